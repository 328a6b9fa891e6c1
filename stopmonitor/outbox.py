"""The outbox relay: publish committed events to RabbitMQ's ``stop_events`` topic exchange, at least once.

:func:`stopmonitor.events.append_events` writes one ``Outbox`` row per event in the event's
transaction. :func:`publish_batch` takes a batch of unpublished rows, publishes each to the
durable topic exchange ``stop_events`` (routing key ``stop.<event_type>.<tenant>.<symbol>``,
persistent, publisher confirms) and marks the rows published only after the broker has
confirmed them. A relay that dies between the confirm and the mark leaves the rows
unpublished, so they are sent again: delivery is **at least once** and a consumer drops
duplicates by ``event_id`` (README, "Events on RabbitMQ").

Several relays may run at once (``publish_outbox`` pods, ``--loop``, Celery tasks) and each
operation's events still leave in stream order: a relay first locks the *head* of each
operation (its oldest unpublished row, ``FOR UPDATE SKIP LOCKED``), and only the holder of
an operation's head publishes any of that operation's rows. A row whose publish failed gets
``attempts + 1``, ``last_error`` and an exponential ``next_attempt_at``; while it waits, the
rows behind it in its stream wait too (order per operation beats latency).

The rows stay locked while the batch is published (a bounded wait: ``confirm_timeout`` per
message). Only relays touch outbox rows after the insert, so this holds up no engine
transaction, and a relay that is killed releases its rows at once (its transaction rolls
back) instead of after a lease.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from django.db import connection, transaction

from stopmonitor.logs import redact

log = logging.getLogger("stopmonitor.outbox")

EXCHANGE_NAME = "stop_events"
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 300.0
DEFAULT_BATCH_SIZE = 200
CONFIRM_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0


class RelayNotConfigured(Exception):
    """No broker URL (``RABBITMQ_URL`` / ``RBS_RABBITMQ_URL``): the relay cannot run."""


@dataclass
class BatchResult:
    """What one batch did: rows published, rows that failed (and will be retried), the last error."""

    claimed: int = 0
    published: int = 0
    failed: int = 0
    error: str = ""
    sequences: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"type": "outbox_batch", "claimed": self.claimed, "published": self.published,
                "failed": self.failed, "error": self.error}


def backoff_seconds(attempts: int) -> float:
    """Seconds to wait before attempt ``attempts + 1``: 2, 4, 8, … capped at 300."""
    return min(BACKOFF_BASE_SECONDS * (2 ** max(attempts - 1, 0)), BACKOFF_MAX_SECONDS)


def event_body(event) -> dict:
    """The message body for one ``StopMonitorEvent`` row (the documented contract, README).

    ``event_id`` (UUID, the dedupe key), ``sequence`` (global order), ``version`` (order in
    the operation's stream), and the event itself; Decimals in ``payload`` are already strings.
    """
    return {
        "event_id": str(event.event_id),
        "sequence": event.sequence,
        "version": event.version,
        "event_type": event.event_type,
        "operation_id": event.operation_id,
        "tenant_id": event.tenant_id,
        "symbol": event.symbol,
        "execution_token": event.execution_token,
        "source": event.source,
        "venue": event.venue,
        "created_at": event.created_at.astimezone(timezone.utc).isoformat(),
        "payload": event.payload,
    }


def broker_url_from_settings() -> str:
    """The configured RabbitMQ URL; raises :class:`RelayNotConfigured` when there is none."""
    from django.conf import settings

    url = getattr(settings, "RABBITMQ_URL", None)
    if not url:
        raise RelayNotConfigured("RABBITMQ_URL (or RBS_RABBITMQ_URL) is not set: nowhere to publish the outbox")
    return url


class Publisher:
    """A kombu connection in confirm mode to one broker, reconnected after any error.

    ``publish(routing_key, body, message_id)`` returns once the broker has confirmed the
    message (raises on a nack, a timeout or a lost connection).
    """

    def __init__(self, url: str, *, confirm_timeout: float = CONFIRM_TIMEOUT_SECONDS,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self._conn = None
        self._producer = None
        self._exchange = None

    def __repr__(self) -> str:  # the URL may hold a password
        return "<Publisher>"

    def _ensure(self):
        from kombu import Connection, Exchange, Producer

        if self._producer is not None:
            return self._producer
        conn = Connection(self.url, connect_timeout=self.connect_timeout,
                          transport_options={"confirm_publish": True})
        try:
            conn.connect()
            self._exchange = Exchange(EXCHANGE_NAME, type="topic", durable=True)
            channel = conn.channel()
            self._exchange(channel).declare()
            self._producer = Producer(channel, exchange=self._exchange)
        except Exception:
            conn.release()
            raise
        self._conn = conn
        return self._producer

    def publish(self, routing_key: str, body: dict, message_id: str) -> None:
        producer = self._ensure()
        try:
            producer.publish(
                json.dumps(body, separators=(",", ":"), default=str),
                routing_key=routing_key,
                exchange=self._exchange,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,  # persistent
                message_id=message_id,
                headers={"event_id": message_id},
                retry=False,
                timeout=self.confirm_timeout,
                confirm_timeout=self.confirm_timeout,
            )
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - a dead connection is already closed
                pass


def _claim(batch_size: int, now: datetime) -> list:
    """Lock the heads of due operations (``SKIP LOCKED``), then their unpublished rows in order.

    Runs inside the caller's transaction. Returns ``Outbox`` rows (with their events) in
    global sequence order, at most ``batch_size``; for each operation a prefix of its
    unpublished rows, cut before the first row that is not due yet.
    """
    from api.models import Outbox

    table = Outbox._meta.db_table
    lock = ""
    if connection.features.has_select_for_update:  # PostgreSQL; SQLite (development) has one writer
        lock = "FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else "FOR UPDATE"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT o.id, o.operation_id_ref FROM {table} o
            WHERE o.published_at IS NULL
              AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= %s)
              AND NOT EXISTS (
                  SELECT 1 FROM {table} p
                  WHERE p.operation_id_ref = o.operation_id_ref AND p.published_at IS NULL
                    AND p.event_id < o.event_id)
            ORDER BY o.event_id
            LIMIT %s
            {lock}
            """,
            [now, batch_size],
        )
        heads = cursor.fetchall()
    if not heads:
        return []
    operations = sorted({op for _, op in heads})
    # holding each head, the rest of these streams is ours: nobody else can hold their heads
    rows = list(
        Outbox.objects.select_for_update(of=("self",))
        .select_related("event")
        .filter(published_at__isnull=True, operation_id_ref__in=operations)
        .order_by("event_id")[:batch_size]
    )
    claimed, blocked = [], set()
    for row in rows:
        op = row.operation_id_ref
        if op in blocked:
            continue
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            blocked.add(op)  # a later row waits behind an earlier one that is backing off
            continue
        claimed.append(row)
    return claimed


def publish_batch(publisher: Publisher, *, batch_size: int = DEFAULT_BATCH_SIZE, now: datetime | None = None,
                  after_publish: Callable[[list], Any] | None = None) -> BatchResult:
    """Publish one batch of due outbox rows; returns what happened. Commits; reaches the broker.

    Must be called outside any transaction. Each row is published with a publisher confirm,
    in global sequence order; the first failure (broker down, nack, confirm timeout) ends the
    batch. Confirmed rows get ``published_at``; the failed row and the rest of the batch
    ``attempts + 1``, ``last_error`` and ``next_attempt_at`` (:func:`backoff_seconds`). ``after_publish(rows)`` runs after the confirms and before the
    mark (tests use it to crash a relay there). ``now`` (UTC) decides which rows are due.
    """
    from api.models import Outbox

    if connection.in_atomic_block:
        raise RuntimeError("publish_batch must be called outside any transaction")
    now = now or datetime.now(timezone.utc)
    result = BatchResult()
    with transaction.atomic():
        rows = _claim(batch_size, now)
        result.claimed = len(rows)
        if not rows:
            return result
        published, failed = [], []
        for i, row in enumerate(rows):
            try:
                publisher.publish(row.routing_key, event_body(row.event), str(row.event.event_id))
            except Exception as exc:  # noqa: BLE001 - any broker failure: keep the rows, retry later
                result.error = redact(f"{type(exc).__name__}: {exc}")[:500]
                failed = rows[i:]
                break
            published.append(row)
        if after_publish is not None:
            after_publish(published)
        if published:
            Outbox.objects.filter(pk__in=[r.pk for r in published]).update(published_at=datetime.now(timezone.utc))
        for row in failed:
            row.attempts += 1
            row.last_error = result.error
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.attempts))
            row.save(update_fields=["attempts", "last_error", "next_attempt_at"])
    result.published = len(published)
    result.failed = len(failed)
    result.sequences = [r.event_id for r in published]
    if failed:
        log.warning("outbox publish failed", extra={"published": result.published, "failed": result.failed,
                                                    "error": result.error})
    from stopmonitor import metrics

    metrics.observe_outbox_batch(result)
    return result


def drain(publisher: Publisher, *, batch_size: int = DEFAULT_BATCH_SIZE, now: datetime | None = None,
          max_batches: int = 1000) -> BatchResult:
    """Publish batches until nothing due is left, a batch fails, or ``max_batches``; the totals."""
    total = BatchResult()
    for _ in range(max_batches):
        r = publish_batch(publisher, batch_size=batch_size, now=now)
        total.claimed += r.claimed
        total.published += r.published
        total.failed += r.failed
        total.error = r.error or total.error
        total.sequences.extend(r.sequences)
        if r.claimed == 0 or r.failed:
            break
    return total


def backlog(now: datetime | None = None) -> tuple[int, float]:
    """``(unpublished rows, age in seconds of the oldest)``; ``(0, 0.0)`` when empty. One query."""
    from django.db.models import Count, Min

    from api.models import Outbox

    now = now or datetime.now(timezone.utc)
    agg = Outbox.objects.filter(published_at__isnull=True).aggregate(n=Count("id"), oldest=Min("created_at"))
    if not agg["n"]:
        return 0, 0.0
    return agg["n"], max((now - agg["oldest"]).total_seconds(), 0.0)
