from __future__ import annotations

import threading
from dataclasses import replace

from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.monitor import run_pass

from .conftest import NOW

ENGINE = EngineSettings(quote_max_age_seconds=10, reconcile_after_seconds=30, breaker_threshold=3,
                        breaker_cooldown_seconds=300)


def stream(op):
    from api.models import StopMonitorEvent

    return [(e.event_type, e.payload) for e in StopMonitorEvent.objects.filter(operation=op).order_by("version")]


def types(op):
    return [t for t, _ in stream(op)]


def refresh(op):
    op.refresh_from_db()
    return op


def run(paper, at=NOW, fresh=True, **kw):
    paper.set_time(at)
    if fresh:
        paper.quotes = {s: replace(q, observed_at=at) for s, q in paper.quotes.items()}
    decisions = []
    summary = run_pass(paper, now=at, emit=decisions.append, engine=kw.pop("engine", ENGINE), **kw)
    return summary, decisions


class Crash(BaseException):
    pass


def in_thread(name, fn, errors, results):
    """Run fn in a named thread with its own DB connection; record exceptions."""
    from django.db import connection

    def target():
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001
            errors[name] = exc
        finally:
            connection.close()

    t = threading.Thread(target=target, name=name)
    t.start()
    return t
