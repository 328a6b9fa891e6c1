"""Per-user throttling: DRF's sliding log, kept in one Redis sorted set changed atomically.

DRF's ``UserRateThrottle`` reads the user's whole log (a pickled list of request times) from the
cache and writes it back on every request: two round trips and a list as long as the requests of
the last period (thousands at a high rate), and two concurrent requests of one user (greenlets,
workers, pods) can each write back a log missing the other's entry, so the throttle undercounts.
"""

from __future__ import annotations

import logging
import os

from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.core.cache.backends.redis import RedisCache
from redis import RedisError
from rest_framework import throttling

log = logging.getLogger("api.throttling")

# KEYS[1]: the user's log (a sorted set: member = one request, score = its time in s)
# ARGV: now, duration (s), allowed requests, member
# returns {1, length} when the request is counted; {0, length, oldest time} when it is refused
_SLIDING_LOG = """
local now = tonumber(ARGV[1])
local duration = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - duration)
local length = redis.call('ZCARD', KEYS[1])
if length >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, length, oldest[2]}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(duration))
return {1, length + 1}
"""


class UserRateThrottle(throttling.UserRateThrottle):
    """``DEFAULT_THROTTLE_RATES["user"]`` (``API_USER_THROTTLE``) requests per user over any period.

    The decision and the ``Retry-After`` are DRF's: entries at or before ``now - duration`` drop out,
    a request is refused when ``num_requests`` remain, and a refused one is not counted. With the
    Redis cache the log is a sorted set under ``<key>:log``, trimmed, counted and appended by one
    Lua script (one round trip whatever the rate; concurrent requests cannot lose each other's
    entries). With another cache (development's file cache, the tests' local memory) DRF's own
    code runs. When Redis cannot be reached, requests are let through (see :meth:`allow_request`).
    """

    def allow_request(self, request, view):
        """Fails open: when the cache cannot be reached the request goes through (a warning is
        logged, and ``/health/ready`` reports the cache), because a trader's read or close must not
        fail for want of a rate counter."""
        try:
            return self._allow_request(request, view)
        except RedisError as exc:
            log.warning("throttle not applied: the cache is unreachable", extra={"error": type(exc).__name__})
            return True

    def _allow_request(self, request, view):
        backend = caches[DEFAULT_CACHE_ALIAS] if self.cache is throttling.default_cache else self.cache
        if self.rate is None or not isinstance(backend, RedisCache):
            return super().allow_request(request, view)
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.now = self.timer()
        client = backend._cache.get_client(write=True)  # Django's Redis client (its connection pool)
        reply = _sliding_log(client)(
            keys=[backend.make_key(f"{self.key}:log")],
            args=[repr(self.now), self.duration, self.num_requests, f"{self.now!r}-{os.urandom(6).hex()}"],
            client=client,
        )
        if int(reply[0]) == 1:
            return True
        # DRF's wait() reads the log's length and its oldest entry (the last one)
        self.history = [float(reply[2])] * int(reply[1])
        return self.throttle_failure()


_script = None


def _sliding_log(client):
    """The Lua script as a redis-py ``Script`` (EVALSHA, loaded on the server the first time)."""
    global _script
    if _script is None:
        _script = client.register_script(_SLIDING_LOG)
    return _script
