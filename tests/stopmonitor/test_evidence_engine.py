"""Issue #12, one test per item with its failing input, through the engine against the fake Binance
account (in process: :class:`AccountExchange`; the HTTP server and the real adapter where it matters)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import psycopg
import pytest
from django.db import connection

from stopmonitor.engine.close import close_operation
from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.monitor import run_pass
from stopmonitor.exchange.binance import BinanceExchange
from stopmonitor.exchange.state import MemoryState

from .exchange.fake_binance import API_KEY, API_SECRET, Account, AccountExchange, FakeBinance

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("on_binance_testnet", "without_protection")]
ENGINE = EngineSettings(quote_max_age_seconds=10, reconcile_after_seconds=30, breaker_threshold=3,
                        breaker_cooldown_seconds=300)
T0 = 1772452800.0  # 2026-03-02T12:00:00Z


def quotes(bid="9150.00"):
    return {"BTCUSDT": {"symbol": "BTCUSDT", "bidPrice": bid, "askPrice": "9150.01", "bidQty": "5", "askQty": "5"}}


@pytest.fixture
def account():
    return Account(balances={"BTC": "1", "USDT": "0"}, quotes=quotes(), clock=lambda: T0)


@pytest.fixture
def ex(account):
    return AccountExchange(account)


def at(account, seconds):
    """Move the account's clock to ``seconds`` after T0 and return that time."""
    account.offset = seconds
    return datetime.fromtimestamp(T0 + seconds, tz=timezone.utc)


def pass_at(ex, account, seconds):
    decisions = []
    run_pass(ex, now=at(account, seconds), engine=ENGINE, emit=decisions.append, use_lock=False)
    return decisions


def stream(op):
    from api.models import StopMonitorEvent

    return [(e.event_type, e.payload) for e in StopMonitorEvent.objects.filter(operation_id=op.pk).order_by("version")]


def types(op):
    return [t for t, _ in stream(op)]


def opened(tenant, symbols, qty="1", stop="9200"):
    from stopmonitor.operations import open_operation

    return open_operation(tenant, symbols["BTCUSDT"], "BUY", D(qty), D("9300"), D(stop),
                          now=datetime.fromtimestamp(T0, tz=timezone.utc))


def sells(account):
    return [(o["clientOrderId"], o["_real_executed"]) for o in account.history]


# ----------------------------------------------------------------------------- item 1


def test_1_a_late_order_whose_answer_was_lost_is_recorded_from_its_trades_never_sent_twice(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(lost=True, invisible_seconds=120)  # filled, answer lost, GET says -2013 for 2 minutes
    pass_at(ex, account, 0)
    decisions = pass_at(ex, account, 31)

    assert len(account.history) == 1  # the issue: a second SELL of 1 BTC, both FILLED
    assert types(op)[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    executed = stream(op)[-2][1]
    assert (executed["order_id"], executed["executed_qty"], executed["commission"], executed["commission_asset"]) == (
        account.history[0]["orderId"], "1", "9.15", "USDT")
    assert "trade(s) of order" in next(d.detail for d in decisions if d.action == "reconciled")


def test_1_not_found_is_not_visible_yet_until_the_window_then_sent_once_with_the_same_id(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    ex.fault("place_market_order", "5xx")  # nothing placed, outcome unknown
    pass_at(ex, account, 0)
    for seconds in (31, 45, 59):
        decisions = pass_at(ex, account, seconds)
        assert account.history == [] and types(op)[-1] == "EXECUTION_SUBMITTED"
        assert [d.reason for d in decisions if d.execution_token] == ["NOT_VISIBLE_YET"]
    pass_at(ex, account, 61)

    assert sells(account) == [(stream(op)[2][1]["client_order_id"], "1.00000000")]
    assert types(op)[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]


def test_1_a_vanished_balance_without_trades_is_reviewed_once_never_resent(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    ex.fault("place_market_order", "5xx")
    pass_at(ex, account, 0)
    account.set_balance("BTC", "0")  # the coins left, no trade shows it
    for seconds in (61, 81, 101):
        pass_at(ex, account, seconds)

    assert account.history == []
    blocks = [p for t, p in stream(op) if t == "BLOCKED"]
    assert [(b["reason"], b["evidence"]) for b in blocks] == [("NEEDS_REVIEW", "BALANCE_GONE")]
    op.refresh_from_db()
    assert op.status == "CLOSING"


def test_1_orders_gone_and_the_balance_refilled_is_a_testnet_reset_for_review(ex, account, tenant, symbols):
    first = opened(tenant, symbols, qty="0.5", stop="9200")
    pass_at(ex, account, 0)  # closes the first (its order is on record)
    assert types(first)[-1] == "OPERATION_CLOSED"
    second = opened(tenant, symbols, qty="0.5", stop="9200")
    ex.fault("place_market_order", "5xx")
    pass_at(ex, account, 20)
    account.testnet_reset({"BTC": "1", "USDT": "0"})  # every order and trade gone, balances refilled
    pass_at(ex, account, 90)

    assert len(account.history) == 0
    assert [(p["reason"], p["evidence"]) for t, p in stream(second) if t == "BLOCKED"] == [("NEEDS_REVIEW", "ORDERS_GONE")]


# ----------------------------------------------------------------------------- item 2


def test_2_insufficient_balance_on_a_close_is_reconciled_not_failed(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    ex.fault("place_market_order", "-2010")
    decisions = pass_at(ex, account, 0)

    assert "FAILED" not in types(op) and types(op)[-1] == "EXECUTION_SUBMITTED"
    assert any("-2010 on the close" in d.detail for d in decisions)
    op.refresh_from_db()
    assert op.status == "CLOSING"  # not released to be blocked later while the position may be sold
    pass_at(ex, account, 61)
    assert types(op)[-1] == "OPERATION_CLOSED" and len(account.history) == 1


def test_2_a_symbol_in_halt_refusing_with_2010_fails_once_then_blocks_once(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.status_of["BTCUSDT"] = "HALT"
    ex.fault("place_market_order", "-2010")
    original = ex.symbol_filters
    calls = {"n": 0}

    def filters(symbols_, *, fresh=False):  # the pass's cached filters still say TRADING
        calls["n"] += 1
        result = original(symbols_, fresh=fresh)
        if not fresh and calls["n"] == 1:
            from dataclasses import replace

            result = {s: replace(f, status="TRADING") for s, f in result.items()}
        return result

    ex.symbol_filters = filters
    pass_at(ex, account, 0)
    for seconds in (60, 120, 180):
        pass_at(ex, account, seconds)

    failed = [p for t, p in stream(op) if t == "FAILED"]
    blocked = [p for t, p in stream(op) if t == "BLOCKED"]
    assert [f["reason"] for f in failed] == ["SYMBOL_STATUS"]
    assert [(b["reason"], b["key"]) for b in blocked] == [("SYMBOL_STATUS", "HALT")]
    assert account.history == []


# ----------------------------------------------------------------------------- items 3 and 4


def test_3_a_misreported_zero_fill_is_recorded_from_its_trades(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(report_zero=True)  # answered EXPIRED, executedQty 0; it filled
    pass_at(ex, account, 0)
    for seconds in (60, 120):
        pass_at(ex, account, seconds)

    assert "FAILED" not in types(op)
    assert types(op)[-2:] == ["EXECUTED", "OPERATION_CLOSED"]
    assert len(account.history) == 1  # the next trigger did not sell again


def test_3_a_real_zero_fill_is_still_no_fill(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(fill_qty="0")
    pass_at(ex, account, 0)
    failed = [p for t, p in stream(op) if t == "FAILED"]
    assert [f["reason"] for f in failed] == ["EXPIRED_NO_FILL"]


def test_4_a_fill_found_by_query_takes_its_commission_from_the_trades(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(lost=True)
    pass_at(ex, account, 0)
    pass_at(ex, account, 31)
    executed = next(p for t, p in stream(op) if t == "EXECUTED")
    assert (executed["commission"], executed["commission_asset"], executed["avg_price"]) == ("9.15", "USDT", "9150")


def test_4_unknown_commission_is_null_never_zero(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(lost=True)
    pass_at(ex, account, 0)
    ex.fault("account_trades", "5xx")
    pass_at(ex, account, 31)
    executed = next(p for t, p in stream(op) if t == "EXECUTED")
    assert (executed["commission"], executed["commission_asset"]) == (None, None)
    from api.models import StopMonitorExecution

    assert StopMonitorExecution.objects.get(pk=executed["client_order_id"]).commission is None


# ----------------------------------------------------------------------------- item 5


def test_5_fee_dust_closes_the_operation_with_the_dust_in_the_event(ex, account, tenant, symbols):
    op = opened(tenant, symbols, qty="1")
    account.set_balance("BTC", "0.999")  # the entry fee took 0.001
    pass_at(ex, account, 0)
    for seconds in (60, 120):
        pass_at(ex, account, seconds)

    assert sells(account) == [(stream(op)[2][1]["client_order_id"], "0.99900000")]
    closed = stream(op)[-1]
    assert closed[0] == "OPERATION_CLOSED" and closed[1]["dust_qty"] == "0.001"
    op.refresh_from_db()
    assert op.status == "CLOSED"


def test_5_a_close_never_sells_another_operations_coins_and_a_shortfall_is_recorded_once(ex, account, tenant, symbols):
    first = opened(tenant, symbols, qty="0.5", stop="9200")
    second = opened(tenant, symbols, qty="0.5", stop="9000")  # not crossed at 9150: it keeps its 0.5
    account.set_balance("BTC", "0.8")
    for seconds in (0, 60, 120):
        pass_at(ex, account, seconds)

    assert [q for _, q in sells(account)] == ["0.30000000"]
    assert [p["shortfall_qty"] for t, p in stream(first) if t == "GUARD_WARNING" and p["reason"] == "SHORTFALL"] == ["0.2"]
    assert [p["reason"] for t, p in stream(first) if t == "BLOCKED"] == ["INSUFFICIENT_BALANCE"]  # once, not every pass
    assert account.balances["BTC"] == D("0.5")
    second.refresh_from_db()
    assert second.status == "ACTIVE"


# ----------------------------------------------------------------------------- items 7 and 8


class SlowClock(AccountExchange):
    """Each book ticker read takes ``lag`` seconds of the account's clock (a slow pass)."""

    lag = 12.0

    def book_tickers(self, symbols):
        quotes_ = super().book_tickers(symbols)
        self.account.advance(self.lag)
        return quotes_


def test_7_a_close_decided_after_its_quote_aged_rereads_it_and_rechecks_the_trigger(account, tenant, symbols):
    ex = SlowClock(account)
    op = opened(tenant, symbols)
    real = ex.book_tickers
    reads = {"n": 0}

    def moving(symbols_):
        reads["n"] += 1
        if reads["n"] == 2:  # by the time the close is decided, the price is back above the stop
            account.quotes["BTCUSDT"].update(bidPrice="9250.00", askPrice="9250.01")
            ex.lag = 0  # the re-read is fresh
        return real(symbols_)

    ex.book_tickers = moving
    decisions = []
    run_pass(ex, now=at(account, 0), engine=ENGINE, emit=decisions.append, use_lock=False)

    assert reads["n"] == 2 and account.history == []
    assert [d.reason for d in decisions if d.operation_id == op.pk] == ["LEVEL_MOVED"]


def test_8_events_carry_the_time_they_were_appended(account, tenant, symbols):
    ex = SlowClock(account)
    ex.lag = 3.0
    op = opened(tenant, symbols)
    start = at(account, 0)
    run_pass(ex, now=start, engine=ENGINE, use_lock=False)
    from api.models import StopMonitorEvent

    rows = {e.event_type: e for e in StopMonitorEvent.objects.filter(operation_id=op.pk)}
    executed = rows["EXECUTED"]
    assert executed.created_at == start + timedelta(seconds=3)  # not the pass start
    assert datetime.fromisoformat(rows["STOP_TRIGGERED"].payload["quote_time"]) <= executed.created_at


# ----------------------------------------------------------------------------- item 12


def test_12_one_locked_row_is_skipped_and_does_not_stall_the_other_closes(ex, account, tenant, symbols, settings):
    settings.STOPMONITOR = {**settings.STOPMONITOR, "ENGINE_LOCK_TIMEOUT_MS": 500}
    held_op = opened(tenant, symbols, qty="0.2")
    others = [opened(tenant, symbols, qty="0.2") for _ in range(3)]
    s = connection.settings_dict
    dsn = f"host={s['HOST'] or '127.0.0.1'} port={s['PORT'] or 5432} dbname={s['NAME']} user={s['USER']}"
    held, release = threading.Event(), threading.Event()

    def hold():
        with psycopg.connect(dsn) as other:
            other.execute("SELECT id FROM api_operation WHERE id = %s FOR UPDATE", [held_op.pk])
            held.set()
            release.wait(20)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    started = time.monotonic()
    try:
        decisions = pass_at(ex, account, 0)
    finally:
        release.set()
        t.join()
    took = time.monotonic() - started

    assert took < 10
    assert [d.reason for d in decisions if d.operation_id == held_op.pk] == ["LOCKED"]
    for op in others:
        assert types(op)[-1] == "OPERATION_CLOSED"
    pass_at(ex, account, 60)
    assert types(held_op)[-1] == "OPERATION_CLOSED"  # taken next pass


# ----------------------------------------------------------------------------- item 14


def test_14_an_expired_in_match_partial_records_the_reason_and_the_rest_stays_protected(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(fill_qty="0.6", status="EXPIRED_IN_MATCH")
    pass_at(ex, account, 0)
    partial = next(p for t, p in stream(op) if t == "PARTIALLY_EXECUTED")
    assert (partial["executed_qty"], partial["unfilled_qty"], partial["expiry_reason"]) == (
        "0.6", "0.4", "INSUFFICIENT_LIQUIDITY")
    op.refresh_from_db()
    assert (op.status, op.remaining_quantity) == ("ACTIVE", D("0.4"))


def test_14_a_price_range_expiry_is_recorded(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(fill_qty="0.25", expiry_reason="EXECUTION_RULE_PRICE_RANGE_EXCEEDED")
    pass_at(ex, account, 0)
    partial = next(p for t, p in stream(op) if t == "PARTIALLY_EXECUTED")
    assert partial["expiry_reason"] == "EXECUTION_RULE_PRICE_RANGE_EXCEEDED"


@pytest.mark.parametrize("status", ["CANCEL_ONLY", "HALT", "BREAK"])
def test_14_a_symbol_that_takes_no_order_is_blocked_once(ex, account, tenant, symbols, status):
    op = opened(tenant, symbols)
    account.status_of["BTCUSDT"] = status
    for seconds in (0, 60, 120):
        pass_at(ex, account, seconds)
    assert [(p["reason"], p["key"]) for t, p in stream(op) if t == "BLOCKED"] == [("SYMBOL_STATUS", status)]
    assert "FAILED" not in types(op) and account.history == []


# ----------------------------------------------------------------------------- through HTTP and the real adapter


@pytest.fixture
def fake():
    with FakeBinance() as f:
        f.account.set_balance("BTC", "1")
        f.account.set_balance("USDT", "0")
        yield f


def test_http_a_late_visible_order_is_not_sent_twice(fake, tenant, symbols):
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=0.5, state=MemoryState())
    from stopmonitor.operations import open_operation

    op = open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"))
    fake.account.next_order(lost=True, delay=1.0, invisible_seconds=300)  # filled; answer after our timeout
    run_pass(exchange, engine=ENGINE)
    time.sleep(0.8)
    run_pass(exchange, engine=ENGINE, now=datetime.now(timezone.utc) + timedelta(seconds=31))
    run_pass(exchange, engine=ENGINE, now=datetime.now(timezone.utc) + timedelta(seconds=90))

    assert len(fake.calls("POST", "/api/v3/order")) == 1
    assert types(op)[-2:] == ["EXECUTED", "OPERATION_CLOSED"]
    trades = fake.calls("GET", "/api/v3/myTrades")
    assert trades and all(r.signature_valid for r in trades)


def test_http_a_misreported_zero_fill_is_checked_against_the_trades(fake, tenant, symbols):
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=2, state=MemoryState())
    from stopmonitor.operations import open_operation

    op = open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"))
    fake.account.next_order(report_zero=True)
    run_pass(exchange, engine=ENGINE)

    executed = next(p for t, p in stream(op) if t == "EXECUTED")
    assert (executed["executed_qty"], executed["commission_asset"]) == ("0.001", "USDT")
    assert fake.calls("GET", "/api/v3/myTrades")[0].query["orderId"] == str(executed["order_id"])


def test_api_close_goes_through_the_same_evidence(ex, account, tenant, symbols):
    op = opened(tenant, symbols)
    account.next_order(report_zero=True)
    close_operation(op.pk, ex, now=at(account, 0), engine=ENGINE)
    assert types(op)[-2:] == ["EXECUTED", "OPERATION_CLOSED"]


# ----------------------------------------------------------------------------- item 11


def test_11_redis_down_the_pass_still_closes_every_crossed_stop(fake, tenant, symbols, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0",
                                   "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    from stopmonitor.operations import open_operation

    ops = [open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000")) for _ in range(3)]
    exchange = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=2)  # CacheState on Redis

    summary = run_pass(exchange, engine=ENGINE)

    assert summary.executed == 3
    for op in ops:
        assert types(op)[-1] == "OPERATION_CLOSED"


# ----------------------------------------------------------------------------- item 15


def test_15_json_stdout_carries_only_json_lines_with_text_logs(fake, tenant, symbols, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stopmonitor.operations import open_operation

    open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"))
    open_operation(tenant, symbols["ETHUSDT"], "BUY", D("0.01"), D("2000"), D("1900"))  # unknown to the fake: -1121
    # the bulk request is refused: the adapter asks each symbol, then logs a warning (text, on stderr)
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "LOG_"))}
    env.update(DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}", ENVIRONMENT="development",
               EXCHANGE_VENUE="binance-testnet", BINANCE_API_KEY=API_KEY, BINANCE_API_SECRET=API_SECRET,
               BINANCE_API_URL=fake.url.removesuffix("/api"), CACHE_DIR=str(tmp_path / "cache"), LOG_FORMAT="text")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "manage.py", "monitor_stops", "--json", "--no-pass-lock"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=90)

    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and all(json.loads(line) for line in lines)
    assert json.loads(lines[-1])["type"] == "summary"
    assert "bulk book ticker refused" in done.stderr
