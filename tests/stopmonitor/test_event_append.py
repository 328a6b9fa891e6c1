"""The one writer on PostgreSQL: events and outbox rows in one statement (no savepoint), sequences
drawn under the append lock, and the unique (operation, version) constraint as the last guard."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from stopmonitor import events as store_events
from stopmonitor.execution import NewEvent

from .conftest import NOW

pytestmark = pytest.mark.django_db(transaction=True)


def _rows(op_id):
    with connection.cursor() as cursor:
        cursor.execute("SELECT e.version, e.event_type, e.sequence, e.prev_sequence, o.routing_key, o.attempts, "
                       "o.published_at FROM api_stopmonitorevent e LEFT JOIN api_outbox o ON o.event_id = e.sequence "
                       "WHERE e.operation_id = %s ORDER BY e.version", [op_id])
        return cursor.fetchall()


def test_two_events_and_their_outbox_rows_are_one_insert_statement_and_chain_their_sequences(open_op):
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")  # version 1: OPENED
    with CaptureQueriesContext(connection) as ctx, transaction.atomic():
        saved = store_events.append_events(op, 1, [NewEvent("STOP_SET", {"stop_price": "9100"}),
                                                   NewEvent("TARGET_SET", {"target_price": "9900"})],
                                           source="api", venue="paper", now=NOW)
    statements = [q["sql"] for q in ctx.captured_queries]

    assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "SELECT", "WITH", "COMMIT"]  # lock, head, insert
    assert not any("SAVEPOINT" in s for s in statements)
    rows = _rows(op.pk)
    opened_seq = rows[0][2]
    assert [(v, t, p, rk, a, pub) for v, t, _, p, rk, a, pub in rows[1:]] == [
        (2, "STOP_SET", opened_seq, f"stop.STOP_SET.{op.client_id}.BTCUSDT", 0, None),
        (3, "TARGET_SET", rows[1][2], f"stop.TARGET_SET.{op.client_id}.BTCUSDT", 0, None),
    ]
    assert rows[1][2] < rows[2][2]
    assert [(r.sequence, r.prev_sequence, r.version, r._state.adding) for r in saved] == [
        (rows[1][2], opened_seq, 2, False), (rows[2][2], rows[1][2], 3, False)]


def test_a_version_taken_past_the_append_lock_writes_nothing_of_the_transaction(open_op, monkeypatch):
    """The last guard (never reached while every writer takes the append lock): a writer that read
    the head before another wrote version 2 gets ConcurrencyConflict, and the atomic block it ran
    in is rolled back — none of its events, outbox rows or earlier writes remain."""
    from api.models import Operation

    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    with transaction.atomic():
        store_events.append_events(op, 1, [NewEvent("STOP_SET", {"stop_price": "9150"})], source="api",
                                   venue="paper", now=NOW)
    before = _rows(op.pk)
    real = store_events._head_and_chain_inputs

    def stale_head(operation_id, payloads):  # the head as it was before version 2 was written
        version, _, last, texts, sequences = real(operation_id, payloads)
        return version - 1, None, last, texts, sequences

    monkeypatch.setattr(store_events, "_head_and_chain_inputs", stale_head)
    with pytest.raises(store_events.ConcurrencyConflict, match="version taken by a concurrent writer"):
        with transaction.atomic():
            Operation.objects.filter(pk=op.pk).update(stop_check_count=77)  # written before the append
            store_events.append_events(op, 1, [NewEvent("STOP_SET", {"stop_price": "9100"}),
                                               NewEvent("TARGET_SET", {"target_price": "9900"})],
                                       source="api", venue="paper", now=NOW)

    assert _rows(op.pk) == before
    assert Operation.objects.get(pk=op.pk).stop_check_count != 77
