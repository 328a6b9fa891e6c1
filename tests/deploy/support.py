"""Shared by the deploy tests that run real processes: is a local port listening, and a free one."""

from __future__ import annotations

import socket


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
