"""``backfill_stop_price`` on PostgreSQL: exact levels, every skip reason, dry run, idempotence,
kills between and inside batches of a real subprocess, and a concurrent writer holding a row lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal as D
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from api.management.commands.backfill_stop_price import Skip, compute_level, event_venue

ROOT = Path(__file__).resolve().parents[2]
pg_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL behaviour (SKIP LOCKED)")
pytestmark = [pg_only, pytest.mark.django_db(transaction=True)]


# -- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture
def tenant():
    from api.models import Client

    return Client.objects.create(name="acme")


@pytest.fixture
def symbols():
    """Three tickSizes: BTC's 0.01, a small-cap's 0.00000001, ADA's 0.0001, and one without tickSize."""
    from api.models import Symbol

    def make(name, base, tick):
        return Symbol.objects.create(symbol=name, base_asset=base, quote_asset="USDT", tick_size=tick)

    return {
        "BTCUSDT": make("BTCUSDT", "BTC", D("0.01")),
        "PEPEUSDT": make("PEPEUSDT", "PEPE", D("0.00000001")),
        "ADAUSDT": make("ADAUSDT", "ADA", D("0.0001")),
        "NOTICKUSDT": make("NOTICKUSDT", "NOTICK", None),
    }


@pytest.fixture
def legacy(tenant, symbols):
    """Factory for a legacy row: percentages only, no absolute levels, no events (as after 0016)."""
    from api.models import Operation

    def make(symbol="BTCUSDT", side="BUY", entry="9300", stop_pct="2.5", target_pct=None, status="ACTIVE",
             client=None, stop_price=None):
        return Operation.objects.create(
            client=client or tenant, symbol=symbols[symbol], side=side, status=status, quantity=D("1"),
            entry_price=D(entry) if entry is not None else None,
            stop_loss_percent=D(stop_pct) if stop_pct is not None else None,
            stop_gain_percent=D(target_pct) if target_pct is not None else None,
            stop_price=D(stop_price) if stop_price is not None else None,
        )

    return make


def backfill(*args) -> tuple[int, str, str]:
    """Run the command in-process; returns (exit status, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("backfill_stop_price", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


def summary_of(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert lines[-1]["type"] == "summary"
    return lines[-1]


def levels(op):
    op.refresh_from_db()
    return op.stop_price, op.target_price


def stream(op):
    from api.models import StopMonitorEvent

    return [(e.event_type, e.source, e.venue, e.version, e.payload)
            for e in StopMonitorEvent.objects.filter(operation_id=op.pk).order_by("version")]


def event_count() -> int:
    from api.models import StopMonitorEvent

    return StopMonitorEvent.objects.count()


# -- exact levels -------------------------------------------------------------------------------

LEVEL_CASES = [
    pytest.param("BTCUSDT", "BUY", "9300", "2.5", "3.333", "9067.5", "9609.96", id="btc-long-target-rounds-down"),
    pytest.param("BTCUSDT", "SELL", "9300", "2.5", "3.333", "9532.5", "8990.04", id="btc-short-target-rounds-up"),
    pytest.param("BTCUSDT", "BUY", "43251.37", "1.7", "2.25", "42516.1", "44224.52", id="btc-long-stop-rounds-up"),
    pytest.param("BTCUSDT", "SELL", "43251.37", "1.7", "2.25", "43986.64", "42278.22", id="btc-short-stop-rounds-down"),
    pytest.param("PEPEUSDT", "BUY", "0.00001234", "3", "5", "0.00001197", "0.00001295", id="smallcap-long-1e-8"),
    pytest.param("PEPEUSDT", "SELL", "0.00001234", "3", "5", "0.00001271", "0.00001173", id="smallcap-short-1e-8"),
    pytest.param("ADAUSDT", "BUY", "0.3852", "7.5", "12.5", "0.3564", "0.4333", id="ada-long-1e-4"),
    pytest.param("ADAUSDT", "SELL", "0.3852", "7.5", "12.5", "0.414", "0.3371", id="ada-short-1e-4"),
]


@pytest.mark.parametrize("symbol,side,entry,stop_pct,target_pct,stop,target", LEVEL_CASES)
def test_exact_levels_and_events(legacy, symbol, side, entry, stop_pct, target_pct, stop, target):
    op = legacy(symbol, side, entry, stop_pct, target_pct)
    code, out, _ = backfill("--json")
    assert code == 0, out
    assert levels(op) == (D(stop), D(target))
    tick = {"BTCUSDT": "0.01", "PEPEUSDT": "0.00000001", "ADAUSDT": "0.0001"}[symbol]
    assert stream(op) == [
        ("STOP_SET", "backfill", "paper", 1, {"stop_price": stop, "stop_loss_percent": stop_pct, "entry_price": entry,
                                              "tick_size": tick, "rounding": "towards_entry"}),
        ("TARGET_SET", "backfill", "paper", 2, {"target_price": target, "stop_gain_percent": target_pct,
                                                "entry_price": entry, "tick_size": tick, "rounding": "towards_entry"}),
    ]
    s = summary_of(out)
    assert (s["scanned"], s["updated"], s["stops_set"], s["targets_set"], s["skipped"]) == (1, 1, 1, 1, 0)


@pytest.mark.parametrize("kind,side,entry,pct,tick,expected", [
    pytest.param("stop", "BUY", "100", "0.005", "0.01", "99.995", id="long-stop-0.005pct"),
    pytest.param("stop", "BUY", "100", "0.004", "0.01", "99.996", id="long-stop-0.004pct"),
    pytest.param("target", "SELL", "100", "0.004", "0.01", "99.996", id="short-target-0.004pct"),
])
def test_compute_level_is_pure_and_rounds_towards_entry(kind, side, entry, pct, tick, expected):
    # e.g. 100 × (1 − 0.005%) = 99.995 → up to tickSize 0.01 = 100.00, the entry itself: the wrong side;
    # on a 0.001 grid the same level is exact
    with pytest.raises(Skip) as info:
        compute_level(kind, side, D(entry), D(pct), D(tick))
    assert info.value.reason == "wrong_side"
    assert compute_level(kind, side, D(entry), D(pct), D("0.001")) == D(expected)


@pytest.mark.parametrize("configured,recorded", [
    pytest.param("paper", "paper", id="paper"),
    pytest.param("replay", "paper", id="replay-is-simulated"),
    pytest.param("binance", "binance", id="binance"),
    pytest.param("binance-testnet", "binance-testnet", id="testnet"),
])
def test_event_venue(configured, recorded):
    assert event_venue(configured) == recorded


def test_only_missing_levels_of_open_operations_are_written(legacy):
    has_stop = legacy(stop_price="9000", stop_pct="2.5", target_pct="5")  # target only
    closed = legacy(status="CLOSED")
    cancelled = legacy(status="CANCELLED")
    planned = legacy(status="PLANNED", stop_pct="1")
    nothing = legacy(stop_pct=None)
    code, out, _ = backfill()
    assert code == 0, out
    assert levels(has_stop) == (D("9000"), D("9765"))
    assert [t for t, *_ in stream(has_stop)] == ["TARGET_SET"]
    assert levels(planned) == (D("9207"), None)
    for op in (closed, cancelled, nothing):
        assert levels(op) == (None, None) and stream(op) == []
    assert "scanned=2 updated=2 (stops=1 targets=1) skipped=0" in out


def test_levels_computed_in_sql_equal_compute_level_on_many_rows(tenant, symbols):
    """The PostgreSQL batch computes levels in ``numeric``; :func:`compute_level` (Decimal) is the
    definition. On a few hundred generated rows — both sides, tickSizes from 1e-8 to 10 and odd
    ones (0.3, 0.05, 0.5), tiny and large percentages and entries, values on and off the grid —
    every row is written with exactly compute_level's levels or skipped with its reason."""
    import random

    from api.models import Operation, Symbol

    ticks = [D("0.01"), D("0.00000001"), D("0.0001"), D("0.3"), D("0.05"), D("0.5"), D("1"), D("10"), None]
    syms = [Symbol.objects.create(symbol=f"T{i}USDT", base_asset=f"T{i}", quote_asset="USDT", tick_size=t)
            for i, t in enumerate(ticks)]
    rng = random.Random(4)
    pcts = [None, D("0"), D("0.0001"), D("0.001"), D("0.25"), D("2.5"), D("3.3333"), D("50"), D("99.9999"),
            D("100"), D("-1")]
    entries = [None, D("0"), D("0.00000001"), D("0.00001234"), D("1"), D("9300"), D("43251.37"), D("0.3852"),
               D("99999999999.99999999"), D("123456789.12345678")]
    ops = Operation.objects.bulk_create([
        Operation(client=tenant, symbol=rng.choice(syms), side=rng.choice(["BUY", "SELL"]), status="ACTIVE",
                  quantity=D("1"), entry_price=rng.choice(entries), stop_loss_percent=rng.choice(pcts),
                  stop_gain_percent=rng.choice(pcts))
        for _ in range(400)
    ])
    code, out, _ = backfill("--json", "--batch-size", "64")
    assert code in (0, 1)
    skipped = {}
    for line in out.splitlines()[:-1]:
        record = json.loads(line)
        skipped.setdefault(record["operation_id"], set()).add((record["field"], record["reason"]))
    checked = written = 0
    for op in Operation.objects.filter(pk__in=[o.pk for o in ops]).select_related("symbol"):
        expected, reasons = {}, set()
        for kind, price_field, pct_field in (("stop", "stop_price", "stop_loss_percent"),
                                             ("target", "target_price", "stop_gain_percent")):
            pct = getattr(op, pct_field)
            if pct is None:
                continue
            try:
                expected[price_field] = compute_level(kind, op.side, op.entry_price, pct, op.symbol.tick_size)
            except Skip as skip:
                reasons.add((price_field, skip.reason))
        got = {"stop_price": op.stop_price, "target_price": op.target_price}
        if reasons or not expected:
            assert skipped.get(op.pk, set()) == reasons, op.pk
            assert got == {"stop_price": None, "target_price": None}, op.pk
        else:
            assert op.pk not in skipped
            assert got == {name: expected.get(name) for name in got}, (op.pk, op.side, op.entry_price,
                                                                       op.symbol.tick_size)
            written += 1
        checked += 1
    assert checked == 400 and written > 50


# -- skips -------------------------------------------------------------------------------------

SKIP_CASES = [
    pytest.param(dict(entry=None), "stop_price", "no_entry_price", "entry_price is empty", id="no-entry-price"),
    pytest.param(dict(entry="0"), "stop_price", "no_entry_price", "entry_price 0 is not positive", id="zero-entry"),
    pytest.param(dict(stop_pct="0"), "stop_price", "percent_out_of_range",
                 "stop percentage 0 is not between 0 and 100", id="zero-percent"),
    pytest.param(dict(stop_pct="-1.5"), "stop_price", "percent_out_of_range",
                 "stop percentage -1.5 is not between 0 and 100", id="negative-percent"),
    pytest.param(dict(stop_pct="100"), "stop_price", "percent_out_of_range",
                 "stop percentage 100 is not between 0 and 100", id="hundred-percent"),
    pytest.param(dict(stop_pct=None, target_pct="150"), "target_price", "percent_out_of_range",
                 "target percentage 150 is not between 0 and 100", id="target-over-hundred"),
    pytest.param(dict(entry="100", stop_pct="0.001"), "stop_price", "wrong_side",
                 "stop 100 from 0.001% at tickSize 0.01: a long's stop must be below the entry price 100",
                 id="long-stop-rounds-onto-entry"),
    pytest.param(dict(side="SELL", entry="100", stop_pct="0.001"), "stop_price", "wrong_side",
                 "stop 100 from 0.001% at tickSize 0.01: a short's stop must be above the entry price 100",
                 id="short-stop-rounds-onto-entry"),
    pytest.param(dict(entry="100", stop_pct=None, target_pct="0.004"), "target_price", "wrong_side",
                 "target 100 from 0.004% at tickSize 0.01: a long's target must be above the entry price 100", id="long-target-rounds-onto-entry"),
    pytest.param(dict(symbol="NOTICKUSDT"), "stop_price", "no_tick_size", "the symbol has no tickSize",
                 id="no-tick-size"),
]


@pytest.mark.parametrize("fields,field,reason,detail", SKIP_CASES)
def test_every_skip_reason_names_the_operation_and_writes_nothing(legacy, fields, field, reason, detail):
    good = legacy()
    bad = legacy(**fields)
    code, out, _ = backfill("--json")
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"type": "skip", "operation_id": bad.pk, "field": field, "reason": reason, "detail": detail}
    s = lines[-1]
    assert (s["scanned"], s["updated"], s["skipped"], s["skipped_by_reason"]) == (2, 1, 1, {reason: 1})
    assert s["skips"] == [{"operation_id": bad.pk, "field": field, "reason": reason, "detail": detail}]
    assert levels(bad) == (None, None) and stream(bad) == []
    assert levels(good) == (D("9067.5"), None)
    # the text form names it too
    code, out, _ = backfill()
    assert code == 1
    assert f"skip op={bad.pk} {field} {reason}: {detail}" in out.splitlines()
    assert "no changes: the operations listed above need attention" in out


def test_a_row_with_one_bad_level_is_not_written_at_all(legacy):
    op = legacy(stop_pct="2.5", target_pct="0")
    code, out, _ = backfill()
    assert code == 1
    assert f"skip op={op.pk} target_price percent_out_of_range" in out
    assert levels(op) == (None, None) and stream(op) == []


# -- dry run, second run, limit, tenant, errors -------------------------------------------------

def test_dry_run_prints_and_writes_nothing(legacy):
    long_ = legacy("BTCUSDT", "BUY", "9300", "2.5", "3.333")
    short = legacy("ADAUSDT", "SELL", "0.3852", "7.5", None)
    code, out, _ = backfill("--dry-run")
    assert code == 0
    assert out.splitlines()[:2] == [
        f"would set op={long_.pk} BUY entry=9300 tickSize=0.01 stop_price=9067.5 (2.5%) target_price=9609.96 (3.333%)",
        f"would set op={short.pk} SELL entry=0.3852 tickSize=0.0001 stop_price=0.414 (7.5%)",
    ]
    assert "backfill (dry run): scanned=2 would update=2 (stops=2 targets=1) skipped=0" in out
    assert levels(long_) == (None, None) and levels(short) == (None, None)
    assert event_count() == 0


def test_second_run_changes_nothing_and_says_so(legacy):
    ops = [legacy(entry=str(9000 + i), target_pct="4") for i in range(25)]
    code, out, _ = backfill("--batch-size", "7", "--json")
    s = summary_of(out)
    assert code == 0 and (s["scanned"], s["updated"], s["batches"]) == (25, 25, 4)
    before = event_count()
    snapshot = [levels(op) for op in ops]
    assert before == 50
    code, out, _ = backfill("--batch-size", "7")
    assert code == 0
    assert "nothing to backfill: every open operation already has its absolute levels" in out
    assert "scanned=0 updated=0" in out
    assert event_count() == before and [levels(op) for op in ops] == snapshot


def test_limit_and_tenant(legacy, tenant):
    from api.models import Client

    other = Client.objects.create(name="other")
    mine = [legacy() for _ in range(5)]
    theirs = [legacy(client=other) for _ in range(3)]
    code, out, _ = backfill("--tenant", str(other.pk), "--json")
    assert code == 0 and summary_of(out)["updated"] == 3
    assert all(levels(op)[0] == D("9067.5") for op in theirs)
    assert all(levels(op)[0] is None for op in mine)
    code, out, _ = backfill("--limit", "2", "--batch-size", "1", "--json")
    assert code == 0 and (summary_of(out)["scanned"], summary_of(out)["batches"]) == (2, 2)
    assert [levels(op)[0] is not None for op in mine] == [True, True, False, False, False]


@pytest.mark.parametrize("args,message", [
    pytest.param(["--batch-size", "0"], "--batch-size must be a positive integer", id="batch-size"),
    pytest.param(["--tenant", "999999"], "tenant 999999 does not exist", id="unknown-tenant"),
])
def test_bad_arguments_exit_2(args, message, tenant):
    code, _, err = backfill(*args)
    assert (code, err) == (2, message)


# -- a real subprocess: exit status, progress, kills ---------------------------------------------

# rows for the kill tests: 12 batches of 100. Each backfilled operation costs one append_events
# (about 7 statements), so this keeps a kill test near 10 s on this machine.
ROWS = 1200


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOPMONITOR_BACKFILL_")}
    s = connection.settings_dict
    env["DATABASE_URL"] = f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    env.update(extra)
    return env


def start(*args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "manage.py", "backfill_stop_price", *args], cwd=ROOT,
                            env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    """Read the child's stderr line by line until a line contains ``needle``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"child ended before {needle!r}: {seen}")
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout}s: {seen}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    # the server ends the dead client's session (rolling back its open transaction) on EOF
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            if cur.fetchone()[0] == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the killed child's database session did not end")


def bulk_legacy(tenant, symbol, n: int) -> list[int]:
    from api.models import Operation

    rows = Operation.objects.bulk_create([
        Operation(client=tenant, symbol=symbol, side="BUY" if i % 2 else "SELL", status="ACTIVE", quantity=D("1"),
                  entry_price=D("20000") + i, stop_loss_percent=D("2"), stop_gain_percent=D("3"))
        for i in range(n)
    ])
    return [r.pk for r in rows]


def expected_levels(side: str, entry: D) -> tuple[D, D]:
    if side == "BUY":  # ×0.98 and ×1.03 of an integer entry land on the 0.01 grid exactly
        return entry * D("0.98"), entry * D("1.03")
    return entry * D("1.02"), entry * D("0.97")


def assert_written_exactly_once(n_expected: int | None = None) -> int:
    """Every backfilled operation has exactly STOP_SET v1 and TARGET_SET v2 matching its row; returns their number."""
    from django.db.models import Count

    from api.models import Operation, StopMonitorEvent

    done = list(Operation.objects.filter(stop_price__isnull=False).values_list("pk", "side", "entry_price",
                                                                              "stop_price", "target_price"))
    per_op = dict(StopMonitorEvent.objects.values("operation_id").annotate(n=Count("sequence"))
                  .values_list("operation_id", "n"))
    assert set(per_op) == {pk for pk, *_ in done}
    assert set(per_op.values()) <= {2}
    stops = dict(StopMonitorEvent.objects.filter(event_type="STOP_SET", version=1)
                 .values_list("operation_id", "payload"))
    targets = dict(StopMonitorEvent.objects.filter(event_type="TARGET_SET", version=2)
                   .values_list("operation_id", "payload"))
    for pk, side, entry, stop, target in done:
        assert (stop, target) == expected_levels(side, entry)
        assert D(stops[pk]["stop_price"]) == stop and D(targets[pk]["target_price"]) == target
    if n_expected is not None:
        assert len(done) == n_expected
    return len(done)


@pytest.mark.slow
def test_subprocess_exit_status_progress_and_summary(tenant, symbols, legacy):
    bulk_legacy(tenant, symbols["BTCUSDT"], 250)
    bad = legacy(entry=None)
    proc = subprocess.run([sys.executable, "manage.py", "backfill_stop_price", "--batch-size", "100",
                           "--progress-interval", "0"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[0] == "backfill: 251 operations to look at"
    assert [line.split(" (")[0] for line in proc.stderr.splitlines()[1:]] == [
        "backfill: 100/251", "backfill: 200/251", "backfill: 251/251"]
    assert "rows/s ETA" in proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"skip op={bad.pk} stop_price no_entry_price: entry_price is empty"
    assert out[1].startswith("backfill: scanned=251 updated=250 (stops=250 targets=250) skipped=1 "
                             "(no_entry_price=1) already_done=0 batches=3 ")
    assert_written_exactly_once(250)
    # an error is one line and exit 2, no traceback
    proc = subprocess.run([sys.executable, "manage.py", "backfill_stop_price", "--tenant", "424242"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "CommandError: tenant 424242 does not exist\n")


@pytest.mark.slow
def test_sigkill_between_batches_then_rerun_writes_each_row_once(tenant, symbols):
    bulk_legacy(tenant, symbols["BTCUSDT"], ROWS)
    proc = start("--batch-size", "100", "--progress-interval", "0", STOPMONITOR_BACKFILL_PAUSE="0.5")
    read_until(proc, f"backfill: 500/{ROWS}")
    kill(proc)  # during the pause after batch 5's commit
    assert assert_written_exactly_once() == 500
    proc = subprocess.run([sys.executable, "manage.py", "backfill_stop_price", "--batch-size", "100", "--json"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = summary_of(proc.stdout)
    assert (s["scanned"], s["updated"], s["skipped"], s["batches"]) == (ROWS - 500, ROWS - 500, 0, ROWS // 100 - 5)
    assert_written_exactly_once(ROWS)


@pytest.mark.slow
def test_sigkill_inside_a_batch_rolls_it_back_then_rerun_completes(tenant, symbols):
    bulk_legacy(tenant, symbols["BTCUSDT"], ROWS)
    proc = start("--batch-size", "100", "--progress-interval", "0", STOPMONITOR_BACKFILL_BATCH_SLEEP="0.3")
    seen = read_until(proc, "hook: inside batch 4")
    assert any(f"backfill: 300/{ROWS}" in line for line in seen)
    kill(proc)  # batch 4 has written its rows and events but not committed
    assert assert_written_exactly_once() == 300
    code, out, _ = backfill("--batch-size", "100", "--json")
    assert code == 0
    assert summary_of(out)["updated"] == ROWS - 300
    assert_written_exactly_once(ROWS)


@pytest.mark.slow
def test_sigterm_finishes_the_batch_and_exits_with_the_summary(tenant, symbols):
    bulk_legacy(tenant, symbols["BTCUSDT"], ROWS)
    proc = start("--batch-size", "100", "--progress-interval", "0", "--json", STOPMONITOR_BACKFILL_BATCH_SLEEP="0.3")
    read_until(proc, "hook: inside batch 3")
    proc.send_signal(signal.SIGTERM)  # lands inside batch 3: it commits, then the run stops
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    s = summary_of(out)
    assert (s["interrupted"], s["updated"], s["batches"]) == ("SIGTERM", 300, 3)
    assert "Traceback" not in err
    assert assert_written_exactly_once() == 300


# -- a concurrent writer -----------------------------------------------------------------------

class RowLocker(threading.Thread):
    """Holds ``select_for_update`` on one operation in a second connection until released, then
    optionally moves its stop like the API would (``move_levels`` semantics: row change + event)."""

    def __init__(self, operation_id: int, set_stop: D | None = None):
        super().__init__(daemon=True)
        self.operation_id = operation_id
        self.set_stop = set_stop
        self.locked = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        from django.db import connection as thread_connection
        from django.db import transaction

        from api.models import Operation
        from stopmonitor.events import append_events, stream_head
        from stopmonitor.execution import STOP_SET, NewEvent

        try:
            with transaction.atomic():
                op = Operation.objects.select_for_update().select_related("symbol").get(pk=self.operation_id)
                self.locked.set()
                assert self.release.wait(60)
                if self.set_stop is not None:
                    op.stop_price = self.set_stop
                    op.save(update_fields=["stop_price", "updated_at"])
                    version, _ = stream_head(op.pk)
                    append_events(op, version, [NewEvent(STOP_SET, {"stop_price": str(self.set_stop), "actor": "u"})],
                                  source="api", venue="paper", now=op.updated_at)
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.locked.set()
            thread_connection.close()


def test_locked_row_is_skipped_not_overwritten_and_a_rerun_updates_it(legacy):
    ops = [legacy(entry=str(9000 + i)) for i in range(5)]
    locker = RowLocker(ops[2].pk)
    locker.start()
    assert locker.locked.wait(10) and locker.error is None
    started = time.monotonic()
    code, out, _ = backfill("--batch-size", "2", "--json")
    assert time.monotonic() - started < 5  # never waited on the lock
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"type": "skip", "operation_id": ops[2].pk, "field": None, "reason": "locked",
                        "detail": "row locked by another transaction; a re-run picks it up"}
    assert (lines[-1]["updated"], lines[-1]["skipped_by_reason"]) == (4, {"locked": 1})
    locker.release.set()
    locker.join(10)
    assert locker.error is None
    assert levels(ops[2]) == (None, None) and stream(ops[2]) == []
    code, out, _ = backfill("--json")
    assert code == 0 and (summary_of(out)["scanned"], summary_of(out)["updated"]) == (1, 1)
    assert levels(ops[2]) == (D("8776.95"), None)  # 9002 × 0.975
    assert [t for t, *_ in stream(ops[2])] == ["STOP_SET"]


def test_concurrent_writer_setting_the_stop_wins_and_is_not_overwritten(legacy):
    ops = [legacy(entry="9300") for _ in range(3)]
    locker = RowLocker(ops[1].pk, set_stop=D("9100"))
    locker.start()
    assert locker.locked.wait(10) and locker.error is None
    code, out, _ = backfill("--json")
    assert code == 1 and summary_of(out)["skipped_by_reason"] == {"locked": 1}
    locker.release.set()
    locker.join(10)
    assert locker.error is None
    code, out, _ = backfill("--json")
    assert code == 0 and summary_of(out)["nothing_to_do"] is True
    assert levels(ops[1]) == (D("9100"), None)
    assert [(t, src) for t, src, *_ in stream(ops[1])] == [("STOP_SET", "api")]
    assert [levels(op)[0] for op in (ops[0], ops[2])] == [D("9067.5"), D("9067.5")]


# -- append_many, the bulk writer the backfill uses --------------------------------------------

def test_append_many_writes_events_and_outbox_rows_or_nothing_on_a_moved_stream(legacy):
    from datetime import datetime, timezone

    from django.db import transaction

    from api.models import Outbox, StopMonitorEvent
    from stopmonitor.events import ConcurrencyConflict, append_many
    from stopmonitor.execution import NewEvent

    a, b = legacy(), legacy(symbol="ADAUSDT", entry="0.3852")
    now = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
    with transaction.atomic():
        n = append_many([(a, 0, [NewEvent("STOP_SET", {"stop_price": "9000"}), NewEvent("TARGET_SET", {"x": [1]})]),
                         (b, 0, [NewEvent("STOP_SET", {"stop_price": "0.3"})]), (a, 0, [])],
                        source="backfill", venue="paper", now=now)
    assert n == 3
    # one INSERT per stream position (ord 1 of every stream, then ord 2): stream order is version order
    rows = list(StopMonitorEvent.objects.order_by("operation_id", "version").values_list(
        "operation_id", "version", "event_type", "payload", "source", "venue", "created_at", "tenant_id", "symbol"))
    assert rows == [(a.pk, 1, "STOP_SET", {"stop_price": "9000"}, "backfill", "paper", now, a.client_id, "BTCUSDT"),
                    (a.pk, 2, "TARGET_SET", {"x": [1]}, "backfill", "paper", now, a.client_id, "BTCUSDT"),
                    (b.pk, 1, "STOP_SET", {"stop_price": "0.3"}, "backfill", "paper", now, b.client_id, "ADAUSDT")]
    outbox = list(Outbox.objects.order_by("event__operation_id", "event__version").values_list(
        "event__operation_id", "routing_key",
                                                                   "operation_id_ref", "published_at"))
    assert outbox == [(a.pk, f"stop.STOP_SET.{a.client_id}.BTCUSDT", a.pk, None),
                      (a.pk, f"stop.TARGET_SET.{a.client_id}.BTCUSDT", a.pk, None),
                      (b.pk, f"stop.STOP_SET.{b.client_id}.ADAUSDT", b.pk, None)]
    # a's stream is at 2: expecting 0 conflicts, names the stream, and writes nothing (b neither)
    with pytest.raises(ConcurrencyConflict) as info, transaction.atomic():
        append_many([(a, 0, [NewEvent("STOP_SET", {})]), (b, 1, [NewEvent("TARGET_SET", {})])],
                    source="backfill", venue="paper", now=now)
    assert info.value.moved == {a.pk: (2, 0)}
    assert event_count() == 3 and Outbox.objects.count() == 3
    with transaction.atomic():  # the staging table was emptied: a corrected retry writes only its own events
        assert append_many([(b, 1, [NewEvent("TARGET_SET", {})])], source="backfill", venue="paper", now=now) == 1
    assert event_count() == 4
    from stopmonitor.integrity import verify_store
    report = verify_store()
    assert (report.events, report.streams, report.broken) == (4, 2, [])


def test_event_ids_are_time_ordered_uuid7_from_the_bulk_and_the_single_append(legacy):
    """Migration 0020: set-based appends draw ids from ``stopmonitor_uuid7()``, single appends from
    ``uuid6.uuid7``; both are version 7 (RFC 9562) with the append's millisecond in the first 48 bits."""
    import time
    import uuid
    from datetime import datetime, timezone

    from django.db import transaction

    from api.models import StopMonitorEvent
    from stopmonitor.events import append_events, append_many
    from stopmonitor.execution import NewEvent

    a, b = legacy(), legacy(symbol="ADAUSDT", entry="0.3852")
    now = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
    before_ms = int(time.time() * 1000)
    with transaction.atomic():
        append_many([(a, 0, [NewEvent("STOP_SET", {"stop_price": "9000"})])], source="backfill", venue="paper", now=now)
    with transaction.atomic():
        append_events(b, 0, [NewEvent("STOP_SET", {"stop_price": "0.3"})], source="api", venue="paper", now=now)
    after_ms = int(time.time() * 1000)
    ids = list(StopMonitorEvent.objects.order_by("sequence").values_list("event_id", flat=True))
    assert [i.version for i in ids] == [7, 7]
    assert [i.variant for i in ids] == [uuid.RFC_4122, uuid.RFC_4122]
    millis = [i.int >> 80 for i in ids]
    assert before_ms - 1 <= millis[0] <= millis[1] <= after_ms + 1


# -- notional at the stop (issue #12 item 6) -------------------------------------------------------

def test_a_stop_that_could_never_close_the_position_is_skipped_with_the_figures(legacy, symbols):
    from api.models import Operation

    symbols["BTCUSDT"].min_notional = D("5")
    symbols["BTCUSDT"].save()
    good = legacy()  # 1 BTC × 9067.5
    bad = legacy(entry="9600", stop_pct="6.25")  # stop 9000
    Operation.objects.filter(pk=bad.pk).update(quantity=D("0.00053"))  # 5.09 at the entry, 4.77 at the stop

    code, out, _ = backfill("--json")

    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"type": "skip", "operation_id": bad.pk, "field": "stop_price",
                        "reason": "below_min_notional_at_stop",
                        "detail": "quantity 0.00053 × stop_price 9000 = 4.77 is below minNotional 5 + 5% margin = "
                                  "5.25: the stop could never close it"}
    assert levels(bad) == (None, None) and stream(bad) == []
    assert levels(good) == (D("9067.5"), None)
