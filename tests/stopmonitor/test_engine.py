"""The close protocol end to end on PostgreSQL with the paper exchange: exact events, quantities
and order requests (../shared/design/stop-execution.md, invariants 1–7)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import OrderRequest, RateLimited
from stopmonitor.exchange.paper import Scripted
from stopmonitor.engine.close import close_operation
from stopmonitor.engine.decisions import EngineUnavailable
from stopmonitor.engine.monitor import run_pass

from .conftest import NOW
from .regressions.helpers import ENGINE, stream, types

pytestmark = pytest.mark.django_db(transaction=True)


def run(paper, at=NOW, fresh=True, **kw):
    """One pass at ``at``; ``fresh`` re-stamps the paper quotes as observed at ``at``."""
    from dataclasses import replace

    paper.set_time(at)
    if fresh:
        paper.quotes = {s: replace(q, observed_at=at) for s, q in paper.quotes.items()}
    decisions = []
    summary = run_pass(paper, now=at, emit=decisions.append, engine=ENGINE, **kw)
    return summary, decisions


def refresh(op):
    op.refresh_from_db()
    return op


def test_long_stop_closes_once_with_exact_events_and_order(paper, open_op):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    paper.set_quote("BTCUSDT", "9199.50", "9199.51", bid_qty="10")
    summary, _ = run(paper)
    assert (summary.triggered, summary.executed) == (1, 1)
    token = f"sm{op.pk}-S1-" + refresh(op).stop_execution_token.split("-")[-1] if op.stop_execution_token else None
    events = stream(op)
    assert [t for t, _ in events] == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED", "OPERATION_CLOSED"]
    trig = events[1][1]
    assert {k: trig[k] for k in ("trigger", "level", "observed_price", "close_side", "quantity", "attempt")} == {
        "trigger": "STOP_LOSS", "level": "9200", "observed_price": "9199.5", "close_side": "SELL", "quantity": "0.5",
        "attempt": 1,
    }
    token = paper.order_requests[0].client_order_id
    assert paper.order_requests == [OrderRequest("BTCUSDT", "SELL", D("0.5"), token)]
    assert token.startswith(f"sm{op.pk}-S1-")
    executed = events[3][1]
    assert executed["executed_qty"] == "0.5" and executed["avg_price"] == "9199.5"
    assert executed["commission"] == "4.59975" and executed["commission_asset"] == "USDT"
    assert executed["slippage_pct"] == "0.0054"  # (9200 - 9199.5) / 9200
    op = refresh(op)
    assert (op.status, op.closed_quantity) == ("CLOSED", D("0.5"))
    from api.models import StopMonitorExecution

    ex = StopMonitorExecution.objects.get()
    assert (ex.status, ex.executed_quantity, ex.avg_fill_price, ex.venue, ex.source) == (
        "EXECUTED", D("0.5"), D("9199.5"), "paper", "cron")
    # a second pass with the price still below does nothing
    summary, _ = run(paper)
    assert (summary.watched, summary.triggered, len(paper.order_requests)) == (0, 0, 1)


def test_short_target_closes_with_buy_at_ask(paper, open_op):
    op = open_op("ETHUSDT", "SELL", "2", entry="2000", stop="2100", target="1900")
    paper.set_quote("ETHUSDT", "1899.00", "1899.90")
    run(paper)
    assert paper.order_requests[0].side == "BUY" and paper.order_requests[0].quantity == D("2")
    assert stream(op)[2][1]["trigger"] == "TAKE_PROFIT"
    assert refresh(op).status == "CLOSED"


def test_stop_and_target_crossed_together_closes_as_stop_loss(paper, open_op):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200", target="9400")
    # an operator moved the levels so both are crossed by the same bid
    from api.models import Operation

    Operation.objects.filter(pk=op.pk).update(target_price=D("9100"))
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    run(paper)
    assert stream(op)[2][1]["trigger"] == "STOP_LOSS"
    assert len(paper.order_requests) == 1


@pytest.mark.parametrize(
    "quote, reason",
    [
        pytest.param(None, "MISSING_PRICE", id="missing"),
        pytest.param(("0", "0"), "INVALID_PRICE", id="zero"),
        pytest.param(("9000", "9000.01", 60), "STALE_PRICE", id="stale-60s"),
    ],
)
def test_bad_quote_blocks_once_and_never_triggers(paper, open_op, quote, reason):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    if quote is not None:
        age = quote[2] if len(quote) > 2 else 0
        paper.set_quote("BTCUSDT", quote[0], quote[1], at=NOW - timedelta(seconds=age))
    run(paper, fresh=False)
    run(paper, fresh=False)
    assert types(op) == ["STOP_SET", "BLOCKED"]
    assert stream(op)[1][1]["reason"] == reason
    assert paper.order_requests == []
    assert refresh(op).status == "ACTIVE"


def test_below_min_notional_blocks_once_not_every_pass(paper, open_op):
    op = open_op("BTCUSDT", "BUY", "0.0005", entry="9300", stop="9200")  # 0.0005 × 9199 = 4.6 < 5
    paper.set_quote("BTCUSDT", "9199", "9199.01")
    for _ in range(3):
        run(paper)
    assert types(op) == ["STOP_SET", "BLOCKED"]
    assert stream(op)[1][1]["reason"] == "BELOW_MIN_NOTIONAL"
    assert paper.order_requests == []


def test_close_quantity_limited_by_free_balance_and_floored_to_step(open_op):
    from stopmonitor.exchange.paper import PaperExchange

    paper = PaperExchange(now=NOW, balances={"BTC": D("0.123456789"), "USDT": D("0")})
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    paper.set_quote("BTCUSDT", "9100", "9100.01")
    run(paper)
    assert paper.order_requests[0].quantity == D("0.12345")
    op = refresh(op)
    assert (op.status, op.closed_quantity) == ("ACTIVE", D("0.12345"))
    assert types(op)[-1] == "EXECUTED"
    # the rest is still protected, but there is no balance left: blocked once
    run(paper)
    run(paper)
    assert types(op)[-1] == "BLOCKED" and stream(op)[-1][1]["reason"] == "BELOW_MIN_QTY"
    assert types(op).count("BLOCKED") == 1


def test_timeout_with_order_at_exchange_is_reconciled_without_second_order(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_after"))
    summary, _ = run(paper)
    assert summary.unknown == 1
    assert types(op)[-1] == "EXECUTION_SUBMITTED" and refresh(op).status == "CLOSING"
    # within the reconcile window nothing is touched (the close may still be in flight)
    run(paper, at=NOW + timedelta(seconds=10))
    assert len(paper.order_requests) == 1 and types(op)[-1] == "EXECUTION_SUBMITTED"
    summary, _ = run(paper, at=NOW + timedelta(seconds=31))
    assert len(paper.order_requests) == 1
    assert types(op)[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    order_id = paper.orders[paper.order_requests[0].client_order_id].exchange_order_id
    assert stream(op)[-3][1] == {"found": True, "exchange_status": "FILLED", "order_id": order_id}
    assert refresh(op).status == "CLOSED"


def test_timeout_without_order_is_placed_once_with_same_client_order_id(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_before"))
    run(paper)
    assert paper.orders == {}
    # -2013 inside the not-visible window (60 s from the submit time): asked, nothing sent (issue #12)
    summary, decisions = run(paper, at=NOW + timedelta(seconds=31))
    assert len(paper.order_requests) == 1 and types(op)[-1] == "EXECUTION_SUBMITTED"
    run(paper, at=NOW + timedelta(seconds=61))
    first, second = paper.order_requests
    assert first == second  # same client order id, same quantity
    assert len(paper.orders) == 1
    assert types(op)[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    assert stream(op)[-3][1]["resubmitted"] is True
    # a third pass places nothing more
    run(paper, at=NOW + timedelta(seconds=120))
    assert len(paper.order_requests) == 2


class Crash(BaseException):
    """The process dies (SIGKILL) between EXECUTION_SUBMITTED and the exchange's answer."""


@pytest.mark.parametrize("order_exists", [pytest.param(True, id="order-exists"), pytest.param(False, id="order-missing")])
def test_crash_between_submitted_and_answer(paper, open_op, order_exists):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    real_place = paper.place_market_order

    def dying_place(request):
        if order_exists:
            real_place(request)
        raise Crash()

    paper.place_market_order = dying_place
    with pytest.raises(Crash):
        run(paper)
    paper.place_market_order = real_place
    assert types(op)[-1] == "EXECUTION_SUBMITTED"
    before = len(paper.order_requests)
    run(paper, at=NOW + timedelta(minutes=1))
    assert len(paper.orders) == 1
    assert types(op)[-4:] == ["EXECUTION_SUBMITTED", "RECONCILED", "EXECUTED", "OPERATION_CLOSED"]
    assert stream(op)[-3][1]["found"] is order_exists
    placed_after_restart = paper.order_requests[before:]
    assert [r.client_order_id for r in placed_after_restart] == ([] if order_exists else [f"{paper.order_requests[0].client_order_id}"])


def test_crash_after_trigger_before_submission_places_once(paper, open_op, monkeypatch):
    from stopmonitor.engine import close

    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")

    def die(*a, **k):
        raise Crash()

    monkeypatch.setattr(close, "submit_and_place", die)
    with pytest.raises(Crash):
        run(paper)
    monkeypatch.undo()
    assert types(op)[-1] == "STOP_TRIGGERED" and refresh(op).status == "CLOSING"
    run(paper, at=NOW + timedelta(minutes=1))
    assert len(paper.order_requests) == 1
    assert types(op) == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED", "OPERATION_CLOSED"]


def test_expired_partial_fill_keeps_the_rest_protected(paper, open_op):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("expire", fill_qty=D("0.2")))
    run(paper)
    assert types(op)[-1] == "PARTIALLY_EXECUTED"
    partial = stream(op)[-1][1]
    assert (partial["executed_qty"], partial["unfilled_qty"], partial["exchange_status"]) == ("0.2", "0.3", "EXPIRED")
    op = refresh(op)
    assert (op.status, op.closed_quantity, op.remaining_quantity) == ("ACTIVE", D("0.2"), D("0.3"))
    run(paper, at=NOW + timedelta(seconds=5))
    assert paper.order_requests[1].quantity == D("0.3")
    assert paper.order_requests[1].client_order_id.startswith(f"sm{op.pk}-S2-")
    assert refresh(op).status == "CLOSED"


def test_expired_with_zero_fill_closes_nothing(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("expire", fill_qty=D("0")))
    summary, _ = run(paper)
    assert summary.failed == 1
    assert types(op)[-1] == "FAILED"
    assert stream(op)[-1][1]["reason"] == "EXPIRED_NO_FILL"
    op = refresh(op)
    assert (op.status, op.closed_quantity) == ("ACTIVE", D("0"))


@pytest.mark.parametrize("code", [-1013, -1100, -1121, -2011])  # -2010: reconciled, not failed (issue #12)
def test_definite_rejection_fails_and_next_pass_retries_with_new_token(paper, open_op, code):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("reject", code=code))
    run(paper)
    assert types(op)[-1] == "FAILED" and stream(op)[-1][1]["code"] == code
    assert refresh(op).status == "ACTIVE"
    run(paper, at=NOW + timedelta(seconds=60))
    t1, t2 = (r.client_order_id for r in paper.order_requests)
    assert t1.startswith(f"sm{op.pk}-S1-") and t2.startswith(f"sm{op.pk}-S2-")
    assert refresh(op).status == "CLOSED"


def test_circuit_breaker_opens_after_three_failures_then_half_open_trial_closes(paper, open_op):
    from api.models import CircuitBreakerState

    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    for i in range(3):
        paper.push(Scripted("reject", code=-1013))
        run(paper, at=NOW + timedelta(seconds=60 * i))
    cb = CircuitBreakerState.objects.get(symbol="BTCUSDT")
    assert (cb.state, cb.failure_count) == ("OPEN", 3)
    for i in range(3, 6):  # held while open: one BLOCKED, no order
        run(paper, at=NOW + timedelta(seconds=60 * i))
    assert len(paper.order_requests) == 3
    assert types(op)[-1] == "BLOCKED" and stream(op)[-1][1]["reason"] == "CIRCUIT_BREAKER"
    assert types(op).count("BLOCKED") == 1
    run(paper, at=cb.retry_at)  # cool-down over: HALF_OPEN trial goes through and succeeds
    assert len(paper.order_requests) == 4 and refresh(op).status == "CLOSED"
    assert CircuitBreakerState.objects.get(symbol="BTCUSDT").state == "CLOSED"


def test_kill_switch_blocks_then_lets_through_when_lifted(paper, open_op, tenant):
    from api.models import TenantConfig

    cfg = TenantConfig.objects.create(client=tenant, kill_switch=True, kill_switch_reason="incident 7")
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    run(paper)
    run(paper)
    assert types(op) == ["STOP_SET", "BLOCKED"]
    assert stream(op)[1][1]["detail"] == "kill switch on: incident 7 (exchange-held protection, if any, stays resting)"
    cfg.kill_switch = False
    cfg.save()
    run(paper)
    assert types(op)[-1] == "OPERATION_CLOSED" and len(paper.order_requests) == 1


def test_slippage_block_and_warn(paper, open_op, tenant):
    from api.models import TenantConfig

    cfg = TenantConfig.objects.create(client=tenant, max_slippage_pct=D("1"), slippage_action="block")
    op = open_op()
    paper.set_quote("BTCUSDT", "9000", "9000.01")  # 2.17 % past the stop
    run(paper)
    assert types(op)[-1] == "BLOCKED" and stream(op)[-1][1]["reason"] == "SLIPPAGE_BREACH"
    cfg.slippage_action = "warn"
    cfg.save()
    run(paper)
    assert types(op)[1:] == ["BLOCKED", "STOP_TRIGGERED", "GUARD_WARNING", "EXECUTION_SUBMITTED", "EXECUTED",
                             "OPERATION_CLOSED"]
    assert stream(op)[3][1]["reason"] == "SLIPPAGE_BREACH"


def test_tenant_rate_limit_blocks_and_lets_through_later(paper, open_op, tenant):
    from api.models import TenantConfig

    TenantConfig.objects.create(client=tenant, max_executions_per_minute=1, max_executions_per_hour=100)
    a = open_op()
    b = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    run(paper)
    assert refresh(a).status == "CLOSED"
    assert types(b)[-1] == "BLOCKED" and stream(b)[-1][1]["reason"] == "RATE_LIMITED"
    run(paper, at=NOW + timedelta(seconds=61))
    assert refresh(b).status == "CLOSED"


def test_dry_run_appends_and_places_nothing(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    summary, decisions = run(paper, dry_run=True)
    assert summary.triggered == 1 and decisions[0].action == "would_trigger"
    assert types(op) == ["STOP_SET"] and paper.order_requests == []


def test_one_bulk_quote_request_per_pass(paper, open_op):
    for symbol in ("BTCUSDT", "ETHUSDT", "ADAUSDT"):
        open_op(symbol, "BUY", "1", entry="10", stop="1")
    for symbol in ("BTCUSDT", "ETHUSDT", "ADAUSDT"):
        paper.set_quote(symbol, "9", "9.01")
    run(paper)
    assert paper.calls == [("book_tickers", ("ADAUSDT", "BTCUSDT", "ETHUSDT"))]


def test_rate_limited_quotes_make_the_pass_fail(paper, open_op):
    open_op()

    def limited(symbols):
        raise RateLimited("429", NOW + timedelta(seconds=30))

    paper.book_tickers = limited
    with pytest.raises(EngineUnavailable):
        run(paper)


def test_manual_close_while_monitor_is_closing_places_nothing(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_after"))
    run(paper)  # CLOSING, SUBMITTED
    decisions = close_operation(op.pk, paper, now=NOW)
    assert [d.action for d in decisions] == ["skipped"] and decisions[0].reason == "NOT_ACTIVE"
    assert len(paper.order_requests) == 1


def test_manual_close_uses_the_same_protocol(paper, open_op):
    op = open_op(stop="9000")
    paper.set_quote("BTCUSDT", "9250", "9250.01")
    decisions = close_operation(op.pk, paper, now=NOW, engine=ENGINE)
    assert [d.action for d in decisions] == ["triggered", "submitted", "executed"]
    assert stream(op)[1][1]["trigger"] == "MANUAL"
    assert paper.order_requests[0].client_order_id.startswith(f"sm{op.pk}-M1-")
    assert refresh(op).status == "CLOSED"


def test_half_open_breaker_allows_one_trial_at_a_time(paper, open_op):
    from api.models import CircuitBreakerState

    a, b = open_op(), open_op()
    CircuitBreakerState.objects.create(symbol="BTCUSDT", state="OPEN", failure_count=3, retry_at=NOW)
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_after"))  # the trial's outcome is unknown
    run(paper)
    assert refresh(a).status == "CLOSING"
    assert types(b)[-1] == "BLOCKED" and "trial close is still in flight" in stream(b)[-1][1]["detail"]
    assert len(paper.order_requests) == 1
