"""The database settings of each kind of process: pooled in gunicorn workers, one connection elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    "PATH": "/usr/bin:/bin",
    "ENVIRONMENT": "development",
    "DATABASE_URL": "postgres://u:p@db:5432/stop",
    "DJANGO_SETTINGS_MODULE": "config.settings",
}


def setting(expression: str, **extra: str):
    """``expression`` (over ``settings``) as a fresh process sees it with ``extra`` in its environment."""
    code = ("import json, django; from django.conf import settings; django.setup(); "
            f"print(json.dumps({expression}, default=str))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**ENV, **extra},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def database_settings(**extra: str) -> dict:
    """``settings.DATABASES["default"]`` of a fresh process with ``extra`` in its environment."""
    return setting("settings.DATABASES['default']", **extra)


def test_commands_and_celery_open_their_own_connection_in_utc():
    db = database_settings()
    assert db["CONN_MAX_AGE"] == 0
    assert "pool" not in db["OPTIONS"]
    # the session starts in UTC: Django sends no SET TIME ZONE after connecting
    assert db["OPTIONS"]["options"] == "-c TimeZone=UTC"


@pytest.mark.parametrize("size, min_size", [pytest.param("50", 2, id="defaults"), pytest.param("1", 1, id="one")])
def test_gunicorn_workers_get_a_pool_as_large_as_their_greenlet_cap(size, min_size):
    # docker/gunicorn.conf.py exports DB_POOL_MAX_SIZE = worker_connections
    db = database_settings(DB_POOL_MAX_SIZE=size)
    assert db["OPTIONS"]["pool"] == {"min_size": min_size, "max_size": int(size), "timeout": 2, "max_idle": 300}
    assert db["CONN_MAX_AGE"] == 0  # Django's pool requires it: a request gives its connection back at its end
    assert db["CONN_HEALTH_CHECKS"] is True


def cache_location(**extra: str) -> str:
    return setting("settings.CACHES['default']['LOCATION']", **extra)


def test_the_file_cache_belongs_to_one_database_unless_cache_dir_says_otherwise():
    """Without Redis: two databases on one machine never share throttle counters or exchange state."""
    import hashlib

    stop = cache_location()
    other = cache_location(DATABASE_URL="postgres://u:p@db:5432/other")
    assert stop == "/tmp/stopmonitor-cache-" + hashlib.sha1(b"db:5432/stop").hexdigest()[:12]
    assert other == "/tmp/stopmonitor-cache-" + hashlib.sha1(b"db:5432/other").hexdigest()[:12]
    assert cache_location(DATABASE_URL="postgres://u:p@db:5432/stop") == stop  # stable
    assert cache_location(CACHE_DIR="/tmp/mine") == "/tmp/mine"
    assert cache_location(REDIS_URL="redis://r:6379/0") == "redis://r:6379/0"
