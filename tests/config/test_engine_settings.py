"""Engine settings checked together at start (issue #12 item 13) and the Binance key settings."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from config.engine import EngineConfigError, resolve_engine
from config.env import ConfigError, resolve

ROOT = Path(__file__).resolve().parents[2]
FULL = {
    "ENVIRONMENT": "staging", "SECRET_KEY": "s3cret-key-value-for-tests", "ALLOWED_HOSTS": "api.staging.example",
    "DATABASE_URL": "postgres://u:p@db:5432/stop", "REDIS_URL": "redis://redis:6379/0", "BINANCE_API_KEY": "k" * 16,
}
PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIBn1uq2oYvJ2h3dL0tSx3VzY6Qk2m7k8m8q8q8q8q8q8\n-----END PRIVATE KEY-----"


def lookup(env):
    return lambda name: env.get(name, "")


def test_defaults():
    cfg = resolve_engine(lookup({}))
    assert {k: cfg[k] for k in ("RECONCILE_AFTER_SECONDS", "NOT_FOUND_WINDOW_SECONDS", "BINANCE_TIMEOUT_SECONDS",
                                "BINANCE_RECV_WINDOW_MS", "FEE_DUST_TOLERANCE_PCT", "NOTIONAL_MARGIN_PCT")} == {
        "RECONCILE_AFTER_SECONDS": 30, "NOT_FOUND_WINDOW_SECONDS": 60, "BINANCE_TIMEOUT_SECONDS": 10,
        "BINANCE_RECV_WINDOW_MS": 5000, "FEE_DUST_TOLERANCE_PCT": Decimal("1"), "NOTIONAL_MARGIN_PCT": Decimal("5")}


@pytest.mark.parametrize("env, problem", [
    pytest.param({"RECONCILE_AFTER_SECONDS": "2"}, "RECONCILE_AFTER_SECONDS (2 s must be longer", id="seen-2s-vs-10s"),
    pytest.param({"RECONCILE_AFTER_SECONDS": "10"}, "RECONCILE_AFTER_SECONDS (10 s", id="equal-to-timeout"),
    pytest.param({"BINANCE_TIMEOUT_SECONDS": "5", "RECONCILE_AFTER_SECONDS": "8", "BINANCE_RECV_WINDOW_MS": "10000"},
                 "recvWindow 10000 ms", id="shorter-than-recv-window"),
    pytest.param({"BINANCE_RECV_WINDOW_MS": "60001"}, "BINANCE_RECV_WINDOW_MS (1..60000", id="recv-window-too-long"),
    pytest.param({"NOT_FOUND_WINDOW_SECONDS": "20"}, "NOT_FOUND_WINDOW_SECONDS (20 s", id="window-shorter-than-delay"),
    pytest.param({"QUOTE_MAX_AGE_SECONDS": "ten"}, "QUOTE_MAX_AGE_SECONDS (not a number", id="not-a-number"),
])
def test_a_combination_that_can_sell_twice_is_refused(env, problem):
    with pytest.raises(EngineConfigError) as err:
        resolve_engine(lookup(env))
    assert any(problem in p for p in err.value.problems), err.value.problems


def _start(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "RECONCILE", "BINANCE", "ENVIRONMENT"))}
    clean.update(env)
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=60)


def test_a_reconcile_delay_shorter_than_the_exchange_timeout_exits_78_with_one_line():
    proc = _start({"RECONCILE_AFTER_SECONDS": "2", "BINANCE_TIMEOUT_SECONDS": "10"})

    assert proc.returncode == 78
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("stopmonitor: configuration error: RECONCILE_AFTER_SECONDS (2 s must be longer")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["BINANCE_PRIVATE_KEY", "RBS_BINANCE_PRIVATE_KEY"])
def test_an_ed25519_key_replaces_the_secret(name):
    cfg = resolve(lookup({**FULL, name: PEM, "RBS_BINANCE_PRIVATE_KEY_PASSPHRASE": "pw"}))
    assert (cfg.binance_private_key, cfg.binance_private_key_passphrase, cfg.binance_api_secret) == (PEM, "pw", None)


@pytest.mark.parametrize("name", ["BINANCE_PRIVATE_KEY_FILE", "RBS_BINANCE_PRIVATE_KEY_FILE"])
def test_the_key_can_come_from_a_file(tmp_path, name):
    path = tmp_path / "key.pem"
    path.write_text(PEM + "\n")
    assert resolve(lookup({**FULL, name: str(path)})).binance_private_key == PEM


@pytest.mark.parametrize("env, problem", [
    pytest.param({}, "BINANCE_API_SECRET (or RBS_BINANCE_API_SECRET)", id="neither"),
    pytest.param({"BINANCE_PRIVATE_KEY_FILE": "/nonexistent/key.pem"}, "BINANCE_PRIVATE_KEY_FILE (cannot read", id="no-file"),
    pytest.param({"BINANCE_PRIVATE_KEY": "hunter2"}, "BINANCE_PRIVATE_KEY (not a PEM private key)", id="not-pem"),
])
def test_missing_or_bad_keys_are_named(env, problem):
    with pytest.raises(ConfigError) as err:
        resolve(lookup({**FULL, **env}))
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
    assert "hunter2" not in str(err.value)
