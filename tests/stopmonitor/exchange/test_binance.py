"""BinanceExchange against the local fake Binance server (loopback only, recorded real bodies)."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime

import pytest
import requests

from stopmonitor.exchange import binance as binance_module
from stopmonitor.exchange.base import (
    ClockSkew,
    ExchangeUnavailable,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRejectedMaybeFilled,
    OrderRequest,
    RateLimited,
)
from stopmonitor.exchange.binance import BinanceExchange, format_decimal, parse_symbol_filters
from stopmonitor.exchange.state import FILTERS_TTL_SECONDS, CacheState, MemoryState

from .contract import ExchangeContract
from .fake_binance import API_KEY, API_SECRET, FakeBinance, fake_binance, load  # noqa: F401 (fixture)

ORDER = "/api/v3/order"
TIME = "/api/v3/time"
BOOK = "/api/v3/ticker/bookTicker"
INFO = "/api/v3/exchangeInfo"
ACCOUNT = "/api/v3/account"
TOKEN = "sm-op42-stop-a1b2c3"


@pytest.fixture
def state():
    return MemoryState()


@pytest.fixture
def exchange(fake_binance, state):
    ex = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, timeout=2, state=state)
    yield ex
    ex.close()


def sell(quantity="0.00123000", client_order_id=TOKEN, symbol="BTCUSDT", side="SELL") -> OrderRequest:
    return OrderRequest(symbol=symbol, side=side, quantity=Decimal(quantity), client_order_id=client_order_id)


def assert_context_without_secret(exc: BaseException, *parts: str) -> None:
    text = str(exc)
    for part in parts:
        assert part in text, (part, text)
    for secret_bearing in (str(exc), repr(exc), str(exc.__cause__ or ""), repr(exc.__cause__ or "")):
        assert API_SECRET not in secret_bearing


# ----------------------------------------------------------------------------- construction


def test_construction_makes_no_request_and_names_the_venue(fake_binance):
    testnet = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=MemoryState())
    live = BinanceExchange(API_KEY, API_SECRET, testnet=False, api_url=fake_binance.url, state=MemoryState())

    assert (testnet.venue, live.venue) == ("binance-testnet", "binance")
    assert fake_binance.requests == []
    assert API_SECRET not in repr(testnet) and API_KEY not in repr(testnet)


@pytest.mark.parametrize("suffix", [pytest.param("/api", id="rest-base"), pytest.param("", id="host-root"), pytest.param("/", id="host-root-slash")])
def test_live_venue_with_api_url_talks_to_that_url(fake_binance, suffix):
    root = fake_binance.url.removesuffix("/api")
    live = BinanceExchange(API_KEY, API_SECRET, testnet=False, api_url=root + suffix, state=MemoryState())

    live.book_tickers(["BTCUSDT"])

    assert [r.path for r in fake_binance.requests] == [BOOK]


# ----------------------------------------------------------------------------- book tickers


def test_book_tickers_is_one_request_with_a_compact_json_symbols_array(exchange, fake_binance):
    before = datetime.now(timezone.utc)
    quotes = exchange.book_tickers(["NKNUSDT", "BTCUSDT", "BLZETH", "BTCUSDT"])

    (req,) = fake_binance.requests
    assert (req.method, req.path) == ("GET", BOOK)
    assert req.query == {"symbols": '["BLZETH","BTCUSDT","NKNUSDT"]'}
    assert req.signature_valid is None  # public endpoint, not signed
    btc = quotes["BTCUSDT"]
    assert (btc.bid, btc.ask, btc.bid_qty, btc.ask_qty) == (
        Decimal("60741.67000000"),
        Decimal("60741.68000000"),
        Decimal("0.36580000"),
        Decimal("0.45178000"),
    )
    assert quotes["BLZETH"].bid == Decimal("0.00006547") and quotes["BLZETH"].ask == Decimal("0.00006560")
    assert quotes["NKNUSDT"].ask_qty == Decimal("152.00000000")
    assert set(quotes) == {"BLZETH", "BTCUSDT", "NKNUSDT"}
    assert before <= btc.observed_at <= datetime.now(timezone.utc)


def test_book_tickers_refused_for_an_unknown_symbol_asks_each_symbol_once(exchange, fake_binance, caplog):
    """Binance answers -1121 for the whole list; the adapter asks symbol by symbol (the contract
    says what is answered; here: the exact requests, their count and the warning)."""
    with caplog.at_level("WARNING", logger="stopmonitor.exchange.binance"):
        quotes = exchange.book_tickers(["NKNUSDT", "NOPEUSDT", "BTCUSDT"])

    assert [(r.path, r.query) for r in fake_binance.requests] == [
        (BOOK, {"symbols": '["BTCUSDT","NKNUSDT","NOPEUSDT"]'}),
        (BOOK, {"symbols": '["BTCUSDT"]'}),
        (BOOK, {"symbols": '["NKNUSDT"]'}),
        (BOOK, {"symbols": '["NOPEUSDT"]'}),
    ]
    assert (set(quotes), quotes.requests) == ({"BTCUSDT", "NKNUSDT"}, 4)
    (line,) = [r for r in caplog.records if r.name == "stopmonitor.exchange.binance"]
    assert (line.levelname, line.getMessage()) == ("WARNING", "bulk book ticker refused with -1121; asked symbol by symbol")
    assert (line.symbols, line.unknown) == (3, 1) and "-1121" in line.error


def test_book_tickers_of_a_lone_unknown_symbol_is_one_request_and_empty(exchange, fake_binance):
    quotes = exchange.book_tickers(["NOPEUSDT"])

    assert (quotes, quotes.requests) == ({}, 1)
    assert [r.query for r in fake_binance.requests] == [{"symbols": '["NOPEUSDT"]'}]


def test_book_tickers_of_known_symbols_is_one_request(exchange, fake_binance):
    assert exchange.book_tickers(["BTCUSDT", "NKNUSDT"]).requests == 1
    assert exchange.book_tickers([]).requests == 0
    assert len(fake_binance.requests) == 1


def test_another_error_while_asking_symbol_by_symbol_is_raised(exchange, fake_binance):
    fake_binance.script_error("GET", BOOK, 400, -1121, "Invalid symbol.")
    fake_binance.script("GET", BOOK, status=503, body="")

    with pytest.raises(ExchangeUnavailable) as info:
        exchange.book_tickers(["BTCUSDT", "NOPEUSDT"])

    assert 'symbols=["BTCUSDT"]' in str(info.value) and info.value.code != -1121
    assert [r.query for r in fake_binance.requests] == [{"symbols": '["BTCUSDT","NOPEUSDT"]'}, {"symbols": '["BTCUSDT"]'}]


@pytest.mark.parametrize(
    "status, body",
    [
        pytest.param(500, {"code": -1001, "msg": "Internal error; unable to process your request."}, id="500-json"),
        pytest.param(502, "<html><body>502 Bad Gateway</body></html>", id="502-html"),
        pytest.param(503, "", id="503-empty"),
        pytest.param(200, "not json", id="200-not-json"),
        pytest.param(200, [{"symbol": "BTCUSDT", "bidPrice": 1.5, "askPrice": "2", "bidQty": "1", "askQty": "1"}], id="200-float-price"),
    ],
)
def test_book_tickers_server_trouble_is_exchange_unavailable(exchange, fake_binance, status, body):
    fake_binance.script("GET", BOOK, status=status, body=body)

    with pytest.raises(ExchangeUnavailable) as info:
        exchange.book_tickers(["BTCUSDT"])

    assert info.value.__cause__ is not None or "malformed" in str(info.value)


# ----------------------------------------------------------------------------- symbol filters


def test_symbol_filters_parse_the_notional_era_answer(exchange, fake_binance):
    filters = exchange.symbol_filters(["BTCUSDT", "ADAUSDT"])

    (req,) = fake_binance.requests
    assert (req.method, req.path, req.query) == ("GET", INFO, {"symbols": '["ADAUSDT","BTCUSDT"]'})
    btc = filters["BTCUSDT"]
    assert (btc.base_asset, btc.quote_asset, btc.status) == ("BTC", "USDT", "TRADING")
    assert btc.tick_size == Decimal("0.01")
    assert (btc.step_size, btc.min_qty, btc.max_qty) == (Decimal("0.00001"), Decimal("0.00001"), Decimal("9000"))
    assert btc.min_notional == Decimal("5")
    # MARKET_LOT_SIZE stepSize/minQty are 0: LOT_SIZE governs; its maxQty is the tighter one.
    assert (btc.market_step_size, btc.market_min_qty, btc.market_max_qty) == (
        Decimal("0.00001"),
        Decimal("0.00001"),
        Decimal("128.52621715"),
    )
    ada = filters["ADAUSDT"]
    assert (ada.tick_size, ada.step_size, ada.min_qty) == (Decimal("0.0001"), Decimal("0.1"), Decimal("0.1"))


def test_symbol_filters_parse_the_older_min_notional_answer(exchange, fake_binance):
    fake_binance.script("GET", INFO, body=load("exchangeInfo_subset_MIN_NOTIONAL_2021-10-12.json"))

    filters = exchange.symbol_filters(["BTCUSDT", "ETHBTC", "XRPUSDT"])

    assert filters["BTCUSDT"].min_notional == Decimal("10")
    assert filters["ETHBTC"].min_notional == Decimal("0.0001")
    assert filters["ETHBTC"].tick_size == Decimal("0.000001")
    assert (filters["XRPUSDT"].step_size, filters["XRPUSDT"].market_max_qty) == (Decimal("1"), Decimal("9222449"))
    assert set(filters) == {"BTCUSDT", "ETHBTC", "XRPUSDT"}  # the other recorded symbols are not returned


def test_symbol_filters_are_cached_and_only_missing_symbols_are_asked(exchange, fake_binance, state):
    exchange.symbol_filters(["BTCUSDT"])
    again = exchange.symbol_filters(["BTCUSDT"])
    both = exchange.symbol_filters(["BTCUSDT", "ETHUSDT"])

    assert [r.query["symbols"] for r in fake_binance.calls("GET", INFO)] == ['["BTCUSDT"]', '["ETHUSDT"]']
    assert again["BTCUSDT"] == both["BTCUSDT"]
    assert both["ETHUSDT"].step_size == Decimal("0.0001")
    assert state.get_symbol_info("ETHUSDT")["symbol"] == "ETHUSDT"


def test_symbol_filters_refused_for_an_unknown_symbol_ask_each_uncached_symbol_once(exchange, fake_binance, state, caplog):
    exchange.symbol_filters(["BTCUSDT"])  # cached: not asked again
    fake_binance.requests.clear()

    with caplog.at_level("WARNING", logger="stopmonitor.exchange.binance"):
        filters = exchange.symbol_filters(["BTCUSDT", "NOPEUSDT", "ADAUSDT"])

    assert [(r.path, r.query) for r in fake_binance.requests] == [
        (INFO, {"symbols": '["ADAUSDT","NOPEUSDT"]'}),
        (INFO, {"symbols": '["ADAUSDT"]'}),
        (INFO, {"symbols": '["NOPEUSDT"]'}),
    ]
    assert set(filters) == {"BTCUSDT", "ADAUSDT"}
    assert state.get_symbol_info("ADAUSDT") is not None and state.get_symbol_info("NOPEUSDT") is None
    (line,) = [r for r in caplog.records if r.name == "stopmonitor.exchange.binance"]
    assert (line.getMessage(), line.symbols, line.unknown) == (
        "bulk exchangeInfo refused with -1121; asked symbol by symbol", 2, 1)
    assert exchange.symbol_filters(["NOPEUSDT"]) == {} and len(fake_binance.requests) == 4


def test_another_error_while_asking_filters_symbol_by_symbol_is_raised(exchange, fake_binance):
    fake_binance.script_error("GET", INFO, 400, -1121, "Invalid symbol.")
    fake_binance.script_error("GET", INFO, 429, -1003, "Too many requests.")

    with pytest.raises(RateLimited):
        exchange.symbol_filters(["ADAUSDT", "NOPEUSDT"])

    assert [r.query for r in fake_binance.requests] == [{"symbols": '["ADAUSDT","NOPEUSDT"]'}, {"symbols": '["ADAUSDT"]'}]


def test_symbol_filters_cache_lasts_one_hour(exchange, fake_binance, monkeypatch):
    exchange.symbol_filters(["BTCUSDT"])
    real = time.monotonic()
    monkeypatch.setattr("stopmonitor.exchange.state.time.monotonic", lambda: real + FILTERS_TTL_SECONDS + 1)

    exchange.symbol_filters(["BTCUSDT"])

    assert FILTERS_TTL_SECONDS == 3600
    assert len(fake_binance.calls("GET", INFO)) == 2


def test_min_notional_that_does_not_apply_to_market_orders_is_zero():
    entry = json.loads(json.dumps(load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")["symbols"][0]))
    for f in entry["filters"]:
        if f["filterType"] == "NOTIONAL":
            f["applyMinToMarket"] = False

    assert parse_symbol_filters(entry).min_notional == Decimal("0")


# ----------------------------------------------------------------------------- balances


def test_free_balances_is_a_signed_account_read(exchange, fake_binance):
    balances = exchange.free_balances()

    (req,) = fake_binance.requests
    assert (req.method, req.path) == ("GET", ACCOUNT)
    assert req.signature_valid is True
    assert req.headers["X-MBX-APIKEY"] == API_KEY
    assert balances == {"BTC": Decimal("0"), "LTC": Decimal("0.91974100"), "ETH": Decimal("0.02229833")}


# ----------------------------------------------------------------------------- placing


def test_place_market_order_sends_the_exact_signed_request(exchange, fake_binance):
    exchange.place_market_order(sell("0.00123000"))

    (req,) = fake_binance.requests
    assert (req.method, req.path, req.query) == ("POST", ORDER, {})
    form = dict(req.form)
    assert set(form) == {
        "symbol", "side", "type", "quantity", "newClientOrderId", "newOrderRespType", "timestamp", "recvWindow", "signature",
    }  # fmt: skip
    assert {k: form[k] for k in ("symbol", "side", "type", "quantity", "newClientOrderId", "newOrderRespType")} == {
        "symbol": "BTCUSDT",
        "side": "SELL",
        "type": "MARKET",
        "quantity": "0.00123",
        "newClientOrderId": TOKEN,
        "newOrderRespType": "FULL",
    }
    assert abs(int(form["timestamp"]) - time.time() * 1000) < 5000
    assert len(form["signature"]) == 64 and req.signature_valid is True
    assert req.headers["X-MBX-APIKEY"] == API_KEY
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert API_SECRET not in req.raw_body + req.raw_query + json.dumps(req.headers)


@pytest.mark.parametrize(
    "client_order_id",
    [
        pytest.param("sm42-S1-0a1b2c3d", id="engine-token"),
        pytest.param("sm:42/S1.x_y-z", id="colon-slash-dot"),  # legal in newClientOrderId, form-encoded on the wire
    ],
)
def test_signature_covers_the_body_as_sent(exchange, fake_binance, client_order_id):
    exchange.place_market_order(sell(client_order_id=client_order_id))
    exchange.get_order("BTCUSDT", client_order_id)

    post, get = fake_binance.requests
    assert post.form["newClientOrderId"] == get.query["origClientOrderId"] == client_order_id
    assert (post.signature_valid, get.signature_valid) == (True, True)


@pytest.mark.parametrize(
    "quantity, wire",
    [
        pytest.param("0.00123000", "0.00123", id="trailing-zeros-dropped"),
        pytest.param("1E-5", "0.00001", id="exponent-never-sent"),
        pytest.param("0.00000001", "0.00000001", id="one-satoshi"),
        pytest.param("100", "100", id="integer"),
        pytest.param("1E+2", "100", id="positive-exponent"),
        pytest.param("12.50", "12.5", id="one-trailing-zero"),
    ],
)
def test_quantity_goes_on_the_wire_as_a_plain_decimal_string(exchange, fake_binance, quantity, wire):
    assert format_decimal(Decimal(quantity)) == wire

    exchange.place_market_order(sell(quantity))

    assert fake_binance.requests[0].form["quantity"] == wire


def test_full_answer_with_five_fills_gives_the_exact_volume_weighted_price(exchange, fake_binance):
    fake_binance.script("POST", ORDER, body=load("order_market_sell_filled_5_fills_doc_example.json"))

    result = exchange.place_market_order(sell("10", client_order_id="6gCrw2kRUAF9CvJDGP16IP", symbol="BTCUSDT"))

    # (4000*1 + 3999*5 + 3998*2 + 3997*1 + 3995*1) / 10
    assert result.avg_price == Decimal("3998.3")
    assert result.commission == Decimal("39.983")
    assert result.commission_asset == "USDT"
    assert (result.status, result.exchange_order_id, result.client_order_id) == ("FILLED", 28, "6gCrw2kRUAF9CvJDGP16IP")
    assert (result.requested_qty, result.executed_qty) == (Decimal("10"), Decimal("10"))
    assert [f.price for f in result.fills] == [Decimal(p) for p in ("4000", "3999", "3998", "3997", "3995")]
    assert result.transact_time == datetime(2017, 10, 11, 12, 32, 56, 595000, tzinfo=timezone.utc)
    assert result.is_final


def test_older_full_answer_with_commission_in_the_base_asset(exchange, fake_binance):
    fake_binance.script("POST", ORDER, body=load("order_market_buy_filled_2_fills_ADABTC_2018.json"))

    result = exchange.place_market_order(sell("377", client_order_id="ZkUN846GrIvvWtf9DN4bBK", symbol="ADABTC", side="BUY"))

    assert result.avg_price == Decimal("0.00001065")
    assert (result.commission, result.commission_asset) == (Decimal("0.377"), "ADA")
    assert result.cummulative_quote_qty == Decimal("0.00401505")


def test_expired_market_order_with_part_filled_is_a_partial_close(exchange, fake_binance):
    fake_binance.script("POST", ORDER, body=load("order_market_sell_expired_partial_fill_DERIVED.json"))

    result = exchange.place_market_order(sell("10", client_order_id="6gCrw2kRUAF9CvJDGP16IP"))

    assert (result.status, result.executed_qty, result.requested_qty) == ("EXPIRED", Decimal("6"), Decimal("10"))
    assert result.avg_price == Decimal("23995") / Decimal("6")
    assert result.is_final


def test_expired_market_order_with_nothing_filled_has_no_price(exchange, fake_binance):
    fake_binance.script("POST", ORDER, body=load("order_market_sell_expired_zero_fill_DERIVED.json"))

    result = exchange.place_market_order(sell("10", client_order_id="6gCrw2kRUAF9CvJDGP16IP"))

    assert (result.status, result.executed_qty, result.fills, result.avg_price) == ("EXPIRED", Decimal("0"), (), None)


def test_placing_inside_a_database_transaction_fails_before_any_request(exchange, fake_binance, monkeypatch):
    from django.db import connection

    monkeypatch.setattr(connection, "in_atomic_block", True)

    with pytest.raises(AssertionError, match="invariant 2"):
        exchange.place_market_order(sell())

    assert fake_binance.requests == []


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(sell("0"), id="zero-quantity"),
        pytest.param(sell("-1"), id="negative-quantity"),
        pytest.param(sell("NaN"), id="nan-quantity"),
        pytest.param(sell(side="HOLD"), id="bad-side"),
        pytest.param(sell(client_order_id="has space"), id="bad-client-order-id"),
        pytest.param(sell(client_order_id="x" * 37), id="client-order-id-too-long"),
    ],
)
def test_invalid_requests_are_rejected_without_a_request(exchange, fake_binance, request_):
    with pytest.raises(OrderRejected):
        exchange.place_market_order(request_)

    assert fake_binance.requests == []


# ----------------------------------------------------------------------------- error mapping (placing)

EXPECTED_FOR_ORDER = {
    -1121: OrderRejected, -2010: OrderRejectedMaybeFilled, -2011: OrderRejected, -2013: OrderRejected, -1013: OrderRejected,
    -1111: OrderRejected, -1100: OrderRejected, -1102: OrderRejected, -1022: OrderRejected, -2015: OrderRejected,
    -2014: OrderRejected,
    -1021: ClockSkew,
    -1003: RateLimited, -1015: RateLimited,
    -1007: OrderOutcomeUnknown, -1000: OrderOutcomeUnknown,
}  # fmt: skip


def _error_cases():
    for i, entry in enumerate(load("error_bodies_spot.json")):
        code = entry["body"]["code"]
        status = entry["typical_http_status"] or 400  # -1007 has no documented status: the code decides
        yield pytest.param(status, entry["body"], EXPECTED_FOR_ORDER[code], id=f"{i:02d}_{code}_{entry['name'].split()[0]}")


@pytest.mark.parametrize("status, body, expected", list(_error_cases()))
def test_every_documented_error_body_maps_to_the_right_class_for_an_order(exchange, fake_binance, status, body, expected):
    fake_binance.script("POST", ORDER, status=status, body=body, times=2)  # -1021 fails its retry too

    with pytest.raises(expected) as info:
        exchange.place_market_order(sell())

    exc = info.value
    assert type(exc) is expected
    assert exc.code == body["code"]
    assert isinstance(exc.__cause__, Exception)
    assert_context_without_secret(exc, "BTCUSDT", "SELL", "0.00123", TOKEN, str(body["code"]))
    posts = len(fake_binance.calls("POST", ORDER))
    assert posts == (2 if expected is ClockSkew else 1)  # never retried, except once after -1021


def test_rate_limit_codes_on_a_400_do_not_block_reads(exchange, fake_binance):
    fake_binance.script_error("POST", ORDER, 400, -1015, "Too many new orders.")

    with pytest.raises(RateLimited):
        exchange.place_market_order(sell())
    exchange.book_tickers(["BTCUSDT"])

    assert [r.path for r in fake_binance.requests] == [ORDER, BOOK]


@pytest.mark.parametrize("status", [pytest.param(s, id=f"http-{s}") for s in (500, 502, 503, 504)])
def test_5xx_on_placement_is_outcome_unknown(exchange, fake_binance, status):
    fake_binance.script("POST", ORDER, status=status, body="<html>upstream error</html>")

    with pytest.raises(OrderOutcomeUnknown) as info:
        exchange.place_market_order(sell())

    assert_context_without_secret(info.value, "BTCUSDT", "SELL", TOKEN, f"HTTP {status}")
    assert len(fake_binance.requests) == 1


@pytest.mark.parametrize(
    "status, body",
    [
        pytest.param(200, "", id="200-empty-body"),
        pytest.param(200, "<html>ok?</html>", id="200-html"),
        pytest.param(200, {"symbol": "BTCUSDT"}, id="200-json-missing-fields"),
        pytest.param(403, "<html>WAF</html>", id="4xx-without-binance-code"),
    ],
)
def test_unreadable_answers_to_an_order_are_outcome_unknown(exchange, fake_binance, status, body):
    fake_binance.script("POST", ORDER, status=status, body=body)

    with pytest.raises(OrderOutcomeUnknown) as info:
        exchange.place_market_order(sell())

    assert_context_without_secret(info.value, "BTCUSDT", TOKEN)


def test_timeout_on_placement_is_outcome_unknown(fake_binance, state):
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, timeout=0.3, state=state)
    fake_binance.script("POST", ORDER, delay=1.5, body=load("order_market_sell_filled_5_fills_doc_example.json"))

    started = time.monotonic()
    with pytest.raises(OrderOutcomeUnknown) as info:
        exchange.place_market_order(sell())

    assert time.monotonic() - started < 1.4
    assert isinstance(info.value.__cause__, requests.exceptions.Timeout)
    assert_context_without_secret(info.value, "BTCUSDT", "SELL", "0.00123", TOKEN)
    assert len(fake_binance.calls("POST", ORDER)) == 1


def test_connection_refused_is_unknown_for_an_order_and_unavailable_for_a_read(state):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=f"http://127.0.0.1:{port}/api", timeout=1, state=state)

    with pytest.raises(OrderOutcomeUnknown):
        exchange.place_market_order(sell())
    with pytest.raises(ExchangeUnavailable):
        exchange.book_tickers(["BTCUSDT"])


def test_an_echoed_secret_is_scrubbed_from_messages(exchange, fake_binance):
    fake_binance.script("POST", ORDER, status=400, body={"code": -1100, "msg": f"bad value {API_SECRET}"})

    with pytest.raises(OrderRejected) as info:
        exchange.place_market_order(sell())

    assert API_SECRET not in str(info.value) and "***" in str(info.value)


# ----------------------------------------------------------------------------- rate limits


def test_429_with_retry_after_blocks_every_call_until_it_passes(exchange, fake_binance, state, monkeypatch):
    fake_binance.script("POST", ORDER, status=429, body={"code": -1003, "msg": "Too much request weight used"}, headers={"Retry-After": "7"})
    before = datetime.now(timezone.utc)

    with pytest.raises(RateLimited) as info:
        exchange.place_market_order(sell())

    assert info.value.banned is False and info.value.code == -1003
    assert before + timedelta(seconds=7) <= info.value.retry_after <= datetime.now(timezone.utc) + timedelta(seconds=7)
    assert state.get_no_calls_until() == info.value.retry_after
    fake_binance.requests.clear()

    for call in (
        lambda: exchange.book_tickers(["BTCUSDT"]),
        lambda: exchange.symbol_filters(["BTCUSDT"]),
        exchange.free_balances,
        lambda: exchange.get_order("BTCUSDT", TOKEN),
        lambda: exchange.place_market_order(sell(client_order_id="sm-another")),
    ):
        with pytest.raises(RateLimited) as blocked:
            call()
        assert blocked.value.retry_after == info.value.retry_after
    assert fake_binance.requests == []

    later = info.value.retry_after + timedelta(seconds=1)
    monkeypatch.setattr(binance_module, "_now", lambda: later)
    assert "BTCUSDT" in exchange.book_tickers(["BTCUSDT"])
    assert len(fake_binance.requests) == 1


def test_429_without_retry_after_waits_60_seconds(exchange, fake_binance):
    fake_binance.script("GET", BOOK, status=429, body={"code": -1003, "msg": "Too much request weight used"})
    before = datetime.now(timezone.utc)

    with pytest.raises(RateLimited) as info:
        exchange.book_tickers(["BTCUSDT"])

    assert before + timedelta(seconds=60) <= info.value.retry_after <= datetime.now(timezone.utc) + timedelta(seconds=60)


def test_retry_after_as_an_http_date_is_honoured(exchange, fake_binance):
    until = (datetime.now(timezone.utc) + timedelta(minutes=5)).replace(microsecond=0)
    fake_binance.script("GET", BOOK, status=429, body="", headers={"Retry-After": format_datetime(until, usegmt=True)})

    with pytest.raises(RateLimited) as info:
        exchange.book_tickers(["BTCUSDT"])

    assert info.value.retry_after == until


def test_418_ban_is_shared_with_the_next_pod(fake_binance, state):
    first = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=state)
    fake_binance.script("GET", BOOK, status=418, body={"code": -1003, "msg": "Way too much request weight used; IP banned"}, headers={"Retry-After": "7200"})
    with pytest.raises(RateLimited) as info:
        first.book_tickers(["BTCUSDT"])
    assert info.value.banned is True
    fake_binance.requests.clear()

    next_pod = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=state)
    with pytest.raises(RateLimited) as blocked:
        next_pod.place_market_order(sell())
    with pytest.raises(RateLimited):
        next_pod.book_tickers(["BTCUSDT"])

    assert blocked.value.retry_after == info.value.retry_after
    assert blocked.value.retry_after >= datetime.now(timezone.utc) + timedelta(seconds=7190)
    assert fake_binance.requests == []


def test_a_shorter_horizon_never_shortens_a_ban(state):
    now = datetime.now(timezone.utc)
    state.set_no_calls_until(now + timedelta(hours=2))
    state.set_no_calls_until(now + timedelta(seconds=60))

    assert state.get_no_calls_until() == now + timedelta(hours=2)


# ----------------------------------------------------------------------------- clock skew


def test_1021_on_placement_resyncs_the_clock_and_retries_exactly_once(exchange, fake_binance, state):
    skew_ms = 5000
    fake_binance.script_error("POST", ORDER, 400, -1021, "Timestamp for this request is outside of the recvWindow.")
    fake_binance.script("GET", TIME, body={"serverTime": int(time.time() * 1000) + skew_ms})

    result = exchange.place_market_order(sell())

    assert [(r.method, r.path) for r in fake_binance.requests] == [("POST", ORDER), ("GET", TIME), ("POST", ORDER)]
    first, _, retry = fake_binance.requests
    assert first.form["newClientOrderId"] == retry.form["newClientOrderId"] == TOKEN
    assert retry.form["quantity"] == "0.00123" and retry.signature_valid is True
    assert abs(state.get_time_offset_ms() - skew_ms) < 1000
    assert abs(int(retry.form["timestamp"]) - int(first.form["timestamp"]) - skew_ms) < 1000
    assert result.client_order_id == TOKEN and result.status == "FILLED"


def test_1021_twice_is_clock_skew_after_one_retry(exchange, fake_binance):
    fake_binance.script_error("POST", ORDER, 400, -1021, "Timestamp for this request is outside of the recvWindow.", times=2)

    with pytest.raises(ClockSkew) as info:
        exchange.place_market_order(sell())

    assert [(r.method, r.path) for r in fake_binance.requests] == [("POST", ORDER), ("GET", TIME), ("POST", ORDER)]
    assert_context_without_secret(info.value, "BTCUSDT", TOKEN, "-1021")


def test_1021_when_the_server_time_cannot_be_read_is_clock_skew_without_retry(exchange, fake_binance):
    fake_binance.script_error("POST", ORDER, 400, -1021, "Timestamp for this request is outside of the recvWindow.")
    fake_binance.script("GET", TIME, status=503, body="")

    with pytest.raises(ClockSkew):
        exchange.place_market_order(sell())

    assert [(r.method, r.path) for r in fake_binance.requests] == [("POST", ORDER), ("GET", TIME)]


def test_1021_on_a_signed_read_resyncs_and_retries(exchange, fake_binance):
    fake_binance.script_error("GET", ACCOUNT, 400, -1021, "Timestamp for this request is outside of the recvWindow.")

    assert exchange.free_balances()["LTC"] == Decimal("0.91974100")
    assert [r.path for r in fake_binance.requests] == [ACCOUNT, TIME, ACCOUNT]


def test_a_new_instance_signs_with_the_stored_offset(fake_binance, state):
    state.set_time_offset_ms(-30_000)
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=state)

    exchange.free_balances()

    sent = int(fake_binance.requests[0].query["timestamp"])
    assert abs(sent - (time.time() * 1000 - 30_000)) < 2000


# ----------------------------------------------------------------------------- get_order


def test_get_order_is_a_signed_read_by_client_order_id(exchange, fake_binance):
    fake_binance.script("GET", ORDER, body=load("get_order_market_sell_filled_LTCUSDT.json"))

    result = exchange.get_order("LTCUSDT", "x-R4BD3S825806ed40c861260428a48c")

    (req,) = fake_binance.requests
    assert (req.method, req.path) == ("GET", ORDER)
    assert req.query["symbol"] == "LTCUSDT"
    assert req.query["origClientOrderId"] == "x-R4BD3S825806ed40c861260428a48c"
    assert req.signature_valid is True and req.headers["X-MBX-APIKEY"] == API_KEY
    assert (result.exchange_order_id, result.status, result.executed_qty) == (3397148653, "FILLED", Decimal("0.1"))
    assert result.fills == () and result.avg_price == Decimal("90.8")
    assert result.transact_time == datetime.fromtimestamp(1679571174.472, tz=timezone.utc)


def test_get_order_of_an_unknown_order_is_none(exchange, fake_binance):
    fake_binance.script_error("GET", ORDER, 400, -2013, "Order does not exist.")

    assert exchange.get_order("BTCUSDT", TOKEN) is None


@pytest.mark.parametrize("status", [pytest.param(s, id=f"http-{s}") for s in (500, 503)])
def test_5xx_on_get_order_is_exchange_unavailable(exchange, fake_binance, status):
    fake_binance.script("GET", ORDER, status=status, body={"code": -1001, "msg": "Internal error"})

    with pytest.raises(ExchangeUnavailable) as info:
        exchange.get_order("BTCUSDT", TOKEN)

    assert_context_without_secret(info.value, "BTCUSDT", TOKEN)


def test_other_4xx_on_get_order_is_unavailable_not_none(exchange, fake_binance):
    fake_binance.script_error("GET", ORDER, 401, -2015, "Invalid API-key, IP, or permissions for action.")

    with pytest.raises(ExchangeUnavailable) as info:
        exchange.get_order("BTCUSDT", TOKEN)

    assert info.value.code == -2015


# ----------------------------------------------------------------------------- Django cache state


@pytest.fixture
def locmem_cache(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "binance-tests"}}
    from django.core.cache import cache

    cache.clear()
    yield cache
    cache.clear()


def test_symbol_entry_of_the_shared_cache_is_answered_from_memory_for_a_minute(locmem_cache, monkeypatch):
    """A close reads its symbol's filters before its order: another process's entry costs one cache
    read, then this process's copy answers for SHARED_COPY_SECONDS; what it fetched itself answers
    for the entry's own TTL without the cache."""
    from stopmonitor.exchange import state as state_module

    entry = load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")["symbols"][0]
    locmem_cache.set("stopmonitor:binance:copy:symbol:BTCUSDT", entry)  # written by another process
    state = CacheState(prefix="stopmonitor:binance:copy:")
    reads = []
    real_get = locmem_cache.get
    monkeypatch.setattr(locmem_cache, "get", lambda key, *a, **k: reads.append(key) or real_get(key, *a, **k))
    clock = [1000.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: clock[0])

    assert state.get_symbol_info("BTCUSDT") == entry
    assert state.get_symbol_info("BTCUSDT") == entry
    assert reads == ["stopmonitor:binance:copy:symbol:BTCUSDT"]
    clock[0] += state_module.SHARED_COPY_SECONDS + 1
    locmem_cache.set("stopmonitor:binance:copy:symbol:BTCUSDT", {**entry, "status": "HALT"})  # refreshed elsewhere
    assert state.get_symbol_info("BTCUSDT")["status"] == "HALT"
    assert len(reads) == 2

    state.set_symbol_info("ETHUSDT", entry, ttl_seconds=3600)  # fetched here
    clock[0] += 3000
    assert state.get_symbol_info("ETHUSDT") == entry
    assert len(reads) == 2
    clock[0] += 601
    assert state.get_symbol_info("ETHUSDT") == entry  # expired here: read from the shared cache again
    assert len(reads) == 3


def test_default_state_is_the_django_cache_per_venue(fake_binance, locmem_cache):
    first = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url)
    fake_binance.script("GET", BOOK, status=418, body={"code": -1003, "msg": "banned"}, headers={"Retry-After": "600"})
    with pytest.raises(RateLimited):
        first.book_tickers(["BTCUSDT"])
    fake_binance.requests.clear()

    assert isinstance(first.state, CacheState)
    assert locmem_cache.get("stopmonitor:binance:binance-testnet:no_calls_until")
    next_pod = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url)
    with pytest.raises(RateLimited):
        next_pod.book_tickers(["BTCUSDT"])
    assert fake_binance.requests == []

    live = BinanceExchange(API_KEY, API_SECRET, testnet=False, api_url=fake_binance.url)
    live.book_tickers(["BTCUSDT"])  # a testnet ban does not block the live venue
    assert len(fake_binance.requests) == 1


def test_cache_state_round_trips_offset_and_filters(locmem_cache):
    state = CacheState(prefix="stopmonitor:binance:test:")
    entry = load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")["symbols"][0]

    state.set_time_offset_ms(-1234)
    state.set_symbol_info("BTCUSDT", entry)

    assert state.get_time_offset_ms() == -1234
    assert state.get_symbol_info("BTCUSDT") == entry
    assert state.get_symbol_info("ETHUSDT") is None
    assert state.get_no_calls_until() is None


# ----------------------------------------------------------------------------- the contract


class BinanceHooks:
    def script_partial_expiry(self, exchange, fill_qty, reason):
        self.fake.account.next_order(fill_qty=fill_qty, expiry_reason=reason)

    def script_free_balance(self, exchange, asset, amount):
        self.fake.account.set_balance(asset, amount)


class TestBinanceContract(BinanceHooks, ExchangeContract):
    """The contract through the real adapter, HTTP and signing, against the fake's account."""

    known_symbols = ("BTCUSDT", "NKNUSDT")

    @pytest.fixture
    def exchange(self, fake_binance):
        self.fake = fake_binance
        return BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=MemoryState())


# ----------------------------------------------------------------------------- evidence (issue #12)

TRADES = "/api/v3/myTrades"


def test_my_trades_of_an_order_is_one_signed_read_parsed_from_the_recorded_answer(exchange, fake_binance):
    fake_binance.script("GET", TRADES, body=load("my_trades_LTCUSDT.json"))

    (trade,) = exchange.account_trades("LTCUSDT", order_id=3784695242)

    (req,) = fake_binance.requests
    assert (req.method, req.path, req.signature_valid) == ("GET", TRADES, True)
    assert {k: req.query[k] for k in ("symbol", "orderId", "limit", "recvWindow")} == {
        "symbol": "LTCUSDT", "orderId": "3784695242", "limit": "1000", "recvWindow": "5000"}
    assert "startTime" not in req.query
    assert (trade.trade_id, trade.order_id, trade.price, trade.qty, trade.quote_qty) == (
        309520010, 3784695242, Decimal("69.63"), Decimal("0.2"), Decimal("13.926"))
    assert (trade.commission, trade.commission_asset, trade.is_buyer) == (Decimal("0.013926"), "USDT", False)
    assert trade.time == datetime(2023, 10, 24, 9, 16, 32, 358000, tzinfo=timezone.utc)


def test_my_trades_since_sends_start_time_in_milliseconds(exchange, fake_binance):
    since = datetime(2026, 3, 2, 12, 0, 1, 250000, tzinfo=timezone.utc)

    assert exchange.account_trades("BTCUSDT", since=since) == []

    assert fake_binance.requests[0].query["startTime"] == str(int(since.timestamp() * 1000))


def test_my_trades_malformed_is_unavailable_and_1021_is_retried_once(exchange, fake_binance):
    fake_binance.script("GET", TRADES, body=[{"symbol": "BTCUSDT", "id": 1}])
    with pytest.raises(ExchangeUnavailable):
        exchange.account_trades("BTCUSDT", order_id=1)
    fake_binance.requests.clear()
    fake_binance.script_error("GET", TRADES, 400, -1021, "Timestamp for this request is outside of the recvWindow.")

    assert exchange.account_trades("BTCUSDT", order_id=1) == []
    assert [r.path for r in fake_binance.requests] == [TRADES, TIME, TRADES]


def test_a_get_answer_without_fills_has_unknown_commission_not_zero(exchange, fake_binance):
    fake_binance.script("GET", ORDER, body=load("get_order_market_sell_filled_LTCUSDT.json"))

    result = exchange.get_order("LTCUSDT", "x-R4BD3S825806ed40c861260428a48c")

    assert (result.commission, result.commission_asset) == (None, None)


@pytest.mark.parametrize("status, reason, expected", [
    pytest.param("EXPIRED", "EXECUTION_RULE_PRICE_RANGE_EXCEEDED", "EXECUTION_RULE_PRICE_RANGE_EXCEEDED", id="price-range"),
    pytest.param("EXPIRED", "INSUFFICIENT_LIQUIDITY", "INSUFFICIENT_LIQUIDITY", id="liquidity"),
    pytest.param("EXPIRED_IN_MATCH", None, "SELF_TRADE_PREVENTION", id="stp-without-reason"),
    pytest.param("FILLED", "NONE", None, id="filled-none"),
])
def test_the_expiry_reason_is_recorded(exchange, fake_binance, status, reason, expected):
    body = load("order_market_sell_expired_partial_fill_DERIVED.json")
    body["status"] = status
    if reason:
        body["expiryReason"] = reason
    fake_binance.script("POST", ORDER, body=body)

    result = exchange.place_market_order(sell("10", client_order_id="6gCrw2kRUAF9CvJDGP16IP"))

    assert (result.status, result.expiry_reason, result.executed_qty) == (status, expected, Decimal("6"))


def test_a_refused_close_after_a_filled_one_is_maybe_filled(exchange, fake_binance):
    fake_binance.account.set_balance("BTC", "0.00123")
    exchange.place_market_order(sell("0.00123"))

    with pytest.raises(OrderRejectedMaybeFilled) as info:
        exchange.place_market_order(sell("0.00123"))  # the same client order id, the balance is gone

    assert info.value.code == -2010 and "may have filled" in str(info.value)


def test_symbol_status_is_surfaced_and_fresh_filters_bypass_the_cache(exchange, fake_binance):
    assert exchange.symbol_filters(["BTCUSDT"])["BTCUSDT"].not_trading is False
    info = json.loads(json.dumps(fake_binance.exchange_info))
    info["symbols"][0]["status"] = "HALT"
    fake_binance.exchange_info = info

    cached = exchange.symbol_filters(["BTCUSDT"])["BTCUSDT"]
    fresh = exchange.symbol_filters(["BTCUSDT"], fresh=True)["BTCUSDT"]

    assert (cached.status, fresh.status, fresh.not_trading) == ("TRADING", "HALT", True)
    assert exchange.symbol_filters(["BTCUSDT"])["BTCUSDT"].status == "HALT"  # the cache was refreshed
    assert len(fake_binance.calls("GET", INFO)) == 2


@pytest.mark.parametrize("window, sent", [pytest.param(5000, "5000", id="default"), pytest.param(2500, "2500", id="set")])
def test_recv_window_is_sent_on_every_signed_request(fake_binance, window, sent):
    ex = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake_binance.url, state=MemoryState(),
                         recv_window_ms=window)
    ex.place_market_order(sell())
    ex.free_balances()

    assert [r.params["recvWindow"] for r in fake_binance.requests] == [sent, sent]


@pytest.mark.parametrize("window", [0, -1, 60001])
def test_a_recv_window_binance_refuses_is_refused_at_construction(window):
    with pytest.raises(ValueError, match="recvWindow"):
        BinanceExchange(API_KEY, API_SECRET, testnet=True, state=MemoryState(), recv_window_ms=window)


def test_the_stock_library_signs_what_it_does_not_send(fake_binance):
    """Why ``_Client`` exists: python-binance signs raw values but sends them form-encoded."""
    from binance.client import Client

    stock = Client(API_KEY, API_SECRET, testnet=True, ping=False)
    stock.API_TESTNET_URL = fake_binance.url
    stock.create_order(symbol="BTCUSDT", side="SELL", type="MARKET", quantity="0.001", newClientOrderId="sm:42/S1")

    assert fake_binance.requests[0].signature_valid is False


def test_the_signature_covers_the_percent_encoded_payload(exchange, fake_binance):
    exchange.place_market_order(sell(client_order_id="sm:42/S1.x_y-z"))

    (req,) = fake_binance.requests
    assert "newClientOrderId=sm%3A42%2FS1.x_y-z&" in req.raw_body and req.signature_valid is True


def _ed25519(passphrase: str | None = None):
    from Crypto.PublicKey import ECC

    key = ECC.generate(curve="Ed25519")
    if passphrase:
        pem = key.export_key(format="PEM", passphrase=passphrase, protection="PBKDF2WithHMAC-SHA512AndAES256-CBC",
                             prot_params={"iteration_count": 1000})
    else:
        pem = key.export_key(format="PEM")
    return pem, key.public_key()


@pytest.mark.parametrize("passphrase", [pytest.param(None, id="plain"), pytest.param("s3cret-pass", id="encrypted")])
def test_ed25519_keys_sign_every_signed_request(fake_binance, passphrase):
    pem, public = _ed25519(passphrase)
    fake_binance.public_key = public
    ex = BinanceExchange(API_KEY, None, testnet=True, api_url=fake_binance.url, state=MemoryState(),
                         private_key=pem, private_key_passphrase=passphrase)

    ex.place_market_order(sell(client_order_id="sm:42/S1"))
    ex.get_order("BTCUSDT", "sm:42/S1")
    ex.free_balances()
    ex.account_trades("BTCUSDT", since=datetime.now(timezone.utc) - timedelta(minutes=1))

    assert ex.key_type == "Ed25519"
    assert [r.signature_valid for r in fake_binance.requests] == [True, True, True, True]
    assert all(r.headers["X-MBX-APIKEY"] == API_KEY for r in fake_binance.requests)
    assert pem not in repr(ex)


def test_a_wrong_ed25519_signature_is_seen_by_the_fake(fake_binance):
    pem, _ = _ed25519()
    _, other_public = _ed25519()
    fake_binance.public_key = other_public
    ex = BinanceExchange(API_KEY, None, testnet=True, api_url=fake_binance.url, state=MemoryState(), private_key=pem)

    with pytest.raises(ExchangeUnavailable, match="-1022"):  # refused as Binance refuses it
        ex.free_balances()

    assert fake_binance.requests[0].signature_valid is False


@pytest.mark.parametrize("pem, passphrase", [
    pytest.param("not a key", None, id="not-pem"),
    pytest.param(None, "wrong", id="wrong-passphrase"),
])
def test_an_unreadable_private_key_is_a_clear_error_without_the_key(pem, passphrase):
    if pem is None:
        pem, _ = _ed25519("right")
    with pytest.raises(ValueError, match="not a readable Ed25519/RSA private key") as info:
        BinanceExchange(API_KEY, None, testnet=True, state=MemoryState(), private_key=pem, private_key_passphrase=passphrase)

    assert pem not in str(info.value)


@pytest.mark.parametrize("secret", [None, ""])
def test_a_signed_request_without_a_secret_is_refused_before_it_is_sent(fake_binance, state, secret):
    """python-binance asserted ("API Secret required for private endpoints"): an AssertionError that
    no caller maps, which killed the monitor's start and the readiness probe's thread on CI."""
    from stopmonitor.exchange.base import KeysMissing, OrderRequest

    ex = BinanceExchange(API_KEY, secret, testnet=True, api_url=fake_binance.url, timeout=2, state=state)
    with pytest.raises(KeysMissing, match="not sent, no API secret or private key is configured"):
        ex.free_balances()
    with pytest.raises(KeysMissing) as placing:
        ex.place_market_order(OrderRequest("BTCUSDT", "SELL", Decimal("0.001"), "sm-nokeys-1"))
    assert placing.value.maybe_filled is False and placing.value.account_refusal is True
    assert [r.path for r in fake_binance.calls("POST")] == []
    assert [r for r in fake_binance.calls() if "signature=" in (r.raw_query or "") + (r.raw_body or "")] == []
    assert ex.book_tickers(["BTCUSDT"])["BTCUSDT"].bid == Decimal("60741.67")  # public reads need no key
