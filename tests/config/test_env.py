"""Settings under both spellings; every missing-value case gives one line and exit status 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.env import ConfigError, resolve

ROOT = Path(__file__).resolve().parents[2]
FULL = {
    "ENVIRONMENT": "staging",
    "SECRET_KEY": "s3cret-key-value-for-tests",
    "ALLOWED_HOSTS": "api.staging.example",
    "DATABASE_URL": "postgres://u:p@db:5432/stop",
    "REDIS_URL": "redis://redis:6379/0",
    "BINANCE_API_KEY": "k" * 16,
    "BINANCE_API_SECRET": "s" * 16,
}


def lookup(env):
    return lambda name: env.get(name, "")


def test_no_configuration_is_the_embedded_development_default():
    cfg = resolve(lookup({}), base_dir="/app")
    assert (cfg.environment, cfg.debug, cfg.venue) == ("development", True, "replay")
    assert cfg.database_url == "sqlite:////app/db.sqlite3"
    assert cfg.redis_url is None and cfg.rabbitmq_url is None


@pytest.mark.parametrize(
    "primary, alternate",
    [
        pytest.param("SECRET_KEY", "RBS_SECRET_KEY", id="secret-key"),
        pytest.param("REDIS_URL", "RBS_REDIS_URL", id="redis"),
        pytest.param("ALLOWED_HOSTS", "RBS_ALLOWED_HOSTS", id="hosts"),
        pytest.param("BINANCE_API_KEY", "RBS_BINANCE_API_KEY", id="binance-key"),
        pytest.param("BINANCE_API_SECRET", "RBS_BINANCE_API_SECRET", id="binance-secret"),
    ],
)
def test_both_spellings_work_and_the_first_wins(primary, alternate):
    env = dict(FULL)
    value = env.pop(primary)
    env[alternate] = value
    cfg = resolve(lookup(env))
    attr = {"SECRET_KEY": "secret_key", "REDIS_URL": "redis_url", "ALLOWED_HOSTS": "allowed_hosts",
            "BINANCE_API_KEY": "binance_api_key", "BINANCE_API_SECRET": "binance_api_secret"}[primary]
    expected = [value] if primary == "ALLOWED_HOSTS" else value
    assert getattr(cfg, attr) == expected
    env[primary] = "" # empty counts as unset: the alternate still wins
    assert getattr(resolve(lookup(env)), attr) == expected


def test_rabbitmq_both_spellings():
    assert resolve(lookup({**FULL, "RABBITMQ_URL": "amqp://a"})).rabbitmq_url == "amqp://a"
    assert resolve(lookup({**FULL, "RBS_RABBITMQ_URL": "amqp://b"})).rabbitmq_url == "amqp://b"


def test_rbs_pg_parts_build_the_database_url_with_escaping():
    env = {k: v for k, v in FULL.items() if k != "DATABASE_URL"}
    env.update(RBS_PG_DATABASE="stop", RBS_PG_USER="app", RBS_PG_PASSWORD="p@ss:w/rd", RBS_PG_HOST="pg", RBS_PG_PORT="6432")
    assert resolve(lookup(env)).database_url == "postgres://app:p%40ss%3Aw%2Frd@pg:6432/stop"
    env.pop("RBS_PG_PORT")
    assert resolve(lookup(env)).database_url.endswith("@pg:5432/stop")


def test_incomplete_rbs_pg_names_what_is_missing():
    env = {k: v for k, v in FULL.items() if k != "DATABASE_URL"}
    env.update(RBS_PG_DATABASE="stop", RBS_PG_HOST="pg")
    with pytest.raises(ConfigError) as err:
        resolve(lookup(env))
    assert err.value.problems == ["DATABASE_URL (or RBS_PG_USER, RBS_PG_PASSWORD to complete RBS_PG_*)"]


@pytest.mark.parametrize(
    "missing, message",
    [
        pytest.param("SECRET_KEY", "SECRET_KEY (or RBS_SECRET_KEY)", id="secret"),
        pytest.param("ALLOWED_HOSTS", "ALLOWED_HOSTS (or RBS_ALLOWED_HOSTS)", id="hosts"),
        pytest.param("DATABASE_URL", "DATABASE_URL (or RBS_PG_DATABASE, RBS_PG_USER, RBS_PG_PASSWORD, RBS_PG_HOST, RBS_PG_PORT)", id="database"),
        pytest.param("REDIS_URL", "REDIS_URL (or RBS_REDIS_URL)", id="redis"),
        pytest.param("BINANCE_API_KEY", "BINANCE_API_KEY (or RBS_BINANCE_API_KEY)", id="binance-key"),
        pytest.param("BINANCE_API_SECRET", "BINANCE_API_SECRET (or RBS_BINANCE_API_SECRET)", id="binance-secret"),
    ],
)
def test_each_missing_value_is_named(missing, message):
    env = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(ConfigError) as err:
        resolve(lookup(env))
    assert err.value.problems == [message]


def test_production_refuses_paper_and_defaults_to_mainnet():
    cfg = resolve(lookup({**FULL, "ENVIRONMENT": "production"}))
    assert (cfg.venue, cfg.binance_testnet, cfg.debug, cfg.secure_ssl_redirect) == ("binance", False, False, True)
    with pytest.raises(ConfigError) as err:
        resolve(lookup({**FULL, "ENVIRONMENT": "production", "EXCHANGE_VENUE": "paper"}))
    assert err.value.problems == ["EXCHANGE_VENUE (paper is not allowed in production)"]
    assert resolve(lookup(FULL)).venue == "binance-testnet"


def _start(env: dict, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "DATABASE_URL", "SECRET_KEY", "REDIS", "RABBIT", "BINANCE", "ENVIRONMENT", "ALLOWED"))}
    clean.update(env)
    return subprocess.run([sys.executable, "manage.py", *(args or ("check",))], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=60)


def test_production_with_nothing_set_exits_78_with_one_line_naming_every_variable():
    proc = _start({"ENVIRONMENT": "production"})
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    for name in ("SECRET_KEY (or RBS_SECRET_KEY)", "ALLOWED_HOSTS", "DATABASE_URL (or RBS_PG_DATABASE", "REDIS_URL (or RBS_REDIS_URL)",
                 "BINANCE_API_KEY", "BINANCE_API_SECRET"):
        assert name in lines[0]


def test_staging_with_everything_under_rbs_spellings_starts():
    env = {"ENVIRONMENT": "staging", "RBS_SECRET_KEY": "x" * 40, "RBS_ALLOWED_HOSTS": "api.staging.example",
           "RBS_PG_DATABASE": "postgres", "RBS_PG_USER": "postgres", "RBS_PG_PASSWORD": "unused", "RBS_PG_HOST": "127.0.0.1",
           "RBS_REDIS_URL": "redis://127.0.0.1:6379/0", "RBS_BINANCE_API_KEY": "k" * 16, "RBS_BINANCE_API_SECRET": "s" * 16}
    proc = _start(env, "check", "--deploy", "--fail-level", "ERROR")
    assert proc.returncode == 0, proc.stderr
