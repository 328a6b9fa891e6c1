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


def test_stream_head_is_one_statement_and_reads_what_the_orm_reads(open_op):
    from api.models import StopMonitorEvent

    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    payload = {"z": "line\nbreak \u0001 é", "a": [1, 2.5, None, True, {"k": "v"}], "qty": "0.00100000"}
    with transaction.atomic():
        store_events.append_events(op, 1, [NewEvent("STOP_SET", payload)], source="stream",
                                   venue="binance-testnet", now=NOW)
    with CaptureQueriesContext(connection) as ctx:
        version, last = store_events.stream_head(op.pk)
    orm = StopMonitorEvent.objects.filter(operation_id=op.pk).order_by("-version").first()

    assert len(ctx.captured_queries) == 1
    assert (version, last) == (2, store_events.to_stored(orm))
    assert last.payload == payload and last.created_at == NOW and last.event_type == "STOP_SET"
    assert store_events.stream_head(op.pk + 1000) == (0, None)


def test_trigger_counts_in_one_statement_equal_the_two_queries(open_op, tenant, tampered):
    """The guards' inputs of transaction 1: the tenant's STOP_TRIGGERED in the last minute and hour,
    and the operation's attempts so far (events inserted behind the writer: `tampered`)."""
    import uuid
    from datetime import timedelta

    from api.models import Client
    from stopmonitor.engine import store

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    b = open_op("ETHUSDT", "BUY", "1", entry="2000", stop="1900")
    other = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200",
                    client=Client.objects.create(name="someone else"))
    rows = [(a, "STOP_TRIGGERED", 30), (a, "STOP_TRIGGERED", 59 * 60), (a, "STOP_TRIGGERED", 2 * 3600),
            (b, "STOP_TRIGGERED", 10), (b, "BLOCKED", 5), (other, "STOP_TRIGGERED", 1)]
    with connection.cursor() as cursor:
        for i, (op, kind, age) in enumerate(rows):
            cursor.execute("INSERT INTO api_stopmonitorevent (event_id, operation_id, version, event_type, tenant_id, "
                           "symbol, source, venue, payload, created_at) VALUES (%s, %s, %s, %s, %s, 'X', 'cron', "
                           "'paper', '{}', %s)", [uuid.uuid4(), op.pk, 100 + i, kind, op.client_id,
                                                  NOW - timedelta(seconds=age)])

    with CaptureQueriesContext(connection) as ctx:
        counts = store.trigger_counts(tenant.pk, a.pk, NOW)
    assert len(ctx.captured_queries) == 1
    assert counts == (2, 3, 3) == (*store.recent_triggers(tenant.pk, NOW), store.attempts_so_far(a.pk))
    assert store.trigger_counts(tenant.pk, b.pk, NOW) == (2, 3, 1)


def test_hand_written_projection_write_rounds_as_the_orm_does(open_op):
    """A rebuild writes the projection through the ORM: the appender's own write must store the same
    values, ties at the 9th decimal included (PostgreSQL's numeric rounds half away from zero, the
    ORM's field preparation first)."""
    from dataclasses import replace
    from decimal import Decimal

    from api.models import StopMonitorExecution
    from stopmonitor.events import _execution_state_pg, _save_execution_state_pg, execution_state_of, \
        save_execution_state
    from stopmonitor.execution import ExecutionState

    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    state = ExecutionState(
        execution_token="tok-a", operation_id=op.pk, tenant_id=op.client_id, symbol="BTCUSDT", attempt=1,
        trigger="STOP_LOSS", status="EXECUTED", side="SELL", trigger_price=Decimal("9200"),
        observed_price=Decimal("9199.99"), requested_quantity=Decimal("0.5"), executed_quantity=Decimal("0.5"),
        avg_fill_price=Decimal("9198.123456785"), commission=Decimal("0.000000015"), commission_asset="USDT",
        slippage_pct=Decimal("-0.020398695652173913"), exchange_order_id=123, exchange_status="FILLED",
        error_code=None, error_message="", source="stream", venue="paper", last_version=4, created_at=NOW,
        updated_at=NOW, submitted_at=None)
    with transaction.atomic():
        _save_execution_state_pg(state, exists=False)
        save_execution_state(replace(state, execution_token="tok-b"), exists=False)
        _save_execution_state_pg(replace(state, status="SUBMITTED", last_version=3), exists=True)
        save_execution_state(replace(state, execution_token="tok-b", status="SUBMITTED", last_version=3), exists=True)

    mine = execution_state_of(StopMonitorExecution.objects.get(pk="tok-a"))
    orm = execution_state_of(StopMonitorExecution.objects.get(pk="tok-b"))
    assert replace(mine, execution_token="tok-b") == orm
    assert (mine.status, mine.last_version) == ("SUBMITTED", 3)
    assert _execution_state_pg("tok-a") == mine and _execution_state_pg("nope") is None
    StopMonitorExecution.objects.filter(pk__in=["tok-a", "tok-b"]).delete()  # no events behind them
