"""Readiness says "degraded" (200) for what does not stop protection: Redis down or refusing our
password (a real authenticated command), an exchange ban with its seconds left (issue #12 items 9, 11)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from django.test import Client

from stopmonitor.exchange.state import CacheState, MemoryState


@pytest.fixture
def locmem(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "health"}}
    from django.core.cache import cache

    cache.clear()
    yield cache
    cache.clear()


def ready():
    response = Client().get("/health/ready")
    return response.status_code, response.json()


@pytest.mark.django_db
@pytest.mark.parametrize("url, reason", [
    pytest.param("redis://127.0.0.1:1/0", "unreachable: ConnectionError", id="down"),
    pytest.param("redis://:wrong-password@127.0.0.1:6379/0", "authentication failed", id="wrong-password"),
])
def test_redis_trouble_is_degraded_not_unavailable(settings, locmem, url, reason):
    settings.REDIS_URL = url

    status, body = ready()

    assert (status, body["status"], body["degraded"], body["checks"]["redis"]) == (200, "degraded", ["redis"], reason)
    assert "wrong-password" not in str(body)


@pytest.mark.django_db
def test_a_working_redis_is_ok_by_an_authenticated_ping(settings, locmem):
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    assert ready()[1]["checks"]["redis"] == "ok"


@pytest.mark.django_db
def test_an_exchange_ban_is_degraded_with_the_seconds_left_and_a_gauge(settings, locmem):
    settings.EXCHANGE_VENUE = "binance-testnet"
    settings.REDIS_URL = None
    CacheState(prefix="stopmonitor:binance:binance-testnet:").set_no_calls_until(
        datetime.now(timezone.utc) + timedelta(seconds=120))

    status, body = ready()

    assert (status, body["status"], body["degraded"]) == (200, "degraded", ["exchange"])
    assert 118 <= body["exchange_ban_seconds_left"] <= 120
    assert body["checks"]["exchange"].startswith(f"banned: {body['exchange_ban_seconds_left']} s left")
    from prometheus_client import CollectorRegistry, generate_latest

    from stopmonitor.metrics import ExchangeBanCollector

    registry = CollectorRegistry()
    registry.register(ExchangeBanCollector())
    text = generate_latest(registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("stopmonitor_exchange_calls_allowed_in_seconds{"))
    assert 'venue="binance-testnet"' in line and 118 <= float(line.split()[-1]) <= 120


@pytest.mark.django_db
def test_no_ban_is_ok(settings, locmem):
    settings.EXCHANGE_VENUE = "binance"
    settings.REDIS_URL = None
    status, body = ready()
    assert (status, body["status"], body["checks"]["exchange"]) == (200, "ok", "ok")


def test_the_exchange_state_goes_on_from_memory_when_redis_is_down(settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0",
                                   "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1}}}
    from stopmonitor.exchange import state as state_module

    state = CacheState(prefix="stopmonitor:binance:redis-down-test:")
    until = datetime.now(timezone.utc) + timedelta(seconds=60)

    state.set_no_calls_until(until)
    state.set_time_offset_ms(-250)
    state.set_symbol_info("BTCUSDT", {"symbol": "BTCUSDT"})

    assert state.get_no_calls_until() == until
    assert state.get_time_offset_ms() == -250
    assert state.get_symbol_info("BTCUSDT") == {"symbol": "BTCUSDT"}
    assert state_module.shared_cache_degraded() is not None
    assert isinstance(state.memory, MemoryState)
