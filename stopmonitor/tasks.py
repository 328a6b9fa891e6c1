"""Celery tasks: the monitor pass and the outbox relay, calling the same engine use cases as the commands.

The pass runs with ``source="loop"`` (stop-execution.md's sources: a worker pass is the
continuous loop's, not the CronJob's ``cron``).
"""

from __future__ import annotations

from celery import shared_task

_publisher = None


@shared_task(name="stopmonitor.tasks.run_monitor_pass", acks_late=True, ignore_result=False)
def run_monitor_pass(use_lock: bool = True, venue: str | None = None) -> dict:
    """One :func:`~stopmonitor.engine.monitor.run_pass` on the configured venue; returns the summary dict.

    ``use_lock=False`` skips the cross-process pass lock (correctness never depends on it: the
    row locks of invariant 1 do; tests race passes this way). Raises
    :class:`~stopmonitor.engine.decisions.EngineUnavailable` when the pass cannot run (not retried: the next
    scheduled pass is the retry).
    """
    from django.db import close_old_connections

    from stopmonitor.exchange.factory import build_exchange
    from stopmonitor.engine.monitor import run_pass

    close_old_connections()
    exchange = build_exchange(venue)
    try:
        return run_pass(exchange, source="loop", use_lock=use_lock).as_dict()
    finally:
        close = getattr(exchange, "close", None)
        if callable(close):
            close()
        close_old_connections()


@shared_task(name="stopmonitor.tasks.publish_outbox", acks_late=True, ignore_result=False)
def publish_outbox(batch_size: int = 200, max_batches: int = 50) -> dict:
    """Publish due outbox rows (:func:`stopmonitor.outbox.drain`); returns the totals.

    The broker connection is kept per worker process between runs.
    """
    from django.db import close_old_connections

    from stopmonitor.outbox import Publisher, broker_url_from_settings, drain

    global _publisher
    close_old_connections()
    if _publisher is None:
        _publisher = Publisher(broker_url_from_settings())
    try:
        return drain(_publisher, batch_size=batch_size, max_batches=max_batches).as_dict()
    finally:
        close_old_connections()
