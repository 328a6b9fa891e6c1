"""Start-up as the seed's pods meet it, with real processes on loopback (issue 18, points 2-6).

A dependency that is late is waited for (bounded back-off, one log line per attempt naming
host:port and the cause; the web answers liveness 200 and readiness 503 meanwhile); a
configuration error stays immediate (one line, exit 78); pending migrations make every command
say "run migrate" on one line and exit non-zero, and the API answer JSON 503; migration 0018
behind another transaction names the session, and ``doctor --quick`` refuses the INVALID index
it leaves, until migrate runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.support import TcpForwarder, drop_database, free_port, request, scratch_database
from tests.deploy.test_faults import (  # noqa: F401 - fixtures
    API_HOST,
    BIN,
    DB_NAME,
    _recreate,
    app,
    clean_env,
    fake,
    gunicorn,
    manage,
    migrated_db,
    probes,
    root_of,
    run,
    services,
    staging_env,
)

pytestmark = pytest.mark.slow

AT_0017 = scratch_database("startup_0017")
AT_0017_URL = f"postgres://postgres@127.0.0.1:5432/{AT_0017}"


def entrypoint(args: list[str], env: dict[str, str], cwd: Path, out: Path) -> subprocess.Popen:
    """``sh docker/entrypoint.sh ARGS`` with stdout and stderr into ``out`` (one log, as kubectl logs shows)."""
    handle = open(out, "wb")
    try:
        return subprocess.Popen(["sh", "docker/entrypoint.sh", *args], cwd=cwd, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        handle.close()


def json_lines(path: Path, kind: str) -> list[dict]:
    found = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            payload = json.loads(line)
            if isinstance(payload, dict) and payload.get("type") == kind:
                found.append(payload)
    return found


def wait_until(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: {log.read_text()[-3000:] if log else ''}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def late_env(tmp_path, port: int, fake=None, **extra) -> dict[str, str]:
    url = f"postgres://postgres:late-pg-password@127.0.0.1:{port}/{DB_NAME}"
    values = {"DATABASE_URL": url, "DEPENDENCY_WAIT_SECONDS": "120", **extra}
    if fake is not None:
        values["BINANCE_API_URL"] = root_of(fake)
    return staging_env(tmp_path, **values)


# --------------------------------------------------------------------------- 2. late dependencies


def test_late_database_monitor_waits_then_runs(app, migrated_db, fake, tmp_path):
    """The seed's CrashLoopBackOff: PostgreSQL not ready when the backend starts. The monitor waits,
    logging one JSON line per attempt with host:port and the cause, and runs once it answers."""
    port = free_port()
    log = tmp_path / "monitor.log"
    proc = entrypoint(["monitor", "--dry-run"], late_env(tmp_path, port, fake), app, log)
    forwarder = None
    try:
        wait_until(lambda: len(json_lines(log, "waiting")) >= 2, 60, "no waiting lines", log)
        assert proc.poll() is None  # still waiting, not crashed
        first, second = json_lines(log, "waiting")[:2]
        assert first["dependency"] == "database" and first["address"] == f"127.0.0.1:{port}"
        assert "Connection refused" in first["cause"]
        assert (first["attempt"], first["retry_in_s"]) == (1, 1.0)
        assert (second["attempt"], second["retry_in_s"]) == (2, 2.0)
        forwarder = TcpForwarder(port, 5432)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
        if forwarder:
            forwarder.close()
    text = log.read_text()
    (done,) = json_lines(log, "dependencies")
    assert done["state"] == "reachable" and done["attempts"] >= 3
    assert '"dry_run":true' in text.replace(" ", "")  # the pass ran (its summary line)
    assert "Traceback" not in text and "late-pg-password" not in text


def test_late_database_web_liveness_200_readiness_503_then_ready(app, migrated_db, tmp_path):
    port = free_port()
    web_port = free_port()
    log = tmp_path / "web.log"
    env = late_env(tmp_path, port, GUNICORN_BIND=f"127.0.0.1:{web_port}", GUNICORN_WORKERS="1")
    proc = entrypoint(["web"], env, app, log)
    forwarder = None
    try:
        def serving():
            with contextlib.suppress(OSError):
                return request(web_port, "/health", timeout=2)[0] == 200
            return False

        wait_until(serving, 60, "gunicorn did not start while the database is late", log)
        live, ready, body = probes(web_port)
        assert (live, ready) == (200, 503), body
        assert body["checks"]["database"].startswith("unreachable")
        wait_until(lambda: json_lines(log, "waiting"), 30, "no waiting line", log)
        assert json_lines(log, "waiting")[0]["address"] == f"127.0.0.1:{port}"
        forwarder = TcpForwarder(port, 5432)
        wait_until(lambda: probes(web_port)[1] == 200, 60, "not ready after the database came up", log)
        wait_until(lambda: json_lines(log, "dependencies"), 30, "no reachable line", log)
        assert json_lines(log, "dependencies")[0]["state"] == "reachable"
        assert proc.poll() is None
    finally:
        stop(proc)
        if forwarder:
            forwarder.close()
    assert "Traceback" not in log.read_text()


def test_the_wait_is_bounded(app, tmp_path):
    log = tmp_path / "monitor.log"
    started = time.monotonic()
    proc = entrypoint(["monitor"], late_env(tmp_path, free_port(), DEPENDENCY_WAIT_SECONDS="3"), app, log)
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        stop(proc)
    assert time.monotonic() - started < 45
    text = log.read_text()
    assert json_lines(log, "dependencies")[0]["state"] == "still unreachable, giving up"
    assert text.strip().splitlines()[-1] == "doctor: FAILED: database"  # doctor execs the monitor only on success


def test_a_definite_refusal_is_not_waited_for(app, tmp_path, services):
    """A definite answer from PostgreSQL is not a late dependency (the loopback server trusts every
    user, so a database that does not exist stands for a wrong password: both carry a SQLSTATE)."""
    env = staging_env(tmp_path, DATABASE_URL="postgres://postgres@127.0.0.1:5432/sm_no_such_database",
                      DEPENDENCY_WAIT_SECONDS="120")
    log = tmp_path / "monitor.log"
    started = time.monotonic()
    proc = entrypoint(["monitor"], env, app, log)
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        stop(proc)
    assert time.monotonic() - started < 30
    assert not json_lines(log, "waiting")
    assert 'database "sm_no_such_database" does not exist' in log.read_text()


@pytest.mark.parametrize(
    "variable,value,named",
    [
        ("RBS_PG_PORT", "5432x", "RBS_PG_PORT (got '5432x'"),
        ("DATABASE_URL", "postgres://u:p@db:54x/stopmonitor", "DATABASE_URL (malformed"),
        ("DATABASE_URL", "postgress://u:p@db:5432/stopmonitor", "DATABASE_URL (scheme 'postgress' unknown"),
        ("DJANGO_SETTINGS_MODULE", "config.setings", "DJANGO_SETTINGS_MODULE='config.setings' is not a module"),
        ("ENVIRONMENT", "stagging", "ENVIRONMENT (got 'stagging'"),
    ],
)
def test_value_typos_are_one_line_exit_78_at_once(app, tmp_path, variable, value, named):
    env = staging_env(tmp_path, DEPENDENCY_WAIT_SECONDS="120")
    if variable == "RBS_PG_PORT":
        env.pop("DATABASE_URL")
        env.update(RBS_PG_HOST="127.0.0.1", RBS_PG_USER="u", RBS_PG_PASSWORD="p", RBS_PG_DATABASE="d")
    env[variable] = value
    started = time.monotonic()
    result = run(["sh", "docker/entrypoint.sh", "monitor"], env, app, timeout=60)
    assert result.returncode == 78, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - started < 30
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert named in lines[0], lines[0]
    assert "EXCHANGE_VENUE" not in lines[0]  # ENVIRONMENT=stagging: no unrelated venue error


def test_rbs_pg_host_as_a_socket_directory(tmp_path):
    """RBS_PG_HOST=/var/run/postgresql is libpq's socket folder, not part of the database name."""
    env = clean_env(tmp_path, ENVIRONMENT="development", RBS_PG_HOST="/var/run/postgresql", RBS_PG_USER="u",
                    RBS_PG_PASSWORD="p", RBS_PG_DATABASE="robson_staging")
    result = manage(["shell", "-c", "from django.conf import settings; d = settings.DATABASES['default']; "
                     "print(d['HOST'], d['PORT'], d['NAME'])"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].split() == ["/var/run/postgresql", "5432", "robson_staging"]


# --------------------------------------------------------------------------- 3. pending migrations


@pytest.fixture(scope="module")
def at_0017(services, tmp_path_factory) -> str:
    """A database stuck at api.0017 (the seed's staging: 0015-0018 expected, 0018 not applied)."""
    _recreate(AT_0017)
    home = tmp_path_factory.mktemp("at0017")
    env = clean_env(home, DATABASE_URL=AT_0017_URL)
    for target in (["api", "0017"], ["auth"], ["admin"], ["sessions"], ["authtoken"]):  # all but api.0018+
        result = manage(["migrate", *target, "--noinput", "-v", "0"], env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    yield AT_0017_URL
    drop_database(AT_0017)


@pytest.mark.parametrize(
    "args",
    [
        ["monitor_stops"],
        ["publish_outbox"],
        ["create_api_user", "alice", "--tenant", "acme"],
        ["sync_symbols"],
        ["rebuild_projections"],
        ["events"],
        ["backfill_stop_price"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_on_a_database_at_0017_says_run_migrate(at_0017, tmp_path, args):
    env = clean_env(tmp_path, ENVIRONMENT="development", DATABASE_URL=at_0017, RABBITMQ_URL="amqp://guest:guest@127.0.0.1:5672//")
    result = manage(args, env, timeout=120)
    assert result.returncode != 0, result.stdout[-2000:]  # monitor_stops used to exit 0 here
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("CommandError: the database is not migrated: ")
    assert "api.0018_create_stop_indexes_concurrent" in lines[0] and "run migrate" in lines[0]


def test_api_on_a_database_at_0017_is_json_503(app, at_0017, fake, tmp_path):
    env = staging_env(tmp_path, DATABASE_URL=at_0017, BINANCE_API_URL=root_of(fake))
    quick = manage(["doctor", "--quick"], env, app, timeout=90)
    assert quick.returncode == 0  # the web starts (readiness 503 until migrate) ...
    assert "fix migrations: run migrate" in quick.stdout  # ... but --quick says why it is not ready
    with gunicorn(env, app, tmp_path) as (proc, port, err):
        status, headers, body = request(port, "/api/operations/", API_HOST,
                                        headers={"X-Forwarded-Proto": "https", "Authorization": "Bearer x"})
        assert status == 503, body[:500]
        assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "30"
        error = json.loads(body)["error"]
        assert error["code"] == "migrations_pending" and "run migrate" in error["message"]
        assert len(body) < 1000
    assert "Traceback" not in err.read_text()


# --------------------------------------------------------------------------- 4. 0018 behind a transaction


def test_0018_behind_an_open_transaction_names_the_session_and_quick_refuses_the_invalid_index(
    app, services, fake, tmp_path
):
    import psycopg

    name = scratch_database("startup_0018")
    url = f"postgres://postgres@127.0.0.1:5432/{name}"
    _recreate(name)
    try:
        env = clean_env(tmp_path, ENVIRONMENT="development", DATABASE_URL=url)
        assert manage(["migrate", "api", "0017", "--noinput", "-v", "0"], env, timeout=300).returncode == 0
        blocker = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", application_name="blocker")
        try:
            # a writer's transaction left open on the table (no row touched: it still holds its lock)
            blocker.execute("UPDATE api_operation SET status = status WHERE false")
            blocker_pid = blocker.info.backend_pid
            result = manage(["migrate", "--noinput", "-v", "0"], env, timeout=120)
        finally:
            blocker.close()
        assert result.returncode == 1, result.stdout[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        line = lines[0]
        assert line.startswith("CommandError: CREATE INDEX CONCURRENTLY op_active_stop_idx waited 5s for a lock")
        assert f"pid {blocker_pid} (idle in transaction, transaction open " in line
        assert "query started 20" in line and "UPDATE api_operation SET status = status WHERE false" in line
        assert f"pg_terminate_backend({blocker_pid})" in line and "run migrate again" in line
        # the INVALID index it left: doctor --quick refuses to start, naming it and the fix
        staging = staging_env(tmp_path, DATABASE_URL=url, BINANCE_API_URL=root_of(fake))
        quick = manage(["doctor", "--quick"], staging, app, timeout=90)
        assert quick.returncode == 1
        assert "invalid_indexes  FAIL    INVALID: op_active_stop_idx" in quick.stdout
        assert "fix invalid_indexes: " in quick.stdout and "run `python manage.py migrate` again" in quick.stdout
        # the migrate Job's own start is not refused, and re-running migrate repairs it
        assert manage(["doctor", "--quick", "--no-index-check"], staging, app, timeout=90).returncode == 0
        assert manage(["migrate", "--noinput", "-v", "0"], env, timeout=300).returncode == 0
        assert manage(["doctor", "--quick"], staging, app, timeout=90).returncode == 0
    finally:
        drop_database(name)
