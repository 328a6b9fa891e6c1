"""Attacks that the engine withstood (these pass)."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest

from stopmonitor.engine.close import close_operation
from stopmonitor.engine.monitor import run_pass

from .conftest import NOW
from .helpers import ENGINE, in_thread, refresh, run, stream, types

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("round_", range(3))
def test_manual_close_racing_the_pass_places_one_order_per_operation(paper, open_op, round_):
    ops = [open_op() for _ in range(6)]
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    start = threading.Barrier(3)
    errors, results = {}, {}

    def manual():
        start.wait()
        return [close_operation(op.pk, paper, now=NOW, engine=ENGINE) for op in reversed(ops)]

    def cron():
        start.wait()
        return run_pass(paper, now=NOW, engine=ENGINE)

    def cron_nolock():
        start.wait()
        return run_pass(paper, now=NOW, engine=ENGINE, use_lock=False)

    ts = [in_thread("m", manual, errors, results), in_thread("c", cron, errors, results),
          in_thread("c2", cron_nolock, errors, results)]
    for t in ts:
        t.join(60)
    assert errors == {}
    ids = [r.client_order_id for r in paper.order_requests]
    assert len(ids) == len(set(ids)) == 6
    assert all(refresh(op).status == "CLOSED" for op in ops)


def test_crossed_quote_is_blocked(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9100")
    run(paper)
    assert types(op) == ["STOP_SET", "BLOCKED"] and stream(op)[1][1]["reason"] == "INVALID_PRICE"
    assert paper.order_requests == []


def test_rate_limited_placement_fails_definitely_and_the_pass_goes_on(paper, open_op):
    from api.models import CircuitBreakerState

    a = open_op("BTCUSDT")
    b = open_op("ETHUSDT", "BUY", "1", entry="2000", stop="1900")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.set_quote("ETHUSDT", "1850", "1850.01")
    from stopmonitor.exchange.paper import Scripted

    paper.push(Scripted("rate_limit", retry_after=NOW + timedelta(seconds=30)))
    summary, _ = run(paper)
    assert summary.failed == 1 and summary.executed == 1
    failed = [op for op in (a, b) if types(op)[-1] == "FAILED"][0]
    assert stream(failed)[-1][1]["reason"] == "RATE_LIMITED" and refresh(failed).status == "ACTIVE"
    assert not CircuitBreakerState.objects.filter(failure_count__gt=0).exists()


def test_filled_more_than_requested_closes_and_keeps_projection(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    real = paper.place_market_order

    def over(request):
        result = real(request)
        fill = replace(result.fills[0], qty=D("0.6"))
        return replace(result, executed_qty=D("0.6"), fills=(fill,))

    paper.place_market_order = over
    run(paper)
    op = refresh(op)
    assert op.status == "CLOSED" and op.closed_quantity == D("0.6")


def test_dry_run_writes_only_the_pass_row(paper, open_op):
    from api.models import MonitorPass, StopMonitorEvent, StopMonitorExecution

    open_op()
    open_op("ETHUSDT", "BUY", "1", entry="2000", stop="1900")  # no quote: would be MISSING_PRICE
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    before = StopMonitorEvent.objects.count()
    run(paper, dry_run=True)
    assert StopMonitorEvent.objects.count() == before and not StopMonitorExecution.objects.exists()
    assert paper.order_requests == [] and MonitorPass.objects.get().dry_run is True
