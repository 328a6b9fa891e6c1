"""gunicorn configuration: ``gunicorn -c docker/gunicorn.conf.py config.wsgi:application``.

Every knob comes from the environment (defaults in brackets):

    GUNICORN_BIND                 [0.0.0.0:$PORT, PORT=8000]
    GUNICORN_WORKERS              [2]   processes
    GUNICORN_WORKER_CONNECTIONS   [1000] HTTP connections (greenlets) per process
    GUNICORN_DB_POOL_SIZE         [10]  database connections per process (the pool's max_size)
    GUNICORN_DB_CONNECTION_BUDGET [unset] cap on workers x GUNICORN_DB_POOL_SIZE (see below)
    GUNICORN_DB_POOL_TIMEOUT      [2]   s a request waits for a database connection, then 503 + Retry-After
    GUNICORN_REQUEST_DEADLINE     [5]   s after its arrival a request may still start: one that got its
                                        database connection later is answered 503 and not executed
    GUNICORN_DB_LOCK_TIMEOUT_MS   [3000] ms a statement waits for a row lock (lock_timeout), then 409
    GUNICORN_TIMEOUT              [30]  s a worker may stay silent before the arbiter kills it
    GUNICORN_GRACEFUL_TIMEOUT     [25]  s to finish in-flight requests after SIGTERM
                                        (preStop 5 s + 25 s < the pod's terminationGracePeriodSeconds=35)
    GUNICORN_KEEPALIVE            [5]   s to keep an idle client connection open
    GUNICORN_MAX_REQUESTS         [0]   recycle a worker after N requests (0: never)
    GUNICORN_LOG_LEVEL            [info]

Why gevent, no preload, and how HTTP connections and database connections are decoupled
    * ``worker_class = "gevent"``: the gunicorn gevent worker monkey-patches the standard library
      in each worker *before* it imports the application. ``preload_app = False`` keeps it that
      way: with preload the arbiter would import Django and psycopg unpatched, and psycopg picks
      its wait function at import time (``psycopg.waiting`` uses the select-based one only when
      it sees ``select`` patched by gevent) — an unpatched psycopg blocks the whole worker on
      every query. This file imports nothing from Django or psycopg for the same reason.
    * HTTP connections are cheap (one greenlet each): a worker accepts up to ``worker_connections``
      (1000) of them, so idle keep-alive clients never hold the door shut on others (with the
      greenlet cap equal to the pool, 50 keep-alive clients on 2 x 20 slots starved: p99 10.3 s,
      34 of 50 clients timed out). Database connections are the scarce resource: each worker keeps
      one psycopg pool (Django's ``OPTIONS["pool"]``) of at most ``GUNICORN_DB_POOL_SIZE``
      connections, exported as ``DB_POOL_MAX_SIZE`` for the settings. A request takes a connection
      at its first query and gives it back when it ends; a request that finds every connection
      busy waits at most ``GUNICORN_DB_POOL_TIMEOUT`` s in the pool's queue and then answers 503
      ``database_unavailable`` with ``Retry-After`` (nothing executed). A request that got its
      connection more than ``GUNICORN_REQUEST_DEADLINE`` s after it arrived (CPU queue plus pool
      queue) is answered 503 ``deadline_exceeded`` without running: its client has most likely
      given up, and a create that commits after that is a position nobody knows about.
      One pod holds at most ``workers x GUNICORN_DB_POOL_SIZE`` PostgreSQL connections whatever
      the number of clients. ``GUNICORN_DB_CONNECTION_BUDGET`` (the k8s ConfigMap sets 20 per pod)
      lowers the pool size to ``budget // workers`` when ``workers x pool size`` exceeds it (logged).
      See docker/README.md.
    * Every web connection starts with ``lock_timeout`` = ``GUNICORN_DB_LOCK_TIMEOUT_MS`` (exported as
      ``DB_LOCK_TIMEOUT_MS``): a PATCH or close of an operation whose row another process holds
      answers 409 ``locked`` within that time instead of waiting as long as the lock is held.
    * ``worker_tmp_dir = /dev/shm``: the heartbeat file lives in memory (tmpfs), so the worker
      neither writes under /app (read-only root filesystem) nor stalls on a slow disk.

Logs: the access log is one JSON object per request on stdout (method, path, status,
duration_ms, ...); gunicorn's own messages go to stderr ("-").
"""

import json
import os
import re
import sys
from urllib.parse import parse_qsl, urlencode

from gunicorn import util as gunicorn_util
from gunicorn.glogging import Logger


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        sys.stderr.write(f"gunicorn.conf: {name}={raw!r} is not an integer; using {default}\n")
        return default


bind = [os.environ.get("GUNICORN_BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"]
worker_class = "gevent"
workers = max(1, _int("GUNICORN_WORKERS", 2))
worker_connections = max(1, _int("GUNICORN_WORKER_CONNECTIONS", 1000))
db_pool_size = max(1, _int("GUNICORN_DB_POOL_SIZE", 10))

_budget = _int("GUNICORN_DB_CONNECTION_BUDGET", 0)
if _budget > 0 and workers * db_pool_size > _budget:
    _capped = max(1, _budget // workers)
    sys.stderr.write(
        f"gunicorn.conf: workers({workers}) x GUNICORN_DB_POOL_SIZE({db_pool_size}) exceeds "
        f"GUNICORN_DB_CONNECTION_BUDGET={_budget}; database pool lowered to {_capped} per worker\n"
    )
    db_pool_size = _capped

# read by config/settings.py in each worker: the pool, its queue timeout, the lock timeout, the deadline
os.environ["DB_POOL_MAX_SIZE"] = str(db_pool_size)
os.environ["DB_POOL_TIMEOUT"] = str(max(1, _int("GUNICORN_DB_POOL_TIMEOUT", 2)))
os.environ["DB_LOCK_TIMEOUT_MS"] = str(max(0, _int("GUNICORN_DB_LOCK_TIMEOUT_MS", 3000)))
os.environ["API_REQUEST_DEADLINE_SECONDS"] = str(max(0, _int("GUNICORN_REQUEST_DEADLINE", 5)))

timeout = _int("GUNICORN_TIMEOUT", 30)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 25)
keepalive = _int("GUNICORN_KEEPALIVE", 5)
max_requests = _int("GUNICORN_MAX_REQUESTS", 0)
max_requests_jitter = _int("GUNICORN_MAX_REQUESTS_JITTER", 0)
backlog = _int("GUNICORN_BACKLOG", 2048)

preload_app = False
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
# no pid file, no control files: nothing is written under the app directory
pidfile = None

loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
accesslog = "-"
errorlog = "-"
capture_output = False
proc_name = "stopmonitor-web"


# query parameters that carry a credential: their values never reach the access log (the API refuses
# them: a token goes in the Authorization header, api.middleware)
_SECRET_PARAM = re.compile(r"(token|key|secret|password|passwd|auth|signature|session|credential)", re.I)


def redact_query(query: str) -> str:
    """``query`` with the value of every credential-like parameter replaced by ``***``."""
    if not query or not _SECRET_PARAM.search(query):
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own error answers (a request line over ``limit_request_line``, malformed headers, …)
    in the API's envelope instead of gunicorn's HTML page: ``{"error": {"code", "message", "fields"}}``."""
    code = {400: "bad_request", 403: "forbidden", 431: "headers_too_large", 500: "server_error",
            501: "not_implemented"}.get(status_int, "bad_request")
    body = json.dumps({"error": {"code": code, "message": f"{reason}: {mesg}" if mesg else reason,
                                 "fields": {}}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin1")
    gunicorn_util.write_nonblock(sock, head + body)


# gunicorn's workers call util.write_error for the errors they answer themselves (before the application)
gunicorn_util.write_error = write_json_error


class JsonAccessLogger(Logger):
    """The access log as one JSON line per request (valid JSON whatever the path or user agent);
    credential-like query parameters are written as ``***``."""

    def access(self, resp, req, environ, request_time):
        if not self.cfg.accesslog:
            return
        try:
            atoms = self.atoms(resp, req, environ, request_time)
            line = {
                "type": "access",
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "query": redact_query(atoms.get("q") or ""),
                "status": int(str(atoms.get("s")).split()[0]) if str(atoms.get("s", "")).split() else None,
                "duration_ms": round(request_time.total_seconds() * 1000, 1),
                "bytes": atoms.get("B"),
                "remote": atoms.get("h"),
                "user_agent": atoms.get("a"),
            }
            self.access_log.info(json.dumps(line))
        except Exception:  # noqa: BLE001 - never fail a request because of its log line
            self.error("access log line failed", exc_info=True)


logger_class = JsonAccessLogger


def on_starting(server):
    # a configuration error stops the master with the one line and status 78 (EX_CONFIG) before any
    # worker boots; otherwise each worker would print it, exit 78 and be respawned for ever
    from decouple import config as decouple_config

    from config.env import EX_CONFIG, ConfigError, resolve

    try:
        resolve(lambda name: decouple_config(name, default=""))
    except ConfigError as err:
        sys.stderr.write(f"stopmonitor: {err}\n")
        sys.stderr.flush()
        os._exit(EX_CONFIG)
    server.log.info(
        "stopmonitor web: %s gevent worker(s) x %s HTTP connections; database pool %s per worker = at most %s "
        "database connections",
        workers,
        worker_connections,
        db_pool_size,
        workers * db_pool_size,
    )
