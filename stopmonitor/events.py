"""The event store's one writer: :func:`append_events`, and readers of a stream.

An append writes the events, the execution projection rows they change and one outbox row
per event in the caller's transaction (invariant 8: events are never updated or deleted).
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, Sequence

from django.db import IntegrityError, connection, transaction

from stopmonitor.execution import NewEvent, StoredEvent, apply

# pg_advisory_xact_lock key serializing appends, so that global sequence order is commit
# order and a reader of /events/?after=SEQ never skips an event committed late.
APPEND_LOCK_KEY = 0x53544F50  # "STOP"


class ConcurrencyConflict(Exception):
    """The stream moved on: ``expected_version`` is not its current version. Nothing was written;
    re-read the stream and decide again (another writer got there first)."""


def stream_head(operation_id: int) -> tuple[int, StoredEvent | None]:
    """``(current version, last event)`` of an operation's stream; ``(0, None)`` when empty."""
    from api.models import StopMonitorEvent

    last = StopMonitorEvent.objects.filter(operation_id=operation_id).order_by("-version").first()
    if last is None:
        return 0, None
    return last.version, to_stored(last)


def to_stored(row) -> StoredEvent:
    """Convert a ``StopMonitorEvent`` row into the domain :class:`StoredEvent`."""
    return StoredEvent(
        operation_id=row.operation_id,
        tenant_id=row.tenant_id,
        symbol=row.symbol,
        version=row.version,
        event_type=row.event_type,
        execution_token=row.execution_token,
        source=row.source,
        venue=row.venue,
        payload=row.payload,
        created_at=row.created_at,
    )


def routing_key(event_type: str, tenant_id: int, symbol: str) -> str:
    """RabbitMQ routing key ``stop.<event_type>.<tenant>.<symbol>`` (topic exchange ``stop_events``)."""
    return f"stop.{event_type}.{tenant_id}.{symbol}"


def append_events(
    operation,
    expected_version: int,
    events: Sequence[NewEvent],
    *,
    source: str,
    venue: str,
    now: datetime,
) -> list:
    """Append ``events`` to ``operation``'s stream as versions ``expected_version+1 …``.

    Must run inside ``transaction.atomic`` (the caller's, usually holding the operation's row
    lock). Writes, in that transaction: the events, the ``StopMonitorExecution`` rows they
    change (folded with :func:`stopmonitor.execution.apply`), and one ``Outbox`` row each.
    Returns the saved ``StopMonitorEvent`` rows (with their global ``sequence``).

    Raises :class:`ConcurrencyConflict` when the stream is not at ``expected_version`` (the
    unique (operation, version) constraint is the last guard), leaving nothing written
    by this call.
    """
    from api.models import Outbox, StopMonitorEvent

    if not connection.in_atomic_block:
        raise RuntimeError("append_events must run inside transaction.atomic")
    if not events:
        return []
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
    current = (
        StopMonitorEvent.objects.filter(operation_id=operation.pk).order_by("-version").values_list("version", flat=True).first()
    ) or 0
    if current != expected_version:
        raise ConcurrencyConflict(
            f"operation {operation.pk}: stream at version {current}, expected {expected_version}"
        )
    symbol = operation.symbol.symbol
    rows = [
        StopMonitorEvent(
            operation_id=operation.pk,
            version=expected_version + i,
            event_type=e.event_type,
            tenant_id=operation.client_id,
            symbol=symbol,
            execution_token=e.execution_token,
            source=source,
            venue=venue,
            payload=e.payload,
            created_at=now,
        )
        for i, e in enumerate(events, start=1)
    ]
    try:
        with transaction.atomic():
            saved = [_insert(row) for row in rows]
    except IntegrityError as exc:
        raise ConcurrencyConflict(f"operation {operation.pk}: version taken by a concurrent writer") from exc
    _project(saved)
    Outbox.objects.bulk_create(
        [
            Outbox(
                event=row,
                operation_id_ref=row.operation_id,
                routing_key=routing_key(row.event_type, row.tenant_id, row.symbol),
                created_at=now,
            )
            for row in saved
        ]
    )
    return saved


def append_many(items, *, source: str, venue: str, now: datetime) -> int:
    """Append to many streams at once: ``items`` is ``[(operation, expected_version, [NewEvent…])]``.

    The bulk form of :func:`append_events` for set-based writers (``backfill_stop_price``):
    one append lock, one version check for all streams, and on PostgreSQL the events and
    their outbox rows go in with ``COPY`` (sequence values drawn from the event sequence
    under the append lock, so sequence order is still commit order). Same transaction rules
    and guarantees as :func:`append_events`; raises :class:`ConcurrencyConflict` naming every
    stream that moved, writing nothing. Returns the number of events written.
    """
    import json
    import uuid

    from api.models import Outbox, StopMonitorEvent

    if not connection.in_atomic_block:
        raise RuntimeError("append_many must run inside transaction.atomic")
    items = [(op, v, evs) for op, v, evs in items if evs]
    if not items:
        return 0
    if connection.vendor != "postgresql":
        for op, version, evs in items:
            append_events(op, version, evs, source=source, venue=venue, now=now)
        return sum(len(evs) for _, _, evs in items)
    from django.db.models import Max

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
    ids = [op.pk for op, _, _ in items]
    current = dict(
        StopMonitorEvent.objects.filter(operation_id__in=ids).values("operation_id").annotate(v=Max("version"))
        .values_list("operation_id", "v")
    )
    moved = [op.pk for op, v, _ in items if current.get(op.pk, 0) != v]
    if moved:
        raise ConcurrencyConflict(f"streams moved since they were read: operations {moved[:20]}")
    total = sum(len(evs) for _, _, evs in items)
    table = StopMonitorEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT nextval(pg_get_serial_sequence('{table}', 'sequence')) FROM generate_series(1, %s) ORDER BY 1",
            [total],
        )
        sequences = [row[0] for row in cursor.fetchall()]
    events_rows, outbox_rows, projected = [], [], []
    seq = iter(sequences)
    for op, version, evs in items:
        symbol = op.symbol.symbol
        for i, e in enumerate(evs, start=1):
            n = next(seq)
            events_rows.append((n, str(uuid.uuid4()), op.pk, version + i, e.event_type, op.client_id, symbol,
                                e.execution_token, source, venue, json.dumps(e.payload), now))
            outbox_rows.append((n, op.pk, routing_key(e.event_type, op.client_id, symbol), now, 0, ""))
            if e.execution_token:
                projected.append(n)
    raw = connection.connection  # the psycopg connection, inside Django's transaction
    with raw.cursor() as cur:
        with cur.copy(
            f"COPY {table} (sequence, event_id, operation_id, version, event_type, tenant_id, symbol, "
            "execution_token, source, venue, payload, created_at) FROM STDIN"
        ) as copy:
            for row in events_rows:
                copy.write_row(row)
        with cur.copy(
            f"COPY {Outbox._meta.db_table} (event_id, operation_id_ref, routing_key, created_at, attempts, last_error) "
            "FROM STDIN"
        ) as copy:
            for row in outbox_rows:
                copy.write_row(row)
    if projected:
        _project(StopMonitorEvent.objects.filter(sequence__in=projected).order_by("sequence"))
    return total


def _insert(row):
    row.save(force_insert=True)
    return row


def _project(saved: Iterable) -> None:
    """Update the execution projection for the events just appended (same transaction)."""
    from api.models import StopMonitorExecution

    for row in saved:
        if not row.execution_token:
            continue
        current = StopMonitorExecution.objects.filter(pk=row.execution_token).first()
        state = apply(execution_state_of(current) if current else None, to_stored(row))
        save_execution_state(state)


def execution_state_of(model):
    """``StopMonitorExecution`` row → :class:`~stopmonitor.execution.ExecutionState` (the one conversion)."""
    from stopmonitor.execution import ExecutionState, state_field_names

    return ExecutionState(**{name: getattr(model, name) for name in state_field_names()})


def save_execution_state(state) -> None:
    """Write an :class:`~stopmonitor.execution.ExecutionState` as its ``StopMonitorExecution`` row."""
    from api.models import StopMonitorExecution
    from stopmonitor.execution import state_field_names

    values = {name: getattr(state, name) for name in state_field_names() if name != "execution_token"}
    StopMonitorExecution.objects.update_or_create(execution_token=state.execution_token, defaults=values)
