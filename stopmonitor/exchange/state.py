"""What the Binance adapter must remember between CronJob pods: ban horizon, clock offset, filters.

Two implementations of one small interface (:class:`ExchangeState`):

- :class:`CacheState` — Django's default cache (Redis in production, shared by every pod;
  a file cache on one machine). Keys are prefixed ``stopmonitor:binance:<venue>:``. Redis is
  a shared cache, not a dependency of protection: when the cache fails, this process goes on
  with what it remembers (a process-memory copy written through on every set) and says so
  (:func:`shared_cache_degraded`), instead of failing the pass (issue #12 item 11).
- :class:`MemoryState` — a dict, for tests and one-off scripts.

Values are plain JSON-able data (ISO datetimes, ints, the raw exchangeInfo symbol entry), so a
new release can read what an old one wrote. This module never imports python-binance.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

#: exchangeInfo entries are kept this long (seconds); invariant 9 "exchangeInfo cached".
FILTERS_TTL_SECONDS = 3600


@runtime_checkable
class ExchangeState(Protocol):
    """Persistence for the adapter's cross-process memory. All datetimes are aware UTC."""

    def get_no_calls_until(self) -> datetime | None:
        """The UTC time before which no request may be sent (429/418 ``Retry-After``), or None."""

    def set_no_calls_until(self, until: datetime) -> None:
        """Record a ban horizon; an earlier horizon never shortens a later one already stored."""

    def get_time_offset_ms(self) -> int | None:
        """Server time minus local time in milliseconds (from ``GET /api/v3/time``), or None."""

    def set_time_offset_ms(self, offset_ms: int) -> None:
        """Store the server-time offset (milliseconds)."""

    def get_symbol_info(self, symbol: str) -> dict | None:
        """The raw exchangeInfo ``symbols[]`` entry for ``symbol`` if cached and fresh, else None."""

    def set_symbol_info(self, symbol: str, info: dict, ttl_seconds: int = FILTERS_TTL_SECONDS) -> None:
        """Cache one raw exchangeInfo ``symbols[]`` entry for ``ttl_seconds``."""


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


class MemoryState:
    """In-process :class:`ExchangeState` (tests; share one instance to simulate two pods)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._no_calls_until: datetime | None = None
        self._offset_ms: int | None = None
        self._symbols: dict[str, tuple[float, dict]] = {}

    def get_no_calls_until(self) -> datetime | None:
        return self._no_calls_until

    def set_no_calls_until(self, until: datetime) -> None:
        with self._lock:
            self._no_calls_until = _later(self._no_calls_until, until)

    def get_time_offset_ms(self) -> int | None:
        return self._offset_ms

    def set_time_offset_ms(self, offset_ms: int) -> None:
        self._offset_ms = int(offset_ms)

    def get_symbol_info(self, symbol: str) -> dict | None:
        entry = self._symbols.get(symbol)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def set_symbol_info(self, symbol: str, info: dict, ttl_seconds: int = FILTERS_TTL_SECONDS) -> None:
        self._symbols[symbol] = (time.monotonic() + ttl_seconds, info)


log = logging.getLogger("stopmonitor.exchange.state")
# how long a symbol entry read from the shared cache is answered from this process's memory
SHARED_COPY_SECONDS = 60
_fallbacks: dict[str, MemoryState] = {}
_fallback_lock = threading.Lock()
_degraded_since: float | None = None


def shared_cache_degraded() -> float | None:
    """Monotonic time since which this process runs on its memory copy (the cache failed), else None."""
    return _degraded_since


def _memory_for(prefix: str) -> MemoryState:
    with _fallback_lock:
        return _fallbacks.setdefault(prefix, MemoryState())


class CacheState:
    """:class:`ExchangeState` on Django's cache (``django.core.cache.caches[alias]``).

    ``prefix`` defaults to ``stopmonitor:binance:``; :class:`BinanceExchange` adds the venue
    (``binance`` or ``binance-testnet``) so a testnet ban never blocks the live venue.

    Every value set is also kept in process memory (one :class:`MemoryState` per prefix). A
    cache error (Redis down, wrong password) is logged once per outage and answered from that
    memory; a ban horizon read falls back to the later of the two, so a ban this process saw is
    honoured even when the cache is gone. The cache is tried again on every call.
    """

    def __init__(self, prefix: str = "stopmonitor:binance:", alias: str = "default") -> None:
        self.prefix = prefix
        self.alias = alias
        self.memory = _memory_for(prefix)

    def _try(self, what: str, fn, fallback):
        global _degraded_since
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - any cache backend error: go on from memory
            if _degraded_since is None:
                _degraded_since = time.monotonic()
                log.warning("shared cache unavailable; using this process's memory",
                            extra={"operation": what, "error": type(exc).__name__})
            return fallback()
        if _degraded_since is not None:
            _degraded_since = None
            log.warning("shared cache available again", extra={"operation": what})
        return value

    @property
    def _cache(self):
        from django.core.cache import caches

        return caches[self.alias]

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get_no_calls_until(self) -> datetime | None:
        raw = self._try("get no_calls_until", lambda: self._cache.get(self._key("no_calls_until")), lambda: None)
        shared = datetime.fromisoformat(raw) if raw else None
        mine = self.memory.get_no_calls_until()
        return mine if shared is None else _later(mine, shared)

    def set_no_calls_until(self, until: datetime) -> None:
        until = _later(self.get_no_calls_until(), until.astimezone(timezone.utc))
        self.memory.set_no_calls_until(until)
        remaining = (until - datetime.now(timezone.utc)).total_seconds()
        # Keep the key a little past the horizon; never let it expire before it.
        self._try("set no_calls_until", lambda: self._cache.set(
            self._key("no_calls_until"), until.isoformat(), timeout=max(1, int(remaining) + 60)), lambda: None)

    def get_time_offset_ms(self) -> int | None:
        raw: Any = self._try("get time_offset_ms", lambda: self._cache.get(self._key("time_offset_ms")),
                             self.memory.get_time_offset_ms)
        return int(raw) if raw is not None else None

    def set_time_offset_ms(self, offset_ms: int) -> None:
        self.memory.set_time_offset_ms(offset_ms)
        self._try("set time_offset_ms", lambda: self._cache.set(self._key("time_offset_ms"), int(offset_ms), timeout=None),
                  lambda: None)

    def get_symbol_info(self, symbol: str) -> dict | None:
        """This process's copy while it is fresh (what it fetched itself: the entry's own TTL; what it
        read from the shared cache: ``SHARED_COPY_SECONDS``), else the shared cache's entry. A close
        reads its symbol's filters before its order: a round trip to the cache fewer on that path."""
        mine = self.memory.get_symbol_info(symbol)
        if mine is not None:
            return mine
        shared = self._try("get symbol", lambda: self._cache.get(self._key(f"symbol:{symbol}")), lambda: None)
        if shared is not None:
            self.memory.set_symbol_info(symbol, shared, SHARED_COPY_SECONDS)
        return shared

    def set_symbol_info(self, symbol: str, info: dict, ttl_seconds: int = FILTERS_TTL_SECONDS) -> None:
        self.memory.set_symbol_info(symbol, info, ttl_seconds)
        self._try("set symbol", lambda: self._cache.set(self._key(f"symbol:{symbol}"), info, timeout=ttl_seconds),
                  lambda: None)


def ban_horizon(venue: str) -> datetime | None:
    """The stored no-calls-until time of ``venue`` (shared cache, else this process's memory), or None."""
    return CacheState(prefix=f"stopmonitor:binance:{venue}:").get_no_calls_until()
