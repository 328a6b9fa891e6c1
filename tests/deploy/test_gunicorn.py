"""Real processes on loopback: gunicorn with docker/gunicorn.conf.py, the doctor command, the entrypoint.

gunicorn runs with ``ENVIRONMENT=production`` (strict ALLOWED_HOSTS, SSL redirect on) against
the PostgreSQL and Redis on 127.0.0.1; the tests are skipped when those are not listening. The
database is a dedicated one (``sm_deploy_ci``, created and migrated here) so readiness can be
200 without touching anyone else's schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.deploy.support import drop_database
from tests.deploy.support import clean_env
from tests.deploy.support import free_port as _free_port
from tests.deploy.support import listening as _listening
from tests.deploy.support import request
from tests.deploy.support import scratch_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = scratch_database("deploy_ci")
DB_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_URL = "redis://127.0.0.1:6379/0"
API_HOST = "api.staging.example"




def production_env(home: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        home,
        ENVIRONMENT="production",
        SECRET_KEY="deploy-test-secret-key-0123456789abcdef",
        ALLOWED_HOSTS=API_HOST,
        DATABASE_URL=DB_URL,
        REDIS_URL=REDIS_URL,
        BINANCE_API_KEY="dummy-binance-key-for-tests",
        BINANCE_API_SECRET="dummy-binance-secret-for-tests",
        SECURE_SSL_REDIRECT="true",
        **extra,
    )


def manage(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> str:
    if not (_listening(5432) and _listening(6379)):
        pytest.skip("PostgreSQL and Redis must listen on 127.0.0.1")
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    home = tmp_path_factory.mktemp("migrate")
    result = manage(["migrate", "--noinput", "-v", "0"], clean_env(home, DATABASE_URL=DB_URL), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    yield DB_URL
    drop_database(DB_NAME)


@contextlib.contextmanager
def gunicorn(env: dict[str, str], logdir: Path):
    """Start gunicorn with docker/gunicorn.conf.py; yield (process, port, stdout path, stderr path)."""
    port = _free_port()
    env = dict(env, GUNICORN_BIND=f"127.0.0.1:{port}")
    out, err = logdir / "gunicorn.out", logdir / "gunicorn.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "-c", "docker/gunicorn.conf.py", "config.wsgi:application"],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"gunicorn exited {proc.returncode}: {err.read_text()[-2000:]}"
            try:
                status, _, _ = request(port, "/health", "10.1.2.3:8000", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"gunicorn did not answer: {err.read_text()[-2000:]}"
            time.sleep(0.2)
        yield proc, port, out, err
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- gunicorn


def test_gunicorn_serves_probes_validates_hosts_and_stops_gracefully(migrated_db, tmp_path):
    with gunicorn(production_env(tmp_path), tmp_path) as (proc, port, out, err):
        # a kubelet probe: plain HTTP, Host = the pod IP
        status, headers, body = request(port, "/health", "10.1.2.3:8000")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        status, headers, body = request(port, "/health/ready", "10.1.2.3:8000")
        ready = json.loads(body)
        assert status == 200, ready
        assert {k: v for k, v in ready["checks"].items() if k != "exchange_keys"} == {
            "imports": "ok", "database": "ok", "migrations": "ok", "redis": "ok", "exchange": "ok"}
        # the keys' verdict comes from a background read (stopmonitor/keys.py): not yet, or accepted/unknown
        assert ready["checks"]["exchange_keys"] == "unchecked" or not ready["checks"]["exchange_keys"].startswith("refused")
        # a normal request with a host outside ALLOWED_HOSTS
        status, _, _ = request(port, "/api/schema/", "evil.example")
        assert status == 400
        # what reached Traefik over plain HTTP is redirected to HTTPS; over https, or straight to the pod
        # (no X-Forwarded-Proto: port-forward, a pod of the namespace), it is served
        status, headers, _ = request(port, "/api/schema/", API_HOST, headers={"X-Forwarded-Proto": "http"})
        assert status == 301 and headers["Location"] == f"https://{API_HOST}/api/schema/"
        status, _, _ = request(port, "/api/schema/", API_HOST)
        assert status in (200, 401, 403)
        status, _, _ = request(port, "/api/schema/", API_HOST, headers={"X-Forwarded-Proto": "https"})
        assert status in (200, 401, 403)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    access = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    lines = {(a["method"], a["path"], a["status"]) for a in access if a.get("type") == "access"}
    assert ("GET", "/health", 200) in lines and ("GET", "/health/ready", 200) in lines
    assert ("GET", "/api/schema/", 400) in lines
    assert all(isinstance(a["duration_ms"], float) for a in access if a.get("type") == "access")
    log = err.read_text()
    assert "Using worker: gevent" in log
    # defaults: 2 workers x 1000 HTTP connections, a database pool of 10 each
    assert "2 gevent worker(s) x 1000 HTTP connections; database pool 10 per worker = at most 20" in log
    assert "Shutting down: Master" in log
    assert "Traceback" not in log


def test_database_connections_stay_bounded_under_200_concurrent_requests(migrated_db, tmp_path):
    import psycopg

    workers, per_worker = 2, 5
    env = production_env(
        tmp_path, GUNICORN_WORKERS=str(workers), GUNICORN_DB_POOL_SIZE="50", GUNICORN_DB_CONNECTION_BUDGET="10",
        # all 200 requests are accepted at once (1000 HTTP connections per worker) and queue for the pool: give
        # them the time to, on a busy machine (this test is about the bound, test_gunicorn_api about the 503s)
        GUNICORN_DB_POOL_TIMEOUT="60", GUNICORN_REQUEST_DEADLINE="0",
    )
    bound = workers * per_worker
    seen: list[int] = []
    backends: set[int] = set()
    stop = threading.Event()

    def sample():
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            while not stop.is_set():
                pids = [row[0] for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", (DB_NAME,)).fetchall()]
                seen.append(len(pids))
                backends.update(pids)
                time.sleep(0.002)

    with gunicorn(env, tmp_path) as (proc, port, out, err):
        assert f"database pool lowered to {per_worker} per worker" in err.read_text()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with ThreadPoolExecutor(max_workers=200) as pool:
                results = list(pool.map(lambda _: request(port, "/health/ready", "10.1.2.3:8000", timeout=60)[0], range(200)))
        finally:
            stop.set()
            sampler.join(timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    print(f"max concurrent connections seen: {max(seen)} (bound {bound}); {len(backends)} backends in all")
    assert results == [200] * 200
    assert seen and max(seen) <= bound, f"max {max(seen)} connections > {bound}"
    # greenlets really interleave on database I/O (psycopg imported after gevent's patches):
    # more connections at once than there are worker processes
    assert max(seen) > workers, f"max {max(seen)} concurrent connections: psycopg blocks the gevent loop?"
    # each worker's pool reuses its connections: 200 requests, not 200 backends
    assert len(backends) <= bound, f"{len(backends)} backends for 200 requests: connections are not pooled"


# --------------------------------------------------------------------------- doctor and entrypoint


def test_doctor_exits_78_with_one_line_when_production_has_nothing(tmp_path):
    result = manage(["doctor"], clean_env(tmp_path, ENVIRONMENT="production"), timeout=60)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("stopmonitor: configuration error:")
    for name in ("SECRET_KEY (or RBS_SECRET_KEY)", "ALLOWED_HOSTS", "DATABASE_URL", "RBS_PG_HOST", "REDIS_URL (or RBS_REDIS_URL)", "BINANCE_API_KEY"):
        assert name in line
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_entrypoint_passes_the_configuration_error_through(tmp_path):
    result = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), "web"],
        env=clean_env(tmp_path, ENVIRONMENT="production", APP_DIR=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("stopmonitor: configuration error:")
    assert lines[-1] == "entrypoint: doctor --quick exited 78; not starting 'web'"
    assert "Traceback" not in result.stderr


def test_entrypoint_runs_doctor_then_execs_the_command(tmp_path):
    env = clean_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3", APP_DIR=str(ROOT))
    assert manage(["migrate", "--noinput", "-v", "0"], env).returncode == 0
    result = subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), "echo", "started"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["doctor: ok", "started"]


def test_doctor_on_the_development_default(tmp_path):
    secret = "a-distinct-secret-value-that-must-not-print"
    env = clean_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/db.sqlite3", SECRET_KEY=secret)
    migrate = manage(["migrate", "--noinput", "-v", "0"], env)
    assert migrate.returncode == 0, migrate.stderr
    table = manage(["doctor"], env, timeout=60)
    assert table.returncode == 0, table.stdout + table.stderr
    assert table.stdout.strip().endswith("doctor: ok")
    assert secret not in table.stdout + table.stderr
    as_json = manage(["doctor", "--json"], env, timeout=60)
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["ok"] is True and document["environment"] == "development" and document["venue"] == "replay"
    config = {item["name"]: item for item in document["config"]}
    assert config["SECRET_KEY"] == {"name": "SECRET_KEY", "source": "SECRET_KEY", "value": "***", "required": False}
    assert config["DATABASE"]["source"] == "DATABASE_URL"
    checks = {c["name"]: c["status"] for c in document["checks"]}
    assert checks["database"] == checks["migrations"] == checks["cache"] == checks["temp_dir"] == "ok"
    assert secret not in as_json.stdout


def test_doctor_reports_pending_migrations_but_quick_passes(tmp_path):
    env = clean_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/empty.sqlite3")
    full = manage(["doctor", "--json"], env, timeout=60)
    assert full.returncode == 1
    document = json.loads(full.stdout)
    assert document["failed"] == ["migrations"]
    migrations = next(c for c in document["checks"] if c["name"] == "migrations")
    assert "unapplied" in migrations["detail"] and "manage.py migrate" in migrations["fix"]
    assert manage(["doctor", "--quick"], env, timeout=60).returncode == 0


def test_doctor_with_only_rbs_spellings_and_the_database_down(tmp_path):
    if not _listening(6379):
        pytest.skip("Redis must listen on 127.0.0.1:6379")
    env = clean_env(
        tmp_path,
        RBS_ENVIRONMENT="staging",
        RBS_SECRET_KEY="rbs-secret-key-value-0123456789",
        RBS_ALLOWED_HOSTS=API_HOST,
        RBS_PG_DATABASE=DB_NAME,
        RBS_PG_USER="postgres",
        RBS_PG_PASSWORD="rbs-pg-password-value",
        RBS_PG_HOST="127.0.0.1",
        RBS_PG_PORT=str(_free_port()),  # nothing listens there: the database is "down"
        RBS_REDIS_URL=REDIS_URL,
        RBS_BINANCE_API_KEY="rbs-binance-key-value",
        RBS_BINANCE_API_SECRET="rbs-binance-secret-value",
    )
    result = manage(["doctor", "--quick", "--json"], env, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    sources = {item["name"]: item["source"] for item in document["config"]}
    assert sources["ENVIRONMENT"] == "RBS_ENVIRONMENT"
    assert sources["SECRET_KEY"] == "RBS_SECRET_KEY"
    assert sources["ALLOWED_HOSTS"] == "RBS_ALLOWED_HOSTS"
    assert sources["DATABASE"] == "RBS_PG_*"
    assert sources["REDIS_URL"] == "RBS_REDIS_URL"
    assert sources["BINANCE_API_KEY"] == "RBS_BINANCE_API_KEY"
    database = next(c for c in document["checks"] if c["name"] == "database")
    assert database["status"] == "fail" and "\n" not in database["detail"] and database["fix"]
    assert "database" in document["failed"]
    for value in ("rbs-secret-key-value-0123456789", "rbs-pg-password-value", "rbs-binance-key-value", "rbs-binance-secret-value"):
        assert value not in result.stdout + result.stderr
