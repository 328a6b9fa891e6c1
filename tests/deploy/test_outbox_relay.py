"""The outbox relay as its Deployment runs it: a real process on loopback, probed by the manifest's script.

``docker/entrypoint.sh`` is started with the container's ``args`` from
``deploy/k8s/base/deployment-outbox-relay.yaml`` (``doctor --quick``, then an exec of
``manage.py publish_outbox --loop``, so the started PID becomes the relay, as PID 1 does in the
pod). The liveness probe's own script is run against it with ``/proc/1/`` pointed at that PID and
its state file in a temporary folder. PostgreSQL, Redis and RabbitMQ must listen on 127.0.0.1
(skipped otherwise). The database (``sm_relay_ci``) holds no outbox rows, so nothing is published
to the shared broker (other test runs bind queues to ``stop_events``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.deploy.support import drop_database
from tests.deploy.support import clean_env
from tests.deploy.support import listening as _listening
from tests.deploy.support import scratch_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MANIFEST = ROOT / "deploy" / "k8s" / "base" / "deployment-outbox-relay.yaml"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = scratch_database("relay_ci")
DB_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_URL = "redis://127.0.0.1:6379/0"
BROKER_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
STATE_PATH = "/tmp/outbox-relay-liveness"



def container() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def grace_seconds() -> int:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def relay_env(home: Path, app_name: str, **extra: str) -> dict[str, str]:
    """A development environment (no static manifest needed) with every datastore on loopback."""
    env = clean_env(home, ENVIRONMENT="development", DATABASE_URL=DB_URL, REDIS_URL=REDIS_URL,
                    RABBITMQ_URL=BROKER_URL,
                    PGAPPNAME=app_name)  # libpq: finds this relay's sessions in pg_stat_activity
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def admin(sql: str, params=()) -> list:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def backends(app_name: str) -> set[int]:
    return {row[0] for row in admin("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,))}


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> str:
    if not (_listening(5432) and _listening(6379) and _listening(5672)):
        pytest.skip("PostgreSQL, Redis and RabbitMQ must listen on 127.0.0.1")
    if not admin("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)):
        admin(f'CREATE DATABASE "{DB_NAME}"')
    home = tmp_path_factory.mktemp("relay-migrate")
    result = subprocess.run(
        [str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT, env=relay_env(home, "sm-relay-migrate"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    yield DB_URL
    drop_database(DB_NAME)


class Probe:
    """The manifest's liveness command, aimed at ``pid`` instead of PID 1, its state in ``state``."""

    def __init__(self, pid: int, state: Path) -> None:
        command = container()["livenessProbe"]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        script = command[2]
        assert script.count("/proc/1/") == 2 and script.count(STATE_PATH) == 1
        self.command = [*command[:2], script.replace("/proc/1/", f"/proc/{pid}/").replace(STATE_PATH, str(state))]
        self.state = state

    def __call__(self) -> int:
        result = subprocess.run(self.command, capture_output=True, text=True, timeout=10)
        assert result.stderr == "", result.stderr
        return result.returncode

    def seen(self) -> tuple[int, int]:
        start, switches = self.state.read_text().split()
        return int(start), int(switches)


@contextlib.contextmanager
def relay(env: dict[str, str], logdir: Path):
    """``docker/entrypoint.sh <args>`` as the pod starts it; yields (process, stdout path, stderr path)
    once the entrypoint has exec'd the relay and the loop holds its database session."""
    out, err = logdir / "relay.out", logdir / "relay.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [str(ROOT / "docker" / "entrypoint.sh"), *container()["args"]],
            cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"relay exited {proc.returncode}: {err.read_text()[-2000:]}"
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            # doctor's own command line names the relay too (`doctor --quick --wait N -- … publish_outbox`)
            # until it execs it: wait for the exec'd relay itself
            if cmdline[1:3] == [b"manage.py", b"publish_outbox"] and backends(env["PGAPPNAME"]):
                break
            assert time.monotonic() < deadline, f"the relay did not start: {err.read_text()[-2000:]}"
            time.sleep(0.2)
        assert cmdline[1:4] == [b"manage.py", b"publish_outbox", b"--loop"]
        yield proc, out, err
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_relay_as_deployed_probe_reconnect_and_sigterm(migrated_db, tmp_path):
    app_name = f"sm-relay-test-{os.getpid()}"
    with relay(relay_env(tmp_path, app_name), tmp_path) as (proc, out, err):
        probe = Probe(proc.pid, tmp_path / "liveness")
        # looping: every probe sees progress (the first one only records)
        assert probe() == 0
        start, first = probe.seen()
        assert start == int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        time.sleep(1.5)
        assert probe() == 0
        assert probe.seen()[1] > first

        # stuck (SIGSTOP: no voluntary context switch any more): fails from the second probe on
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.3)
        probe()  # may still see the switches made before the stop
        time.sleep(0.5)
        assert probe() == 1
        assert probe() == 1
        # a state file left by an earlier container of the pod (another start time) is not a failure
        _, switches = probe.seen()
        probe.state.write_text(f"{start + 1} {switches}\n")
        assert probe() == 0
        assert probe() == 1
        # going again: passes
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)
        assert probe() == 0

        # its database session killed: the loop logs the error, reconnects and keeps going (no restart needed)
        (old,) = backends(app_name)
        admin("SELECT pg_terminate_backend(%s)", (old,))
        deadline = time.monotonic() + 15
        while not (backends(app_name) - {old}):
            assert proc.poll() is None, err.read_text()[-2000:]
            assert time.monotonic() < deadline, "the relay did not reconnect"
            time.sleep(0.2)
        lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
        # the dead session is dropped before the next batch (stopmonitor.dbhealth.fresh_connection): at
        # most one error line for it, never a traceback
        assert [line for line in lines if line.get("type") == "error"] in (
            [], [{"type": "error", "error": "database: OperationalError"}])
        time.sleep(0.5)
        assert probe() == 0
        assert proc.poll() is None

        # SIGTERM (what the kubelet sends): status 0, far inside the grace period
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=grace_seconds())
        elapsed = time.monotonic() - started
        assert returncode == 0, err.read_text()[-2000:]
        assert elapsed < 5 < grace_seconds()
        assert "Traceback" not in err.read_text()


def test_relay_without_rabbitmq_url_exits_1_with_one_line(migrated_db, tmp_path):
    env = relay_env(tmp_path, f"sm-relay-nobroker-{os.getpid()}", RABBITMQ_URL=None)
    result = subprocess.run(
        [str(ROOT / "docker" / "entrypoint.sh"), *container()["args"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "doctor: ok" in result.stdout  # RabbitMQ is optional for doctor: the relay itself refuses
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "RABBITMQ_URL" in lines[0] and "RBS_RABBITMQ_URL" in lines[0]
