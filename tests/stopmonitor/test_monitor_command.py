"""`manage.py monitor_stops` as the CronJob runs it: exit codes, JSON lines, dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal as D
from pathlib import Path

import pytest
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def run_command(tmp_path, *args, **env):
    s = connection.settings_dict
    if connection.vendor == "postgresql":
        url = f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}"
    else:
        url = f"sqlite:///{s['NAME']}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    base.update(DATABASE_URL=url, ENVIRONMENT="development", CACHE_DIR=str(tmp_path / "cache"), LOG_LEVEL="WARNING")
    base.update(env)
    return subprocess.run([sys.executable, "manage.py", "monitor_stops", *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def armed(tenant, symbols):
    from stopmonitor.operations import open_operation

    return open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"),
                          now=datetime.now(timezone.utc))


def test_unreachable_exchange_exits_1_with_one_line_and_changes_nothing(armed, tmp_path):
    from api.models import Operation, StopMonitorEvent

    Operation.objects.update(venue="binance-testnet")  # the venue this monitor watches (migration 0026)
    proc = run_command(tmp_path, "--json", EXCHANGE_VENUE="binance-testnet", BINANCE_API_KEY="k" * 16,
                       BINANCE_API_SECRET="s" * 16, BINANCE_API_URL="http://127.0.0.1:9", BINANCE_TIMEOUT_SECONDS="2")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CommandError: pass could not run: best bid/ask unavailable")
    assert "Traceback" not in proc.stderr and "s" * 16 not in proc.stderr + proc.stdout
    assert list(StopMonitorEvent.objects.values_list("event_type", flat=True)) == ["STOP_SET"]


def test_dry_run_prints_the_decision_and_writes_no_event(tenant, symbols, tmp_path):
    from api.models import StopMonitorEvent
    from stopmonitor.operations import open_operation

    # the replay starts at BTCUSDT 9094.18: a long with its stop above that is crossed
    op = open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.01"), D("9200"), D("9100"),
                        now=datetime.now(timezone.utc))
    proc = run_command(tmp_path, "--json", "--dry-run", EXCHANGE_VENUE="replay")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    decision = next(x for x in lines if x["type"] == "decision")
    assert (decision["action"], decision["operation_id"], decision["reason"], decision["detail"]) == (
        "would_trigger", op.pk, "STOP_LOSS", "level 9100 observed 9094.18")
    summary = lines[-1]
    assert (summary["type"], summary["triggered"], summary["dry_run"], summary["watched"]) == ("summary", 1, True, 1)
    assert StopMonitorEvent.objects.filter(operation=op).count() == 1  # STOP_SET only


def test_bad_interval_is_refused_with_one_line(tmp_path):
    proc = run_command(tmp_path, "--loop", "--interval", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "CommandError: --interval must be a positive number of seconds"


def test_an_unmigrated_database_is_one_line_that_says_to_migrate(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}", ENVIRONMENT="development",
               CACHE_DIR=str(tmp_path / "cache"), LOG_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "manage.py", "monitor_stops"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("CommandError: the database is not migrated: ")  # stopmonitor/preflight.py
    assert "run migrate: python manage.py migrate" in lines[0]


def test_refused_keys_stop_the_monitor_at_start_in_one_line_and_nothing_is_sent(armed, tmp_path):
    """Issue 18, point 7: Binance refuses the key (-2015): the monitor does not start (exit 1, one
    line naming the code and the fix), no quote read, no event, no order; the secret never shows."""
    from api.models import Operation, StopMonitorEvent
    from tests.stopmonitor.exchange.fake_binance import API_KEY, FakeBinance

    Operation.objects.update(venue="binance-testnet")
    with FakeBinance() as fake:
        fake.script_error("GET", "/api/v3/account", 401, -2015, "Invalid API-key, IP, or permissions for action.",
                          times=None)
        proc = run_command(tmp_path, "--json", EXCHANGE_VENUE="binance-testnet", BINANCE_API_KEY=API_KEY,
                           BINANCE_API_SECRET="secret-value-never-logged-0123", BINANCE_API_URL=fake.url,
                           BINANCE_TIMEOUT_SECONDS="2")
        paths = [(r.method, r.path) for r in fake.requests]
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("CommandError: binance-testnet refused the API keys: code -2015 "
                           "(invalid API-key, IP, or permissions for action); set BINANCE_API_KEY")
    assert "secret-value-never-logged-0123" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert ("GET", "/api/v3/account") in paths
    assert ("GET", "/api/v3/ticker/bookTicker") not in paths and ("POST", "/api/v3/order") not in paths
    assert list(StopMonitorEvent.objects.values_list("event_type", flat=True)) == ["STOP_SET"]
