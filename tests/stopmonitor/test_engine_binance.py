"""The engine through the real Binance adapter against the local fake Binance: timeouts and 5XX on
order placement with and without the order at the exchange, and a definite rejection."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import time

import pytest

from stopmonitor.exchange.binance import BinanceExchange, MemoryState
from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.monitor import run_pass

from .exchange.fake_binance import API_KEY, API_SECRET, FakeBinance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("on_binance_testnet", "without_protection")]
ENGINE = EngineSettings(reconcile_after_seconds=30)
ORDER = "/api/v3/order"


@pytest.fixture
def fake():
    with FakeBinance() as f:
        f.script("GET", "/api/v3/account", body={"balances": [{"asset": "BTC", "free": "1.00000000", "locked": "0"}]},
                 times=None)
        yield f


@pytest.fixture
def exchange(fake):
    return BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=0.5, state=MemoryState())


@pytest.fixture
def armed(tenant, symbols):
    from stopmonitor.operations import open_operation

    return open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"))


def events(op):
    from api.models import StopMonitorEvent

    return [(e.event_type, e.payload) for e in StopMonitorEvent.objects.filter(operation=op).order_by("version")]


def later(seconds):
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)


def test_timeout_with_the_order_placed_is_recorded_from_the_exchange_without_a_second_order(fake, exchange, armed):
    fake.delays[("POST", ORDER)] = 1.0  # the fake fills the order after our 0.5 s timeout
    summary = run_pass(exchange, engine=ENGINE)
    assert summary.unknown == 1
    fake.delays.clear()
    time.sleep(0.8)  # the fake finishes filling (in real time the reconcile waits 30 s)
    run_pass(exchange, engine=ENGINE, now=later(31))
    posts = fake.calls("POST", ORDER)
    gets = fake.calls("GET", ORDER)
    assert len(posts) == 1 and len(gets) == 1
    assert gets[0].query["origClientOrderId"] == posts[0].form["newClientOrderId"]
    types = [t for t, _ in events(armed)]
    assert types[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    executed = events(armed)[-2][1]
    assert (executed["executed_qty"], executed["avg_price"]) == ("0.001", "60741.67")


def test_5xx_without_the_order_places_it_once_more_with_the_same_client_order_id(fake, exchange, armed):
    fake.script("POST", ORDER, status=503, body="<html>busy</html>")
    assert run_pass(exchange, engine=ENGINE).unknown == 1
    run_pass(exchange, engine=ENGINE, now=later(31))  # -2013 inside the not-visible window: nothing sent
    assert len(fake.calls("POST", ORDER)) == 1
    run_pass(exchange, engine=ENGINE, now=later(61))
    first, second = fake.calls("POST", ORDER)
    assert first.form["newClientOrderId"] == second.form["newClientOrderId"]
    assert (second.form["quantity"], second.form["side"], second.form["type"]) == ("0.001", "SELL", "MARKET")
    assert [t for t, _ in events(armed)][-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    assert events(armed)[-3][1]["resubmitted"] is True


def test_definite_rejection_is_failed_and_not_retried_in_the_same_pass(fake, exchange, armed):
    fake.script_error("POST", ORDER, 400, -1013, "Filter failure: NOTIONAL")
    summary = run_pass(exchange, engine=ENGINE)
    assert (summary.failed, len(fake.calls("POST", ORDER))) == (1, 1)
    failed = events(armed)[-1]
    assert failed[0] == "FAILED" and failed[1]["code"] == -1013
    armed.refresh_from_db()
    assert armed.status == "ACTIVE"


def test_one_unknown_symbol_does_not_leave_the_others_unprotected(fake, exchange, tenant, symbols):
    """Regression: Binance refuses a bulk bookTicker with -1121 when one symbol is delisted (the
    fake does not know ETHUSDT); the adapter asks symbol by symbol and the pass counts every request."""
    from stopmonitor.operations import open_operation

    btc = open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"))
    eth = open_operation(tenant, symbols["ETHUSDT"], "BUY", D("0.01"), D("2000"), D("1900"))

    summary = run_pass(exchange, engine=ENGINE)

    assert [(r.method, r.path, r.query.get("symbols")) for r in fake.requests] == [
        ("GET", "/api/v3/ticker/bookTicker", '["BTCUSDT","ETHUSDT"]'),
        ("GET", "/api/v3/ticker/bookTicker", '["BTCUSDT"]'),
        ("GET", "/api/v3/ticker/bookTicker", '["ETHUSDT"]'),
        ("GET", "/api/v3/exchangeInfo", '["BTCUSDT"]'),
        ("GET", "/api/v3/account", None),
        ("POST", ORDER, None),
    ]
    assert summary.exchange_requests == 3 + 2  # bulk, then one per symbol; filters and balances
    assert [t for t, _ in events(btc)][-1] == "OPERATION_CLOSED"
    assert [t for t, _ in events(eth)] == ["STOP_SET", "BLOCKED"] and events(eth)[1][1]["reason"] == "MISSING_PRICE"
