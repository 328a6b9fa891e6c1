"""Rebuild and verify the execution projection from the event log (invariant 8).

Both stream: the events that carry an execution token are read through a server-side cursor
ordered by ``(execution_token, sequence)``, so each execution's events arrive together and in
their global order, and :func:`stopmonitor.execution.apply` folds one execution at a time (the
fold of an execution depends on its own events only, so this is the fold of the log in
sequence order). Memory holds one chunk of events and one chunk of folded rows, whatever the
size of the log. :func:`rebuild` writes the rows with ``COPY`` in chunks (through a temporary
table, writing only what differs, when the projection already has rows); :func:`verify`
compares each chunk with the stored rows of the same tokens, then lists stored rows that no
event explains. ``bench/bench_rebuild.py`` measures both on a million events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from operator import attrgetter
from typing import Iterator

from django.db import connection, transaction

from stopmonitor.events import APPEND_LOCK_KEY, execution_state_of, save_execution_state
from stopmonitor.execution import ExecutionState, StoredEvent, apply, state_field_names

FETCH = 5000  # events per fetch from the server-side cursor
CHUNK = 1000  # folded rows per COPY or per comparison with the stored rows (5000: +40 MB peak, no faster)

_STAGE = "stopmonitor_projection_stage"  # rebuild's temporary table, dropped before it returns
_JSON = json.JSONDecoder()  # json.loads's decoder (no hooks): payloads decode to the dicts the ORM gives
_EVENT_COLUMNS = ("operation_id", "tenant_id", "symbol", "version", "event_type", "execution_token", "source",
                  "venue", "payload", "created_at")


def _tables() -> tuple[str, str]:
    from api.models import StopMonitorEvent, StopMonitorExecution

    qn = connection.ops.quote_name
    return qn(StopMonitorEvent._meta.db_table), qn(StopMonitorExecution._meta.db_table)


def _columns() -> list[str]:
    """The projection's columns, in :func:`state_field_names` order."""
    from api.models import StopMonitorExecution

    return [StopMonitorExecution._meta.get_field(name).column for name in state_field_names()]


def _events(operation_id: int | None) -> Iterator[StoredEvent]:
    """The events that carry an execution token, ordered by ``(execution_token, sequence)``.

    On PostgreSQL a binary server-side cursor, ``FETCH`` rows per fetch, with the payload read
    as ``payload::text`` and decoded here by the standard library's decoder: psycopg's jsonb
    loader does the same decoding with a Python call, a copy and an encoding check per value,
    which was the largest single cost of streaming a million events. (PostgreSQL's text form of
    a jsonb value is one JSON document without surrounding whitespace, the very text its binary
    form carries, so the payloads are the same dicts.) Elsewhere the ORM iterator."""
    from api.models import StopMonitorEvent

    if connection.vendor != "postgresql":
        qs = StopMonitorEvent.objects.exclude(execution_token=None)
        if operation_id is not None:
            qs = qs.filter(operation_id=operation_id)
        for row in qs.order_by("execution_token", "sequence").values_list(*_EVENT_COLUMNS).iterator(chunk_size=FETCH):
            yield StoredEvent(*row)
        return
    events, _ = _tables()
    where = "execution_token IS NOT NULL" + (" AND operation_id = %s" if operation_id is not None else "")
    columns = ", ".join("payload::text" if column == "payload" else column for column in _EVENT_COLUMNS)
    decode = _JSON.raw_decode
    connection.ensure_connection()
    raw = connection.connection
    with raw.cursor(name="stopmonitor_projection_fold", binary=True, withhold=raw.autocommit) as cursor:
        cursor.execute(f"SELECT {columns} FROM {events} WHERE {where} ORDER BY execution_token, sequence",
                       [operation_id] if operation_id is not None else None)
        while rows := cursor.fetchmany(FETCH):
            for operation, tenant, symbol, version, event_type, token, source, venue, payload, created_at in rows:
                yield StoredEvent(operation, tenant, symbol, version, event_type, token, source, venue,
                                  decode(payload)[0], created_at)


def _fold(operation_id: int | None = None) -> Iterator[ExecutionState]:
    """Yield the folded state of every execution (of one operation's stream, or of the whole log),
    one execution at a time."""
    token, state = None, None
    for event in _events(operation_id):
        if event.execution_token != token:
            if state is not None:
                yield state
            token, state = event.execution_token, None
        state = apply(state, event)
    if state is not None:
        yield state


def _chunks(states: Iterator[ExecutionState]) -> Iterator[list[ExecutionState]]:
    chunk: list[ExecutionState] = []
    for state in states:
        chunk.append(state)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _replay(operation_id: int | None = None) -> dict[str, ExecutionState]:
    """``{token: ExecutionState}`` for the whole log or one stream (in memory: for small scopes and tests)."""
    return {state.execution_token: state for state in _fold(operation_id)}


@dataclass(frozen=True)
class Difference:
    """One projection row that differs from the fold: ``field`` is ``"<missing>"``/``"<extra>"`` for whole rows."""

    execution_token: str
    field: str
    stored: object
    rebuilt: object


def verify(operation_id: int | None = None) -> list[Difference]:
    """Compare the stored projection with a fold of the events; writes nothing.

    Reads one snapshot (``REPEATABLE READ``, when it opens the transaction), so appends
    committed meanwhile do not show up as differences."""
    names = state_field_names()
    diffs: list[Difference] = []
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        values = attrgetter(*names)
        for chunk in _chunks(_fold(operation_id)):
            stored = {row[0]: row for row in _stored_rows([state.execution_token for state in chunk])}
            diffs.extend(_chunk_differences(chunk, stored, names, values))
        diffs.extend(_extra_rows(operation_id))
    return diffs


def _chunk_differences(chunk: list[ExecutionState], stored: dict[str, tuple], names: list[str],
                       values: attrgetter) -> list[Difference]:
    """The differences between the folded ``chunk`` and its ``stored`` rows (``{token: row}``, rows in
    ``names`` order; ``values`` reads a state's fields in that order): ``<missing>`` for a state without
    a row, else one :class:`Difference` per field that differs."""
    diffs: list[Difference] = []
    for state in chunk:
        row = stored.get(state.execution_token)
        if row is None:
            diffs.append(Difference(state.execution_token, "<missing>", None, state.status))
            continue
        rebuilt_row = values(state)
        if row == rebuilt_row:  # one comparison in C for the usual, equal row; field by field otherwise
            continue
        for name, value, rebuilt in zip(names, row, rebuilt_row):
            if value != rebuilt:
                diffs.append(Difference(state.execution_token, name, value, rebuilt))
    return diffs


def _extra_rows(operation_id: int | None) -> list[Difference]:
    """``<extra>`` for each stored row (in scope) whose token no event carries, in token order."""
    from django.db.models import Exists, OuterRef

    from api.models import StopMonitorEvent, StopMonitorExecution

    events = StopMonitorEvent.objects.filter(execution_token=OuterRef("execution_token"))
    extra = StopMonitorExecution.objects.all()
    if operation_id is not None:
        events = events.filter(operation_id=operation_id)
        extra = extra.filter(operation_id=operation_id)
    extra = extra.filter(~Exists(events))  # an anti-join: stored rows that no event explains
    return [Difference(token, "<extra>", status, None)
            for token, status in extra.order_by("execution_token").values_list("execution_token", "status")]


def _stored_rows(tokens: list[str]) -> list[tuple]:
    """The stored projection rows of ``tokens``, as tuples in :func:`state_field_names` order."""
    from api.models import StopMonitorExecution

    if connection.vendor != "postgresql":
        return list(StopMonitorExecution.objects.filter(execution_token__in=tokens).values_list(*state_field_names()))
    _, executions = _tables()
    import psycopg

    with psycopg.Cursor(connection.connection) as cursor:  # server-side binding: binary results, one array parameter
        cursor.execute(f"SELECT {', '.join(_columns())} FROM {executions} WHERE execution_token = ANY(%s)", [tokens],
                       binary=True)
        return cursor.fetchall()


def rebuild(operation_id: int | None = None) -> int:
    """Make the projection (all, or one operation's) equal to the fold of the events; returns the
    number of execution rows the events give.

    One transaction holding the event store's append lock, so no event is appended between the
    read and the commit (appends wait for it). On PostgreSQL the folded rows go by binary ``COPY``:
    straight into the projection when it holds no row in scope (a first build), otherwise into a
    temporary table from which one statement deletes the stored rows that no event explains and
    one ``INSERT … ON CONFLICT DO UPDATE`` writes only the rows that differ, so a rebuild of a
    correct projection rewrites nothing (no dead rows, no index or foreign-key work) and readers
    see the old rows until the commit either way."""
    _, executions = _tables()
    with transaction.atomic():
        if connection.vendor != "postgresql":
            return _rebuild_by_orm(operation_id)
        scope, params = ("operation_id = %s", [operation_id]) if operation_id is not None else ("TRUE", [])
        columns = _columns()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
            staged = _open_stage(cursor, executions, scope, params)
            types = _column_types(cursor, executions, columns)
        target = _STAGE if staged else executions
        written = _copy_fold(operation_id, f"COPY {target} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)", types)
        if staged:
            _merge_stage(executions, columns, scope, params)
    return written


def _rebuild_by_orm(operation_id: int | None) -> int:
    """Not PostgreSQL: delete the rows in scope and save each folded state; returns the rows written."""
    from api.models import StopMonitorExecution

    qs = StopMonitorExecution.objects.all()
    if operation_id is not None:
        qs = qs.filter(operation_id=operation_id)
    qs.delete()
    written = 0
    for state in _fold(operation_id):
        save_execution_state(state)
        written += 1
    return written


def _open_stage(cursor, executions: str, scope: str, params: list) -> bool:
    """True (and the temporary stage table created) when the projection already holds rows in
    ``scope``; False for a first build, which copies straight into the projection."""
    cursor.execute(f"SELECT EXISTS (SELECT FROM {executions} WHERE {scope})", params)
    staged = cursor.fetchone()[0]
    if staged:
        cursor.execute(f"CREATE TEMPORARY TABLE {_STAGE} (LIKE {executions}) ON COMMIT DROP")
    return staged


def _column_types(cursor, executions: str, columns: list[str]) -> list[int]:
    """The type oids of ``columns`` of the projection table, for a binary COPY."""
    cursor.execute("SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s::regclass "
                   "AND attnum > 0 AND NOT attisdropped", [executions])
    oids = dict(cursor.fetchall())
    return [oids[column] for column in columns]


def _copy_fold(operation_id: int | None, copy_sql: str, types: list[int]) -> int:
    """Write the fold by binary ``copy_sql``, one COPY per :data:`CHUNK` states; returns the rows written."""
    values = attrgetter(*state_field_names())
    written = 0
    for chunk in _chunks(_fold(operation_id)):
        with connection.connection.cursor() as cur, cur.copy(copy_sql) as copy:
            copy.set_types(types)
            for state in chunk:
                copy.write_row(values(state))
        written += len(chunk)
    return written


def _merge_stage(executions: str, columns: list[str], scope: str, params: list) -> None:
    """From the stage: delete the stored rows in ``scope`` that no event explains, upsert only the
    rows that differ, drop the stage."""
    from api.models import StopMonitorExecution

    key = StopMonitorExecution._meta.pk.column
    rest = [column for column in columns if column != key]
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {executions} e WHERE {scope} AND NOT EXISTS "
                       f"(SELECT FROM {_STAGE} s WHERE s.{key} = e.{key})", params)
        cursor.execute(
            f"INSERT INTO {executions} AS e ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {_STAGE} "
            f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in rest)} "
            f"WHERE ({', '.join(f'e.{c}' for c in rest)}) IS DISTINCT FROM "
            f"({', '.join(f'EXCLUDED.{c}' for c in rest)})")
        cursor.execute(f"DROP TABLE {_STAGE}")


__all__ = ["CHUNK", "FETCH", "Difference", "execution_state_of", "rebuild", "verify"]


# --------------------------------------------------------------------------- the protection projection
# One row per operation that ever requested protection (``StopMonitorProtection``), folded by
# :func:`stopmonitor.protection.apply_protection`. A few events per operation: read with the ORM,
# streamed in (operation, version) order.


def _protection_fold(operation_id: int | None = None):
    from api.models import StopMonitorEvent
    from stopmonitor.protection import PROTECTION_EVENT_TYPES, apply_protection

    qs = StopMonitorEvent.objects.filter(event_type__in=PROTECTION_EVENT_TYPES)
    if operation_id is not None:
        qs = qs.filter(operation_id=operation_id)
    current, state = None, None
    for row in qs.order_by("operation_id", "version").values_list(*_EVENT_COLUMNS).iterator(chunk_size=FETCH):
        event = StoredEvent(*row)
        if event.operation_id != current:
            if state is not None:
                yield state
            current, state = event.operation_id, None
        state = apply_protection(state, event)
    if state is not None:
        yield state


def verify_protection(operation_id: int | None = None) -> list[Difference]:
    """The protection projection against a fold of the protection events (``execution_token`` of a
    :class:`Difference` is the operation id as text); writes nothing."""
    from api.models import StopMonitorProtection
    from stopmonitor.protection import protection_field_names

    names = protection_field_names()
    stored_qs = StopMonitorProtection.objects.all()
    if operation_id is not None:
        stored_qs = stored_qs.filter(operation_id=operation_id)
    stored = {row[0]: row for row in stored_qs.values_list(*names)}
    diffs: list[Difference] = []
    for state in _protection_fold(operation_id):
        row = stored.pop(state.operation_id, None)
        if row is None:
            diffs.append(Difference(str(state.operation_id), "<missing>", None, state.status))
            continue
        for name, value, rebuilt in zip(names, row, (getattr(state, n) for n in names)):
            if value != rebuilt:
                diffs.append(Difference(str(state.operation_id), name, value, rebuilt))
    diffs.extend(Difference(str(op), "<extra>", row[names.index("status")], None) for op, row in sorted(stored.items()))
    return diffs


def rebuild_protection(operation_id: int | None = None) -> int:
    """Make the protection projection equal to the fold of its events (under the append lock); returns the rows."""
    from api.models import StopMonitorProtection
    from stopmonitor.protection import protection_field_names

    names = protection_field_names()
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
        qs = StopMonitorProtection.objects.all()
        if operation_id is not None:
            qs = qs.filter(operation_id=operation_id)
        qs.delete()
        rows = [StopMonitorProtection(**{n: getattr(s, n) for n in names}) for s in _protection_fold(operation_id)]
        StopMonitorProtection.objects.bulk_create(rows, batch_size=CHUNK)
    return len(rows)
