"""The protection calls of BinanceExchange against the fake Binance: request shapes, the four
cancelReplace outcomes, and the existing faults (5XX, timeouts, HTML pages, 429) on the new calls."""

from __future__ import annotations

import time
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import (
    CancelReplaceCancelFailed,
    CancelReplaceNewFailed,
    CancelReplaceUnknown,
    ExchangeUnavailable,
    OcoRequest,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    RateLimited,
    StopOrderRequest,
)
from stopmonitor.exchange.binance import BinanceExchange
from stopmonitor.exchange.state import MemoryState

from .contract import ProtectionContract
from .fake_binance import API_KEY, API_SECRET, FakeBinance

ORDER = "/api/v3/order"
CANCEL_REPLACE = "/api/v3/order/cancelReplace"
OCO = "/api/v3/orderList/oco"
AMEND = "/api/v3/order/amend/keepPriority"
OPEN = "/api/v3/openOrders"


@pytest.fixture
def fake():
    with FakeBinance() as server:
        server.set_wallet(BTC="1", USDT="0")
        server.set_last_price("BTCUSDT", "60000")
        yield server


@pytest.fixture
def exchange(fake):
    ex = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=2, state=MemoryState())
    yield ex
    ex.close()


class TestBinanceProtectionContract(ProtectionContract):
    @pytest.fixture
    def exchange(self, fake):
        self.fake = fake
        return BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, state=MemoryState())

    def cross(self, exchange, price):
        self.fake.set_last_price(self.symbol, price)


STOP = StopOrderRequest("BTCUSDT", "SELL", D("0.40000000"), D("57000.00"), "sp42-1")
CLOSE = OrderRequest("BTCUSDT", "SELL", D("0.4"), "sm42-S1-a1b2c3d4")


def test_stop_request_is_a_signed_stop_loss_with_decimal_strings(exchange, fake):
    exchange.place_stop_order(STOP)

    (req,) = fake.calls("POST", ORDER)
    assert req.signature_valid is True
    assert {k: v for k, v in req.form.items() if k not in ("timestamp", "signature", "recvWindow")} == {
        "symbol": "BTCUSDT", "side": "SELL", "type": "STOP_LOSS", "quantity": "0.4", "stopPrice": "57000",
        "newClientOrderId": "sp42-1", "newOrderRespType": "RESULT"}


@pytest.mark.parametrize("side, stop_leg, limit_leg", [pytest.param("SELL", "below", "above", id="sell-list-long"),
                                                       pytest.param("BUY", "above", "below", id="buy-list-short")])
def test_oco_request_puts_the_stop_and_the_limit_maker_on_the_right_legs(exchange, fake, side, stop_leg, limit_leg):
    stop, limit = (D("57000"), D("65000")) if side == "SELL" else (D("65000"), D("57000"))
    exchange.place_oco(OcoRequest("BTCUSDT", side, D("0.4"), stop, limit, "sp42-1", "sp42-1t", "sp42-1l"))

    (req,) = fake.calls("POST", OCO)
    assert req.signature_valid is True
    assert (req.form[f"{stop_leg}Type"], req.form[f"{stop_leg}StopPrice"], req.form[f"{stop_leg}ClientOrderId"]) == (
        "STOP_LOSS", str(stop), "sp42-1")
    assert (req.form[f"{limit_leg}Type"], req.form[f"{limit_leg}Price"], req.form[f"{limit_leg}ClientOrderId"]) == (
        "LIMIT_MAKER", str(limit), "sp42-1t")
    assert (req.form["listClientOrderId"], req.form["quantity"]) == ("sp42-1l", "0.4")


def test_cancel_replace_200_sends_stop_on_failure_only_new_and_records_both(exchange, fake):
    exchange.place_stop_order(STOP)

    result = exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    (req,) = fake.calls("POST", CANCEL_REPLACE)
    assert req.signature_valid is True
    assert {k: req.form[k] for k in ("cancelReplaceMode", "cancelRestrictions", "cancelOrigClientOrderId", "type",
                                     "side", "quantity", "newClientOrderId", "newOrderRespType")} == {
        "cancelReplaceMode": "STOP_ON_FAILURE", "cancelRestrictions": "ONLY_NEW", "cancelOrigClientOrderId": "sp42-1",
        "type": "MARKET", "side": "SELL", "quantity": "0.4", "newClientOrderId": "sm42-S1-a1b2c3d4",
        "newOrderRespType": "FULL"}
    assert (result.cancelled.client_order_id, result.cancelled.status, result.cancelled.order_type) == (
        "sp42-1", "CANCELED", "STOP_LOSS")
    assert (result.new.status, result.new.executed_qty, result.new.avg_price) == ("FILLED", D("0.4"), D("60741.67"))


def test_cancel_replace_400_is_cancel_failed_with_the_cancel_code(exchange, fake):
    fake.script_error("POST", CANCEL_REPLACE, 400, -2022, "Order cancel-replace failed.")  # no data: not the table
    with pytest.raises(CancelReplaceUnknown):
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    exchange.place_stop_order(STOP)
    fake.set_last_price("BTCUSDT", "56000")  # the exchange stop fires first
    with pytest.raises(CancelReplaceCancelFailed) as info:
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    assert (info.value.code, info.value.cancel_code) == (-2022, -2011)
    assert "sm42-S1-a1b2c3d4" in str(info.value) and API_SECRET not in str(info.value)
    assert fake.orders["sp42-1"]["status"] == "FILLED" and "sm42-S1-a1b2c3d4" not in fake.orders


def test_cancel_replace_409_is_new_failed_with_the_cancelled_protection(exchange, fake):
    exchange.place_stop_order(STOP)

    with pytest.raises(CancelReplaceNewFailed) as info:
        exchange.cancel_replace("BTCUSDT", "sp42-1", OrderRequest("BTCUSDT", "SELL", D("2"), "sm42-S1-a1b2c3d4"))

    assert (info.value.code, info.value.new_code) == (-2021, -2010)
    assert (info.value.cancelled.client_order_id, info.value.cancelled.status) == ("sp42-1", "CANCELED")
    assert fake.open() == []


def test_the_doc_example_409_body_parses(exchange, fake):
    body = {"code": -2021, "msg": "Order cancel-replace partially failed.", "data": {
        "cancelResult": "SUCCESS", "newOrderResult": "FAILURE",
        "cancelResponse": {"symbol": "BTCUSDT", "origClientOrderId": "sp42-1", "orderId": 3, "orderListId": -1,
                           "clientOrderId": "G1kLo6aDv2KGNTFcjfTSFq", "transactTime": 1684804350068,
                           "price": "0.006123", "origQty": "10000.000000", "executedQty": "0.000000",
                           "origQuoteOrderQty": "0.000000", "cummulativeQuoteQty": "0.000000", "status": "CANCELED",
                           "timeInForce": "GTC", "type": "LIMIT_MAKER", "side": "SELL",
                           "selfTradePreventionMode": "NONE"},
        "newOrderResponse": {"code": -2010, "msg": "Order would immediately match and take."}}}
    fake.script("POST", CANCEL_REPLACE, status=409, body=body)  # Binance "Cancel an Existing Order…", verbatim

    with pytest.raises(CancelReplaceNewFailed) as info:
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    assert (info.value.cancelled.exchange_order_id, info.value.cancelled.requested_qty) == (3, D("10000"))


@pytest.mark.parametrize("status, body", [
    pytest.param(500, {"code": -1001, "msg": "Internal error"}, id="500"),
    pytest.param(502, "<html>502 Bad Gateway</html>", id="502-html"),
    pytest.param(400, {"code": -1007, "msg": "Timeout waiting for response from backend server."}, id="-1007"),
    pytest.param(200, "not json", id="200-not-json"),
])
def test_cancel_replace_without_a_usable_answer_is_unknown_naming_both_ids(exchange, fake, status, body):
    fake.script("POST", CANCEL_REPLACE, status=status, body=body)

    with pytest.raises(CancelReplaceUnknown) as info:
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    assert (info.value.cancel_client_order_id, info.value.new_client_order_id) == ("sp42-1", "sm42-S1-a1b2c3d4")
    assert isinstance(info.value, OrderOutcomeUnknown)


def test_cancel_replace_timeout_is_unknown(fake):
    ex = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=0.3, state=MemoryState())
    fake.script("POST", CANCEL_REPLACE, delay=3.0, body={})
    started = time.monotonic()
    with pytest.raises(CancelReplaceUnknown):
        ex.cancel_replace("BTCUSDT", "sp42-1", CLOSE)
    assert time.monotonic() - started < 2.5 and len(fake.calls("POST", CANCEL_REPLACE)) == 1


def test_cancel_replace_refused_before_either_leg_is_a_plain_rejection(exchange, fake):
    exchange.place_stop_order(STOP)
    fake.script_error("POST", CANCEL_REPLACE, 400, -1013, "Filter failure: LOT_SIZE")

    with pytest.raises(OrderRejected) as info:
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)

    assert type(info.value) is OrderRejected and info.value.code == -1013
    assert [o["clientOrderId"] for o in fake.open()] == ["sp42-1"]


@pytest.mark.parametrize("call", ["stop", "oco", "amend", "cancel"])
def test_placing_calls_on_5xx_or_timeout_are_unknown_and_429_is_rate_limited(exchange, fake, call):
    path, method = {"stop": (ORDER, "POST"), "oco": (OCO, "POST"), "amend": (AMEND, "PUT"), "cancel": (ORDER, "DELETE")}[call]
    do = {"stop": lambda: exchange.place_stop_order(STOP),
          "oco": lambda: exchange.place_oco(OcoRequest("BTCUSDT", "SELL", D("0.4"), D("57000"), D("65000"),
                                                       "sp42-1", "sp42-1t", "sp42-1l")),
          "amend": lambda: exchange.amend_quantity("BTCUSDT", "sp42-1", D("0.2")),
          "cancel": lambda: exchange.cancel_order("BTCUSDT", "sp42-1")}[call]
    fake.script(method, path, status=503, body="<html>503</html>")
    with pytest.raises(OrderOutcomeUnknown):
        do()
    fake.script(method, path, status=429, body={"code": -1003, "msg": "Too many requests"}, headers={"Retry-After": "7"})
    with pytest.raises(RateLimited):
        do()
    with pytest.raises(RateLimited):  # the ban horizon holds: no request sent
        do()
    assert len(fake.calls(method, path)) == 2


def test_open_orders_of_every_symbol_is_one_request_and_unavailable_on_5xx(exchange, fake):
    exchange.place_stop_order(STOP)
    orders = exchange.open_orders()

    assert [(o.client_order_id, o.order_type, o.stop_price, o.status) for o in orders] == [
        ("sp42-1", "STOP_LOSS", D("57000"), "NEW")]
    (req,) = fake.calls("GET", OPEN)
    assert "symbol" not in req.query and req.signature_valid is True
    fake.script("GET", OPEN, status=500, body={"code": -1001, "msg": "Internal error"})
    with pytest.raises(ExchangeUnavailable):
        exchange.open_orders("BTCUSDT")


def test_amend_sends_the_same_client_order_id(exchange, fake):
    exchange.place_stop_order(STOP)
    exchange.amend_quantity("BTCUSDT", "sp42-1", D("0.25"))

    (req,) = fake.calls("PUT", AMEND)
    assert (req.form["origClientOrderId"], req.form["newClientOrderId"], req.form["newQty"]) == ("sp42-1", "sp42-1", "0.25")
    assert req.signature_valid is True


def test_nothing_is_sent_for_a_bad_client_order_id_or_inside_a_transaction(exchange, fake, monkeypatch):
    from django.db import connection

    with pytest.raises(OrderRejected):
        exchange.place_stop_order(StopOrderRequest("BTCUSDT", "SELL", D("1"), D("1"), "bad id with spaces"))
    monkeypatch.setattr(connection, "in_atomic_block", True)
    with pytest.raises(AssertionError, match="invariant 2"):
        exchange.cancel_replace("BTCUSDT", "sp42-1", CLOSE)
    assert fake.requests == []
