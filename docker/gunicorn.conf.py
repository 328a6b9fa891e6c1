"""gunicorn configuration: ``gunicorn -c docker/gunicorn.conf.py config.wsgi:application``.

Every knob comes from the environment (defaults in brackets):

    GUNICORN_BIND                 [0.0.0.0:$PORT, PORT=8000]
    GUNICORN_WORKERS              [2]   processes
    GUNICORN_WORKER_CONNECTIONS   [50]  greenlets (= requests in flight) per process
    GUNICORN_DB_CONNECTION_BUDGET [unset] cap on workers x worker_connections (see below)
    GUNICORN_TIMEOUT              [30]  s a worker may stay silent before the arbiter kills it
    GUNICORN_GRACEFUL_TIMEOUT     [25]  s to finish in-flight requests after SIGTERM
                                        (below the pod's terminationGracePeriodSeconds=30)
    GUNICORN_KEEPALIVE            [5]   s to keep an idle client connection open
    GUNICORN_MAX_REQUESTS         [0]   recycle a worker after N requests (0: never)
    GUNICORN_LOG_LEVEL            [info]

Why gevent, no preload, and how database connections stay bounded
    * ``worker_class = "gevent"``: the gunicorn gevent worker monkey-patches the standard library
      in each worker *before* it imports the application. ``preload_app = False`` keeps it that
      way: with preload the arbiter would import Django and psycopg unpatched, and psycopg picks
      its wait function at import time (``psycopg.waiting`` uses the select-based one only when
      it sees ``select`` patched by gevent) — an unpatched psycopg blocks the whole worker on
      every query. This file imports nothing from Django or psycopg for the same reason.
    * Each worker keeps one psycopg pool (Django's ``OPTIONS["pool"]``) of at most
      ``worker_connections`` connections: this file exports ``DB_POOL_MAX_SIZE`` for the settings.
      A request takes a connection at its first query and gives it back when it ends; nothing is
      kept per greenlet. The gevent worker serves at most ``worker_connections`` requests at once
      (its greenlet pool size), so no request waits for the pool and one pod holds at most
      ``workers x worker_connections`` PostgreSQL connections whatever the number of concurrent
      clients — extra clients wait in the listen backlog, they do not open connections. psycopg
      and psycopg_pool are imported after gevent's patches, so their waits (socket, lock,
      condition) yield to the other greenlets.
      Defaults: 2 x 50 = 100 per pod. With PostgreSQL's default ``max_connections=100`` that is
      already too much for 2 replicas plus the monitor, migrate and Celery, so set
      ``GUNICORN_DB_CONNECTION_BUDGET`` (the k8s ConfigMap sets 40: 2 pods x 40 = 80, leaving 20
      for the CronJob, jobs, workers and superuser_reserved_connections). When the budget is
      set and workers x worker_connections exceeds it, worker_connections is lowered to
      budget // workers at start-up (logged on stderr). See docker/README.md.
    * ``worker_tmp_dir = /dev/shm``: the heartbeat file lives in memory (tmpfs), so the worker
      neither writes under /app (read-only root filesystem) nor stalls on a slow disk.

Logs: the access log is one JSON object per request on stdout (method, path, status,
duration_ms, ...); gunicorn's own messages go to stderr ("-").
"""

import json
import os
import sys

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
worker_connections = max(1, _int("GUNICORN_WORKER_CONNECTIONS", 50))

_budget = _int("GUNICORN_DB_CONNECTION_BUDGET", 0)
if _budget > 0 and workers * worker_connections > _budget:
    _capped = max(1, _budget // workers)
    sys.stderr.write(
        f"gunicorn.conf: workers({workers}) x worker_connections({worker_connections}) exceeds "
        f"GUNICORN_DB_CONNECTION_BUDGET={_budget}; worker_connections lowered to {_capped}\n"
    )
    worker_connections = _capped

# each worker keeps a psycopg pool of at most worker_connections connections (config/settings.py):
# the greenlet cap stays the connection cap, and requests no longer open a connection each
os.environ["DB_POOL_MAX_SIZE"] = str(worker_connections)

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


class JsonAccessLogger(Logger):
    """The access log as one JSON line per request (valid JSON whatever the path or user agent)."""

    def access(self, resp, req, environ, request_time):
        if not self.cfg.accesslog:
            return
        try:
            atoms = self.atoms(resp, req, environ, request_time)
            line = {
                "type": "access",
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "query": atoms.get("q") or "",
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
        "stopmonitor web: %s gevent worker(s) x %s connections = at most %s database connections (pooled)",
        workers,
        worker_connections,
        workers * worker_connections,
    )
