"""Tamper evidence (issue 17): the hash chain written by both appenders, ``verify_events`` finding a
superuser's edit, a removed event and a renumbered one; the TRUNCATE and tenant triggers."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from stopmonitor import chain
from stopmonitor.execution import NewEvent

from .conftest import NOW

pytestmark = pytest.mark.django_db(transaction=True)

# control characters, quotes, backslashes, non-ASCII, nesting, numbers: what jsonb reorders and escapes
AWKWARD = {"z": "line\nbreak\t\"q\" \\ \u0001 é ✓", "a": [1, 2.5, None, True, {"k": "v"}], "bb": 10 ** 20,
           "n": -0.000001}


def command(name: str, *args) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command(name, *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except CommandError as exc:
        code = exc.returncode
        out.write(str(exc))
    return code, out.getvalue()


def append(op, version, *events, source="api", now=NOW):
    from stopmonitor.events import append_events

    with transaction.atomic():
        return append_events(op, version, [NewEvent(t, p) for t, p in events], source=source, venue="paper", now=now)


def as_superuser(*statements):
    """Edit the event table the way a superuser can: with the append-only trigger disabled."""
    with connection.cursor() as cursor, transaction.atomic():
        cursor.execute("ALTER TABLE api_stopmonitorevent DISABLE TRIGGER api_stopmonitorevent_append_only")
        for sql, params in statements:
            cursor.execute(sql, params)
        cursor.execute("ALTER TABLE api_stopmonitorevent ENABLE TRIGGER api_stopmonitorevent_append_only")


def test_sql_link_equals_python_link_on_awkward_payloads():
    """The set-based writer's SQL expression and the Python writer/verifier agree byte for byte."""
    created = datetime(2026, 3, 2, 12, 0, 0, 123456, tzinfo=timezone.utc)
    prev = bytes(range(32))
    sql = chain.link_sql("%(prev)s", operation_id="7", version="3", event_type="'STOP_SET'::text",
                         tenant_id="42", symbol="'BTCUSDT'::text", execution_token="NULL::text",
                         source="'api'::text", venue="'paper'::text", created_us="%(us)s::bigint",
                         payload="%(payload)s::jsonb")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}, %(payload)s::jsonb::text",
                       {"prev": prev, "us": chain.micros(created), "payload": json.dumps(AWKWARD)})
        from_sql, text = cursor.fetchone()
    head = chain.header(7, 3, "STOP_SET", 42, "BTCUSDT", None, "api", "paper", created)
    assert bytes(from_sql) == chain.link(prev, head, text)
    assert chain.micros(created) == 1772452800123456


def test_both_appenders_chain_every_stream_and_verify_passes(open_op):
    from api.models import StopMonitorEvent
    from stopmonitor.events import append_many

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")  # version 1: OPENED by the writer
    b = open_op("ETHUSDT", "SELL", "2", entry="2000", stop="2100")
    append(a, 1, ("STOP_SET", AWKWARD), ("TARGET_SET", {"target_price": "9900"}))
    with transaction.atomic():
        append_many([(a, 3, [NewEvent("STOP_SET", {"stop_price": "9250"}), NewEvent("NOTE", AWKWARD)]),
                     (b, 1, [NewEvent("STOP_SET", {"stop_price": "2090"})])], source="backfill", venue="paper", now=NOW)
    append(a, 5, ("TARGET_SET", {"target_price": "9950"}))
    rows = list(StopMonitorEvent.objects.order_by("operation_id", "version").values_list(
        "operation_id", "version", "chain_hash", "prev_sequence", "sequence"))
    assert [(op, v) for op, v, *_ in rows] == [(a.pk, v) for v in range(1, 7)] + [(b.pk, 1), (b.pk, 2)]
    assert all(len(bytes(h)) == 32 for _, _, h, _, _ in rows)
    by_sequence = sorted(rows, key=lambda r: r[4])
    assert [r[3] for r in by_sequence] == [None] + [r[4] for r in by_sequence[:-1]]  # each names the one before
    code, out = command("verify_events")
    assert code == 0, out
    assert out.strip().startswith("event store verifies: 8 events in 2 streams")


def test_a_superuser_edit_is_found_and_named(open_op, tampered):
    from api.models import StopMonitorEvent

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    append(a, 1, ("STOP_SET", {"stop_price": "9210"}), ("STOP_SET", {"stop_price": "9220"}))
    edited = StopMonitorEvent.objects.get(operation_id=a.pk, version=2)
    as_superuser(("UPDATE api_stopmonitorevent SET payload = %s WHERE sequence = %s",
                  [json.dumps({"stop_price": "1"}), edited.sequence]))
    code, out = command("verify_events", "--json")
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["kind"] == "hash" and (lines[0]["sequence"], lines[0]["operation_id"], lines[0]["version"]) == (
        edited.sequence, a.pk, 2)
    assert lines[-1]["broken"] == 1  # later links of the stream are not re-reported
    # a superuser who also rewrites that event's hash breaks the next link instead
    from stopmonitor.integrity import verify_store

    forged = chain.link(bytes(StopMonitorEvent.objects.get(operation_id=a.pk, version=1).chain_hash),
                        chain.header(a.pk, 2, "STOP_SET", a.client_id, "BTCUSDT", None, "api", "paper", NOW),
                        '{"stop_price": "1"}')
    as_superuser(("UPDATE api_stopmonitorevent SET chain_hash = %s WHERE sequence = %s", [forged, edited.sequence]))
    [broken] = verify_store().broken
    assert (broken.kind, broken.version) == ("hash", 3)


def test_a_removed_event_breaks_versions_and_the_global_link(open_op, tampered):
    from api.models import StopMonitorEvent

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    b = open_op("ETHUSDT", "SELL", "2", entry="2000", stop="2100")
    append(a, 1, ("STOP_SET", {"stop_price": "9210"}), ("STOP_SET", {"stop_price": "9220"}))
    last_of_b = append(b, 1, ("STOP_SET", {"stop_price": "2090"}))[0]  # b's v2, the table's newest event
    gone = StopMonitorEvent.objects.get(operation_id=a.pk, version=2)
    as_superuser(("DELETE FROM api_stopmonitorevent WHERE sequence = %s", [gone.sequence]))
    code, out = command("verify_events")
    assert code == 1
    lines = out.splitlines()
    next_in_a = StopMonitorEvent.objects.get(operation_id=a.pk, version=3).sequence
    assert lines[0] == (f"BROKEN version: event sequence {next_in_a} (operation {a.pk} version 3): expected version 2")
    assert lines[1].startswith(f"BROKEN global_link: event sequence {next_in_a} ")
    assert f"names event {gone.sequence} as the one before it" in lines[1]
    assert last_of_b.sequence > next_in_a
    assert lines[-1].startswith("event store does NOT verify: 2 broken link(s)")


def test_rolled_back_appends_leave_sequence_gaps_that_verify_accepts(open_op):
    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    with pytest.raises(RuntimeError), transaction.atomic():
        from stopmonitor.events import append_events

        append_events(a, 1, [NewEvent("STOP_SET", {"stop_price": "9210"})], source="api", venue="paper", now=NOW)
        raise RuntimeError("the caller's transaction fails after the append")
    append(a, 1, ("STOP_SET", {"stop_price": "9211"}))
    from api.models import StopMonitorEvent

    seqs = list(StopMonitorEvent.objects.order_by("sequence").values_list("sequence", flat=True))
    assert seqs[1] - seqs[0] == 2  # the rolled-back append drew a sequence value
    assert command("verify_events")[0] == 0


def test_truncate_refused_to_a_non_superuser_and_tenant_frozen_once_there_are_events(open_op, tenant):
    from django.db import DatabaseError

    from api.models import Client

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    other = Client.objects.create(name="other")
    role = f"sm_trunc_{connection.settings_dict['NAME'][-20:]}".lower().replace("-", "_")
    with connection.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {role}")
        cursor.execute(f"CREATE ROLE {role}")
        cursor.execute(f"GRANT TRUNCATE ON api_stopmonitorevent TO {role}")  # the privilege; the trigger still says no
        try:
            with pytest.raises(DatabaseError, match="append-only: TRUNCATE refused"), transaction.atomic():
                cursor.execute(f"SET LOCAL ROLE {role}")
                cursor.execute("TRUNCATE api_stopmonitorevent")
        finally:
            cursor.execute(f"REVOKE ALL ON api_stopmonitorevent FROM {role}")
            cursor.execute(f"DROP ROLE {role}")
        with pytest.raises(DatabaseError, match="its tenant cannot change"), transaction.atomic():
            cursor.execute("UPDATE api_operation SET client_id = %s WHERE id = %s", [other.pk, a.pk])
        with transaction.atomic():  # another column, or an operation without events: allowed
            cursor.execute("UPDATE api_operation SET client_id = client_id, stop_check_count = 1 WHERE id = %s", [a.pk])
            cursor.execute("INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, created_at, "
                           "updated_at, closed_quantity, stop_check_count) SELECT client_id, symbol_id, side, status, "
                           "quantity, now(), now(), 0, 0 FROM api_operation WHERE id = %s RETURNING id", [a.pk])
            fresh = cursor.fetchone()[0]
            cursor.execute("UPDATE api_operation SET client_id = %s WHERE id = %s", [other.pk, fresh])
