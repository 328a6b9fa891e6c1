"""Prometheus metrics of the monitor, the pass record in the database, and the one log line per decision.

Two kinds of numbers:

* **Process counters** (this module's ``Counter``/``Histogram``/``Gauge``): passes, pass
  duration, watched operations, triggers, executions by status, blocks by reason, exchange
  requests and errors by code, quote age, outbox publishes. They live in the process that ran
  the pass: the web pod's ``/metrics`` (django-prometheus, default registry), or the
  ``monitor_stops --loop --metrics-port`` server.
* **Database gauges** (:class:`DatabaseCollector`, read at scrape time, two queries): the time
  and counts of the last completed pass from ``MonitorPass`` and the outbox backlog. A CronJob
  pod lives seconds, so :func:`record_pass` writes each pass's summary (one INSERT) and the
  web pod exports it: ``time() - stopmonitor_last_completed_pass_timestamp_seconds > 180``
  alerts when no pass completed for 3 minutes, whichever process ran them.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
import threading
from datetime import datetime, timedelta, timezone

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from stopmonitor.logs import redact

decision_log = logging.getLogger("stopmonitor.decisions")

PASSES = Counter("stopmonitor_passes", "Monitor passes by source and outcome (completed, lock_held, error)",
                 ["source", "outcome"])
PASS_DURATION = Histogram("stopmonitor_pass_duration_seconds", "Duration of completed monitor passes", ["source"],
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60))
WATCHED = Gauge("stopmonitor_operations_watched", "ACTIVE operations with a stop or target at the last pass of this process")
TRIGGERS = Counter("stopmonitor_triggers", "Crossed levels acted on (STOP_LOSS, TAKE_PROFIT, MANUAL)", ["trigger"])
EXECUTIONS = Counter("stopmonitor_executions", "Close outcomes by status (executed, partially_executed, failed, unknown)",
                     ["status"])
BLOCKED = Counter("stopmonitor_blocked", "Triggers held by a guardrail, by reason", ["reason"])
EXCHANGE_REQUESTS = Counter("stopmonitor_exchange_requests", "Exchange calls by venue and endpoint", ["venue", "endpoint"])
EXCHANGE_ERRORS = Counter("stopmonitor_exchange_errors", "Exchange errors by venue, endpoint and code (Binance code, "
                          "else the error type)", ["venue", "endpoint", "code"])
EXCHANGE_KEYS = Gauge("stopmonitor_exchange_keys_accepted",
                      "1 when the venue accepted this process's last signed read, 0 when it refused the keys "
                      "(-2014/-2015/-1022), -1 when the read said nothing about them (stopmonitor/keys.py)", ["venue"])
QUOTE_AGE = Gauge("stopmonitor_quote_age_seconds", "Age of the last best bid/ask read, per symbol", ["symbol"])
LAST_PASS_LOCAL = Gauge("stopmonitor_process_last_completed_pass_timestamp_seconds",
                        "Unix time of the last pass completed by this process")
OUTBOX_PUBLISHED = Counter("stopmonitor_outbox_published", "Outbox rows published and confirmed by the broker")
OUTBOX_FAILED = Counter("stopmonitor_outbox_publish_failures", "Outbox rows whose publish failed (retried with back-off)")

_EXECUTION_ACTIONS = ("executed", "partially_executed", "failed", "unknown")
_TRIGGER_ACTIONS = ("triggered", "would_trigger")


# ------------------------------------------------------------------------------- decisions


def observe_decision(decision, *, log: bool = True) -> None:
    """Count one engine decision and (``log``) log it as one JSON line (logger ``stopmonitor.decisions``).

    The line carries ``action``, ``tenant_id``, ``operation_id``, ``symbol``,
    ``execution_token``, ``event_type``, ``reason`` and ``source`` (null when not known).
    """
    action = decision.action
    if action in _TRIGGER_ACTIONS:
        TRIGGERS.labels(decision.reason or "unknown").inc()
    elif action in _EXECUTION_ACTIONS:
        EXECUTIONS.labels(action).inc()
    elif action == "blocked":
        BLOCKED.labels(decision.reason or "unknown").inc()
    if not log:
        return
    decision_log.info(
        "decision %s", action,
        extra={
            "type": "decision",
            "action": action,
            "tenant_id": decision.tenant_id,
            "operation_id": decision.operation_id,
            "symbol": decision.symbol,
            "execution_token": decision.execution_token,
            "event_type": decision.event_type,
            "reason": decision.reason,
            "source": decision.source,
            "detail": decision.detail,
        },
    )


# ------------------------------------------------------------------------------- the pass


# MonitorPass rows older than this are deleted; a CronJob pass a minute keeps ≈43k rows
PASS_RETENTION = timedelta(days=30)
PRUNE_EVERY = 60  # passes: the pruning DELETE runs when the new row's id is a multiple of this


def record_pass(summary, *, error: str = "", finished_at: datetime | None = None) -> None:
    """Count the pass and write its ``MonitorPass`` row (one INSERT). Commits (autocommit).

    ``summary`` is a :class:`~stopmonitor.engine.decisions.PassSummary`; ``error`` (non-empty) records
    a pass that could not run. Every :data:`PRUNE_EVERY` th row (by id: about once an hour at one
    pass a minute, whichever process writes it) also deletes the rows that finished more than
    :data:`PASS_RETENTION` before this one, so the table stays bounded. A database error here is
    logged, never raised: the pass itself already happened.
    """
    from django.db import transaction

    from api.models import MonitorPass

    finished_at = finished_at or datetime.now(timezone.utc)
    if error:
        outcome = "error"
    elif summary.lock_held_elsewhere:
        outcome = "lock_held"
    else:
        outcome = "completed"
    PASSES.labels(summary.source, outcome).inc()
    if outcome == "completed":
        PASS_DURATION.labels(summary.source).observe(summary.duration_s)
        WATCHED.set(summary.watched)
        LAST_PASS_LOCAL.set(finished_at.timestamp())
    fields = ("watched", "symbols", "triggered", "executed", "partially_executed", "failed", "unknown", "blocked",
              "reconciled", "skipped", "exchange_requests")
    try:
        # inside a caller's transaction a savepoint keeps a failure here from poisoning it; in autocommit
        # (a pass) the INSERT is its own statement: no BEGIN/COMMIT round trips
        with transaction.atomic() if transaction.get_connection().in_atomic_block else nullcontext():
            row = MonitorPass.objects.create(
                finished_at=finished_at,
                started_at=summary.started_at,
                source=summary.source[:12],
                venue=summary.venue[:20],
                dry_run=summary.dry_run,
                completed=not error,
                lock_held_elsewhere=summary.lock_held_elsewhere,
                duration_s=summary.duration_s,
                error=redact(error)[:500],
                **{name: getattr(summary, name) for name in fields},
            )
            if row.pk % PRUNE_EVERY == 0:
                MonitorPass.objects.filter(finished_at__lt=finished_at - PASS_RETENTION).delete()
    except Exception:  # noqa: BLE001 - metrics never fail a pass
        logging.getLogger("stopmonitor.metrics").warning("could not record the pass summary", exc_info=True)


# ------------------------------------------------------------------------------- the exchange


class InstrumentedExchange:
    """Wraps an exchange adapter: counts each call by endpoint, each error by code, and the
    age of each quote read. Every other attribute is the wrapped adapter's."""

    _ENDPOINTS = ("book_tickers", "symbol_filters", "free_balances", "account_trades", "get_order",
                  "place_market_order",
                  # exchange-held protection
                  "place_stop_order", "place_oco", "cancel_replace", "amend_quantity", "open_orders", "cancel_order")

    def __init__(self, exchange) -> None:
        self._exchange = exchange

    def __getattr__(self, name):
        attr = getattr(self._exchange, name)
        if name not in self._ENDPOINTS:
            return attr
        venue = getattr(self._exchange, "venue", "unknown")

        def call(*args, **kwargs):
            from stopmonitor.exchange.base import ExchangeError

            EXCHANGE_REQUESTS.labels(venue, name).inc()
            try:
                result = attr(*args, **kwargs)
            except ExchangeError as exc:
                code = exc.code if exc.code is not None else type(exc).__name__
                EXCHANGE_ERRORS.labels(venue, name, str(code)).inc()
                raise
            if name == "book_tickers" and result:
                self._observe_quotes(result)
            return result

        return call

    def _observe_quotes(self, quotes) -> None:
        clock = getattr(self._exchange, "clock", None)
        now = clock() if callable(clock) else datetime.now(timezone.utc)
        for symbol, quote in quotes.items():
            observed = getattr(quote, "observed_at", None)
            if observed is not None:
                QUOTE_AGE.labels(symbol).set(max((now - observed).total_seconds(), 0.0))


def instrument(exchange):
    """``exchange`` wrapped in :class:`InstrumentedExchange` (once)."""
    return exchange if isinstance(exchange, InstrumentedExchange) else InstrumentedExchange(exchange)


# ------------------------------------------------------------------------------- the outbox


def observe_outbox_batch(result) -> None:
    """Count one relay batch (:class:`~stopmonitor.outbox.BatchResult`)."""
    if result.published:
        OUTBOX_PUBLISHED.inc(result.published)
    if result.failed:
        OUTBOX_FAILED.inc(result.failed)


# ------------------------------------------------------------------------------- from the database


class DatabaseCollector:
    """Gauges read from the database at scrape time (two queries): the last pass and the outbox backlog.

    * ``stopmonitor_last_completed_pass_timestamp_seconds`` — Unix time (UTC) the last
      completed pass ended, any process (0 when none yet); ``..._last_pass_duration_seconds``,
      ``..._last_pass_operations_watched``, ``..._last_pass_triggered`` of that pass.
    * ``stopmonitor_outbox_backlog`` — unpublished outbox rows;
      ``stopmonitor_outbox_oldest_unpublished_age_seconds`` — age of the oldest (0 when none).

    A database error yields ``stopmonitor_metrics_database_up 0`` instead of failing the scrape.
    """

    def describe(self):
        return []  # no collect() at registration time (that would query the database at import)

    def collect(self):
        from django.db import connection

        from api.models import MonitorPass
        from stopmonitor.outbox import backlog

        up = GaugeMetricFamily("stopmonitor_metrics_database_up", "1 when the database gauges could be read")
        try:
            last = (
                MonitorPass.objects.filter(completed=True, lock_held_elsewhere=False)
                .order_by("-finished_at")
                .values("finished_at", "duration_s", "watched", "triggered")
                .first()
            )
            count, age = backlog()
        except Exception:  # noqa: BLE001 - the scrape still answers
            logging.getLogger("stopmonitor.metrics").warning("database gauges unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        finally:
            if threading.current_thread() is not threading.main_thread() and not connection.in_atomic_block:
                connection.close()  # a scrape thread keeps no connection
        up.add_metric([], 1)
        yield up
        fam = GaugeMetricFamily("stopmonitor_last_completed_pass_timestamp_seconds",
                                "Unix time the last completed monitor pass ended (any process; from the database)")
        fam.add_metric([], last["finished_at"].timestamp() if last else 0.0)
        yield fam
        for name, key, help_text in (
            ("stopmonitor_last_pass_duration_seconds", "duration_s", "Duration of the last completed pass"),
            ("stopmonitor_last_pass_operations_watched", "watched", "Operations watched by the last completed pass"),
            ("stopmonitor_last_pass_triggered", "triggered", "Triggers acted on by the last completed pass"),
        ):
            g = GaugeMetricFamily(name, help_text + " (from the database)")
            g.add_metric([], float(last[key]) if last else 0.0)
            yield g
        b = GaugeMetricFamily("stopmonitor_outbox_backlog", "Outbox rows not yet published to RabbitMQ")
        b.add_metric([], count)
        yield b
        a = GaugeMetricFamily("stopmonitor_outbox_oldest_unpublished_age_seconds",
                              "Age of the oldest unpublished outbox row (0 when none)")
        a.add_metric([], age)
        yield a


class ExchangeBanCollector:
    """``stopmonitor_exchange_calls_allowed_in_seconds{venue}``: seconds until calls to the
    configured Binance venue are allowed again (0 when no 429/418 ban is in force), read from the
    stored ban horizon at scrape time."""

    def describe(self):
        return []

    def collect(self):
        from api.health import exchange_ban
        from django.conf import settings

        fam = GaugeMetricFamily("stopmonitor_exchange_calls_allowed_in_seconds",
                                "Seconds until calls to the exchange are allowed again (429/418 ban; 0 = allowed)",
                                labels=["venue"])
        try:
            seconds = exchange_ban()[1] or 0
        except Exception:  # noqa: BLE001 - the scrape still answers
            logging.getLogger("stopmonitor.metrics").warning("ban horizon unavailable", exc_info=True)
            return
        fam.add_metric([str(getattr(settings, "EXCHANGE_VENUE", ""))], float(seconds))
        yield fam


_collector_lock = threading.Lock()
_collector: DatabaseCollector | None = None


def register_database_collector(registry=REGISTRY) -> DatabaseCollector:
    """Add :class:`DatabaseCollector` to ``registry`` once per process (the web pod, the loop's server)."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = DatabaseCollector()
            registry.register(_collector)
            registry.register(ExchangeBanCollector())
        return _collector


def metrics_view(request):
    """``GET /metrics``: django-prometheus's exporter with the database gauges added."""
    from django_prometheus.exports import ExportToDjangoView

    register_database_collector()
    return ExportToDjangoView(request)


def serve(port: int, addr: str = "0.0.0.0"):
    """Serve ``/metrics`` on ``port`` from a daemon thread (``monitor_stops --loop --metrics-port``)."""
    from prometheus_client import start_http_server

    register_database_collector()
    return start_http_server(port, addr=addr)


class MetricsEndpointMiddleware:
    """Answers ``/metrics`` before host validation and the SSL redirect (placed right after the
    probe middleware): Prometheus scrapes the pod IP over plain HTTP, like the kubelet's probes, so
    ``Host:`` is not in a strict ``ALLOWED_HOSTS``.

    Only to requests that did not come through the reverse proxy: one carrying ``X-Forwarded-For``,
    ``X-Forwarded-Host`` or ``X-Forwarded-Proto`` (Traefik sets them on everything it forwards
    from the public Ingress) gets a 404 — the metrics (symbols watched, request counts, backlog)
    are not for the internet. Other methods get 405.
    """

    path = "/metrics"
    forwarded = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.http import HttpResponseNotAllowed, HttpResponseNotFound

        if request.path_info.rstrip("/") != self.path:
            return self.get_response(request)
        if any(request.META.get(header) for header in self.forwarded):
            return HttpResponseNotFound("not found", content_type="text/plain")
        if request.method not in ("GET", "HEAD"):
            return HttpResponseNotAllowed(["GET", "HEAD"])
        return metrics_view(request)
