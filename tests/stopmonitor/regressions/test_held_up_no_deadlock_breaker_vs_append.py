"""HELD UP (passes): suspected lock-order inversion. begin_close locks the symbol's CircuitBreakerState row and THEN takes
the global append advisory lock (append_events); record_outcome / record_failure take the
append advisory lock (append_events) and THEN lock the same breaker row. A manual close of one
operation racing the pass's reconcile of another operation on the same symbol deadlocks;
PostgreSQL kills one of them with OperationalError (deadlock detected), which escapes
close_operation / reconcile_submitted / run_pass.

The two threading.Events only make the (otherwise timing-dependent) interleaving deterministic;
no engine code is changed. It does NOT deadlock: ``lock_operation`` (``FOR NO KEY UPDATE`` with ``select_related("symbol")``)
also locks the joined Symbol row (no ``of=``), so all closers of one symbol serialize on that row
before they reach the breaker row or the append lock. Kept as a regression guard: adding
``of=("self",)`` to those queries would open the deadlock."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from stopmonitor.engine import close, store
from stopmonitor.engine.context import EngineContext
from stopmonitor.engine.reconcile import reconcile_submitted
from stopmonitor.exchange.paper import Scripted

from .conftest import NOW
from .helpers import ENGINE, in_thread, refresh

pytestmark = pytest.mark.django_db(transaction=True)


def test_manual_close_and_reconcile_on_same_symbol_do_not_deadlock(paper, open_op, monkeypatch):
    from api.models import CircuitBreakerState

    CircuitBreakerState.objects.create(symbol="BTCUSDT")
    op_a = open_op(stop="9000")            # to be closed manually (thread A)
    op_b = open_op(stop="9000")            # left SUBMITTED, reconciled by the pass (thread B)
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_after"))  # op_b's order exists, answer lost
    close.close_operation(op_b.pk, paper, now=NOW, engine=ENGINE)
    assert refresh(op_b).status == "CLOSING"

    later = NOW + timedelta(seconds=31)
    paper.set_time(later)
    paper.set_quote("BTCUSDT", "9150", "9150.01", at=later)

    a_holds_breaker = threading.Event()
    b_holds_append_lock = threading.Event()
    real_breaker, real_append = store.breaker, close.append_events

    def breaker(symbol, lock):
        row = real_breaker(symbol, lock)
        if threading.current_thread().name == "A" and lock and not a_holds_breaker.is_set():
            a_holds_breaker.set()
            # less than the engine's lock_timeout (2 s): B, blocked on the Symbol row A holds, never
            # sets the event, and a wait of 2 s raced B's lock timeout (a flake on a loaded machine)
            b_holds_append_lock.wait(0.5)
        return row

    def append(*a, **k):
        saved = real_append(*a, **k)
        if threading.current_thread().name == "B" and not b_holds_append_lock.is_set():
            b_holds_append_lock.set()
            a_holds_breaker.wait(0.5)
        return saved

    monkeypatch.setattr(store, "breaker", breaker)
    monkeypatch.setattr(close, "append_events", append)

    errors, results = {}, {}
    ta = in_thread("A", lambda: close.close_operation(op_a.pk, paper, now=later, engine=ENGINE), errors, results)
    tb = in_thread("B", lambda: reconcile_submitted(paper, EngineContext(later, "cron", paper.venue, ENGINE)),
                   errors, results)
    ta.join(30)
    tb.join(30)
    assert errors == {}, f"closer crashed: {errors!r}"
