"""Shared by the benchmarks: a scratch PostgreSQL database and `manage.py` run as a measured child.

``ScratchDB(name)`` lives beside the database named by DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/postgres); ``run(*args)`` runs ``manage.py args`` on it and
returns (exit status, wall seconds, the child's peak RSS in MB from ``wait4``, last stdout line).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parents[1]


def admin_url() -> str:
    return os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


class ScratchDB:
    """A database the benchmark creates, fills and drops."""

    def __init__(self, name: str):
        self.name = name
        self.url = urlunsplit(urlsplit(admin_url())._replace(path=f"/{name}"))

    def recreate(self) -> None:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        with psycopg.connect(admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def run(self, *args: str) -> tuple[int, float, float, str]:
        env = {**os.environ, "DATABASE_URL": self.url, "DEBUG": "false"}
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        lines = out.strip().splitlines()
        return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 1024, lines[-1] if lines else ""
