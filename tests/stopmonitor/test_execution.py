"""The execution fold and outcome decision, without a database."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace
from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import Fill, OrderResult
from stopmonitor.execution import (ExecutionState, StoredEvent, _evolve, _state, apply, decide_outcome, fold,
                                   state_field_names)

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


def _trigger_payload(**extra):
    return {"attempt": 2, "trigger": "STOP_LOSS", "close_side": "SELL", "level": "9200", "observed_price": "9150",
            "quantity": "0.5", **extra}


T2 = datetime(2026, 1, 1, 0, 0, 5, 123456, tzinfo=timezone.utc)
TRIGGERED = ExecutionState(
    execution_token="tok", operation_id=1, tenant_id=7, symbol="BTCUSDT", attempt=2, trigger="STOP_LOSS",
    status="TRIGGERED", side="SELL", trigger_price=D("9200"), observed_price=D("9150"), requested_quantity=D("0.5"),
    executed_quantity=None, avg_fill_price=None, commission=None, commission_asset="", slippage_pct=None,
    exchange_order_id=None, exchange_status="", error_code=None, error_message="", source="cron", venue="paper",
    last_version=1, created_at=T, updated_at=T, submitted_at=None)


@pytest.mark.parametrize("event_type,payload,expected", [
    pytest.param("EXECUTION_SUBMITTED", {"quantity": "0.4"},
                 dict(status="SUBMITTED", requested_quantity=D("0.4"), submitted_at=T2), id="submitted"),
    pytest.param("EXECUTED", {"executed_qty": "0.5", "avg_price": "9149.5", "commission": "4.57",
                              "commission_asset": "USDT", "slippage_pct": "0.5489", "order_id": 42,
                              "exchange_status": "FILLED"},
                 dict(status="EXECUTED", executed_quantity=D("0.5"), avg_fill_price=D("9149.5"), commission=D("4.57"),
                      commission_asset="USDT", slippage_pct=D("0.5489"), exchange_order_id=42,
                      exchange_status="FILLED"), id="executed"),
    pytest.param("PARTIALLY_EXECUTED", {"executed_qty": "0.2", "avg_price": "", "commission_asset": "A" * 20,
                                        "order_id": 43},
                 dict(status="PARTIALLY_EXECUTED", executed_quantity=D("0.2"), commission_asset="A" * 12,
                      exchange_order_id=43), id="partial-empty-price-long-asset"),
    pytest.param("FAILED", {"code": -2010, "message": "x" * 400},
                 dict(status="FAILED", error_code=-2010, error_message="x" * 300), id="failed-rejected"),
    pytest.param("FAILED", {"code": None, "message": None, "order_id": 44, "exchange_status": "EXPIRED",
                            "executed_qty": "0"},
                 dict(status="FAILED", exchange_order_id=44, exchange_status="EXPIRED", executed_quantity=D("0")),
                 id="failed-expired-no-fill"),
    pytest.param("RECONCILED", {"resubmitted": True}, dict(status="SUBMITTED", submitted_at=T2),
                 id="reconciled-resubmitted"),
    pytest.param("RECONCILED", {"found": True, "exchange_status": "FILLED"}, {}, id="reconciled-found"),
    pytest.param("BLOCKED", {"reason": "KILL_SWITCH"}, {}, id="blocked"),
])
def test_apply_of_each_event_type_after_a_trigger(event_type, payload, expected):
    """Exact fields after STOP_TRIGGERED then one event (the fold builds states without ``__init__``)."""
    triggered = apply(None, StoredEvent(1, 7, "BTCUSDT", 1, "STOP_TRIGGERED", "tok", "cron", "paper",
                                        _trigger_payload(), T))
    assert triggered == TRIGGERED
    state = apply(triggered, StoredEvent(1, 7, "BTCUSDT", 2, event_type, "tok", "loop", "binance", payload, T2))
    want = replace(TRIGGERED, last_version=2, updated_at=T2, **expected)
    assert [(name, getattr(state, name)) for name in state_field_names()] == [
        (name, getattr(want, name)) for name in state_field_names()]
    assert (state, hash(state), repr(state)) == (want, hash(want), repr(want))
    assert triggered == TRIGGERED  # the previous state is untouched


def test_states_built_by_apply_stay_frozen_and_check_their_field_names():
    state = apply(None, ev(1, "STOP_TRIGGERED", _trigger_payload()))
    assert type(state) is ExecutionState
    with pytest.raises(FrozenInstanceError):
        state.status = "FAILED"
    with pytest.raises(TypeError, match=r"not ExecutionState fields: \['stauts'\]"):
        _evolve(state, {"stauts": "FAILED"})
    values = {name: getattr(state, name) for name in state_field_names()}
    del values["venue"]
    values["venu"] = "paper"
    with pytest.raises(TypeError, match=r"missing \['venue'\], unknown \['venu'\]"):
        _state(values)
    assert apply(state, ev(2, "STOP_SET", {}, token=None)) is state
    with pytest.raises(ValueError, match="EXECUTED v2 for tok before STOP_TRIGGERED"):
        apply(None, ev(2, "EXECUTED", {}))
