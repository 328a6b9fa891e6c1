"""Guardrails as pure functions: quotes, kill switch, breaker transitions, slippage, rate limit."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

from stopmonitor import guardrails as g
from stopmonitor.exchange.base import Quote

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def q(bid, ask, age=0):
    return Quote("BTCUSDT", D(bid), D(ask), D("1"), D("1"), NOW - timedelta(seconds=age))


def test_quote_problems():
    assert g.quote_problem(None, NOW, 10).reason == "MISSING_PRICE"
    assert g.quote_problem(q("0", "1"), NOW, 10).reason == "INVALID_PRICE"
    assert g.quote_problem(q("2", "1"), NOW, 10).reason == "INVALID_PRICE"
    assert g.quote_problem(q("1", "1.1", age=11), NOW, 10).reason == "STALE_PRICE"
    assert g.quote_problem(q("1", "1.1", age=10), NOW, 10) is None


def test_kill_switch():
    assert g.kill_switch(True, "incident 42", NOW) == g.Block("KILL_SWITCH", "kill switch on: incident 42" + g.PROTECTION_STAYS,
                                                              "2026-01-01T12:00:00+00:00|incident 42")
    assert g.kill_switch(False, "") is None


def test_breaker_transitions():
    b = g.BreakerState()
    b = g.breaker_on_failure(b, NOW, 3, 300, "e1")
    b = g.breaker_on_failure(b, NOW, 3, 300, "e2")
    assert (b.state, b.failure_count) == ("CLOSED", 2)
    b = g.breaker_on_failure(b, NOW, 3, 300, "e3")
    assert (b.state, b.retry_at) == ("OPEN", NOW + timedelta(seconds=300))
    held, block = g.breaker_allows(b, NOW + timedelta(seconds=299))
    assert held.state == "OPEN" and block.reason == "CIRCUIT_BREAKER"
    half, block = g.breaker_allows(b, NOW + timedelta(seconds=300))
    assert half.state == "HALF_OPEN" and block is None
    reopened = g.breaker_on_failure(half, NOW, 3, 300, "e4")
    assert reopened.state == "OPEN" and reopened.failure_count == 4
    assert g.breaker_on_success(half) == g.BreakerState()


def test_slippage_warn_and_block():
    warn = g.check_slippage("SELL", D("100"), D("98"), D("1"), "warn")
    assert (warn.pct, warn.breach, warn.block) == (D("2.0000"), True, None)
    block = g.check_slippage("SELL", D("100"), D("98"), D("1"), "block")
    assert block.block.reason == "SLIPPAGE_BREACH"
    assert g.check_slippage("SELL", D("100"), D("99.5"), D("1"), "block").block is None


def test_rate_limit():
    assert g.rate_limit(2, 5, 2, 100).reason == "RATE_LIMITED"
    assert g.rate_limit(1, 100, 2, 100).reason == "RATE_LIMITED"
    assert g.rate_limit(1, 99, 2, 100) is None
