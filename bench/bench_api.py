"""Benchmark ``GET /api/v1/operations/`` under gunicorn (gevent workers): latency at 50 clients, SQL per request.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python bench/bench_api.py [--ops 10000] [--requests 5000] [--concurrency 50] \
            [--workers 2] [--worker-connections 50] [--loadgen auto|wrk|python]

The requirement (issue 5, "Speed"): one tenant with 10,000 operations, 50 rows a page, p99 under
50 ms at 50 concurrent clients, and a constant number of SQL queries per request (no N+1).

1. Creates a scratch database ``stopmonitor_bench_api`` on the server of ``DATABASE_URL`` (the
   admin URL; default ``postgres://postgres@127.0.0.1:5432/postgres``), migrates it and seeds two
   tenants, each with one user and a DRF token: ``bench-10k`` with ``--ops`` operations and
   ``bench-1k`` with a tenth of that (bulk_create; BTCUSDT/ETHUSDT/ADAUSDT, long and short, mostly
   ACTIVE, with stop and target levels).
2. SQL per request, in this process, through Django's test ``Client`` with ``CaptureQueriesContext``:
   page sizes (``?limit=``) 10/50/100 and the second page (cursor) for both tenants, and a filtered
   list. The same count whatever the page size and the tenant's size means no N+1.
3. Starts gunicorn with ``docker/gunicorn.conf.py`` (gevent workers; knobs ``GUNICORN_WORKERS`` and
   ``GUNICORN_WORKER_CONNECTIONS`` from ``--workers``/``--worker-connections``) on 127.0.0.1 with
   production settings (``ENVIRONMENT=production``, ``DEBUG`` off, Redis cache, ``SECURE_SSL_REDIRECT``
   off because there is no TLS proxy, the user throttle raised to 1000000/minute so it never answers
   429), waits for ``/health``, then measures with ``wrk`` when installed (a Lua script stops each
   thread after its share of the requests), else with a gevent client in a child process:

   * warm-up: ``--warmup`` requests to the list at full concurrency (not reported);
   * baseline ``/health`` (answered by the first middleware: the cost of gunicorn + HTTP) at the
     same concurrency;
   * the list, one client (``--single`` requests): the service time of one request;
   * the list at ``--concurrency`` clients (``--requests`` requests): the requirement;
   * ``--paced`` phases: the same clients sending a fixed total rate below saturation (gevent child,
     open loop, latency from the scheduled send), i.e. the latency when the server is not the queue.
   * issue 16: ``--concurrency`` closed-loop keep-alive clients for ``--closed-seconds`` (40) with a 30 s
     client timeout: client timeouts (goal 0), p50/p99 (goal p99 < 1 s) and the throughput against the
     CPU-per-request ceiling of that phase;
   * issue 16: a mixed load for ``--mixed-seconds`` by a third tenant: ``--write-share`` of the requests
     are creates with a fresh ``Idempotency-Key``, ``--retry-share`` of those sent again with the same
     key (half of them after the first answer was abandoned unread): duplicate operations = operations
     opened beyond the committed keys, plus keys answered with two different ids (goal 0).

   Each phase prints count, throughput, p50/p90/p99/max and errors (non-200, socket errors), the
   server-side durations from gunicorn's JSON access log (time in the worker, no queueing in the
   listen backlog), PostgreSQL transactions and sessions per request (``pg_stat_database``
   deltas: every query is its own transaction in autocommit, the pool's check on taking a
   connection one more; a worker's pool opens sessions only when it grows), the CPU per request
   of the gunicorn workers, of the PostgreSQL backends serving the bench database (``pg ms``) and
   of the load generator (``lg ms``), the machine's busy share and the load average (the machine
   may be shared). After the phases, one line adds up the CPU per request at ``--concurrency``
   clients and what it implies: the highest throughput the CPUs allow, and the least mean latency
   of that many closed-loop clients at that throughput (Little's law).

Figures only: nothing asserts on time. gunicorn is always stopped (its process group) and the
database dropped unless ``--keep-db``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--loadgen-child" in sys.argv:  # the Python load generator: patch first
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
DB = "stopmonitor_bench_api"
LIST_PATH = "/api/v1/operations/"
HEALTH_PATH = "/health"
REDIS_DEFAULT = "redis://127.0.0.1:6379/11"  # its own Redis database: throttle keys never meet another run's


# read once: the bench later points DATABASE_URL of its own process at the bench database
ADMIN_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def admin_url() -> str:
    return ADMIN_URL


def db_url(name: str) -> str:
    parts = urlsplit(admin_url())
    return urlunsplit(parts._replace(path=f"/{name}"))


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def service_env(allowed_hosts: str) -> dict[str, str]:
    """The production-like environment of the service (the bench process and gunicorn)."""
    return {
        "ENVIRONMENT": "production",
        "DEBUG": "false",
        "SECRET_KEY": "bench-api-secret-key-not-a-real-one-0123456789abcdef",
        "ALLOWED_HOSTS": allowed_hosts,
        "DATABASE_URL": db_url(DB),
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", REDIS_DEFAULT),
        "BINANCE_API_KEY": "bench-dummy-key",
        "BINANCE_API_SECRET": "bench-dummy-secret",
        "SECURE_SSL_REDIRECT": "false",
        "API_USER_THROTTLE": "1000000/minute",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }


# --------------------------------------------------------------------------------------
# database: create, migrate, seed
# --------------------------------------------------------------------------------------


def recreate_db() -> None:
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB}"')


def drop_db() -> None:
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


def setup_django() -> None:
    # in this process the test Client's host is "testserver"; gunicorn gets 127.0.0.1 only
    os.environ.update(service_env("127.0.0.1,testserver"))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def seed(ops_big: int, ops_small: int) -> dict[str, dict]:
    """Two tenants with a user and a token each; returns {label: {"token", "tenant_id", "ops"}}."""
    from datetime import datetime, timedelta
    from decimal import Decimal as D

    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from api.models import Client, Operation, Symbol
    from stopmonitor.exchange.paper import bundled_filters

    symbols = {}
    for name, f in sorted(bundled_filters().items()):
        symbols[name] = Symbol.objects.create(symbol=name, base_asset=f.base_asset, quote_asset=f.quote_asset,
                                              tick_size=f.tick_size, step_size=f.step_size, min_qty=f.min_qty,
                                              min_notional=f.min_notional)
    prices = {"BTCUSDT": D(9300), "ETHUSDT": D(2000), "ADAUSDT": D("0.35")}
    names = [n for n in ("BTCUSDT", "ETHUSDT", "ADAUSDT") if n in symbols] or sorted(symbols)
    statuses = ["ACTIVE"] * 7 + ["PLANNED", "CLOSED", "CANCELLED"]
    base_time = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    out = {}
    for label, count in (("bench-1k", ops_small), ("bench-10k", ops_big)):
        tenant = Client.objects.create(name=label)
        user = get_user_model().objects.create_user(label.replace("-", "_"))
        tenant.users.add(user)
        token = Token.objects.create(user=user)
        rows = []
        for i in range(count):
            name = names[i % len(names)]
            entry = prices.get(name, D(100)) * (1 + D(i % 97) / D(1000))
            side = "BUY" if i % 2 == 0 else "SELL"
            sign = 1 if side == "BUY" else -1
            status = statuses[i % len(statuses)]
            rows.append(Operation(
                client=tenant, symbol=symbols[name], side=side, status=status,
                quantity=D("0.5") if name == "BTCUSDT" else D(40),
                entry_price=entry.quantize(D("0.01")),
                stop_price=(entry * (1 - sign * D("0.02"))).quantize(D("0.01")),
                target_price=(entry * (1 + sign * D("0.04"))).quantize(D("0.01")),
                closed_quantity=D("0.5") if status == "CLOSED" and name == "BTCUSDT" else
                (D(40) if status == "CLOSED" else D(0)),
                last_stop_check_at=base_time + timedelta(seconds=i) if status == "ACTIVE" else None,
            ))
        Operation.objects.bulk_create(rows, batch_size=2000)
        out[label] = {"token": token.key, "tenant_id": tenant.pk, "ops": count, "user_id": user.pk}
    # the mixed load's tenant: its creates are counted against its idempotency keys
    tenant = Client.objects.create(name="bench-writer")
    user = get_user_model().objects.create_user("bench_writer")
    tenant.users.add(user)
    out["bench-writer"] = {"token": Token.objects.create(user=user).key, "tenant_id": tenant.pk, "ops": 0,
                           "user_id": user.pk}
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE api_operation")
    return out


def operation_count(tenant_id: int) -> int:
    import psycopg

    with psycopg.connect(db_url(DB), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM api_operation WHERE client_id = %s", [tenant_id]).fetchone()[0]


def idempotency_keys(user_id: int) -> int:
    """Keys of ``user_id`` whose create committed (one row each, in the operation's transaction)."""
    import psycopg

    with psycopg.connect(db_url(DB), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM api_idempotencykey WHERE user_id = %s AND state = 'done'",
                            [user_id]).fetchone()[0]


# --------------------------------------------------------------------------------------
# SQL per request (Django test Client + CaptureQueriesContext)
# --------------------------------------------------------------------------------------


def count_queries(tenants: dict[str, dict]) -> tuple[bool, list[str]]:
    """Print the SQL count of each case; returns (constant, the statements of the 50-row page)."""
    from django.db import connection
    from django.test import Client as TestClient
    from django.test.utils import CaptureQueriesContext

    def get(client, path, params=None):
        with CaptureQueriesContext(connection) as ctx:
            response = client.get(path, params or {})
        if response.status_code != 200:
            raise SystemExit(f"GET {path} {params} answered {response.status_code}: {response.content[:300]!r}")
        return response.json(), [q["sql"] for q in ctx.captured_queries]

    print("\n## SQL queries per request (Django test Client, CaptureQueriesContext, production settings)")
    print(f"{'tenant':<10} {'operations':>10} {'request':<44} {'rows':>5} {'queries':>7}")
    counts: set[int] = set()
    sample: list[str] = []
    for label in ("bench-1k", "bench-10k"):
        info = tenants[label]
        client = TestClient(HTTP_AUTHORIZATION=f"Bearer {info['token']}")
        get(client, LIST_PATH, {"limit": 5})  # first request of the process: nothing lazy in the counts
        cases = []
        for size in (10, 50, 100):
            body, sql = get(client, LIST_PATH, {"limit": size})
            cases.append((f"?limit={size}", body, sql))
            if size == 50:
                if label == "bench-10k":
                    sample = sql
                nxt = urlsplit(body["next"])
                body2, sql2 = get(client, nxt.path + "?" + nxt.query)
                cases.append(("?limit=50 page 2 (cursor)", body2, sql2))
        body, sql = get(client, LIST_PATH, {"limit": 50, "symbol": "BTCUSDT", "status": "ACTIVE", "side": "BUY"})
        cases.append(("?limit=50&symbol=BTCUSDT&status=ACTIVE&side=BUY", body, sql))
        for name, body, sql in cases:
            counts.add(len(sql))
            print(f"{label:<10} {info['ops']:>10} {name:<44} {len(body['results']):>5} {len(sql):>7}")
    constant = len(counts) == 1
    print(f"queries per request: {sorted(counts)} -> {'constant (no N+1)' if constant else 'NOT constant (N+1?)'}")
    print("the statements of one 50-row page (10k tenant):")
    for i, sql in enumerate(sample, 1):
        print(f"  {i}. {sql[:260]}{' …' if len(sql) > 260 else ''}")
    return constant, sample


def explain_list(tenant_id: int) -> None:
    """EXPLAIN ANALYZE of the page query for the big tenant (the plan and its execution time)."""
    from django.db import connection

    sql = ("SELECT * FROM api_operation INNER JOIN api_symbol ON api_operation.symbol_id = api_symbol.id "
           "WHERE api_operation.client_id = %s ORDER BY api_operation.id DESC LIMIT 51")
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, [tenant_id])
        plan = [row[0] for row in cursor.fetchall()]
    print("EXPLAIN ANALYZE of the page query (10k tenant, 51 rows):")
    for line in plan:
        print(f"  {line}")


# --------------------------------------------------------------------------------------
# gunicorn
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(port: int, workers: int, worker_connections: int, logdir: Path,
                   db_pool_size: int = 10) -> tuple[subprocess.Popen, Path, Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    env.update(service_env("127.0.0.1"))
    env.update({
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKERS": str(workers),
        "GUNICORN_WORKER_CONNECTIONS": str(worker_connections),
        "GUNICORN_DB_POOL_SIZE": str(db_pool_size),
        "GUNICORN_LOG_LEVEL": "warning",
    })
    access = logdir / f"access-{workers}x{worker_connections}.log"
    errors = logdir / f"gunicorn-{workers}x{worker_connections}.err"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    cmd = [str(gunicorn) if gunicorn.exists() else "gunicorn", "-c", "docker/gunicorn.conf.py", "config.wsgi:application"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=access.open("wb"), stderr=errors.open("wb"),
                            start_new_session=True)
    return proc, access, errors


def stop_gunicorn(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def wait_health(base: str, proc: subprocess.Popen, errors: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited with {proc.returncode}:\n{errors.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(base + HEALTH_PATH, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"gunicorn did not answer {HEALTH_PATH} within {timeout:.0f} s:\n{errors.read_text()[-2000:]}")


def check_page(base: str, token: str, size: int) -> None:
    req = urllib.request.Request(f"{base}{LIST_PATH}?limit={size}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = json.loads(r.read())
        length = int(r.headers.get("Content-Length") or 0)
    if len(body["results"]) != size or not body.get("next"):
        raise SystemExit(f"unexpected page: {len(body['results'])} rows, next={body.get('next')!r}")
    print(f"GET {LIST_PATH}?limit={size} under gunicorn: 200, {len(body['results'])} rows, {length} bytes, next cursor present")


# --------------------------------------------------------------------------------------
# load generators: wrk (Lua: stop after N requests per thread) or a gevent child process
# --------------------------------------------------------------------------------------

WRK_LUA = r"""
local limit = tonumber(os.getenv("BENCH_PER_THREAD") or "0")
local count = 0
function response(status, headers, body)
  count = count + 1
  if limit > 0 and count == limit then
    io.write("BENCH_THREAD_DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_s":%.6f,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f,"mean":%.3f}\n',
    summary.requests, summary.duration / 1e6, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


def which_wrk() -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        p = Path(d) / "wrk"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def run_wrk(wrk: str, url: str, token: str | None, requests: int, concurrency: int, lua: Path, max_s: int) -> dict:
    """``wrk`` with one thread (it keeps ``concurrency`` connections busy: one event loop in C is plenty
    for a server answering hundreds of requests a second, and leaves the CPUs to the server). The Lua
    script prints a line after ``requests`` answers; wrk then gets SIGINT, which ends its run early
    with the real elapsed time in its summary (its own ``-d`` is only the upper bound)."""
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max_s}s", "--timeout", "10s", "-s", str(lua)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    cmd.append(url)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BENCH_PER_THREAD": str(requests)})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BENCH_THREAD_DONE"):
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in lines:
        if line.startswith("BENCH_JSON "):
            r = json.loads(line[len("BENCH_JSON "):])
            r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
            r["error_detail"] = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
            return r
    raise SystemExit(f"wrk failed ({proc.returncode}): {''.join(lines)[-1000:]} {proc.stderr.read()[-1000:]}")


def run_python_loadgen(url: str, token: str | None, requests: int, concurrency: int, max_s: int,
                       rate: float = 0.0, **env: str) -> dict:
    """The gevent client in a child process (its own GIL). ``rate`` > 0: paced, ``concurrency`` clients
    sending ``rate`` requests/s in all (each on its own schedule), else closed loop (back to back).
    ``env``: ``BENCH_CLIENT_TIMEOUT``, ``BENCH_MODE`` … (see :func:`loadgen_child`)."""
    cmd = [sys.executable, __file__, "--loadgen-child", url, str(requests), str(concurrency), str(max_s), str(rate)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_s + 60, check=False,
                          env={**os.environ, "BENCH_TOKEN": token or "", **env})
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise SystemExit(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")


def loadgen_child(url: str, requests: int, concurrency: int, max_s: float, rate: float = 0.0) -> None:
    """gevent clients, one keep-alive connection each, until ``requests`` answers or ``max_s`` (runs
    monkey-patched). ``BENCH_CLIENT_TIMEOUT`` (s, default 10) is each request's socket timeout: a request
    that times out is counted under ``timeout`` and its client reconnects.

    ``rate`` > 0: client i sends at ``start + (i / concurrency + k) * concurrency / rate`` (k = 0, 1, …);
    latency counts from the scheduled time, so a late answer that delays the next send is not hidden
    (no coordinated omission).

    ``BENCH_MODE=mixed``: each request is a create (``POST``, share ``BENCH_WRITE_SHARE``, default 0.2)
    with a fresh ``Idempotency-Key`` or a list; a share ``BENCH_RETRY_SHARE`` (default 0.3) of the creates
    is sent again with the same key and body — half of them after the first answer was thrown away
    unread by closing the connection mid-way (a client that gave up) — and the answers' operation ids
    per key are reported, so duplicates can be counted against the database."""
    import http.client
    import random
    import uuid

    import gevent

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    create_path = parts.path
    token = os.environ.get("BENCH_TOKEN")
    client_timeout = float(os.environ.get("BENCH_CLIENT_TIMEOUT") or 10)
    mixed = os.environ.get("BENCH_MODE") == "mixed"
    write_share = float(os.environ.get("BENCH_WRITE_SHARE") or 0.2)
    retry_share = float(os.environ.get("BENCH_RETRY_SHARE") or 0.3)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = json.dumps({"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300",
                       "stop_price": "9200"})
    latencies: list[float] = []
    errors = {"status": 0, "socket": 0, "timeout": 0}
    state = {"issued": 0, "bytes": 0, "creates": 0, "retries": 0, "abandoned": 0, "replayed": 0}
    ids_by_key: dict[str, set] = {}
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + max_s
    rng = random.Random(42)

    interval = concurrency / rate if rate > 0 else 0.0
    origin = time.perf_counter() + 0.5

    def connect():
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=client_timeout)

    def send(conn, method, path, extra=None, payload=None, abandon=False):
        """One request on ``conn`` (reconnecting once if the server closed the idle connection):
        (conn, status, body) — body ``None`` when ``abandon``: the connection is closed unread."""
        h = {**headers, **(extra or {})}
        try:
            conn.request(method, path, body=payload, headers=h)
            if abandon:
                conn.close()
                return connect(), None, None
            resp = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # the server closed the idle keep-alive connection (GUNICORN_KEEPALIVE): reconnect once
            conn.close()
            conn = connect()
            conn.request(method, path, body=payload, headers=h)
            resp = conn.getresponse()
        return conn, resp.status, resp.read()

    def client(i: int):
        conn = connect()
        k = 0
        while state["issued"] < requests and time.monotonic() < deadline:
            state["issued"] += 1
            if interval:
                scheduled = origin + (i / concurrency + k) * interval
                k += 1
                gevent.sleep(max(0.0, scheduled - time.perf_counter()))
                t0 = scheduled
            else:
                t0 = time.perf_counter()
            try:
                if mixed and rng.random() < write_share:
                    key = str(uuid.uuid4())
                    extra = {"Idempotency-Key": key, "Content-Type": "application/json"}
                    state["creates"] += 1
                    retry = rng.random() < retry_share
                    abandon = retry and rng.random() < 0.5
                    conn, status, answer = send(conn, "POST", create_path, extra, body, abandon=abandon)
                    if abandon:
                        state["abandoned"] += 1
                    attempts = [(status, answer)]
                    if retry:
                        state["retries"] += 1
                        conn, status, answer = send(conn, "POST", create_path, extra, body)
                        attempts.append((status, answer))
                    for st, ans in attempts:
                        if st is None:
                            continue
                        statuses[str(st)] = statuses.get(str(st), 0) + 1
                        if st == 201:
                            ids_by_key.setdefault(key, set()).add(json.loads(ans)["id"])
                    ok = status in (200, 201)
                else:
                    conn, status, answer = send(conn, "GET", target)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    ok = status == 200
                latencies.append((time.perf_counter() - t0) * 1000)
                state["bytes"] += len(answer or b"")
                if not ok:
                    errors["status"] += 1
            except TimeoutError:
                errors["timeout"] += 1
                conn.close()
                conn = connect()
            except (OSError, http.client.HTTPException):
                errors["socket"] += 1
                conn.close()
                conn = connect()
        conn.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client, i) for i in range(concurrency)])
    duration = time.perf_counter() - (origin if interval else started)
    lat = sorted(latencies)
    out = {"requests": len(lat), "duration_s": duration, "bytes": state["bytes"],
           "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": lat[-1] if lat else float("nan"),
           "mean": sum(lat) / len(lat) if lat else float("nan"),
           "errors": sum(errors.values()), "error_detail": {k: v for k, v in errors.items() if v},
           "timeouts": errors["timeout"], "statuses": statuses}
    if mixed:
        out["mixed"] = {**{k: state[k] for k in ("creates", "retries", "abandoned")},
                        "keys_answered": len(ids_by_key),
                        "keys_with_two_ids": sum(1 for ids in ids_by_key.values() if len(ids) > 1)}
    print("BENCH_JSON " + json.dumps(out), flush=True)


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


# --------------------------------------------------------------------------------------
# server-side figures: gunicorn access log, pg_stat_database
# --------------------------------------------------------------------------------------


def access_durations(path: Path, offset: int, url_path: str) -> list[float]:
    out = []
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("type") == "access" and url_path in (None, line.get("path")):
                out.append(float(line["duration_ms"]))
    return out


def pg_counters() -> tuple[int, int]:
    """(xact_commit + xact_rollback, sessions) of the bench database, flushed by ended sessions; this
    reading's own session (one transaction) is counted by the next reading, hence the ``- 1`` in :func:`phase`."""
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database WHERE datname = %s",
                           [DB]).fetchone()
    return int(row[0]), int(row[1])


def drain(access: Path, quiet_s: float = 1.0, max_s: float = 60.0) -> None:
    """Wait until the server is idle: the access log has not grown for ``quiet_s``. A load generator
    stops with requests still in flight (up to one per client); they must not run into the next phase."""
    deadline = time.monotonic() + max_s
    size, since = access.stat().st_size, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now_size = access.stat().st_size
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def worker_pids(master: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> list[float]:
    """utime + stime of each process, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except OSError:
            out.append(float("nan"))
    return out


def pg_backend_cpu() -> dict[int, float]:
    """utime + stime (s) of each PostgreSQL backend connected to the bench database (same machine),
    read from /proc. Pooled backends live through a phase; a backend that starts and ends inside
    one (no pool) is missed, so the figure is a lower bound then."""
    import psycopg

    with psycopg.connect(admin_url(), autocommit=True) as conn:
        pids = [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [DB]).fetchall()]
    return {pid: cpu for pid, cpu in zip(pids, cpu_seconds(pids)) if not math.isnan(cpu)}


def children_cpu() -> float:
    """utime + stime (s) of this process's ended children: the load generator (wrk or the gevent child)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def phase(name: str, run, access: Path, url_path: str, workers: list[int]) -> dict:
    drain(access)
    offset = access.stat().st_size
    x0, s0 = pg_counters()
    load_before = os.getloadavg()[0]
    w0, m0 = cpu_seconds(workers), machine_cpu()
    pg0, lg0 = pg_backend_cpu(), children_cpu()
    r = run()
    w1, m1 = cpu_seconds(workers), machine_cpu()
    lg1 = children_cpu()
    drain(access)  # in-flight answers are logged; ended sessions have flushed their statistics
    pg1 = pg_backend_cpu()
    x1, s1 = pg_counters()
    server = sorted(access_durations(access, offset, url_path))
    n = r["requests"]
    rps = n / r["duration_s"] if r["duration_s"] else float("nan")
    errors = f"{r['errors']}" + (f" {r['error_detail']}" if r.get("error_detail") else "")
    per_worker = [b - a for a, b in zip(w0, w1)]
    busy = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
    pg_cpu = sum(cpu - pg0.get(pid, 0.0) for pid, cpu in pg1.items())
    print(f"{name:<34} {n:>6} {rps:>7.0f} {r['p50']:>7.1f} {r['p90']:>7.1f} {r['p99']:>7.1f} {r['max']:>7.1f} "
          f"{errors:>6} | {pct(server, 50):>6.1f} {pct(server, 99):>6.1f} | "
          f"{(x1 - x0 - 1) / n if n else float('nan'):>5.2f} {(s1 - s0 - 1) / n if n else float('nan'):>5.2f} | "
          f"{1000 * sum(per_worker) / n if n else float('nan'):>6.1f} {'/'.join(f'{c:.1f}' for c in per_worker):>11} "
          f"{busy:>4.0f}% | {load_before:.2f}->{os.getloadavg()[0]:.2f} | "
          f"{1000 * pg_cpu / n if n else float('nan'):>5.2f} {1000 * (lg1 - lg0) / n if n else float('nan'):>5.2f}",
          flush=True)
    r["rps"] = rps
    r["server"] = server
    r["cpu_ms"] = {"worker": 1000 * sum(per_worker) / n if n else float("nan"),
                   "postgres": 1000 * pg_cpu / n if n else float("nan"),
                   "loadgen": 1000 * (lg1 - lg0) / n if n else float("nan")}
    return r


def bench_server(args, tenants: dict, workers: int, logdir: Path, wrk: str | None, lua: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = tenants["bench-10k"]["token"]
    proc, access, errors = start_gunicorn(port, workers, args.worker_connections, logdir, args.db_pool_size)
    results = {}
    try:
        wait_health(base, proc, errors)
        print(f"\n## gunicorn: {workers} gevent worker(s) x {args.worker_connections} HTTP connections, database pool "
              f"{args.db_pool_size} per worker, on {base} "
              f"(load generator: {'wrk' if wrk else 'gevent child process'}; {load()})")
        check_page(base, token, args.page_size)
        list_url = f"{base}{LIST_PATH}?limit={args.page_size}"

        def gen(url, tok, n, c):
            if wrk:
                return lambda: run_wrk(wrk, url, tok, n, c, lua, args.max_seconds)
            return lambda: run_python_loadgen(url, tok, n, c, args.max_seconds)

        gen(list_url, token, args.warmup, args.concurrency)()  # warm-up: workers imported, caches filled
        print(f"{'phase':<34} {'reqs':>6} {'req/s':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'errors':>6} | "
              f"{'srv50':>6} {'srv99':>6} | {'xact':>5} {'sess':>5} | {'cpu ms':>6} {'worker cpu s':>11} {'busy':>5} | "
              f"{'load 1-min':<10} | {'pg ms':>5} {'lg ms':>5}")
        print(f"{'':<34} {'':>6} {'':>7} {'(client latency, ms)':>31} {'':>6} | {'(in worker)':>13} | "
              f"{'(per req)':>11} | {'(gunicorn workers; machine)':>25} | {'':<10} | {'(CPU per req)':>11}")
        pids = worker_pids(proc.pid)
        results["health"] = phase(f"/health, {args.concurrency} clients",
                                  gen(base + HEALTH_PATH, None, args.requests, args.concurrency), access, HEALTH_PATH, pids)
        results["single"] = phase(f"list {args.page_size} rows, 1 client", gen(list_url, token, args.single, 1),
                                  access, LIST_PATH, pids)
        results["list"] = phase(f"list {args.page_size} rows, {args.concurrency} clients",
                                gen(list_url, token, args.requests, args.concurrency), access, LIST_PATH, pids)
        for rate in args.paced:
            n = max(50, int(rate * args.paced_seconds))
            results[f"paced {rate:g}"] = phase(
                f"list, {args.concurrency} clients paced {rate:g} req/s",
                lambda n=n, rate=rate: run_python_loadgen(list_url, token, n, args.concurrency, args.max_seconds, rate),
                access, LIST_PATH, pids)
        # issue 16: closed-loop keep-alive clients for a fixed time with a 30 s client timeout (before: 34 of
        # 50 clients timed out, p99 10.3 s)
        results["closed"] = phase(
            f"list, {args.concurrency} keep-alive clients {args.closed_seconds:g} s",
            lambda: run_python_loadgen(list_url, token, 10**9, args.concurrency, args.closed_seconds,
                                       BENCH_CLIENT_TIMEOUT="30"),
            access, LIST_PATH, pids)
        # a mixed load: creates with idempotency keys, a share retried (half after abandoning the answer)
        writer = tenants["bench-writer"]
        before = operation_count(writer["tenant_id"])
        results["mixed"] = phase(
            f"mixed {args.write_share:.0%} creates, {args.concurrency} clients {args.mixed_seconds:g} s",
            lambda: run_python_loadgen(f"{base}{LIST_PATH}?limit={args.page_size}", writer["token"], 10**9,
                                       args.concurrency, args.mixed_seconds, BENCH_CLIENT_TIMEOUT="30",
                                       BENCH_MODE="mixed", BENCH_WRITE_SHARE=str(args.write_share),
                                       BENCH_RETRY_SHARE=str(args.retry_share)),
            access, None, pids)
        created = operation_count(writer["tenant_id"]) - before
        mixed = results["mixed"]["mixed"]
        committed_keys = idempotency_keys(writer["user_id"])
        duplicates = max(0, created - committed_keys) + mixed["keys_with_two_ids"]
        print(f"mixed load: {mixed['creates']} creates with a key, {mixed['retries']} retried with the same key "
              f"({mixed['abandoned']} after abandoning the first answer); {created} operations opened, "
              f"{committed_keys} keys committed, {mixed['keys_answered']} keys answered 201; answers "
              f"{results['mixed']['statuses']}; duplicate operations: {duplicates} (goal 0)")
        h, s, lst = results["health"], results["single"], results["list"]
        print(f"ratios: list/health p99 {lst['p99'] / h['p99']:.1f}x, p50 {lst['p50'] / h['p50']:.1f}x; "
              f"list at {args.concurrency} clients / 1 client: p50 {lst['p50'] / s['p50']:.1f}x, "
              f"p99 {lst['p99'] / s['p99']:.1f}x; throughput {lst['rps']:.0f} req/s at {args.concurrency} clients "
              f"vs {s['rps']:.0f} req/s with one")
        cpu = lst["cpu_ms"]
        total = cpu["worker"] + cpu["postgres"] + cpu["loadgen"]
        ceiling = os.cpu_count() * 1000 / total if total > 0 else float("nan")
        print(f"CPU per request at {args.concurrency} clients: gunicorn worker {cpu['worker']:.2f} + PostgreSQL "
              f"{cpu['postgres']:.2f} + load generator {cpu['loadgen']:.2f} = {total:.2f} ms -> at most "
              f"{ceiling:.0f} req/s on {os.cpu_count()} CPUs with nothing else running; {args.concurrency} "
              f"closed-loop clients then wait at least {args.concurrency / ceiling * 1000:.0f} ms per request on "
              f"average (Little's law: clients / throughput)")
        met = lst["p99"] < 50 and lst["errors"] == 0
        print(f"requirement p99 < 50 ms at {args.concurrency} clients: p99 = {lst['p99']:.1f} ms -> "
              f"{'met' if met else 'NOT met'} ({load()})")
        c = results["closed"]
        ccpu = c["cpu_ms"]
        ctotal = ccpu["worker"] + ccpu["postgres"] + ccpu["loadgen"]
        cceiling = os.cpu_count() * 1000 / ctotal if ctotal > 0 else float("nan")
        print(f"issue 16 goals: {args.concurrency} keep-alive clients {args.closed_seconds:g} s: client timeouts "
              f"{c['timeouts']} (goal 0), p50 {c['p50']:.0f} ms, p99 {c['p99']:.0f} ms (goal < 1000), "
              f"{c['rps']:.0f} req/s = {c['rps'] / cceiling:.0%} of the CPU ceiling {cceiling:.0f} req/s "
              f"({ctotal:.2f} ms CPU per request in that phase), answers {c['statuses']}")
        for rate in args.paced:
            r = results[f"paced {rate:g}"]
            print(f"issue 16 goals: paced {rate:g} req/s p99 {r['p99']:.1f} ms (goal < 50 ms at 100 req/s)")
        print(f"issue 16 goals: worker CPU per list request {lst['cpu_ms']['worker']:.2f} ms at {args.concurrency} "
              f"clients, {s['cpu_ms']['worker']:.2f} ms with one (goal <= 5 ms)")
        stderr_tail = [l for l in errors.read_text(errors="replace").splitlines() if "Traceback" in l or "ERROR" in l]
        if stderr_tail:
            print(f"gunicorn stderr has {len(stderr_tail)} error line(s), e.g. {stderr_tail[0][:200]}")
    finally:
        stop_gunicorn(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=10000, help="operations of the measured tenant [10000]")
    parser.add_argument("--page-size", type=int, default=50, help="?limit= of the measured list [50]")
    parser.add_argument("--requests", type=int, default=5000, help="requests per measured phase [5000]")
    parser.add_argument("--warmup", type=int, default=1000, help="warm-up requests [1000]")
    parser.add_argument("--single", type=int, default=500, help="requests of the one-client phase [500]")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent clients [50]")
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="GUNICORN_WORKERS; several values run one server each [2]")
    parser.add_argument("--worker-connections", type=int, default=1000,
                        help="GUNICORN_WORKER_CONNECTIONS: HTTP connections per worker [1000]")
    parser.add_argument("--db-pool-size", type=int, default=10, help="GUNICORN_DB_POOL_SIZE per worker [10]")
    parser.add_argument("--closed-seconds", type=float, default=40,
                        help="length of the closed-loop keep-alive phase (30 s client timeout) [40]")
    parser.add_argument("--mixed-seconds", type=float, default=30, help="length of the mixed read/write phase [30]")
    parser.add_argument("--write-share", type=float, default=0.2, help="share of creates in the mixed phase [0.2]")
    parser.add_argument("--retry-share", type=float, default=0.3, help="share of creates retried [0.3]")
    parser.add_argument("--paced", type=float, nargs="*", default=[5, 10, 15, 50, 100],
                        help="extra phases: --concurrency gevent clients sending this many req/s in all, "
                             "below saturation (open loop; latency from the scheduled send) [5 10 15 50 100]")
    parser.add_argument("--paced-seconds", type=float, default=20, help="length of one paced phase [20]")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--max-seconds", type=int, default=240, help="upper bound of one load phase [240]")
    parser.add_argument("--keep-db", action="store_true", help="leave the database for inspection")
    args = parser.parse_args()

    wrk = which_wrk() if args.loadgen in ("auto", "wrk") else None
    if args.loadgen == "wrk" and not wrk:
        raise SystemExit("wrk is not installed (apt-get install wrk), use --loadgen python")
    print(f"# bench_api: {os.cpu_count()} CPUs; {load()} at start; database {DB}; "
          f"load generator {'wrk ' + wrk if wrk else 'gevent (child process)'}", flush=True)
    recreate_db()
    try:
        setup_django()
        from django.core.management import call_command

        t0 = time.monotonic()
        call_command("migrate", verbosity=0, interactive=False)
        t1 = time.monotonic()
        tenants = seed(args.ops, max(1, args.ops // 10))
        print(f"migrated in {t1 - t0:.1f} s; seeded tenants bench-10k ({args.ops} operations) and bench-1k "
              f"({max(1, args.ops // 10)}) in {time.monotonic() - t1:.1f} s", flush=True)
        count_queries(tenants)
        explain_list(tenants["bench-10k"]["tenant_id"])
        from django.db import connections

        connections.close_all()
        with tempfile.TemporaryDirectory(prefix="bench_api-") as tmp:
            lua = Path(tmp) / "stop_after.lua"
            lua.write_text(WRK_LUA)
            for workers in args.workers:
                bench_server(args, tenants, workers, Path(tmp), wrk, lua)
    finally:
        if not args.keep_db:
            with contextlib.suppress(Exception):  # Django may not be set up yet
                from django.db import connections

                connections.close_all()
            drop_db()
    print(f"# done; {load()}")


if __name__ == "__main__":
    if "--loadgen-child" in sys.argv:
        i = sys.argv.index("--loadgen-child")
        url, n, c, max_s, rate = sys.argv[i + 1: i + 6]
        loadgen_child(url, int(n), int(c), float(max_s), float(rate))
    else:
        main()
