"""api.throttling.UserRateThrottle on Redis: DRF's decisions and Retry-After, one atomic log per user."""

from __future__ import annotations

import socket
import threading
import uuid
from types import SimpleNamespace

import pytest
from rest_framework import throttling

from api.throttling import UserRateThrottle
from tests.api.conftest import error


def _redis_listening() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_cache(settings):
    """The default cache on the Redis of 127.0.0.1 under a key prefix of its own (removed afterwards)."""
    if not _redis_listening():
        pytest.skip("Redis must listen on 127.0.0.1:6379")
    prefix = f"throttle-test-{uuid.uuid4().hex}"
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:6379/0", "KEY_PREFIX": prefix}}
    from django.core.cache import caches

    backend = caches["default"]
    yield backend
    client = backend._cache.get_client(write=True)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def user_request(pk: int = 7):
    return SimpleNamespace(user=SimpleNamespace(is_authenticated=True, pk=pk))


def decisions(throttle_class, times, rate="3/minute"):
    """(allowed, wait) for a request of one user at each time (s), through ``throttle_class``."""
    out = []
    for now in times:
        throttle = throttle_class()
        throttle.rate = rate
        throttle.num_requests, throttle.duration = throttle.parse_rate(rate)
        throttle.timer = lambda now=now: now
        allowed = throttle.allow_request(user_request(), None)
        out.append((allowed, None if allowed else throttle.wait()))
    return out


TIMELINE = [
    pytest.param([0, 1, 2, 3, 4], id="burst-refused-after-3"),
    pytest.param([0, 1, 2, 59.9, 60, 60.5, 61, 61.5, 62, 121], id="oldest-drops-out-at-exactly-60s"),
    pytest.param([0, 10, 20, 30, 40, 50, 65, 75, 85, 95], id="steady-rate-near-the-limit"),
    pytest.param([5, 5, 5, 5, 64.9, 65, 65, 65], id="same-instant-requests"),
]


@pytest.mark.parametrize("times", TIMELINE)
def test_redis_log_decides_and_waits_like_drf(redis_cache, times, settings):
    """The same timeline through the Redis sorted set and through DRF's pickled list (local memory)."""
    ours = decisions(UserRateThrottle, times)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": f"drf-{uuid.uuid4().hex}"}}
    drf = decisions(throttling.UserRateThrottle, times)
    assert [allowed for allowed, _ in ours] == [allowed for allowed, _ in drf]
    assert [wait for _, wait in ours] == pytest.approx([wait for _, wait in drf])


def test_the_api_answers_429_with_retry_after_from_the_redis_log(redis_cache, alice, bob, monkeypatch):
    monkeypatch.setattr(throttling.UserRateThrottle, "THROTTLE_RATES", {"user": "3/minute"})
    for _ in range(3):
        assert alice.api.get("/api/v1/symbols/").status_code == 200
    r = alice.api.get("/api/v1/symbols/")
    assert r.status_code == 429
    assert r.json() == error("throttled", "Request was throttled. Expected available in 60 seconds.")
    assert r["Retry-After"] == "60"
    assert bob.api.get("/api/v1/symbols/").status_code == 200  # another user has their own budget
    client = redis_cache._cache.get_client(write=True)
    assert client.zcard(redis_cache.make_key(f"throttle_user_{alice.user.pk}:log")) == 3  # refused: not counted


def test_concurrent_requests_of_one_user_are_all_counted(redis_cache):
    """40 threads x 5 requests at a limit of 120: exactly 120 pass (DRF's get-then-set of the whole log
    lets concurrent requests overwrite each other's entries, so more would)."""
    allowed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(40)

    def user():
        start.wait()
        for _ in range(5):
            throttle = UserRateThrottle()
            throttle.rate = "120/minute"
            throttle.num_requests, throttle.duration = 120, 60
            ok = throttle.allow_request(user_request(pk=9), None)
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=user) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(allowed) == 200
    assert allowed.count(True) == 120


def test_requests_go_through_with_a_warning_when_redis_is_down(settings, alice, caplog):
    """Failing open: the API keeps answering (reads, closes) when the throttle's cache is down."""
    from django.core.cache import caches
    from django.core.cache.backends.redis import RedisCache

    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens on port 1
                                   "OPTIONS": {"socket_connect_timeout": 0.2}}}
    assert isinstance(caches["default"], RedisCache)
    with caplog.at_level("WARNING", logger="api.throttling"):
        r = alice.api.get("/api/v1/symbols/")
    assert r.status_code == 200
    assert [(rec.getMessage(), rec.error) for rec in caplog.records if rec.name == "api.throttling"] == [
        ("throttle not applied: the cache is unreachable", "ConnectionError")]
