"""Least privilege with real roles on the local PostgreSQL (issue 17): ``setup_roles --create`` as the
bootstrap superuser, ``migrate`` and ``setup_roles`` as the owner, then the runtime role runs the
backfill and ``verify_events`` but cannot UPDATE, DELETE or TRUNCATE an event, run DDL, disable a
trigger or drop the table; ``doctor`` warns for the owner and not for the runtime role."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.deploy.support import BIN, clean_env, listening, scratch_database

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DB = scratch_database("roles")
OWNER, RUNTIME = f"{DB}_owner".lower(), f"{DB}_runtime".lower()
pytestmark = pytest.mark.slow


def url(user: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(netloc=f"{user}@127.0.0.1:5432", path=f"/{DB}"))


def sql(user: str, statement: str, params=()):
    import psycopg

    with psycopg.connect(url(user), autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


def manage(home: Path, user: str, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    env = clean_env(home, ENVIRONMENT="development", DATABASE_URL=url(user), DEBUG="false", **extra)
    return subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def admin(statement: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def drop_all() -> None:
    admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    for role in (OWNER, RUNTIME):
        admin(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def roles_db(tmp_path_factory):
    if not listening(5432):
        pytest.skip("PostgreSQL must listen on 127.0.0.1:5432")
    drop_all()
    admin(f'CREATE DATABASE "{DB}"')
    home = tmp_path_factory.mktemp("roles")
    try:
        # the migrate Job's environment: after migrate, the post_migrate hook re-grants the runtime role
        job_env = {"DATABASE_OWNER_ROLE": OWNER, "DATABASE_RUNTIME_ROLE": RUNTIME}
        for step in (("postgres", "setup_roles", "--create", "--owner", OWNER, "--runtime", RUNTIME, "--quiet"),
                     (OWNER, "migrate", "--noinput", "-v", "0")):
            result = manage(home, *step, **job_env)
            assert result.returncode == 0, (step, result.stdout[-1500:], result.stderr[-1500:])
        yield home
    finally:
        drop_all()


def denied(user: str, statement: str) -> str:
    import psycopg

    with pytest.raises(psycopg.Error) as info:
        sql(user, statement)
    return str(info.value)


def test_runtime_role_appends_and_reads_but_never_rewrites_events(roles_db):
    # the real writers run as the runtime role: a backfill (set-based append, temporary tables, sequence)
    client = sql(RUNTIME, "INSERT INTO api_client (name, created_at) VALUES ('t', now()) RETURNING id")[0][0]
    symbol = sql(RUNTIME, "INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
                          "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now()) RETURNING id")[0][0]
    sql(RUNTIME, "INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, entry_price, "
                 "stop_loss_percent, created_at, updated_at, closed_quantity, stop_check_count) "
                 "SELECT %s, %s, 'BUY', 'ACTIVE', 0.5, 20000 + g, 1.5, now(), now(), 0, 0 "
                 "FROM generate_series(1, 50) g", (client, symbol))
    result = manage(roles_db, RUNTIME, "backfill_stop_price", "--json")
    assert result.returncode == 0, result.stderr[-1500:]
    assert json.loads(result.stdout.splitlines()[-1])["updated"] == 50
    result = manage(roles_db, RUNTIME, "verify_events")
    assert result.returncode == 0 and result.stdout.startswith("event store verifies: 50 events in 50 streams"), \
        result.stdout + result.stderr
    # ... and can do nothing else to the event store
    assert "permission denied for table api_stopmonitorevent" in denied(
        RUNTIME, "UPDATE api_stopmonitorevent SET payload = '{}'")
    assert "permission denied for table api_stopmonitorevent" in denied(RUNTIME, "DELETE FROM api_stopmonitorevent")
    assert "permission denied for table api_stopmonitorevent" in denied(RUNTIME, "TRUNCATE api_stopmonitorevent")
    assert "permission denied for table api_outbox" in denied(RUNTIME, "DELETE FROM api_outbox")
    assert "permission denied for table api_operation" in denied(RUNTIME, "TRUNCATE api_operation CASCADE")
    assert "must be owner of table api_stopmonitorevent" in denied(
        RUNTIME, "ALTER TABLE api_stopmonitorevent DISABLE TRIGGER api_stopmonitorevent_append_only")
    assert "must be owner of table api_stopmonitorevent" in denied(RUNTIME, "DROP TABLE api_stopmonitorevent")
    assert "permission denied for schema public" in denied(
        RUNTIME, "CREATE OR REPLACE FUNCTION stopmonitor_event_append_only() RETURNS trigger LANGUAGE plpgsql "
                 "AS $$ BEGIN RETURN NEW; END $$")
    assert "permission denied for schema public" in denied(RUNTIME, "CREATE TABLE x (i int)")
    assert "permission denied for table django_migrations" in denied(RUNTIME, "DELETE FROM django_migrations")
    # the tenant of an operation with events is frozen, for every role
    other = sql(RUNTIME, "INSERT INTO api_client (name, created_at) VALUES ('u', now()) RETURNING id")[0][0]
    assert "its tenant cannot change" in denied(RUNTIME, f"UPDATE api_operation SET client_id = {other}")
    # the owner (which may DDL) still cannot TRUNCATE the event store: the trigger says no
    assert "append-only: TRUNCATE refused" in denied(OWNER, "TRUNCATE api_stopmonitorevent CASCADE")
    assert sql(OWNER, "SELECT count(*) FROM api_stopmonitorevent") == [(50,)]


def test_setup_roles_check_and_doctor_warn_for_the_owner_not_the_runtime_role(roles_db):
    result = manage(roles_db, RUNTIME, "setup_roles", "--check")
    assert (result.returncode, result.stdout.strip()) == (0, "least privilege holds for the connected role")
    result = manage(roles_db, OWNER, "setup_roles", "--check")
    assert result.returncode == 1
    assert f"WARN {OWNER} owns (or is a member of the owner of)" in result.stdout
    assert f"WARN {OWNER} may TRUNCATE" in result.stdout and f"WARN {OWNER} may CREATE in schema public" in result.stdout
    rows = {}
    for user in (RUNTIME, OWNER):
        out = manage(roles_db, user, "doctor", "--json", "--quick").stdout
        rows[user] = [c for c in json.loads(out)["checks"] if c["name"] == "database_role"][0]
    assert rows[RUNTIME]["status"] == "ok"
    assert rows[OWNER]["status"] == "warn" and "owns" in rows[OWNER]["detail"]


def test_setup_roles_runs_again_without_change(roles_db):
    before = sql("postgres", "SELECT relname, relacl::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                             "AND relkind IN ('r', 'S') ORDER BY 1")
    result = manage(roles_db, OWNER, "setup_roles", "--owner", OWNER, "--runtime", RUNTIME, "--quiet")
    assert result.returncode == 0, result.stderr
    assert sql("postgres", "SELECT relname, relacl::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                           "AND relkind IN ('r', 'S') ORDER BY 1") == before
    events_acl = dict(before)["api_stopmonitorevent"]
    assert f"{RUNTIME}=ar/{OWNER}" in events_acl  # a = INSERT, r = SELECT: nothing else
