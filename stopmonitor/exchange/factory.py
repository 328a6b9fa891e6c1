"""Build the configured exchange adapter (``settings.EXCHANGE_VENUE``).

``binance``/``binance-testnet`` → :class:`~stopmonitor.exchange.binance.BinanceExchange`
(python-binance is imported only then); ``replay`` → recorded real prices with the replay
position kept in Django's cache; ``paper`` → an empty in-memory book. Staging/production
never fall back to paper silently: ``config.env`` refuses a missing Binance configuration.
"""

from __future__ import annotations

from django.conf import settings


def build_exchange(venue: str | None = None):
    """Return the adapter for ``venue`` (default: the configured one). Raises ``ValueError`` on an unknown venue."""
    venue = venue or settings.EXCHANGE_VENUE
    if venue in ("binance", "binance-testnet"):
        return LazyBinance(venue)
    if venue == "replay":
        from django.core.cache import cache

        from stopmonitor.exchange.replay import ReplayExchange

        return ReplayExchange(cursor_store=cache)
    if venue == "paper":
        from stopmonitor.exchange.paper import PaperExchange

        return PaperExchange()
    raise ValueError(f"unknown exchange venue {venue!r}")


class LazyBinance:
    """The Binance adapter, built (and python-binance imported, ~0.5 s) on first use only.

    A pass with nothing to watch never pays for the import. ``venue`` and ``clock()`` answer
    without building it.
    """

    def __init__(self, venue: str):
        self.venue = venue
        self._real = None

    def clock(self):
        from datetime import datetime, timezone

        return datetime.now(timezone.utc)

    def _build(self):
        if self._real is None:
            from stopmonitor.exchange.binance import BinanceExchange

            self._real = BinanceExchange(
                settings.BINANCE_API_KEY,
                settings.BINANCE_API_SECRET,
                testnet=self.venue == "binance-testnet",
                api_url=settings.BINANCE_API_URL,
                timeout=settings.BINANCE_TIMEOUT_SECONDS,
            )
        return self._real

    _PORT = frozenset({"book_tickers", "symbol_filters", "free_balances", "place_market_order", "get_order", "close",
                       "state"})

    def __getattr__(self, name):
        if name not in self._PORT:  # e.g. the command asking for a replay's `advance`: no build for that
            raise AttributeError(name)
        return getattr(self._build(), name)
