"""``monitor_stops --stream``: parse the stream's settings, build the exchange and the signer, run the loop.

Exit 0 after SIGTERM/SIGINT (in-flight closes finish first); 1 with one line on a bad
configuration (no Binance venue, unreadable key, bad port).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from django.core.management.base import CommandError

SWITCH_INTERVAL_SECONDS = 0.001
VENUE_URLS = {  # Binance "WebSocket Streams" and "WebSocket API", General information
    "binance": ("wss://stream.binance.com:443", "wss://ws-api.binance.com:443/ws-api/v3"),
    "binance-testnet": ("wss://stream.testnet.binance.vision", "wss://ws-api.testnet.binance.vision/ws-api/v3"),
}


def config_from_settings(venue: str, *, user_stream: bool = True):
    """A :class:`~stopmonitor.stream.runner.StreamConfig` from ``settings.STREAM`` and the URL settings."""
    from django.conf import settings

    from .runner import StreamConfig

    s = settings.STREAM
    stream_url, ws_api_url = VENUE_URLS[venue]
    if s["STREAMS_PER_CONNECTION"] < 1 or s["STREAMS_PER_CONNECTION"] > 1024:
        raise CommandError("STREAM_STREAMS_PER_CONNECTION must be between 1 and 1024 (Binance's limit per connection)")
    for name in ("SILENCE_SECONDS", "HOLD_DOWN_SECONDS", "FALLBACK_INTERVAL_SECONDS", "WATCHED_POLL_SECONDS",
                 "MAX_CONNECTION_AGE_SECONDS"):
        if s[name] <= 0:
            raise CommandError(f"STREAM_{name} must be a positive number of seconds")
    if s["MAX_CONNECTION_AGE_SECONDS"] >= 24 * 3600:
        raise CommandError("STREAM_MAX_CONNECTION_AGE_SECONDS must be below 86400 (Binance closes connections at 24 h)")
    return StreamConfig(
        stream_url=settings.BINANCE_STREAM_URL or stream_url,
        ws_api_url=(settings.BINANCE_WS_API_URL or ws_api_url) if user_stream else None,
        silence_seconds=s["SILENCE_SECONDS"],
        hold_down_seconds=s["HOLD_DOWN_SECONDS"],
        fallback_interval=s["FALLBACK_INTERVAL_SECONDS"],
        watched_poll=s["WATCHED_POLL_SECONDS"],
        max_connection_age=s["MAX_CONNECTION_AGE_SECONDS"],
        streams_per_connection=s["STREAMS_PER_CONNECTION"],
        workers=max(1, s["WORKERS"]),
        retry_cooldown=s["RETRY_COOLDOWN_SECONDS"],
        reconcile_after=settings.STOPMONITOR.get("RECONCILE_AFTER_SECONDS", 30),
        progress_file=s["PROGRESS_FILE"] or None,
    )


def build_signer():
    """Ed25519 (``BINANCE_PRIVATE_KEY``/``_FILE``) when configured, else HMAC with the API secret."""
    from django.conf import settings

    from .signing import Signer

    try:
        return Signer(settings.BINANCE_API_KEY or "", private_key_pem=settings.BINANCE_PRIVATE_KEY,
                      passphrase=settings.BINANCE_PRIVATE_KEY_PASSPHRASE, secret=settings.BINANCE_API_SECRET)
    except ValueError as exc:
        raise CommandError(f"user data stream: {exc}") from None


def run(command, opts) -> None:
    """Run stream mode until SIGTERM/SIGINT."""
    from django.conf import settings

    from stopmonitor.exchange.factory import build_exchange

    from .runner import StreamMonitor

    venue = opts.get("venue") or settings.EXCHANGE_VENUE
    if venue not in VENUE_URLS:
        raise CommandError(f"--stream needs a Binance venue (binance or binance-testnet), not {venue}")
    if opts.get("loop") or opts.get("dry_run") or opts.get("max_passes"):
        raise CommandError("--stream cannot be combined with --loop, --dry-run or --max-passes")
    port = opts.get("metrics_port") or 0
    if not 0 <= port <= 65535:
        raise CommandError("--metrics-port must be between 1 and 65535 (0 = off)")
    user_stream = not opts.get("no_user_stream")
    config = config_from_settings(venue, user_stream=user_stream)
    signer = build_signer() if user_stream else None
    if port:
        from stopmonitor.metrics import serve

        serve(port)
    persistent_connections()
    # the event loop and the worker threads share the GIL: a close waiting on PostgreSQL gets it
    # back within 1 ms instead of the default 5 ms per query while quotes keep arriving
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    monitor = StreamMonitor(lambda: build_exchange(venue), config, signer)
    asyncio.run(_main(monitor))


def persistent_connections() -> None:
    """Keep each worker thread's database connection between jobs (a long-running process: no
    PostgreSQL backend start per quote that crosses). A connection that saw an error is checked
    and replaced before the next job (``CONN_HEALTH_CHECKS``; :func:`django.db.close_old_connections`
    in :mod:`.engine_port`). Must run before the first query.

    On PostgreSQL the close's statements are prepared on the server after
    ``STREAM_PREPARE_THRESHOLD`` executions (psycopg's ``prepare_threshold``; Django turns them
    off by default for transaction poolers, which the stream's own connections do not go
    through): each crossing then skips ~40 parses and plans before its order. 0 keeps them off."""
    from django.conf import settings
    from django.db import connections

    threshold = settings.STREAM.get("PREPARE_THRESHOLD", 0)
    for alias in connections:
        for conf in (settings.DATABASES[alias], connections.settings[alias]):
            conf["CONN_MAX_AGE"] = None
            conf["CONN_HEALTH_CHECKS"] = True
            if threshold > 0 and conf.get("ENGINE") == "django.db.backends.postgresql":
                conf.setdefault("OPTIONS", {})["prepare_threshold"] = threshold


async def _main(monitor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await monitor.run(stop)
