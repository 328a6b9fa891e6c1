"""A manual close through the API racing the monitor on the same operation places one order
(invariant 1: the row lock and ACTIVE → CLOSING in one transaction decide who closes)."""

from __future__ import annotations

import threading

import pytest
from django.db import connections

from api.models import StopMonitorEvent
from stopmonitor.exchange.paper import Scripted
from stopmonitor.projections import verify
from stopmonitor.engine.monitor import run_pass
from tests.api.conftest import NOW, error

URL = "/api/v1/operations/"


def triggered_count(op_id):
    return StopMonitorEvent.objects.filter(operation_id=op_id, event_type="STOP_TRIGGERED").count()


def test_close_while_the_monitors_order_is_unresolved_is_409_then_reconciled_once(alice, open_op, paper):
    op = open_op(alice.tenant)
    paper.push(Scripted("timeout_after"))  # the monitor's order reaches the book, the answer is lost
    run_pass(paper, now=NOW, use_lock=False)
    op.refresh_from_db()
    assert op.status == "CLOSING" and len(paper.order_requests) == 1

    r = alice.api.post(f"{URL}{op.pk}/close/")
    assert (r.status_code, r.json()) == (
        409, error("conflict", f"operation {op.pk} is CLOSING: it cannot be closed now"))
    assert len(paper.order_requests) == 1

    later = NOW.replace(minute=5)
    paper.set_time(later)
    paper.set_quote("BTCUSDT", "9100", "9101")
    run_pass(paper, now=later, use_lock=False)  # reconciles by client order id: no second order
    op.refresh_from_db()
    assert op.status == "CLOSED" and len(paper.order_requests) == 1
    assert triggered_count(op.pk) == 1
    assert verify() == []


def test_monitor_after_an_api_close_places_nothing(alice, open_op, paper):
    op = open_op(alice.tenant)
    assert alice.api.post(f"{URL}{op.pk}/close/").json()["outcome"] == "executed"
    summary = run_pass(paper, now=NOW, use_lock=False)
    assert (summary.watched, summary.triggered) == (0, 0)
    assert len(paper.order_requests) == 1


class Gate:
    """Wraps ``paper.book_tickers`` so the monitor and the API read the quote at the same moment."""

    def __init__(self, paper, parties=2):
        self.barrier = threading.Barrier(parties, timeout=10)
        self.inner = paper.book_tickers
        paper.book_tickers = self

    def __call__(self, symbols):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return self.inner(symbols)


@pytest.mark.parametrize("round_", range(4))
def test_api_close_racing_the_monitor_in_two_threads_gives_one_order(transactional_db, alice, open_op, paper,
                                                                     round_):
    if connections["default"].vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL")
    op = open_op(alice.tenant)  # bid 9100 <= stop 9200: the monitor triggers too
    Gate(paper)
    results = {}

    def monitor():
        try:
            results["monitor"] = run_pass(paper, now=NOW, source="cron")
        finally:
            connections.close_all()

    def api():
        try:
            results["api"] = alice.api.post(f"{URL}{op.pk}/close/")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=monitor), threading.Thread(target=api)]
    if round_ % 2:
        threads.reverse()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {"monitor", "api"}

    assert len(paper.order_requests) == 1
    assert triggered_count(op.pk) == 1
    op.refresh_from_db()
    assert op.status == "CLOSED"
    r = results["api"]
    source = StopMonitorEvent.objects.get(operation_id=op.pk, event_type="STOP_TRIGGERED").source
    if r.status_code == 200:  # the API won: the monitor saw it closing/closed and stood back
        assert r.json()["outcome"] == "executed" and source == "api"
        assert results["monitor"].executed == 0
    else:  # the monitor won: the API answered 409 and placed nothing
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        assert source == "cron" and results["monitor"].executed == 1
    assert verify() == []
