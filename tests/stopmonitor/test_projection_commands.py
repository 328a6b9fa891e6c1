"""``rebuild_projections`` (rebuild, ``--verify`` and its exit status) and ``events`` (stream and
global feed, table and JSON lines) on PostgreSQL, on executions produced by real monitor passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal as D
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.monitor import run_pass

from .conftest import NOW

ROOT = Path(__file__).resolve().parents[2]
ENGINE = EngineSettings(quote_max_age_seconds=10, reconcile_after_seconds=30, breaker_threshold=3,
                        breaker_cooldown_seconds=300)
pytestmark = pytest.mark.django_db(transaction=True)


def command(name: str, *args) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def closed_pair(paper, open_op):
    """Two operations closed by one pass: a long stop-loss on BTCUSDT and a short target on ETHUSDT."""
    long_ = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    short = open_op("ETHUSDT", "SELL", "2", entry="2000", stop="2100", target="1900")
    paper.set_quote("BTCUSDT", "9199.50", "9199.51", bid_qty="10")
    paper.set_quote("ETHUSDT", "1899.00", "1899.90")
    paper.quotes = {s: replace(q, observed_at=NOW) for s, q in paper.quotes.items()}
    summary = run_pass(paper, now=NOW, engine=ENGINE)
    assert summary.executed == 2
    from api.models import StopMonitorExecution

    tokens = {ex.operation_id: ex.execution_token for ex in StopMonitorExecution.objects.all()}
    return long_, short, tokens


def test_verify_passes_on_a_consistent_projection(closed_pair):
    code, out, _ = command("rebuild_projections", "--verify")
    assert code == 0
    assert out.startswith("projection matches the events (all operations) in ")


def test_verify_lists_every_difference_and_exits_1_then_rebuild_repairs(closed_pair):
    from api.models import StopMonitorExecution

    long_, short, tokens = closed_pair
    StopMonitorExecution.objects.filter(pk=tokens[long_.pk]).update(status="FAILED", executed_quantity=D("0.4"))
    StopMonitorExecution.objects.filter(pk=tokens[short.pk]).delete()
    extra = StopMonitorExecution.objects.get(pk=tokens[long_.pk])
    extra.execution_token = f"sm{long_.pk}-S9-deadbeef"
    extra.save(force_insert=True)

    code, out, _ = command("rebuild_projections", "--verify")
    assert code == 1
    assert sorted(out.splitlines()[:-1]) == sorted([
        f'DIFF {tokens[long_.pk]} status: stored="FAILED" rebuilt="EXECUTED"',
        f'DIFF {tokens[long_.pk]} executed_quantity: stored="0.40000000" rebuilt="0.5"',
        f'DIFF {tokens[short.pk]} <missing>: stored=null rebuilt="EXECUTED"',
        f'DIFF sm{long_.pk}-S9-deadbeef <extra>: stored="FAILED" rebuilt=null',
    ])
    assert out.splitlines()[-1] == ("projection differs from the events: 4 difference(s) (all operations); "
                                    "run rebuild_projections to repair")
    # --verify wrote nothing
    assert StopMonitorExecution.objects.get(pk=tokens[long_.pk]).status == "FAILED"

    code, out, _ = command("rebuild_projections", "--verify", "--json", "--operation", str(short.pk))
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert lines[0] == {"type": "difference", "execution_token": tokens[short.pk], "field": "<missing>",
                        "stored": None, "rebuilt": "EXECUTED"}
    assert (lines[-1]["type"], lines[-1]["differences"], lines[-1]["operation"]) == ("summary", 1, short.pk)

    code, out, _ = command("rebuild_projections", "--operation", str(short.pk))
    assert (code, out.split(" in ")[0]) == (0, f"rebuilt 1 execution rows and 0 protection rows from the events "
                                             f"(operation {short.pk})")
    code, _, _ = command("rebuild_projections", "--verify", "--operation", str(short.pk))
    assert code == 0

    code, out, _ = command("rebuild_projections", "--json")
    assert code == 0 and json.loads(out)["executions"] == 2
    code, _, _ = command("rebuild_projections", "--verify")
    assert code == 0
    rows = {ex.execution_token: (ex.status, ex.executed_quantity, ex.avg_fill_price, ex.side)
            for ex in StopMonitorExecution.objects.all()}
    assert rows == {tokens[long_.pk]: ("EXECUTED", D("0.5"), D("9199.5"), "SELL"),
                    tokens[short.pk]: ("EXECUTED", D("2"), D("1899.9"), "BUY")}


def test_rebuild_of_an_unknown_operation_is_an_error(closed_pair):
    assert command("rebuild_projections", "--operation", "987654") == (2, "", "operation 987654 does not exist")


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="child process on the test database")
def test_verify_exit_status_of_the_real_process(closed_pair):
    from api.models import StopMonitorExecution

    long_, _, tokens = closed_pair
    s = connection.settings_dict
    env = {**os.environ, "DATABASE_URL": f"postgres://{s['USER']}@{s['HOST']}:{s['PORT'] or 5432}/{s['NAME']}"}

    def run(*args):
        return subprocess.run([sys.executable, "manage.py", "rebuild_projections", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    assert run("--verify").returncode == 0
    StopMonitorExecution.objects.filter(pk=tokens[long_.pk]).update(avg_fill_price=D("9000"))
    proc = run("--verify")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == (f'DIFF {tokens[long_.pk]} avg_fill_price: stored="9000.00000000" '
                                           'rebuilt="9199.5"')
    assert run().returncode == 0
    assert run("--verify").returncode == 0


def test_events_prints_one_operations_stream_as_a_table(closed_pair):
    long_, _, tokens = closed_pair
    code, out, _ = command("events", "--operation", str(long_.pk))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "OP", "V", "TIME", "(UTC)", "TYPE", "SOURCE", "VENUE", "TOKEN", "PAYLOAD"]
    rows = [line.split(None, 9) for line in lines[1:]]
    assert [(r[1], r[2], r[5], r[6], r[7]) for r in rows] == [
        (str(long_.pk), "1", "STOP_SET", "api", "paper"),
        (str(long_.pk), "2", "STOP_TRIGGERED", "cron", "paper"),
        (str(long_.pk), "3", "EXECUTION_SUBMITTED", "cron", "paper"),
        (str(long_.pk), "4", "EXECUTED", "cron", "paper"),
        (str(long_.pk), "5", "OPERATION_CLOSED", "cron", "paper"),
    ]
    assert (rows[0][3], rows[0][4]) == ("2026-03-02", "12:00:00")
    assert rows[0][8] == "-" and rows[1][8] == tokens[long_.pk]
    assert json.loads(rows[0][9]) == {"entry_price": "9300", "stop_price": "9200"}
    executed = json.loads(rows[3][9])
    assert (executed["executed_qty"], executed["avg_price"], executed["slippage_pct"]) == ("0.5", "9199.5", "0.0054")


def test_events_json_lines_and_the_global_feed_after_a_sequence(closed_pair):
    from api.models import StopMonitorEvent

    long_, short, tokens = closed_pair
    all_events = list(StopMonitorEvent.objects.order_by("sequence"))
    assert len(all_events) == 11  # 5 for the long, 6 for the short (STOP_SET + TARGET_SET)
    code, out, _ = command("events", "--operation", str(short.pk), "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(r["version"], r["event_type"]) for r in records] == [
        (1, "STOP_SET"), (2, "TARGET_SET"), (3, "STOP_TRIGGERED"), (4, "EXECUTION_SUBMITTED"), (5, "EXECUTED"),
        (6, "OPERATION_CLOSED")]
    trig = records[2]
    assert {k: trig[k] for k in ("operation_id", "symbol", "execution_token", "source", "venue", "created_at",
                                 "tenant_id")} == {
        "operation_id": short.pk, "symbol": "ETHUSDT", "execution_token": tokens[short.pk], "source": "cron",
        "venue": "paper", "created_at": "2026-03-02T12:00:00+00:00", "tenant_id": short.client_id}
    assert (trig["payload"]["trigger"], trig["payload"]["close_side"], trig["payload"]["level"]) == (
        "TAKE_PROFIT", "BUY", "1900")

    after = all_events[3].sequence
    code, out, _ = command("events", "--after", str(after), "--limit", "4", "--json")
    feed = [json.loads(line) for line in out.splitlines()]
    assert [r["sequence"] for r in feed] == [e.sequence for e in all_events[4:8]]
    code, out, _ = command("events", "--after", str(all_events[-1].sequence))
    assert out.splitlines()[1:] == ["(no events)"]
    code, out, _ = command("events", "--json")
    assert len(out.splitlines()) == 11


@pytest.mark.parametrize("args,message", [
    pytest.param(["--operation", "987654"], "operation 987654 does not exist", id="unknown-operation"),
    pytest.param(["--limit", "0"], "--limit must be a positive integer", id="zero-limit"),
    pytest.param(["--after", "-5"], "--after must be 0 or a positive sequence", id="negative-after"),
    pytest.param(["--operation", "1", "--after", "3"],
                 "--after reads the global feed: give --operation or --after, not both", id="operation-and-after"),
])
def test_events_errors_exit_2(tenant, args, message):
    assert command("events", *args) == (2, "", message)


@pytest.mark.parametrize("chunk,fetch", [(1, 1), (2, 3), (1000, 2), (1, 5000)])
def test_streamed_rebuild_and_verify_match_the_in_memory_fold_across_chunks(closed_pair, monkeypatch, chunk, fetch):
    """Rebuild and verify stream the events by (token, sequence) in fetches and fold them into chunks
    of rows: any sizes give the rows of the plain fold of the whole log in sequence order, and verify
    sees a change in any chunk."""
    from api.models import StopMonitorEvent, StopMonitorExecution
    from stopmonitor import projections
    from stopmonitor.events import execution_state_of, to_stored
    from stopmonitor.execution import fold

    long_, short, tokens = closed_pair
    monkeypatch.setattr(projections, "CHUNK", chunk)
    monkeypatch.setattr(projections, "FETCH", fetch)
    expected = fold(to_stored(e) for e in StopMonitorEvent.objects.order_by("sequence"))
    assert projections.rebuild() == 2
    assert {ex.execution_token: execution_state_of(ex) for ex in StopMonitorExecution.objects.all()} == expected
    assert projections.verify() == []
    StopMonitorExecution.objects.filter(pk=tokens[short.pk]).update(last_version=99)
    assert [(d.execution_token, d.field, d.stored) for d in projections.verify()] == [
        (tokens[short.pk], "last_version", 99)]
    assert projections.rebuild(short.pk) == 1
    assert projections.verify() == []


def test_streamed_events_carry_the_payloads_the_orm_reads(open_op):
    """The rebuild reads payloads as ``payload::text`` and decodes them itself: the same dicts as the
    ORM's (unicode, escapes, nesting, big and negative integers, floats, booleans, null, empty)."""
    from django.db import transaction

    from api.models import StopMonitorEvent
    from stopmonitor import projections
    from stopmonitor.events import append_events, to_stored
    from stopmonitor.execution import NewEvent

    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    head = StopMonitorEvent.objects.filter(operation_id=op.pk).count()
    trigger = {"attempt": 1, "trigger": "STOP_LOSS", "close_side": "SELL", "level": "9200", "quantity": "0.5",
               "note": "café \u20ac \U0001F600 \"quoted\" back\\slash\ttab\nline \u0001", "nested": {"a": [1, {"b": None}]}}
    failed = {"code": -2010, "message": "Account has insufficient balance — ünïcode", "order_id": 2**62 + 1,
              "ratio": 0.1, "big": 12345678901234567890, "definite": True, "fills": [], "meta": {}}
    with transaction.atomic():
        append_events(op, head, [NewEvent("STOP_TRIGGERED", trigger, "tok-payloads"),
                                 NewEvent("FAILED", failed, "tok-payloads"), NewEvent("STOP_MOVED", {"x": 1})],
                      source="cron", venue="paper", now=NOW)
    orm = [to_stored(e) for e in StopMonitorEvent.objects.filter(execution_token="tok-payloads").order_by("sequence")]
    with transaction.atomic():
        streamed = list(projections._events(op.pk))
    assert streamed == orm
    assert [e.payload for e in streamed] == [trigger, failed]
    assert streamed[1].payload["order_id"] == 4611686018427387905 and type(streamed[1].payload["ratio"]) is float
    (state,) = projections._fold(op.pk)
    assert (state.status, state.error_code, state.error_message, state.exchange_order_id, state.last_version) == (
        "FAILED", -2010, "Account has insufficient balance — ünïcode", 4611686018427387905, head + 2)


def test_rebuild_over_a_projection_rewrites_only_the_rows_that_differ(closed_pair):
    """A rebuild over stored rows goes through a temporary table: equal rows keep their row version
    (``xmin``), a changed row is rewritten, a row no event explains is deleted in scope only."""
    from django.db import transaction

    from api.models import StopMonitorExecution
    from stopmonitor import projections

    long_, short, tokens = closed_pair

    def versions():
        with connection.cursor() as cursor:
            cursor.execute("SELECT execution_token, xmin::text FROM api_stopmonitorexecution")
            return dict(cursor.fetchall())

    before = versions()
    StopMonitorExecution.objects.filter(pk=tokens[short.pk]).update(status="FAILED", executed_quantity=None)
    extra = StopMonitorExecution.objects.get(pk=tokens[long_.pk])
    extra.execution_token = f"sm{long_.pk}-S9-deadbeef"
    extra.save(force_insert=True)
    corrupted = versions()

    assert projections.rebuild(short.pk) == 1
    after = versions()
    assert after.keys() == {tokens[long_.pk], tokens[short.pk], f"sm{long_.pk}-S9-deadbeef"}  # the extra is out of scope
    assert after[tokens[long_.pk]] == before[tokens[long_.pk]]
    assert after[tokens[short.pk]] != corrupted[tokens[short.pk]]
    assert StopMonitorExecution.objects.get(pk=tokens[short.pk]).executed_quantity == D("2")

    with transaction.atomic():  # twice in one transaction: the temporary table is dropped each time
        assert projections.rebuild() == 2
        assert projections.rebuild() == 2
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('pg_temp.stopmonitor_projection_stage') IS NULL")
            assert cursor.fetchone() == (True,)
    final = versions()
    assert final == {tokens[long_.pk]: before[tokens[long_.pk]], tokens[short.pk]: after[tokens[short.pk]]}
    assert projections.verify() == []


def test_first_rebuild_writes_every_row(closed_pair):
    from api.models import StopMonitorExecution
    from stopmonitor import projections

    long_, short, tokens = closed_pair
    expected = {ex.execution_token: ex for ex in StopMonitorExecution.objects.all()}
    StopMonitorExecution.objects.all().delete()
    assert projections.rebuild(long_.pk) == 1
    assert list(StopMonitorExecution.objects.values_list("execution_token", flat=True)) == [tokens[long_.pk]]
    assert projections.rebuild() == 2
    from stopmonitor.events import execution_state_of

    assert {ex.execution_token: execution_state_of(ex) for ex in StopMonitorExecution.objects.all()} == {
        token: execution_state_of(ex) for token, ex in expected.items()}


@pytest.mark.parametrize("event_type, source", [("PROTECTION_REQUESTED", "loop"), ("STOP_MOVED", "break_even")])
def test_events_table_columns_hold_the_longest_event_type_and_source(event_type, source):
    """PROTECTION_REQUESTED (20 characters) and source break_even (10) overflowed their columns
    (19 and 8): the rest of the row slid one or two characters right of its header (a new user's report)."""
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from stopmonitor.management.commands.events import TABLE_HEADER, table_line

    e = SimpleNamespace(sequence=136, operation_id=7, version=5, created_at=datetime(2026, 3, 2, 12, tzinfo=timezone.utc),
                        event_type=event_type, source=source, venue="binance-testnet", execution_token="sm7-S1-1a29416e",
                        payload={"a": 1})
    line = table_line(e)
    for header, value in [("TYPE", event_type), ("SOURCE", source), ("VENUE", "binance-testnet"),
                          ("TOKEN", "sm7-S1-1a29416e"), ("PAYLOAD", '{"a":1}')]:
        assert line.index(value) == TABLE_HEADER.index(header), header
