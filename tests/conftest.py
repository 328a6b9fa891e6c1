"""Shared fixtures: no outbound network (loopback only), and small factories."""

from __future__ import annotations

import ipaddress
import socket

import pytest

_real_connect = socket.socket.connect


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _forget_exchange_state_in_memory():
    """The exchange state a test left in this process's memory (a ban horizon, a clock offset: the
    fallback of stopmonitor/exchange/state.py) is not the next test's. A 120 s ban set by
    tests/api/test_health_degraded.py refused tests/stopmonitor/test_accounts.py's credential checks
    when the suite reached them within those 120 s. Nor is anything a test left in Django's cache
    (a file cache in tests, which outlives the run): a keys verdict "accepted" let a test pass
    locally that failed on a fresh CI machine without keys, and symbol filters cached by another
    test (or run) without STOP_LOSS in orderTypes made an account client refuse to arm."""
    yield
    from django.core.cache import cache

    from stopmonitor.exchange import state

    state._fallbacks.clear()
    try:
        cache.clear()
    except Exception:  # noqa: BLE001 - a test that broke the cache has its own failure
        pass


@pytest.fixture(autouse=True)
def _block_outbound_network(monkeypatch, request):
    """Refuse any socket connection that is not loopback (Binance is never called by tests)."""
    if request.node.get_closest_marker("live_testnet"):
        return

    def guarded_connect(self, address):
        if not _is_loopback(address):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return _real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
