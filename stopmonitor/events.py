"""The event store's one writer: :func:`append_events`, and readers of a stream.

An append writes the events, the execution projection rows they change and one outbox row
per event in the caller's transaction (invariant 8: events are never updated or deleted).
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Iterable, Sequence

from django.db import IntegrityError, connection, transaction

from stopmonitor import chain
from stopmonitor.execution import NewEvent, StoredEvent, apply
from stopmonitor.protection import PROTECTION_EVENT_TYPES

# pg_advisory_xact_lock key serializing appends, so that global sequence order is commit
# order and a reader of /events/?after=SEQ never skips an event committed late.
APPEND_LOCK_KEY = 0x53544F50  # "STOP"


class ConcurrencyConflict(Exception):
    """The stream moved on: ``expected_version`` is not its current version. Nothing was written;
    re-read the stream and decide again (another writer got there first)."""


_STORED_COLUMNS = ("operation_id", "tenant_id", "symbol", "version", "event_type", "execution_token", "source",
                   "venue", "payload", "created_at")


def stream_head(operation_id: int) -> tuple[int, StoredEvent | None]:
    """``(current version, last event)`` of an operation's stream; ``(0, None)`` when empty.

    On PostgreSQL one hand-written statement over the (operation, version) index (each of the
    close's transactions reads it before its order: no query compiled, no model built)."""
    from api.models import StopMonitorEvent

    if connection.vendor == "postgresql":
        field = StopMonitorEvent._meta.get_field("payload")
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {', '.join(_STORED_COLUMNS)} FROM "
                           f"{connection.ops.quote_name(StopMonitorEvent._meta.db_table)} "
                           "WHERE operation_id = %s ORDER BY version DESC LIMIT 1", [operation_id])
            row = cursor.fetchone()
        if row is None:
            return 0, None
        values = dict(zip(_STORED_COLUMNS, row))
        values["payload"] = field.from_db_value(values["payload"], None, connection)
        return values["version"], StoredEvent(**values)
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
    if not connection.in_atomic_block:
        raise RuntimeError("append_events must run inside transaction.atomic")
    if not events:
        return []
    current, prev_hash, last_sequence, texts, sequences = _lock_and_read_head(operation.pk, [e.payload for e in events])
    if current != expected_version:
        raise ConcurrencyConflict(
            f"operation {operation.pk}: stream at version {current}, expected {expected_version}"
        )
    rows = _chained_rows(operation, expected_version, events, texts, prev_hash, source=source, venue=venue, now=now)
    if sequences is not None:  # PostgreSQL: the events and their outbox rows in one statement
        saved = _insert_with_outbox(operation.pk, rows, texts, last_sequence, sequences, now)
        _project(saved)
        return saved
    saved = _insert_linked(operation.pk, rows, last_sequence)
    _project(saved)
    _write_outbox(saved, now)
    return saved


def _lock_and_read_head(operation_id: int, payloads: list) -> tuple[int, bytes | None, int | None, list[str],
                                                                   list[int] | None]:
    """Take the append lock (PostgreSQL; its own statement: what follows reads a snapshot taken under
    it) and read ``(the stream's version, its last chain hash, the last committed sequence, each
    payload as the database prints it, the sequence values drawn for the events)``; elsewhere the
    same from the ORM and :func:`_chain_inputs`, with no sequences drawn (None: the inserts number them)."""
    from api.models import StopMonitorEvent

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
        return _head_and_chain_inputs(operation_id, payloads)
    current, prev_hash = (
        StopMonitorEvent.objects.filter(operation_id=operation_id).order_by("-version")
        .values_list("version", "chain_hash").first()
    ) or (0, None)
    last_sequence, texts = _chain_inputs(payloads)
    return current, prev_hash, last_sequence, texts, None


def _chained_rows(operation, expected_version: int, events: Sequence[NewEvent], texts: list[str],
                  prev_hash: bytes | None, *, source: str, venue: str, now: datetime) -> list:
    """Unsaved ``StopMonitorEvent`` rows for ``events`` as versions ``expected_version+1 …``, each
    with its chain hash (:func:`stopmonitor.chain.link` from ``prev_hash``, the stream's last)."""
    from api.models import StopMonitorEvent

    symbol = operation.symbol.symbol
    rows = []
    for i, (e, text) in enumerate(zip(events, texts), start=1):
        version = expected_version + i
        prev_hash = chain.link(prev_hash, chain.header(operation.pk, version, e.event_type, operation.client_id,
                                                       symbol, e.execution_token, source, venue, now), text)
        rows.append(StopMonitorEvent(
            operation_id=operation.pk,
            version=version,
            event_type=e.event_type,
            tenant_id=operation.client_id,
            symbol=symbol,
            execution_token=e.execution_token,
            source=source,
            venue=venue,
            payload=e.payload,
            created_at=now,
            chain_hash=prev_hash,
        ))
    return rows


def _insert_linked(operation_id: int, rows: list, last_sequence: int | None) -> list:
    """Insert ``rows`` in order in a savepoint, each naming the event committed before it
    (``prev_sequence``); returns them saved. A unique-version violation (a concurrent writer)
    rolls the savepoint back and raises :class:`ConcurrencyConflict`."""
    try:
        with transaction.atomic():
            saved = []
            for row in rows:
                row.prev_sequence = last_sequence
                saved.append(_insert(row))
                last_sequence = row.sequence
    except IntegrityError as exc:
        raise ConcurrencyConflict(f"operation {operation_id}: version taken by a concurrent writer") from exc
    return saved


_EVENT_COLUMNS = ("sequence", "prev_sequence", "event_id", "operation_id", "version", "event_type", "tenant_id",
                  "symbol", "execution_token", "source", "venue", "payload", "created_at", "chain_hash")


def _insert_with_outbox(operation_id: int, rows: list, texts: list[str], last_sequence: int | None,
                        sequences: list[int], now: datetime) -> list:
    """PostgreSQL: insert ``rows`` with the ``sequences`` drawn under the append lock (each naming the
    one committed before it) and their outbox rows, in ONE statement and no savepoint (the ORM's
    inserts in a savepoint, then the outbox: five round trips). Returns the rows, saved.

    A version taken by a concurrent writer (the unique (operation, version) constraint, the last
    guard: never while every writer takes the append lock) inserts nothing of it; the innermost
    atomic block is then marked for rollback, so nothing of this call survives it, and
    :class:`ConcurrencyConflict` is raised."""
    from api.models import Outbox, StopMonitorEvent

    events = connection.ops.quote_name(StopMonitorEvent._meta.db_table)
    outbox = connection.ops.quote_name(Outbox._meta.db_table)
    values, params = [], []
    for row, text, sequence in zip(rows, texts, sequences):
        row.sequence, row.prev_sequence = sequence, last_sequence
        last_sequence = sequence
        values.append("(" + ", ".join(["%s"] * 11 + ["%s::jsonb", "%s", "%s"]) + ")")
        params += [row.sequence, row.prev_sequence, row.event_id, row.operation_id, row.version, row.event_type,
                   row.tenant_id, row.symbol, row.execution_token, row.source, row.venue, text, row.created_at,
                   row.chain_hash]
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH ins AS (INSERT INTO {events} ({', '.join(_EVENT_COLUMNS)}) VALUES {', '.join(values)} "
            f"ON CONFLICT ON CONSTRAINT event_stream_version_uniq DO NOTHING "
            f"RETURNING sequence, operation_id, event_type, tenant_id, symbol), "
            f"ob AS (INSERT INTO {outbox} (event_id, operation_id_ref, routing_key, created_at, attempts, last_error) "
            f"SELECT sequence, operation_id, {_ROUTING_KEY_SQL}, %s, 0, '' FROM ins) "
            f"SELECT count(*) FROM ins", [*params, now])
        inserted = cursor.fetchone()[0]
    if inserted != len(rows):
        transaction.set_rollback(True)
        raise ConcurrencyConflict(f"operation {operation_id}: version taken by a concurrent writer")
    for row in rows:
        row._state.adding, row._state.db = False, connection.alias
    return rows


def _write_outbox(saved: list, now: datetime) -> None:
    """One ``Outbox`` row per saved event, with its routing key, in one bulk insert."""
    from api.models import Outbox

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


# Staging table of :func:`append_many` (a temporary table of the session, emptied at every commit):
# one row per event to append. A set-based caller may fill it with ``INSERT … SELECT`` (see
# :func:`append_stage`) and call ``append_many(staged=True)``; the list form copies its items in.
APPEND_STAGE = "stopmonitor_append_stage"
_APPEND_STAGE_DDL = f"""
DO $$ BEGIN
  IF to_regclass('pg_temp.{APPEND_STAGE}') IS NULL THEN
    CREATE TEMPORARY TABLE {APPEND_STAGE} (
      operation_id bigint NOT NULL,       -- the stream
      expected_version integer NOT NULL,  -- its version the events were decided on (same for all its rows)
      ord integer NOT NULL,               -- 1, 2, … within the stream: version = expected_version + ord
      event_type varchar(32) NOT NULL,
      tenant_id bigint NOT NULL,
      symbol varchar(20) NOT NULL,
      execution_token varchar(36),
      payload jsonb NOT NULL
    ) ON COMMIT DELETE ROWS;
  END IF;
END $$"""


def append_stage() -> str:
    """The name of this session's staging table for :func:`append_many` (PostgreSQL; created on first use).

    Columns: ``operation_id, expected_version, ord, event_type, tenant_id, symbol, execution_token,
    payload`` (jsonb). Rows are removed by the append (and at every commit or rollback).
    """
    with connection.cursor() as cursor:
        cursor.execute(_APPEND_STAGE_DDL)
    return APPEND_STAGE


def append_many(items=(), *, source: str, venue: str, now: datetime, staged: bool = False,
                relation: str | None = None) -> int:
    """Append to many streams at once: ``items`` is ``[(operation, expected_version, [NewEvent…])]``.

    The bulk form of :func:`append_events` for set-based writers (``backfill_stop_price``):
    one append lock, one version check for all streams, one ``INSERT … SELECT`` of the events and
    their outbox rows per position in the streams (every stream's first new event, then every
    second, …: each chains to the hash the previous statement wrote; global sequence drawn under
    the append lock, so sequence order is still commit order, and version order within a stream). With ``staged=True`` (PostgreSQL) the events are the rows the caller
    put in :func:`append_stage` in this transaction, not ``items``: that lets a caller compute
    payloads in SQL and never bring them to Python. ``relation`` (with ``staged=True``) names
    another relation with the staging table's columns to read the events from instead — a
    temporary view over the caller's own table saves copying the rows; it is left as it is.

    Same transaction rules and guarantees as :func:`append_events`; raises
    :class:`ConcurrencyConflict` naming every stream that moved, writing nothing — its ``moved``
    attribute is ``{operation_id: (current version, expected version)}``, and with ``staged=True``
    the staged rows are left in place so the caller can drop those streams and call again.
    Returns the number of events written.
    """

    if not connection.in_atomic_block:
        raise RuntimeError("append_many must run inside transaction.atomic")
    items = [(op, v, evs) for op, v, evs in items if evs]
    if connection.vendor != "postgresql":
        return _append_each(items, staged, source=source, venue=venue, now=now)
    if not staged and not items:
        return 0
    if relation is not None and not staged:
        raise RuntimeError("append_many(relation=...) needs staged=True")
    if staged:  # the caller's rows: left in place on a conflict
        return _append_staged(relation or append_stage(), source=source, venue=venue, now=now,
                              keep=relation is not None)
    stage = append_stage()
    _copy_to_stage(stage, items)
    try:
        return _append_staged(stage, source=source, venue=venue, now=now)
    except ConcurrencyConflict:
        with connection.cursor() as cursor:  # the rows this call copied in
            cursor.execute(f"TRUNCATE {stage}")
        raise


def _append_each(items: list, staged: bool, *, source: str, venue: str, now: datetime) -> int:
    """Not PostgreSQL: :func:`append_events` for each stream in turn (no staged form); returns the events written."""
    if staged:
        raise RuntimeError("append_many(staged=True) needs PostgreSQL")
    for op, version, evs in items:
        append_events(op, version, evs, source=source, venue=venue, now=now)
    return sum(len(evs) for _, _, evs in items)


def _copy_to_stage(stage: str, items: list) -> None:
    """COPY ``items`` (``[(operation, expected_version, [NewEvent…])]``) into the staging table, one row per event."""
    raw = connection.connection  # the psycopg connection, inside Django's transaction
    with raw.cursor() as cur, cur.copy(
        f"COPY {stage} (operation_id, expected_version, ord, event_type, tenant_id, symbol, execution_token, "
        "payload) FROM STDIN"
    ) as copy:
        for op, version, evs in items:
            symbol = op.symbol.symbol
            for i, e in enumerate(evs, start=1):
                copy.write_row((op.pk, version, i, e.event_type, op.client_id, symbol, e.execution_token,
                                json.dumps(e.payload)))


def _append_staged(stage: str, *, source: str, venue: str, now: datetime, keep: bool = False) -> int:
    """The set-based append of the rows of ``stage`` (see :func:`append_many`), on PostgreSQL."""
    from api.models import Outbox, StopMonitorEvent

    events = connection.ops.quote_name(StopMonitorEvent._meta.db_table)
    outbox = connection.ops.quote_name(Outbox._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
        cursor.execute(
            f"SELECT s.operation_id, COALESCE(h.v, 0), s.expected FROM "
            f"(SELECT operation_id, min(expected_version) AS expected, max(expected_version) AS expected_max "
            f" FROM {stage} GROUP BY operation_id) AS s "
            f"LEFT JOIN LATERAL (SELECT max(e.version) AS v FROM {events} e WHERE e.operation_id = s.operation_id) h "
            f"ON true WHERE COALESCE(h.v, 0) <> s.expected OR s.expected <> s.expected_max ORDER BY 1"
        )
        moved = {op_id: (current, expected) for op_id, current, expected in cursor.fetchall()}
        if moved:
            listed = ", ".join(f"{op_id} (at {cur}, expected {exp})" for op_id, (cur, exp) in list(moved.items())[:20])
            conflict = ConcurrencyConflict(f"streams moved since they were read: operations {listed}")
            conflict.moved = moved
            raise conflict
        # one INSERT per position in the streams (ord 1, then 2, …): each event chains to the hash of
        # the one before it, which for ord > 1 a previous statement of this loop wrote. Sequence values
        # are drawn here under the append lock (in operation order within a pass) and each event names
        # the event committed before it (prev_sequence). The outbox rows are made from the inserted events.
        serial = _serial_sequence(cursor, StopMonitorEvent._meta.db_table)
        total, projected = 0, []
        try:
            with transaction.atomic():
                for ord_ in itertools.count(1):
                    cursor.execute(_staged_insert_sql(stage, events, outbox),
                                   {"source": source, "venue": venue, "now": now, "ord": ord_, "serial": serial,
                                    "created_us": chain.micros(now)})
                    n, tokens, more = cursor.fetchone()
                    total += n
                    projected.extend(tokens or ())
                    if not more:
                        break
        except IntegrityError as exc:
            raise ConcurrencyConflict("a version was taken by a concurrent writer") from exc
        if not keep:
            cursor.execute(f"TRUNCATE {stage}")
    if projected:
        _project(StopMonitorEvent.objects.filter(sequence__in=projected).order_by("sequence"))
    return total


_SERIALS: dict[str, str] = {}


def _serial_sequence(cursor, table: str) -> str:
    """The name of the sequence behind ``table``'s ``sequence`` column (looked up once per process)."""
    if table not in _SERIALS:
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'sequence')", [table])
        _SERIALS[table] = cursor.fetchone()[0]
    return _SERIALS[table]


def _staged_insert_sql(stage: str, events: str, outbox: str) -> str:
    """One pass of :func:`_append_staged`: the staged events at position ``%(ord)s`` of their stream and
    their outbox rows. The first event of the pass names the last committed one (``max(sequence)`` is
    read before this statement's rows exist, and sees the previous passes'). Returns (rows, the
    sequences of events with a token, whether the stage has events at a later position)."""
    prev = (f"CASE WHEN src.version > 1 THEN (SELECT p.chain_hash FROM {events} p "
            f"WHERE p.operation_id = src.operation_id AND p.version = src.version - 1) END")
    link = chain.link_sql(prev, source="%(source)s::text", venue="%(venue)s::text", created_us="%(created_us)s::bigint")
    return (
        f"WITH src AS ("
        f" SELECT nextval(%(serial)s::regclass) AS seq, s.operation_id, s.expected_version + s.ord AS version,"
        f"  s.event_type, s.tenant_id, s.symbol, s.execution_token, s.payload"
        f" FROM {stage} s WHERE s.ord = %(ord)s ORDER BY s.operation_id"
        f"), ins AS ("
        f" INSERT INTO {events} (sequence, prev_sequence, event_id, operation_id, version, event_type, tenant_id,"
        f"  symbol, execution_token, source, venue, payload, created_at, chain_hash)"
        f" SELECT seq, lag(seq, 1, (SELECT max(sequence) FROM {events})) OVER (ORDER BY seq), {UUID7_SQL_FUNCTION}(),"
        f"  operation_id, version,"
        f"  event_type, tenant_id, symbol, execution_token, %(source)s, %(venue)s, payload, %(now)s, {link}"
        f" FROM src ORDER BY seq"
        f" RETURNING sequence, operation_id, event_type, tenant_id, symbol, execution_token"
        f"), ob AS ("
        f" INSERT INTO {outbox} (event_id, operation_id_ref, routing_key, created_at, attempts, last_error)"
        f" SELECT sequence, operation_id, {_ROUTING_KEY_SQL}, %(now)s, 0, '' FROM ins"
        f") SELECT count(*), array_agg(sequence ORDER BY sequence) FILTER (WHERE execution_token IS NOT NULL), "
        f"EXISTS (SELECT 1 FROM {stage} s WHERE s.ord > %(ord)s) FROM ins"
    )


def _head_and_chain_inputs(operation_id: int, payloads: list) -> tuple[int, bytes | None, int | None, list[str],
                                                                      list[int]]:
    """PostgreSQL, under the append lock: ``(the stream's version, its last chain hash, the last
    committed sequence, each payload as the database prints it, one sequence value drawn for each
    payload)`` in ONE statement (the stream head and :func:`_chain_inputs` were two: one round trip
    fewer in each of the close's transactions). Drawn under the append lock, the sequence values
    are in commit order; a conflict after this leaves a gap, as a rolled back insert always did."""
    from api.models import StopMonitorEvent

    encoder = StopMonitorEvent._meta.get_field("payload").encoder
    table = connection.ops.quote_name(StopMonitorEvent._meta.db_table)
    with connection.cursor() as cursor:
        serial = _serial_sequence(cursor, StopMonitorEvent._meta.db_table)
        cursor.execute(
            f"SELECT h.version, h.chain_hash, (SELECT max(sequence) FROM {table}), "
            f"ARRAY(SELECT t::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i), "
            f"ARRAY(SELECT nextval(%s::regclass) FROM generate_series(1, %s)) "
            f"FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT version, chain_hash FROM {table} "
            f"WHERE operation_id = %s ORDER BY version DESC LIMIT 1) AS h ON true",
            [[json.dumps(p, cls=encoder) for p in payloads], serial, len(payloads), operation_id])
        version, prev_hash, last, texts, sequences = cursor.fetchone()
    return version or 0, bytes(prev_hash) if prev_hash is not None else None, last, texts, sorted(sequences)


def _chain_inputs(payloads: list) -> tuple[int | None, list[str]]:
    """``(the last committed sequence, each payload as the database will print it)`` for :func:`append_events`
    (caller holds the append lock): one query on PostgreSQL (``jsonb`` text), the stored JSON text elsewhere."""
    from api.models import StopMonitorEvent

    encoder = StopMonitorEvent._meta.get_field("payload").encoder
    dumped = [json.dumps(p, cls=encoder) for p in payloads]
    if connection.vendor != "postgresql":
        last = StopMonitorEvent.objects.order_by("-sequence").values_list("sequence", flat=True).first()
        return last, dumped
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT max(sequence) FROM {connection.ops.quote_name(StopMonitorEvent._meta.db_table)}), "
            f"ARRAY(SELECT t::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i) ORDER BY i)", [dumped])
        last, texts = cursor.fetchone()
    return last, texts


# the SQL function that makes a set-based append's event ids: UUID version 7 like the model's
# default (``uuid6.uuid7``); created by migration 0020 (:class:`api.db_operations.CreateUUID7Function`)
UUID7_SQL_FUNCTION = "stopmonitor_uuid7"

# :func:`routing_key` in SQL, over the columns of an inserted event
_ROUTING_KEY_SQL = "'stop.' || event_type || '.' || tenant_id || '.' || symbol"


def _insert(row):
    row.save(force_insert=True)
    return row


def _project(saved: Iterable) -> None:
    """Update the execution projection for the events just appended (same transaction)."""
    from api.models import StopMonitorExecution

    for row in saved:
        if row.event_type in PROTECTION_EVENT_TYPES:
            _project_protection(row)
        if not row.execution_token:
            continue
        if connection.vendor == "postgresql":  # hand-written: no query compiled, no model built
            current = _execution_state_pg(row.execution_token)
            state = apply(current, to_stored(row))
            _save_execution_state_pg(state, exists=current is not None)
            continue
        current = StopMonitorExecution.objects.filter(pk=row.execution_token).first()
        state = apply(execution_state_of(current) if current else None, to_stored(row))
        save_execution_state(state, exists=current is not None)


def _execution_state_pg(token: str):
    """PostgreSQL: the :class:`~stopmonitor.execution.ExecutionState` of ``token``'s projection row, or None."""
    from api.models import StopMonitorExecution
    from stopmonitor.execution import ExecutionState, state_field_names

    names = state_field_names()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(names)} FROM {connection.ops.quote_name(StopMonitorExecution._meta.db_table)} "
                       "WHERE execution_token = %s", [token])
        found = cursor.fetchone()
    return ExecutionState(**dict(zip(names, found))) if found is not None else None


def _save_execution_state_pg(state, exists: bool) -> None:
    """PostgreSQL: :func:`save_execution_state` as one hand-written UPDATE or INSERT; each value
    prepared by its model field as the ORM prepares it (Decimals rounded to the column's places the
    same way, so a rebuild through the ORM writes the same rows)."""
    from api.models import StopMonitorExecution
    from stopmonitor.execution import state_field_names

    meta = StopMonitorExecution._meta
    names = state_field_names()
    values = [meta.get_field(n.removesuffix("_id") if n in ("operation_id", "tenant_id") else n)
              .get_db_prep_save(getattr(state, n), connection) for n in names]
    table = connection.ops.quote_name(meta.db_table)
    with connection.cursor() as cursor:
        if exists:
            cursor.execute(f"UPDATE {table} SET {', '.join(f'{n} = %s' for n in names[1:])} WHERE execution_token = %s",
                           [*values[1:], values[0]])
        else:
            cursor.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})", values)


def _project_protection(row) -> None:
    """Fold one protection event into the operation's ``StopMonitorProtection`` row (same transaction)."""
    from api.models import StopMonitorProtection
    from stopmonitor.protection import ProtectionState, apply_protection, protection_field_names

    names = protection_field_names()
    current = StopMonitorProtection.objects.filter(pk=row.operation_id).first()
    state = ProtectionState(**{n: getattr(current, n) for n in names}) if current else None
    new = apply_protection(state, to_stored(row))
    values = {n: getattr(new, n) for n in names if n != "operation_id"}
    if current is not None:  # read in this transaction, under the append lock: one UPDATE, no savepoint
        StopMonitorProtection.objects.filter(pk=new.operation_id).update(**values)
    else:
        StopMonitorProtection.objects.create(operation_id=new.operation_id, **values)


def execution_state_of(model):
    """``StopMonitorExecution`` row → :class:`~stopmonitor.execution.ExecutionState` (the one conversion)."""
    from stopmonitor.execution import ExecutionState, state_field_names

    return ExecutionState(**{name: getattr(model, name) for name in state_field_names()})


def save_execution_state(state, exists: bool | None = None) -> None:
    """Write an :class:`~stopmonitor.execution.ExecutionState` as its ``StopMonitorExecution`` row.
    ``exists``: whether the row is known to exist (read in this transaction under the append
    lock): one UPDATE or one INSERT instead of ``update_or_create``'s savepoint, locking read and
    write (the close's three transactions each write it: 9 statements fewer before and after
    the order). None: not known, ``update_or_create``."""
    from api.models import StopMonitorExecution
    from stopmonitor.execution import state_field_names

    values = {name: getattr(state, name) for name in state_field_names() if name != "execution_token"}
    if exists is None:
        StopMonitorExecution.objects.update_or_create(execution_token=state.execution_token, defaults=values)
    elif exists:
        StopMonitorExecution.objects.filter(pk=state.execution_token).update(**values)
    else:
        StopMonitorExecution.objects.create(execution_token=state.execution_token, **values)
