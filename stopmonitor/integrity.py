"""Read the event store back and check it: every stream's chain and versions, the global links (``verify_events``)."""

from __future__ import annotations

from datetime import timezone

from stopmonitor import chain

CHUNK = 5000


def _rows(cursor, sql: str):
    cursor.execute(sql)
    while True:
        batch = cursor.fetchmany(CHUNK)
        if not batch:
            return
        yield from batch


def _aware(value):
    if isinstance(value, str):  # SQLite
        from django.utils.dateparse import parse_datetime

        value = parse_datetime(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def verify_store(*, operation_id: int | None = None, keep_heads: bool = False) -> chain.Report:
    """Recompute the chains of the event store on Django's default connection (streamed in chunks of
    :data:`CHUNK` rows through a server-side cursor on PostgreSQL, so memory stays flat) and check the
    global links (skipped with ``operation_id``). Returns the :class:`~stopmonitor.chain.Report`;
    ``report.broken`` sorted by sequence names the first broken link first. Writes nothing."""
    from django.db import connection, transaction

    from api.models import StopMonitorEvent

    table = connection.ops.quote_name(StopMonitorEvent._meta.db_table)
    pg = connection.vendor == "postgresql"
    payload = "payload::text" if pg else "payload"
    where = f"WHERE operation_id = {int(operation_id)}" if operation_id is not None else ""
    report = chain.Report()
    outer = connection.in_atomic_block
    with transaction.atomic():
        if pg and not outer:  # one snapshot for both passes
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        with connection.chunked_cursor() as cursor:
            rows = ((seq, op, version, etype, tenant, symbol, token, source, venue, _aware(created), text, stored)
                    for seq, op, version, etype, tenant, symbol, token, source, venue, created, text, stored in _rows(
                        cursor, f"SELECT sequence, operation_id, version, event_type, tenant_id, symbol, execution_token, "
                                f"source, venue, created_at, {payload}, chain_hash FROM {table} {where} "
                                f"ORDER BY operation_id, version"))
            chain.verify_rows(rows, keep_heads=keep_heads, report=report)
        if operation_id is None:
            with connection.chunked_cursor() as cursor:
                chain.verify_global(_rows(cursor, f"SELECT sequence, prev_sequence, operation_id, version FROM {table} "
                                                  f"ORDER BY sequence"), report)
    report.broken.sort(key=lambda b: b.sequence)
    return report
