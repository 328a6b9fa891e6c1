"""Two real `manage.py monitor_stops` processes race on the same triggered operations against the
local fake Binance (PostgreSQL): one order per operation at the exchange (invariant 1)."""

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

from .exchange.fake_binance import API_KEY, API_SECRET, FakeBinance

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks across processes need PostgreSQL"),
]
N_OPS = 6


def child_env(fake: FakeBinance, tmp_path) -> dict:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    env.update(
        DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
        ENVIRONMENT="development",
        EXCHANGE_VENUE="binance-testnet",
        BINANCE_API_KEY=API_KEY,
        BINANCE_API_SECRET=API_SECRET,
        BINANCE_API_URL=fake.url,
        CACHE_DIR=str(tmp_path / "cache"),
        LOG_LEVEL="WARNING",
    )
    return env


def start(env, *extra):
    return subprocess.Popen([sys.executable, "manage.py", "monitor_stops", "--json", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def armed(tenant, symbols, on_binance_testnet, without_protection):
    """N long BTCUSDT operations whose stop (61000) is above the fake's recorded bid (60741.67)."""
    from stopmonitor.operations import open_operation

    now = datetime.now(timezone.utc)
    return [open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"), now=now)
            for _ in range(N_OPS)]


@pytest.mark.parametrize("pass_lock", [pytest.param(False, id="row-locks-only"), pytest.param(True, id="with-pass-lock")])
def test_two_processes_place_one_order_per_operation(armed, tmp_path, pass_lock):
    from api.models import StopMonitorEvent

    with FakeBinance() as fake:
        fake.script("GET", "/api/v3/account", body={"balances": [{"asset": "BTC", "free": "1.00000000", "locked": "0"}]},
                    times=None)
        fake.delays[("POST", "/api/v3/order")] = 0.3  # keep both passes inside the close window
        env = child_env(fake, tmp_path)
        extra = () if pass_lock else ("--no-pass-lock",)
        procs = [start(env, *extra) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outputs):
            assert p.returncode == 0, err
        orders = fake.calls("POST", "/api/v3/order")
    ids = [r.form["newClientOrderId"] for r in orders]
    assert len(ids) == N_OPS and len(set(ids)) == N_OPS
    assert sorted(r.form["quantity"] for r in orders) == ["0.001"] * N_OPS
    for op in armed:
        op.refresh_from_db()
        assert op.status == "CLOSED"
        assert StopMonitorEvent.objects.filter(operation=op, event_type="STOP_TRIGGERED").count() == 1
        assert StopMonitorEvent.objects.filter(operation=op, event_type="EXECUTED").count() == 1
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(s["executed"] for s in summaries) == N_OPS
    if not pass_lock:  # both passes worked: the second found the rows CLOSING or CLOSED and placed nothing
        assert all(s["lock_held_elsewhere"] is False for s in summaries)
