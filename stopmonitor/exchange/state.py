"""What the Binance adapter must remember between CronJob pods: ban horizon, clock offset, filters.

Two implementations of one small interface (:class:`ExchangeState`):

- :class:`CacheState` — Django's default cache (Redis in production, shared by every pod;
  a file cache on one machine). Keys are prefixed ``stopmonitor:binance:<venue>:``.
- :class:`MemoryState` — a dict, for tests and one-off scripts.

Values are plain JSON-able data (ISO datetimes, ints, the raw exchangeInfo symbol entry), so a
new release can read what an old one wrote. This module never imports python-binance.
"""

from __future__ import annotations

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


class CacheState:
    """:class:`ExchangeState` on Django's cache (``django.core.cache.caches[alias]``).

    ``prefix`` defaults to ``stopmonitor:binance:``; :class:`BinanceExchange` adds the venue
    (``binance`` or ``binance-testnet``) so a testnet ban never blocks the live venue.
    Cache errors propagate (a pod that cannot read the ban horizon must not call Binance).
    """

    def __init__(self, prefix: str = "stopmonitor:binance:", alias: str = "default") -> None:
        self.prefix = prefix
        self.alias = alias

    @property
    def _cache(self):
        from django.core.cache import caches

        return caches[self.alias]

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get_no_calls_until(self) -> datetime | None:
        raw = self._cache.get(self._key("no_calls_until"))
        return datetime.fromisoformat(raw) if raw else None

    def set_no_calls_until(self, until: datetime) -> None:
        until = _later(self.get_no_calls_until(), until.astimezone(timezone.utc))
        remaining = (until - datetime.now(timezone.utc)).total_seconds()
        # Keep the key a little past the horizon; never let it expire before it.
        self._cache.set(self._key("no_calls_until"), until.isoformat(), timeout=max(1, int(remaining) + 60))

    def get_time_offset_ms(self) -> int | None:
        raw: Any = self._cache.get(self._key("time_offset_ms"))
        return int(raw) if raw is not None else None

    def set_time_offset_ms(self, offset_ms: int) -> None:
        self._cache.set(self._key("time_offset_ms"), int(offset_ms), timeout=None)

    def get_symbol_info(self, symbol: str) -> dict | None:
        return self._cache.get(self._key(f"symbol:{symbol}"))

    def set_symbol_info(self, symbol: str, info: dict, ttl_seconds: int = FILTERS_TTL_SECONDS) -> None:
        self._cache.set(self._key(f"symbol:{symbol}"), info, timeout=ttl_seconds)
