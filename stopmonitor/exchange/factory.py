"""Build the configured exchange adapter (``settings.EXCHANGE_VENUE``).

``binance``/``binance-testnet`` → :class:`~stopmonitor.exchange.binance.BinanceExchange`
(python-binance is imported only then); ``replay`` → recorded real prices with the replay
position kept in Django's cache; ``paper`` → an empty in-memory book. Staging/production
never fall back to paper silently: ``config.env`` refuses a missing Binance configuration.
"""

from __future__ import annotations

from django.conf import settings

from stopmonitor.exchange.base import ProtectionPort, port_members


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


def build_account_exchange(venue: str, api_key: str, secret: str, key_type: str = "HMAC"):
    """The adapter for one tenant's exchange account (``venue`` binance/binance-testnet).

    ``secret`` is the HMAC secret, or the Ed25519 private key (PEM) when ``key_type`` is
    ``ED25519`` (passed to the adapter as ``private_key``). The ban horizon and the clock offset
    are the venue's (shared by every account: Binance counts request weight per IP). Built lazily
    like the default adapter. Raises ``ValueError`` on a venue that has no accounts, or when the key
    or the secret is empty (a LazyBinance without a key signs with the environment's: never for a tenant).
    """
    if venue not in ("binance", "binance-testnet"):
        raise ValueError(f"exchange accounts trade on binance or binance-testnet, not {venue!r}")
    if not api_key or not secret:  # never the environment's keys for a tenant's account
        raise ValueError("an exchange account needs its own API key and secret (or private key)")
    return LazyBinance(venue, api_key=api_key, secret=secret, key_type=key_type)


class LazyBinance:
    """The Binance adapter, built (and python-binance imported, ~0.5 s) on first use only.

    A pass with nothing to watch never pays for the import. ``venue`` and ``clock()`` answer
    without building it. Without ``api_key`` it signs with the environment's keys (the default
    account); the key and secret never appear in its repr.
    """

    def __init__(self, venue: str, *, api_key: str | None = None, secret: str | None = None, key_type: str = "HMAC"):
        self.venue = venue
        self._real = None
        self._credentials = (api_key, secret, key_type) if api_key else None

    def __repr__(self) -> str:
        return f"LazyBinance(venue={self.venue!r}, account={'own' if self._credentials else 'default'})"

    def clock(self):
        from datetime import datetime, timezone

        return datetime.now(timezone.utc)

    def _build(self):
        if self._real is None:
            from stopmonitor.exchange.binance import BinanceExchange

            if self._credentials:  # a tenant's account signs with its own key only, never the deployment's
                api_key, secret, key_type = self._credentials
                hmac_secret, private_key, passphrase = (None, secret, None) if key_type == "ED25519" else (secret, None, None)
            else:
                api_key, hmac_secret = settings.BINANCE_API_KEY, settings.BINANCE_API_SECRET
                private_key = getattr(settings, "BINANCE_PRIVATE_KEY", None)
                passphrase = getattr(settings, "BINANCE_PRIVATE_KEY_PASSPHRASE", None)
            self._real = BinanceExchange(
                api_key,
                hmac_secret,
                testnet=self.venue == "binance-testnet",
                api_url=settings.BINANCE_API_URL,
                timeout=settings.BINANCE_TIMEOUT_SECONDS,
                private_key=private_key,
                private_key_passphrase=passphrase,
                recv_window_ms=getattr(settings, "BINANCE_RECV_WINDOW_MS", 5000),
            )
        return self._real

    # every call of the port (stopmonitor.exchange.base.ProtectionPort), read from the protocol, less what
    # this wrapper answers itself (venue, clock), plus the adapter's own close/state/key_type
    _PORT = (port_members(ProtectionPort) - {"venue", "clock"}) | frozenset({"close", "state", "key_type"})

    def __getattr__(self, name):
        if name not in self._PORT:  # e.g. the command asking for a replay's `advance`: no build for that
            raise AttributeError(name)
        return getattr(self._build(), name)
