"""The stream's seam into the engine: one quote for one symbol's operations goes through the pass's
own rule, guardrails and close protocol (the paper exchange, a fixed clock)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import Quote
from stopmonitor.stream import engine_port as port

from ..conftest import NOW

pytestmark = pytest.mark.django_db


def quote(bid, ask, at=NOW):
    return Quote("BTCUSDT", D(bid), D(ask), D("1"), D("1"), at)


def kinds(op):
    from api.models import StopMonitorEvent

    return list(StopMonitorEvent.objects.filter(operation=op).order_by("version").values_list("event_type", "source"))


def test_a_crossing_quote_closes_only_the_crossed_operation_with_source_stream(open_op, paper):
    crossed = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    untouched = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9000")
    paper.set_quote("BTCUSDT", "9190", "9191", at=NOW)
    watched = [w for w in port.load_watched() if w.symbol == "BTCUSDT"]
    decisions = port.evaluate_quote(paper, "BTCUSDT", quote("9190", "9191"), watched)
    assert [(d.action, d.operation_id, d.source) for d in decisions] == [
        ("triggered", crossed.pk, "stream"), ("submitted", crossed.pk, "stream"), ("executed", crossed.pk, "stream")]
    assert kinds(crossed) == [("STOP_SET", "api"), ("STOP_TRIGGERED", "stream"), ("EXECUTION_SUBMITTED", "stream"),
                              ("EXECUTED", "stream"), ("OPERATION_CLOSED", "stream")]
    assert kinds(untouched) == [("STOP_SET", "api")]
    # the same quote again: the closed operation is skipped by the engine, nothing appended
    again = port.evaluate_quote(paper, "BTCUSDT", quote("9190", "9191"), watched)
    assert [(d.action, d.reason) for d in again] == [("skipped", "NOT_ACTIVE")]
    assert len(kinds(crossed)) == 5


def test_a_missing_or_stale_quote_is_blocked_once_and_a_quiet_one_does_nothing(open_op, paper):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    watched = port.load_watched()
    assert port.evaluate_quote(paper, "BTCUSDT", quote("9250", "9251"), watched) == []
    first = port.evaluate_quote(paper, "BTCUSDT", None, watched)
    assert [(d.action, d.reason) for d in first] == [("blocked", "MISSING_PRICE")]
    second = port.evaluate_quote(paper, "BTCUSDT", None, watched)
    assert [(d.action, d.reason) for d in second] == [("skipped", "MISSING_PRICE")]
    stale = port.evaluate_quote(paper, "BTCUSDT", quote("9190", "9191", at=NOW - timedelta(seconds=11)), watched)
    assert [(d.action, d.reason) for d in stale] == [("blocked", "STALE_PRICE")]
    assert [e for e, _ in kinds(op)] == ["STOP_SET", "BLOCKED", "BLOCKED"]


def test_a_pushed_fill_for_an_unknown_client_order_id_changes_nothing(paper):
    from stopmonitor.exchange.base import OrderResult

    result = OrderResult("BTCUSDT", "SELL", "FILLED", 1, "sm999-S1-00000000", D("1"), D("1"), D("9000"))
    assert port.record_pushed_fill(paper, "sm999-S1-00000000", result) is None
