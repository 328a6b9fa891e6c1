"""Migrations 0015–0018 on PostgreSQL: data kept, reversible, 0018 concurrent and self-repairing,
the event table append-only, and nothing left for makemigrations."""

from __future__ import annotations

import uuid
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import IntegrityError, InternalError, ProgrammingError

pg_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL behaviour")


def migrate_to(target):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([target])


@pytest.fixture(autouse=True)
def _back_to_latest(request):
    """Whatever a test migrated to, leave the test database at the latest schema for the others."""
    yield
    if "transactional_db" in request.fixturenames or request.node.get_closest_marker("django_db"):
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


def index_state(name):
    with connection.cursor() as cur:
        cur.execute(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = %s", [name])
        return cur.fetchone()


def sqlmigrate(name: str, *flags: str) -> str:
    out = StringIO()
    call_command("sqlmigrate", "api", name, *flags, stdout=out)
    return out.getvalue()


def columns(table):
    with connection.cursor() as cur:
        return {c.name for c in connection.introspection.get_table_description(cur, table)}


@pytest.mark.django_db
def test_makemigrations_finds_nothing_to_do():
    call_command("makemigrations", "--check", "--dry-run", stdout=StringIO())


@pg_only
@pytest.mark.django_db
def test_sqlmigrate_0018_builds_concurrently():
    sql = sqlmigrate("0018")
    assert 'CREATE INDEX CONCURRENTLY "op_active_stop_idx"' in sql
    assert 'CREATE INDEX CONCURRENTLY "op_stop_exec_token_idx"' in sql
    assert "SET lock_timeout = '5s'" in sql
    assert "BEGIN;" not in sql  # non-atomic


@pg_only
@pytest.mark.django_db(transaction=True)
def test_migrate_from_before_0015_to_0018_keeps_operations_and_back_again():
    migrate_to(("api", "0001_initial"))
    assert "stop_price" not in columns("api_operation")
    with connection.cursor() as cur:
        cur.execute("INSERT INTO api_client (name, created_at) VALUES ('legacy', now()) RETURNING id")
        client_id = cur.fetchone()[0]
        cur.execute("INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
                    "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now()) RETURNING id")
        symbol_id = cur.fetchone()[0]
        for i in range(50):
            cur.execute(
                "INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, entry_price, stop_loss_percent, "
                "created_at, updated_at) VALUES (%s, %s, 'BUY', 'ACTIVE', %s, 9000.5, 2.5, now(), now())",
                [client_id, symbol_id, f"0.{i + 1:03d}"])
    migrate_to(("api", "0018_create_stop_indexes_concurrent"))
    with connection.cursor() as cur:
        cur.execute("SELECT count(*), sum(quantity), min(stop_loss_percent), count(stop_price), "
                    "sum(closed_quantity), count(stop_check_count) FROM api_operation")
        assert cur.fetchone() == (50, Decimal("1.27500000"), Decimal("2.5000"), 0, Decimal("0E-8"), 0)
        cur.execute("SELECT column_default FROM information_schema.columns "
                    "WHERE table_name = 'api_operation' AND column_name = 'stop_check_count'")
        assert cur.fetchone()[0] == "0"
    assert index_state("op_active_stop_idx")[0] is True
    # back to before 0015 and forward again
    migrate_to(("api", "0001_initial"))
    assert "stop_price" not in columns("api_operation") and "api_stopmonitorevent" not in connection.introspection.table_names()
    migrate_to(("api", "0018_create_stop_indexes_concurrent"))
    assert index_state("op_stop_exec_token_idx")[0] is True
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM api_operation")
        assert cur.fetchone()[0] == 50
        cur.execute("DELETE FROM api_operation")
        cur.execute("DELETE FROM api_symbol")
        cur.execute("DELETE FROM api_client")


@pg_only
@pytest.mark.django_db(transaction=True)
def test_0018_rebuilds_an_index_left_invalid_by_a_failed_build():
    migrate_to(("api", "0017_set_stop_check_default"))
    with connection.cursor() as cur:
        cur.execute("INSERT INTO api_client (name, created_at) VALUES ('x', now()) RETURNING id")
        client_id = cur.fetchone()[0]
        cur.execute("INSERT INTO api_symbol (symbol, base_asset, quote_asset, is_active, updated_at) "
                    "VALUES ('ETHUSDT', 'ETH', 'USDT', true, now()) RETURNING id")
        symbol_id = cur.fetchone()[0]
        for _ in range(2):
            cur.execute("INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, created_at, updated_at) "
                        "VALUES (%s, %s, 'BUY', 'ACTIVE', 1, now(), now())", [client_id, symbol_id])
        # a concurrent build that fails (duplicate keys) leaves an INVALID index with the name 0018 uses
        with pytest.raises(Exception):
            cur.execute('CREATE UNIQUE INDEX CONCURRENTLY "op_active_stop_idx" ON api_operation (side)')
    assert index_state("op_active_stop_idx")[0] is False
    migrate_to(("api", "0018_create_stop_indexes_concurrent"))
    valid, definition = index_state("op_active_stop_idx")
    assert valid is True
    assert "UNIQUE" not in definition and "WHERE" in definition and "status" in definition
    with connection.cursor() as cur:
        cur.execute("DELETE FROM api_operation")
        cur.execute("DELETE FROM api_symbol")
        cur.execute("DELETE FROM api_client")


@pg_only
@pytest.mark.django_db(transaction=True)
def test_event_table_refuses_update_and_delete_even_in_raw_sql():
    from datetime import datetime, timezone

    from api.models import Client, Symbol
    from stopmonitor.operations import open_operation

    client = Client.objects.create(name="t")
    symbol = Symbol.objects.create(symbol="BTCUSDT", base_asset="BTC", quote_asset="USDT")
    op = open_operation(client, symbol, "BUY", Decimal("1"), Decimal("100"), Decimal("90"),
                        now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    for sql in ("UPDATE api_stopmonitorevent SET event_type = 'X'", "DELETE FROM api_stopmonitorevent"):
        with pytest.raises((InternalError, ProgrammingError)) as err, transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(sql)
        assert "append-only" in str(err.value)
    from api.models import StopMonitorEvent

    with pytest.raises(PermissionError):
        StopMonitorEvent.objects.filter(operation=op).update(event_type="X")
    with pytest.raises(PermissionError):
        StopMonitorEvent.objects.filter(operation=op).delete()
    assert list(StopMonitorEvent.objects.values_list("event_type", flat=True)) == ["STOP_SET"]


def event_indexes() -> dict[str, str]:
    with connection.cursor() as cur:
        cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'api_stopmonitorevent'::regclass")
        return dict(cur.fetchall())


def foreign_keys(table: str) -> set[str]:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'f' AND conrelid = %s::regclass",
                    [table])
        return {row[0] for row in cur.fetchall()}


@pg_only
@pytest.mark.django_db
def test_sqlmigrate_0020_changes_indexes_concurrently_and_never_revalidates_a_foreign_key():
    sql = sqlmigrate("0020")
    for name in ("event_token_idx", "event_tenant_seq_idx", "event_tenant_trigger_idx"):
        assert f'CREATE INDEX CONCURRENTLY "{name}"' in sql
    for name in ("event_exec_token_idx", "event_tenant_type_time_idx", "api_stopmonitorevent_operation_id_ba39ecd4",
                 "api_stopmonitorevent_tenant_id_43281414"):
        assert f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"' in sql
    assert "ADD CONSTRAINT" not in sql  # adding a foreign key would scan the whole event table under lock
    assert "BEGIN;" not in sql


@pg_only
@pytest.mark.django_db(transaction=True)
def test_migration_0020_back_to_0019_and_forward_again():
    after = {
        "api_stopmonitorevent_pkey", "api_stopmonitorevent_event_id_key", "event_stream_version_uniq",
        "event_token_idx", "event_tenant_seq_idx", "event_tenant_trigger_idx",
    }
    assert set(event_indexes()) == after
    assert 'WHERE (execution_token IS NOT NULL)' in event_indexes()["event_token_idx"]
    assert "WHERE ((event_type)::text = 'STOP_TRIGGERED'::text)" in event_indexes()["event_tenant_trigger_idx"]
    assert foreign_keys("api_stopmonitorevent") == set()
    assert foreign_keys("api_outbox") == set()

    migrate_to(("api", "0019_monitor_pass"))
    assert set(event_indexes()) == {
        "api_stopmonitorevent_pkey", "api_stopmonitorevent_event_id_key", "event_stream_version_uniq",
        "event_exec_token_idx", "event_tenant_type_time_idx", "api_stopmonitorevent_operation_id_ba39ecd4",
        "api_stopmonitorevent_tenant_id_43281414",
    }
    assert len(foreign_keys("api_stopmonitorevent")) == 2
    assert len(foreign_keys("api_outbox")) == 1
    with connection.cursor() as cur:
        cur.execute("SELECT to_regprocedure('stopmonitor_uuid7()'), "
                    "to_regprocedure('stopmonitor_operation_keeps_its_events()')")
        assert cur.fetchone() == (None, None)

    migrate_to(("api", "0020_event_store_write_path"))
    assert set(event_indexes()) == after
    with connection.cursor() as cur:
        cur.execute("SELECT stopmonitor_uuid7()::text")
        made = cur.fetchone()[0]
    assert uuid.UUID(made).version == 7


@pg_only
@pytest.mark.django_db(transaction=True)
def test_an_operation_with_events_cannot_be_deleted_or_renumbered_one_without_can():
    """Migration 0020's trigger: the guard the event's foreign key gave, on the operation's side."""
    from datetime import datetime, timezone

    from api.models import Client, Operation, StopMonitorEvent, Symbol
    from stopmonitor.events import append_events
    from stopmonitor.execution import NewEvent

    client = Client.objects.create(name="t")
    symbol = Symbol.objects.create(symbol="BTCUSDT", base_asset="BTC", quote_asset="USDT", tick_size=Decimal("0.01"))
    kept, bare = (Operation.objects.create(client=client, symbol=symbol, side="BUY", quantity=Decimal("1"),
                                           entry_price=Decimal("100"), status="ACTIVE") for _ in range(2))
    with transaction.atomic():
        append_events(kept, 0, [NewEvent("STOP_SET", {"stop_price": "90"})], source="api", venue="paper",
                      now=datetime(2026, 1, 1, tzinfo=timezone.utc))
    for sql in ("DELETE FROM api_operation WHERE id = %s", "UPDATE api_operation SET id = id + 1000 WHERE id = %s"):
        with pytest.raises(IntegrityError, match=f"operation {kept.pk} has events"), transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(sql, [kept.pk])
    with connection.cursor() as cur:  # a level change on the same row is no concern of the trigger
        cur.execute("UPDATE api_operation SET stop_price = 95 WHERE id = %s", [kept.pk])
        cur.execute("DELETE FROM api_operation WHERE id = %s", [bare.pk])
    assert list(Operation.objects.values_list("pk", "stop_price")) == [(kept.pk, Decimal("95"))]
    assert StopMonitorEvent.objects.filter(operation_id=kept.pk).count() == 1


# -- 0020 on a live database: never queued without limit behind a transaction, re-runnable, and
#    its way back builds nothing that blocks appends (reproductions from a review)

def _dsn() -> str:
    s = connection.settings_dict
    return f"host={s['HOST'] or '127.0.0.1'} port={s['PORT'] or 5432} user={s['USER'] or 'postgres'} dbname={s['NAME']}"


def _reader_in_transaction():
    """Another session that has read api_operation and sits idle in its transaction (a slow API request, say)."""
    import psycopg

    reader = psycopg.connect(_dsn())
    reader.execute("SELECT count(*) FROM api_operation")
    return reader


@pg_only
@pytest.mark.django_db(transaction=True)
def test_0020_gives_up_after_its_lock_timeout_behind_a_long_transaction_and_a_rerun_completes():
    import threading
    import time

    from django.core.management.base import CommandError

    migrate_to(("api", "0019_monitor_pass"))
    reader = _reader_in_transaction()
    releaser = threading.Timer(20, reader.rollback)  # never hang the suite
    releaser.start()
    started = time.monotonic()
    try:
        # one line naming the blocking session (issue #18), not a traceback of the lock timeout
        with pytest.raises(CommandError, match=r"waited 5s for a lock and gave up; blocked by pid \d+ \(idle in transaction"):
            migrate_to(("api", "0020_event_store_write_path"))
        assert time.monotonic() - started < 15  # 5 s lock timeout, not the reader's lifetime
    finally:
        releaser.cancel()
        reader.rollback()
        reader.close()
    with connection.cursor() as cur:
        cur.execute("RESET lock_timeout")
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'api_operation_keeps_its_events'")
        assert cur.fetchone()[0] == 1  # it failed after the trigger step
    migrate_to(("api", "0020_event_store_write_path"))  # the re-run completes
    assert foreign_keys("api_stopmonitorevent") == set() and foreign_keys("api_outbox") == set()
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'api_operation_keeps_its_events'")
        assert cur.fetchone()[0] == 1


@pg_only
@pytest.mark.django_db
def test_0020_backwards_builds_indexes_concurrently_and_validates_foreign_keys_without_blocking_writes():
    sql = sqlmigrate("0020", "--backwards")
    plain = [line for line in sql.splitlines() if line.startswith("CREATE INDEX") and "CONCURRENTLY" not in line]
    assert plain == []
    adds = [line for line in sql.splitlines() if "ADD CONSTRAINT" in line]
    assert len(adds) == 3 and all(line.endswith("NOT VALID;") for line in adds)
    assert sql.count("VALIDATE CONSTRAINT") == 3


@pg_only
@pytest.mark.django_db
def test_sqlmigrate_0021_builds_the_relay_claim_index_concurrently():
    sql = sqlmigrate("0021")
    assert ('CREATE INDEX CONCURRENTLY "outbox_stream_unpublished_idx" ON "api_outbox" ("operation_id_ref", "event_id") '
            'WHERE "published_at" IS NULL;') in sql
    assert "BEGIN;" not in sql


@pg_only
@pytest.mark.django_db(transaction=True)
def test_0023_chains_the_events_already_stored_and_backwards_drops_the_columns():
    """Events written before migration 0023 (no chain) are chained by it, in stream and sequence
    order, so verify_events passes on an upgraded database; the append-only trigger is back on."""
    import json as json_

    from stopmonitor.integrity import verify_store

    migrate_to(("api", "0021_outbox_stream_index"))
    assert "chain_hash" not in columns("api_stopmonitorevent")
    with connection.cursor() as cur:
        cur.execute("INSERT INTO api_client (name, created_at) VALUES ('old', now()) RETURNING id")
        client = cur.fetchone()[0]
        cur.execute("INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
                    "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now()) RETURNING id")
        symbol = cur.fetchone()[0]
        ops = []
        for _ in range(2):
            cur.execute("INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, created_at, "
                        "updated_at, closed_quantity, stop_check_count) VALUES (%s, %s, 'BUY', 'ACTIVE', 1, now(), "
                        "now(), 0, 0) RETURNING id", [client, symbol])
            ops.append(cur.fetchone()[0])
        # interleaved streams, as the live store has them
        for op, version in ((ops[0], 1), (ops[1], 1), (ops[0], 2), (ops[1], 2), (ops[0], 3)):
            cur.execute("INSERT INTO api_stopmonitorevent (event_id, operation_id, version, event_type, tenant_id, "
                        "symbol, execution_token, source, venue, payload, created_at) VALUES (%s, %s, %s, 'STOP_SET', "
                        "%s, 'BTCUSDT', NULL, 'api', 'paper', %s, now())",
                        [uuid.uuid4(), op, version, client, json_.dumps({"stop_price": f"9{version}00", "ü": [1]})])
    migrate_to(("api", "0023_event_chain"))
    report = verify_store()
    assert (report.events, report.streams, report.broken) == (5, 2, [])
    with pytest.raises((InternalError, ProgrammingError)), transaction.atomic(), connection.cursor() as cur:
        cur.execute("UPDATE api_stopmonitorevent SET event_type = 'X'")
    migrate_to(("api", "0021_outbox_stream_index"))
    assert "chain_hash" not in columns("api_stopmonitorevent")
