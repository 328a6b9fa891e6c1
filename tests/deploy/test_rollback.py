"""A rollback runs the previous release on this release's schema: migrations stay backward-compatible
for one release (deploy/README.md, "Rollback").

On a scratch PostgreSQL database this release applies its migrations; then the previous release's
code (``git archive`` of it into a temporary folder; this virtualenv when its requirements.txt is
the same, else a virtualenv of its own) does what a rollback makes it do: its ``migrate`` (the
PreSync hook of the reverted sync) must find nothing to apply, its gunicorn must serve the API
(health, readiness, open an operation, read it), and its monitor pass must close that operation and
record the events. This release then reads what the old code wrote (events, projection verify), as
after rolling forward again.

The previous release is ``$PREVIOUS_RELEASE`` when set; else the newest ``vX.Y.Z`` tag below HEAD;
else main as it was before its newest migration arrived (first parent of the newest first-parent
commit that added a file under api/migrations/), the commit a rollback of that migration would
run. Skipped without git history.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from tests.deploy.support import clean_env, free_port, listening, request, scratch_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = scratch_database("rollback")
DB_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def previous_release() -> tuple[str, str]:
    """(commit, how it was chosen) of the release a rollback would run."""
    if os.environ.get("PREVIOUS_RELEASE"):
        ref = os.environ["PREVIOUS_RELEASE"]
        return git("rev-parse", f"{ref}^{{commit}}"), f"PREVIOUS_RELEASE={ref}"
    head = git("rev-parse", "HEAD")
    for tag in git("tag", "--list", "v*.*.*", "--merged", "HEAD", "--sort=-v:refname").splitlines():
        commit = git("rev-parse", f"{tag}^{{commit}}")
        if commit != head:
            return commit, f"tag {tag}"
    added = git("log", "--first-parent", "--diff-filter=A", "--format=%H", "-1", "HEAD", "--", "api/migrations/")
    if not added:
        pytest.skip("no migration in the history")
    return git("rev-parse", f"{added}^1"), f"main before {added[:12]} added its migration"


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> dict:
    """The previous release unpacked, with the python that runs it."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    try:
        commit, why = previous_release()
    except subprocess.CalledProcessError as error:
        pytest.skip(f"git history unavailable (shallow clone?): {error.stderr.strip()}")
    folder = tmp_path_factory.mktemp("previous-release")
    archive = folder / "tree.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit], cwd=ROOT, check=True, timeout=120)
    tree = folder / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    python = Path(sys.executable)
    if (tree / "requirements.txt").read_text() != (ROOT / "requirements.txt").read_text():
        venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r",
                        str(tree / "requirements.txt")], check=True, timeout=900)
        python = venv / "bin" / "python"
    own = sorted(p.name for p in (ROOT / "api" / "migrations").glob("0*.py"))
    old = sorted(p.name for p in (tree / "api" / "migrations").glob("0*.py"))
    return {"commit": commit, "why": why, "tree": tree, "python": python, "new_migrations": sorted(set(own) - set(old))}


@pytest.fixture(scope="module")
def database():
    if not (listening(5432) and listening(6379)):
        pytest.skip("PostgreSQL and Redis must listen on 127.0.0.1")
    import psycopg

    def recreate(create: bool):
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            if create:
                conn.execute(f'CREATE DATABASE "{DB_NAME}"')

    recreate(True)
    yield DB_URL
    recreate(False)


def run(python: Path, cwd: Path, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "manage.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def call(port: int, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"Host": "127.0.0.1", "Authorization": f"Bearer {token}", "Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body)
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw or b"null")
        except ValueError:  # an HTML error page: show its start in the assertion
            return response.status, {"not_json": raw[:800].decode(errors="replace")}
    finally:
        conn.close()


@contextlib.contextmanager
def old_gunicorn(previous: dict, env: dict[str, str], logdir: Path):
    port = free_port()
    env = dict(env, GUNICORN_BIND=f"127.0.0.1:{port}", GUNICORN_WORKERS="1")
    gunicorn = previous["python"].parent / "gunicorn"
    with open(logdir / "gunicorn.out", "wb") as out, open(logdir / "gunicorn.err", "wb") as err:
        proc = subprocess.Popen([str(gunicorn), "-c", "docker/gunicorn.conf.py", "config.wsgi:application"],
                                cwd=previous["tree"], env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, (logdir / "gunicorn.err").read_text()[-2000:]
            with contextlib.suppress(OSError):
                if request(port, "/health", timeout=2)[0] == 200:
                    break
            assert time.monotonic() < deadline, (logdir / "gunicorn.err").read_text()[-2000:]
            time.sleep(0.2)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_previous_release_runs_on_this_releases_schema(previous, database, tmp_path):
    env = clean_env(tmp_path, DATABASE_URL=database, REDIS_URL="redis://127.0.0.1:6379/0", EXCHANGE_VENUE="replay")
    here, old, tree = Path(sys.executable), previous["python"], previous["tree"]
    print(f"previous release: {previous['commit'][:12]} ({previous['why']}); "
          f"migrations it does not know: {previous['new_migrations'] or 'none'}")

    # this release's migrations (its PreSync hook)
    result = run(here, ROOT, ["migrate", "--noinput", "-v", "0"], env)
    assert result.returncode == 0, result.stderr[-3000:]

    # rollback: the previous release's PreSync migrate finds nothing to apply and fails on nothing
    result = run(old, tree, ["migrate", "--noinput"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "No migrations to apply." in result.stdout, result.stdout[-2000:]
    assert run(old, tree, ["migrate", "--check"], env).returncode == 0

    # its setup commands
    result = run(old, tree, ["sync_symbols", "BTCUSDT", "--venue", "replay"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run(old, tree, ["create_api_user", "rollback-user", "--tenant", "rollback-desk"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    token = result.stdout.strip().splitlines()[-1]

    # its API, under its own gunicorn configuration
    with old_gunicorn(previous, env, tmp_path) as port:
        assert request(port, "/health")[0] == 200
        status, _, body = request(port, "/health/ready")
        assert status == 200, body
        # a long whose stop (100000 USDT) is far above the replayed April 2018 price: the next pass closes it
        status, opened = call(port, "POST", "/api/v1/operations/", token, {
            "symbol": "BTCUSDT", "side": "BUY", "quantity": "0.01000000",
            "entry_price": "120000.00", "stop_price": "100000.00",
        })
        assert status == 201, opened
        operation = opened["id"]
        status, listed = call(port, "GET", "/api/v1/operations/", token)
        assert status == 200 and [o["id"] for o in listed["results"]] == [operation]
        status, one = call(port, "GET", f"/api/v1/operations/{operation}/", token)
        assert status == 200 and one["status"] == "ACTIVE" and one["stop_price"] == "100000.00000000"

        # its monitor pass closes the operation on this schema
        result = run(old, tree, ["monitor_stops", "--json"], env, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][-1]
        assert (summary["watched"], summary["triggered"], summary["executed"], summary["errors"]) == (1, 1, 1, 0), summary

        status, closed = call(port, "GET", f"/api/v1/operations/{operation}/", token)
        assert status == 200 and closed["status"] == "CLOSED", closed
        status, events = call(port, "GET", f"/api/v1/operations/{operation}/events/", token)
        assert status == 200
        old_types = [e["event_type"] for e in (events["results"] if isinstance(events, dict) else events)]
        # (a GUARD_WARNING for the slippage against the far-off entry price may sit among them)
        assert [t for t in old_types if t != "GUARD_WARNING"] == [
            "STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED", "OPERATION_CLOSED"], old_types

    # rolling forward again: this release reads what the previous one wrote
    result = run(here, ROOT, ["events", "--operation", str(operation), "--json"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["event_type"] for line in result.stdout.splitlines()] == old_types
    result = run(here, ROOT, ["rebuild_projections", "--verify"], env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
