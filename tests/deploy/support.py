"""Shared by the deploy tests that run real processes: a clean environment, is a local port
listening, and a free one."""

from __future__ import annotations

import http.client
import os
import socket
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: nothing inherited from the developer's shell (``extra`` on top)."""
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CACHE_DIR": str(home / "cache"),
    }
    env.update(extra)
    return env


def listening(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port`` (within 1 s)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_database(suffix: str) -> str:
    """The name of a scratch database of these tests: ``sm_<suffix>``, or ``<TEST_DATABASE_NAME>_<suffix>``
    when ``TEST_DATABASE_NAME`` is set, so two suites on one PostgreSQL server (two checkouts, CI and a
    developer) never recreate each other's databases."""
    return f"{os.environ.get('TEST_DATABASE_NAME') or 'sm'}_{suffix}"


def request(port: int, path: str, host: str = "10.1.2.3:8000", timeout: float = 10, headers: dict | None = None):
    """``GET path`` from 127.0.0.1:``port`` with ``Host: host`` (default: a pod IP, as a probe sends it):
    ``(status, headers, body bytes)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


class TcpForwarder:
    """Accept on 127.0.0.1:``listen_port`` and relay each connection to 127.0.0.1:``target_port``
    (a dependency that comes up late: start it while the process under test waits). ``close()`` stops it."""

    def __init__(self, listen_port: int, target_port: int):
        import threading

        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self.server.settimeout(0.2)
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        import threading

        while not self.closed:
            try:
                client, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, target):
        try:
            source.settimeout(None)
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.thread.join(timeout=2)
        self.server.close()


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def drop_database(name: str) -> None:
    """Drop the scratch database ``name`` (its sessions ended first): a suite leaves none behind."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
