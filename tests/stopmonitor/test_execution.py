"""The execution fold and outcome decision, without a database."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

from stopmonitor.exchange.base import Fill, OrderResult
from stopmonitor.execution import StoredEvent, decide_outcome, fold, state_field_names

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def ev(version, event_type, payload, token="tok"):
    return StoredEvent(1, 7, "BTCUSDT", version, event_type, token, "cron", "paper", payload, T)


def result(status, executed, fills=()):
    return OrderResult("BTCUSDT", "SELL", status, 42, "tok", D("0.5"), D(executed),
                       sum((f.price * f.qty for f in fills), D(0)), tuple(fills))


def test_projection_fields_match_the_django_model():
    from api.models import StopMonitorExecution

    model = {f.attname for f in StopMonitorExecution._meta.concrete_fields}
    assert set(state_field_names()) == model


def test_fold_of_a_full_close():
    states = fold([
        ev(1, "STOP_SET", {}, token=None),
        ev(2, "STOP_TRIGGERED", {"attempt": 1, "trigger": "STOP_LOSS", "close_side": "SELL", "level": "9200",
                                 "observed_price": "9150", "quantity": "0.5"}),
        ev(3, "EXECUTION_SUBMITTED", {"quantity": "0.5"}),
        ev(4, "EXECUTED", {"executed_qty": "0.5", "avg_price": "9149.5", "commission": "4.57", "commission_asset": "USDT",
                           "slippage_pct": "0.5489", "order_id": 42, "exchange_status": "FILLED"}),
    ])
    s = states["tok"]
    assert (s.status, s.attempt, s.trigger_price, s.executed_quantity, s.avg_fill_price, s.exchange_order_id,
            s.last_version, s.submitted_at) == ("EXECUTED", 1, D("9200"), D("0.5"), D("9149.5"), 42, 4, T)


def test_outcome_full_partial_zero_and_not_final():
    filled = decide_outcome("tok", D("0.5"), D("9200"), result("FILLED", "0.5", [Fill(D("9100"), D("0.3"), D("2.73"), "USDT"),
                                                                              Fill(D("9000"), D("0.2"), D("1.8"), "USDT")]))
    assert filled.event.event_type == "EXECUTED"
    assert (filled.event.payload["avg_price"], filled.event.payload["commission"], filled.event.payload["slippage_pct"]) == (
        "9060", "4.53", "1.5217")
    partial = decide_outcome("tok", D("0.5"), D("9200"), result("EXPIRED", "0.2", [Fill(D("9100"), D("0.2"), D("0"), "USDT")]))
    assert (partial.event.event_type, partial.closed_qty, partial.event.payload["unfilled_qty"]) == (
        "PARTIALLY_EXECUTED", D("0.2"), "0.3")
    zero = decide_outcome("tok", D("0.5"), D("9200"), result("EXPIRED", "0"))
    assert (zero.event.event_type, zero.closed_qty, zero.failure, zero.event.payload["reason"]) == (
        "FAILED", D("0"), True, "EXPIRED_NO_FILL")
    assert decide_outcome("tok", D("0.5"), D("9200"), result("NEW", "0")).event is None
