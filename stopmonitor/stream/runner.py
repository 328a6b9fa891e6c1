"""The stream process: bookTicker connections, the watchdog's REST fallback, the user data stream.

One asyncio event loop does only parsing and the O(1) pre-check (:mod:`.book`); everything
that touches the database or sends a REST request runs in a thread pool through
:mod:`.engine_port` (the pass's own functions), never inside the event loop and never with a
transaction held across network I/O. One job per symbol at a time; a quote that arrives while
its symbol is busy replaces the pending one (the newest bid/ask is what counts).

Connections (Binance "WebSocket Streams"): combined streams ``/stream?streams=…``, at most
``streams_per_connection`` (≤ 1024) per connection, more connections beyond; SUBSCRIBE /
UNSUBSCRIBE as the watched set changes, paced under the 5 incoming messages per second
limit; rolled over (make-before-break) before the 24 h limit and on ``serverShutdown``;
reconnected with exponential back-off; one REST read of the affected symbols after any gap.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Callable

import websockets

from . import engine_port as port
from . import stream_metrics as m
from .book import WatchedBook
from .fills import Reports
from .watchdog import Watchdog

log = logging.getLogger("stopmonitor.stream")

URL_STREAMS = 100  # streams named in the connection URL; the rest are SUBSCRIBEd
SUBSCRIBE_BATCH = 100  # params per SUBSCRIBE / UNSUBSCRIBE message
CONTROL_GAP_SECONDS = 0.25  # ≤ 4 control messages per second per connection (limit: 5)
REPORT_GRACE_SECONDS = 1.0  # a final report whose trades are missing waits this long for them


@dataclass(frozen=True)
class StreamConfig:
    """Stream knobs (``settings.STREAM``; seconds unless named otherwise)."""

    stream_url: str  # e.g. wss://stream.binance.com:443 (443: the egress policy allows HTTPS only)
    ws_api_url: str | None = None  # e.g. wss://ws-api.binance.com:443/ws-api/v3; None: no user data stream
    silence_seconds: float = 10.0
    hold_down_seconds: float = 30.0
    fallback_interval: float = 1.0
    watched_poll: float = 2.0
    max_connection_age: float = 23 * 3600.0
    streams_per_connection: int = 1024
    workers: int = 4
    retry_cooldown: float = 1.0
    reconcile_after: float = 30.0
    progress_file: str | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass
class _Shard:
    """One market stream connection and the symbols it carries."""

    index: int
    symbols: set[str] = field(default_factory=set)
    subscribed: set[str] = field(default_factory=set)  # what the open connection carries
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False


class StreamMonitor:
    """Run with ``await monitor.run(stop)``; ``exchange_factory()`` builds one REST adapter per worker thread."""

    def __init__(self, exchange_factory: Callable[[], object], config: StreamConfig, signer=None,
                 with_accounts: bool = True) -> None:
        self.config = config
        self.signer = signer
        self.with_accounts = with_accounts  # subscribe every enabled exchange account too (issue #20)
        self.account_subscriptions: dict[int, object] = {}  # account id -> subscriptionId, this connection
        self._factory = factory = exchange_factory
        self._local = threading.local()
        self.venue = factory().venue
        self.book = WatchedBook()
        self._fingerprints: dict[str, str] | None = None  # of the watched set last applied
        self._dirty: set[str] = set()  # symbols changed in the book here since (dropped closes): read them again
        self.watchdog = Watchdog(config.silence_seconds, config.hold_down_seconds)
        self.reports = Reports()
        self.shards: list[_Shard] = []
        self._shard_tasks: dict[int, asyncio.Task] = {}
        self._busy: set[str] = set()
        self._pending: dict[str, object] = {}
        self._cooldown: dict[int, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="stream-worker")
        self._stop: asyncio.Event | None = None
        self._messages = 0
        self._last_touch = 0.0
        self._jobs: set[asyncio.Future] = set()
        self.loaded = asyncio.Event()

    # ------------------------------------------------------------------ plumbing
    def _exchange(self):
        ex = getattr(self._local, "exchange", None)
        if ex is None:
            ex = self._local.exchange = self._factory()
        return ex

    async def _in_thread(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, lambda: fn(self._exchange(), *args, **kwargs))
        self._jobs.add(future)
        try:
            return await future
        finally:
            self._jobs.discard(future)

    def _progress(self, now: float | None = None) -> None:
        """Touch the liveness file (at most once a second) and the progress gauge."""
        now = now or time.monotonic()
        if now - self._last_touch < 1.0:
            return
        self._last_touch = now
        m.LAST_PROGRESS.set(time.time())
        if self.config.progress_file:
            try:
                with open(self.config.progress_file, "w") as handle:
                    handle.write(f"{time.time():.3f}\n")
            except OSError:
                log.warning("cannot write the progress file", extra={"path": self.config.progress_file})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._job_done)
        return task

    @staticmethod
    def _job_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("stream job failed", exc_info=task.exception())

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: catch up with one REST pass, then follow the streams.

        On stop, in-flight closes finish (a started close is never abandoned half-way).
        """
        self._stop = stop
        log.info("stream starting", extra={"stream_url": self.config.stream_url,
                                           "user_stream": bool(self.config.ws_api_url and self.signer)})
        tasks = [self._spawn(self._start_pass()), self._spawn(self._poll_watched()), self._spawn(self._watch())]
        if self.config.ws_api_url and self.signer is not None:
            tasks.append(self._spawn(self._user_stream()))
        try:
            await stop.wait()
        finally:
            for t in [*tasks, *self._shard_tasks.values()]:
                t.cancel()
            await asyncio.gather(*tasks, *self._shard_tasks.values(), return_exceptions=True)
            if self._jobs:
                await asyncio.gather(*list(self._jobs), return_exceptions=True)
            self._pool.shutdown(wait=True)
            log.info("stream stopped")

    async def _start_pass(self) -> None:
        """Restart resolves before it decides (invariant 7): one whole REST pass first."""
        try:
            summary = await self._in_thread(port.run_pass)
            m.REST_PASSES.labels("start").inc()
            self._progress()
            log.info("catch-up pass", extra={"watched": summary.watched, "triggered": summary.triggered})
        except Exception as exc:  # noqa: BLE001 - the streams still run; the CronJob sweeps
            log.warning("start pass could not run", extra={"error": str(exc)[:300]})
        freeze_heap()

    # ------------------------------------------------------------------ the watched set
    async def _poll_watched(self) -> None:
        while True:
            await self._poll_once()
            await asyncio.sleep(self.config.watched_poll)

    async def _poll_once(self) -> None:
        """One read of the watched set (what changed since the last one), applied to the book."""
        dirty, self._dirty = self._dirty, set()
        try:
            fingerprints, symbols, watched = await self._in_thread(lambda _ex: self._read_watched(dirty))
        except Exception as exc:  # noqa: BLE001 - a database outage: keep the last set, retry
            self._dirty |= dirty
            log.warning("watched set unavailable", extra={"error": str(exc)[:300]})
            return
        self._apply_watched(watched, symbols, fingerprints)
        if not self.book.symbols:
            self._progress()

    def _read_watched(self, dirty: set[str]) -> tuple[dict[str, str] | None, set[str] | None, list]:
        """In a worker thread: (fingerprints now, the symbols reloaded — None for all —, their
        watched operations). Only the symbols whose fingerprint differs from the last applied
        read, and the ``dirty`` ones (changed in the book here), are loaded; all of them on the
        first read or when the database gives no fingerprints.
        Building 10k watched rows in Python every poll held the GIL for 50–110 ms every 2 s, and
        a close running then waited for it on each of its round trips (bench_stream's p99)."""
        with port.watched_snapshot():  # the fingerprints and the rows loaded: one snapshot
            fingerprints = port.watched_fingerprints()
            if fingerprints is None or self._fingerprints is None:
                return fingerprints, None, port.load_watched()
            changed = dirty | {s for s in fingerprints.keys() | self._fingerprints.keys()
                               if fingerprints.get(s) != self._fingerprints.get(s)}
            return fingerprints, changed, port.load_watched(symbols=changed) if changed else []

    def _apply_watched(self, watched, symbols: set[str] | None = None,
                       fingerprints: dict[str, str] | None = None) -> None:
        """Apply a read of the watched set: all of it (``symbols`` None) or those symbols only."""
        now = time.monotonic()
        self._cooldown = {k: v for k, v in self._cooldown.items() if v > now}
        # an operation we just closed may still be in a set read before the close committed: its
        # symbol's fingerprint differs at the next poll, which reads it again
        added, removed = self.book.replace(watched) if symbols is None else self.book.update(symbols, watched)
        self._fingerprints = fingerprints
        if fingerprints is not None:
            for symbol in self._dirty:  # dropped while this read was on its way: read it again next time
                fingerprints.pop(symbol, None)
        self.watchdog.watch(self.book.symbols, now)
        self._resubscribe(added, removed)
        m.SUBSCRIBED.set(len(self.book.symbols))
        if added:
            self._spawn(self._rest_read(set(added), "catch_up"))  # a new subscription starts with a gap
            self._spawn(self._warm_filters(sorted(added)))
        self.loaded.set()

    def _resubscribe(self, added: set[str], removed: set[str]) -> None:
        """Symbols out of their shard; new ones into the first shard with room (a new shard,
        i.e. connection, beyond ``streams_per_connection``, at most 1024)."""
        for shard in self.shards:
            if shard.symbols & removed:
                shard.symbols -= removed
                shard.changed.set()
        cap = max(1, min(self.config.streams_per_connection, 1024))
        for symbol in sorted(added):
            shard = next((s for s in self.shards if len(s.symbols) < cap), None)
            if shard is None:
                shard = _Shard(len(self.shards))
                self.shards.append(shard)
                self._shard_tasks[shard.index] = self._spawn(self._run_shard(shard))
            shard.symbols.add(symbol)
            shard.changed.set()

    async def _warm_filters(self, symbols: list[str]) -> None:
        """Read the symbols' filters into the adapter's cache now, not on the first close."""
        try:
            await self._in_thread(lambda ex: ex.symbol_filters(symbols))
        except Exception as exc:  # noqa: BLE001 - the close reads them again if need be
            log.warning("symbol filters unavailable", extra={"error": str(exc)[:300]})

    # ------------------------------------------------------------------ market streams
    def _url(self, symbols: list[str]) -> str:
        names = "/".join(f"{s.lower()}@bookTicker" for s in symbols[:URL_STREAMS])
        return f"{self.config.stream_url.rstrip('/')}/stream?streams={names}"

    async def _connect(self, shard: _Shard):
        symbols = sorted(shard.symbols)
        ws = await websockets.connect(self._url(symbols), open_timeout=10, max_queue=4096, compression=None)
        shard.subscribed = set(symbols[:URL_STREAMS])
        await self._sync_subscriptions(shard, ws)
        return ws

    async def _sync_subscriptions(self, shard: _Shard, ws) -> None:
        """SUBSCRIBE what the shard should carry and UNSUBSCRIBE what it no longer should."""
        shard.changed.clear()
        for method, names in (("SUBSCRIBE", sorted(shard.symbols - shard.subscribed)),
                              ("UNSUBSCRIBE", sorted(shard.subscribed - shard.symbols))):
            for i in range(0, len(names), SUBSCRIBE_BATCH):
                batch = names[i:i + SUBSCRIBE_BATCH]
                await ws.send(json.dumps({"method": method, "params": [f"{s.lower()}@bookTicker" for s in batch],
                                          "id": int(time.time() * 1000) % 2**31}))
                if method == "SUBSCRIBE":
                    shard.subscribed |= set(batch)
                else:
                    shard.subscribed -= set(batch)
                await asyncio.sleep(CONTROL_GAP_SECONDS)

    async def _run_shard(self, shard: _Shard) -> None:
        """The shard's connection for ever: idle while it has no symbols, connect (back-off on
        failure), carry it (:meth:`_carry`), then on a disconnect fall back to REST for its
        symbols and reconnect after the back-off; a REST read covers the gap after a reconnect."""
        backoff = self.config.backoff_initial
        first = True
        while True:
            if not shard.symbols:
                shard.changed.clear()
                await shard.changed.wait()
                continue
            try:
                ws = await self._connect(shard)
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as exc:
                m.RECONNECTS.labels("market", "connect_failed").inc()
                log.warning("market stream connect failed", extra={"shard": shard.index, "error": str(exc)[:200],
                                                                   "retry_in_s": round(backoff, 2)})
                backoff = await self._back_off(backoff)
                continue
            reason, heard = await self._carry(shard, ws, after_gap=not first)
            first = False
            if heard:
                backoff = self.config.backoff_initial
            if reason == "no_symbols":  # nothing left to carry: idle until the watched set grows
                first = True
                continue
            m.RECONNECTS.labels("market", reason).inc()
            self.watchdog.force_fallback(shard.symbols)
            log.warning("market stream disconnected", extra={"shard": shard.index, "reason": reason,
                                                            "retry_in_s": round(backoff, 2)})
            backoff = await self._back_off(backoff)

    async def _back_off(self, backoff: float) -> float:
        """Sleep ``backoff`` seconds with jitter (50–100 %); returns the next one (doubled, at most ``backoff_max``)."""
        await asyncio.sleep(backoff * (0.5 + random.random() / 2))
        return min(backoff * 2, self.config.backoff_max)

    async def _carry(self, shard: _Shard, ws, after_gap: bool) -> tuple[str, bool]:
        """Carry the shard on the open ``ws`` (one REST read first when ``after_gap``: the time
        since the previous connection) until it must go: returns (why, whether anything arrived).

        ``rollover`` and ``server_shutdown`` are made before break: the new connection opens before
        the old one closes (a REST read after a ``server_shutdown``); a failed one ends the carry
        as ``<reason>_failed``. The connection it ends with is closed."""
        shard.connected = True
        m.CONNECTIONS.inc()
        if after_gap:
            self._spawn(self._rest_read(set(shard.symbols), "catch_up"))
        heard_any = False
        try:
            while True:
                reason, heard = await self._read(shard, ws, time.monotonic())
                heard_any = heard_any or heard
                if reason not in ("rollover", "server_shutdown"):
                    return reason, heard_any
                m.RECONNECTS.labels("market", reason).inc()
                try:
                    new = await self._connect(shard)
                except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
                    return f"{reason}_failed", heard_any
                await ws.close()
                ws = new
                if reason == "server_shutdown":
                    self._spawn(self._rest_read(set(shard.symbols), "catch_up"))
        finally:
            shard.connected = False
            m.CONNECTIONS.dec()
            await ws.close()

    async def _read(self, shard: _Shard, ws, opened: float) -> tuple[str, bool]:
        """Read until the connection must be replaced; returns (why, whether anything arrived).

        The messages are read by one plain ``async for`` (no timer per message); this coroutine
        supervises it once a second: subscriptions to sync, the connection's age, its silence.
        """
        state = {"heard": False, "reason": "closed"}

        async def reader():
            try:
                async for raw in ws:
                    state["heard"] = True
                    if self._on_market_message(raw, time.monotonic()) == "server_shutdown":
                        state["reason"] = "server_shutdown"
                        return
            except websockets.ConnectionClosed:
                pass

        task = asyncio.ensure_future(reader())
        try:
            while not task.done():
                if shard.changed.is_set():
                    await self._sync_subscriptions(shard, ws)
                if not shard.symbols:
                    return "no_symbols", state["heard"]
                now = time.monotonic()
                if now - opened >= self.config.max_connection_age:
                    return "rollover", state["heard"]
                if now - max(opened, self._last_heard(shard)) > self.config.silence_seconds:
                    return "silent", state["heard"]
                await asyncio.wait([task], timeout=min(1.0, self.config.silence_seconds / 2))
            return state["reason"], state["heard"]
        finally:
            task.cancel()

    def _last_heard(self, shard: _Shard) -> float:
        feeds = [self.watchdog.feeds[s].last_message for s in shard.symbols if s in self.watchdog.feeds]
        return max(feeds, default=0.0)

    def _on_market_message(self, raw, received: float) -> str | None:
        """One market stream message: counted by kind, the feed heard, progress touched; a
        bookTicker of a watched symbol goes on to :meth:`_on_book_ticker`. Returns
        ``"server_shutdown"`` when the connection must be rolled over, else None."""
        try:
            msg = json.loads(raw)
        except ValueError:
            m.MESSAGES.labels("other").inc()
            return None
        data = msg.get("data") if isinstance(msg, dict) else None
        if not isinstance(data, dict):
            m.MESSAGES.labels("other").inc()  # SUBSCRIBE answers {"result": null, "id": …}
            return None
        if data.get("e") == "serverShutdown":
            m.MESSAGES.labels("server_shutdown").inc()
            log.warning("serverShutdown on a market stream: rolling the connection over")
            return "server_shutdown"
        symbol = data.get("s")
        if not symbol or "b" not in data:
            m.MESSAGES.labels("other").inc()
            return None
        _BOOK_TICKER.inc()
        self._messages += 1
        self.watchdog.heard(symbol, received)
        if received - self._last_touch >= 1.0:
            self._progress(received)
        levels = self.book.by_symbol.get(symbol)
        if levels is not None:
            self._on_book_ticker(symbol, levels, data, received)
        return None

    def _on_book_ticker(self, symbol: str, levels, data: dict, received: float) -> None:
        """The hot path's decision for a watched symbol's bookTicker ``data``: a usable bid/ask that
        crosses no level is decided here (only its lag observed); anything else — a level may be
        crossed, or the prices are unusable (bid = ask = 0: the engine records INVALID_PRICE once) —
        becomes a :class:`~.engine_port.Quote` for :meth:`_consider`."""
        event_ms = data.get("E") or data.get("T")
        try:
            bid, ask = Decimal(data["b"]), Decimal(data["a"])
        except (InvalidOperation, KeyError, TypeError):
            bid = ask = Decimal("0")  # unusable: the engine records INVALID_PRICE once
        if 0 < bid <= ask and not levels.may_trigger(bid, ask):  # the common case, decided here
            _QUOTE_LAG.observe(_lag(received, event_ms))
            return
        try:
            bid_qty, ask_qty = Decimal(data.get("B", "0")), Decimal(data.get("A", "0"))
        except (InvalidOperation, TypeError):
            bid_qty = ask_qty = Decimal("0")
        quote = port.Quote(symbol, bid, ask, bid_qty, ask_qty, datetime.now(timezone.utc))
        self._consider(quote, received, event_ms)

    # ------------------------------------------------------------------ decisions
    def _consider(self, quote, received: float, event_ms: int | None = None, *, missing_symbol: str | None = None) -> None:
        """The hot path: O(1) pre-check with the trigger rule; a job only when a level may be crossed."""
        symbol = missing_symbol or quote.symbol
        levels = self.book.by_symbol.get(symbol)
        if levels is None:
            return
        usable = quote is not None and 0 < quote.bid <= quote.ask
        if usable and not levels.may_trigger(quote.bid, quote.ask):
            _QUOTE_LAG.observe(_lag(received, event_ms))
            return
        if symbol in self._busy:
            self._pending[symbol] = (quote, received, event_ms)
            return
        now = time.monotonic()
        ops = [o for o in levels.operations if self._cooldown.get(o.operation_id, 0) <= now]
        if not ops:
            return
        self._busy.add(symbol)
        self._spawn(self._evaluate(symbol, quote, ops, received, event_ms))

    async def _evaluate(self, symbol, quote, ops, received, event_ms) -> None:
        try:
            _QUOTE_LAG.observe(_lag(received, event_ms))
            decisions = await self._in_thread(port.evaluate_quote, symbol, quote, ops)
        except port.PassError as exc:
            log.warning("close could not run", extra={"symbol": symbol, "error": str(exc)[:300]})
            decisions = []
            until = time.monotonic() + self.config.retry_cooldown
            self._cooldown.update({o.operation_id: until for o in ops})
        except Exception:  # noqa: BLE001 - the other symbols must go on
            log.exception("evaluating a quote failed", extra={"symbol": symbol})
            decisions = []
        finally:
            self._busy.discard(symbol)
        until = time.monotonic() + self.config.retry_cooldown
        touched = {d.operation_id for d in decisions if d.operation_id is not None}
        self._cooldown.update({op: until for op in touched})
        closed = {d.operation_id for d in decisions
                  if d.extra.get("operation_status") == "CLOSED" or d.reason == "NOT_ACTIVE"}
        if closed:
            self.book.drop(closed)
            self._dirty.add(symbol)  # the book differs from the last read here: the next poll reads it
        pending = self._pending.pop(symbol, None)
        if pending is not None:
            self._consider(pending[0], pending[1], pending[2], missing_symbol=symbol)

    # ------------------------------------------------------------------ watchdog and REST
    async def _watch(self) -> None:
        """Every second: the silence rule; every ``fallback_interval``: one REST read of the fallen back."""
        last_poll = 0.0
        last_count, last_tick = 0, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.config.fallback_interval))
            now = time.monotonic()
            fell, fallback = self.watchdog.check(now)
            if fell:
                log.warning("stream silent: REST polling these symbols", extra={"symbols": sorted(fell)[:50],
                                                                                "count": len(fell)})
            m.FALLBACK.set(len(fallback))
            m.MESSAGE_RATE.set((self._messages - last_count) / max(now - last_tick, 1e-6))
            last_count, last_tick = self._messages, now
            if fallback and now - last_poll >= self.config.fallback_interval:
                last_poll = now
                await self._rest_read(fallback & self.book.symbols, "fallback")

    async def _rest_read(self, symbols: set[str], reason: str) -> None:
        """One bulk REST best bid/ask for ``symbols``, each evaluated like a stream quote."""
        symbols = symbols & self.book.symbols
        if not symbols:
            return
        received = time.monotonic()
        try:
            quotes, _ = await self._in_thread(lambda ex: port.fetch_quotes(ex, sorted(symbols)))
        except Exception as exc:  # noqa: BLE001 - PassError or a bug: the next tick tries again
            log.warning("REST best bid/ask unavailable", extra={"reason": reason, "error": str(exc)[:300]})
            return
        m.REST_PASSES.labels(reason).inc()
        self._progress()
        for symbol in symbols:
            self._consider(quotes.get(symbol), received, missing_symbol=symbol)

    # ------------------------------------------------------------------ user data stream
    async def _user_stream(self) -> None:
        """``userDataStream.subscribe.signature`` on the WebSocket API; every (re)connect is
        followed by the engine's REST reconcile (now and once the reconcile age has passed)."""
        backoff = self.config.backoff_initial
        while True:
            reason = "closed"
            try:
                async with websockets.connect(self.config.ws_api_url, open_timeout=10, compression=None) as ws:
                    await self._subscribe_user(ws)
                    backoff = self.config.backoff_initial
                    self._schedule_reconcile()
                    opened = time.monotonic()
                    reason = await self._read_user(ws, opened)
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException, _SubscribeRefused) as exc:
                reason = type(exc).__name__
                log.warning("user data stream down", extra={"error": str(exc)[:200], "retry_in_s": round(backoff, 2)})
            m.RECONNECTS.labels("user_data", reason).inc()
            if reason not in ("rollover", "server_shutdown", "terminated"):
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.config.backoff_max)

    async def _subscribe_user(self, ws) -> None:
        request_id = f"uds-{int(time.time() * 1000)}"
        params = self.signer.sign({"timestamp": int(time.time() * 1000)})
        await ws.send(json.dumps({"id": request_id, "method": "userDataStream.subscribe.signature", "params": params}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == request_id:
                if msg.get("status") != 200:
                    error = msg.get("error") or {}
                    raise _SubscribeRefused(f"userDataStream.subscribe.signature refused: {error.get('code')} "
                                            f"{str(error.get('msg'))[:200]}")
                log.info("user data stream subscribed", extra={"subscription_id": msg["result"].get("subscriptionId"),
                                                               "key_type": self.signer.kind})
                break
            if "event" in msg:
                self._on_user_event(msg["event"])
        else:
            raise _SubscribeRefused("no answer to userDataStream.subscribe.signature within 10 s")
        self.account_subscriptions = {}
        if self.with_accounts:
            for account_id, signer in await self._in_thread(lambda _ex: port.account_signers(self.venue)):
                await self._subscribe_account(ws, account_id, signer)

    async def _subscribe_account(self, ws, account_id: int, signer) -> None:
        """One more ``userDataStream.subscribe.signature`` on the same connection, for one exchange
        account (a WebSocket API connection carries many accounts' subscriptions). A refusal or no
        answer leaves that account to the REST reconcile and audit (logged), never the others."""
        request_id = f"uds-{account_id}-{int(time.time() * 1000)}"
        params = signer.sign({"timestamp": int(time.time() * 1000)})
        await ws.send(json.dumps({"id": request_id, "method": "userDataStream.subscribe.signature", "params": params}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == request_id:
                if msg.get("status") == 200:
                    self.account_subscriptions[account_id] = (msg.get("result") or {}).get("subscriptionId")
                    log.info("user data stream subscribed", extra={"account_id": account_id, "key_type": signer.kind})
                else:
                    error = msg.get("error") or {}
                    log.warning("user data stream refused an account", extra={
                        "account_id": account_id, "code": error.get("code"), "error": str(error.get("msg"))[:200]})
                return
            if "event" in msg:
                self._on_user_event(msg["event"])
        log.warning("user data stream: no answer for an account", extra={"account_id": account_id})

    async def _read_user(self, ws, opened: float) -> str:
        while True:
            left = self.config.max_connection_age - (time.monotonic() - opened)
            if left <= 0:
                return "rollover"
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=min(left, 5.0))
            except asyncio.TimeoutError:
                continue  # an account with no activity is quiet; pings keep the connection checked
            except websockets.ConnectionClosed:
                return "closed"
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            event = msg.get("event") if isinstance(msg, dict) else None
            if not isinstance(event, dict):
                continue
            kind = event.get("e")
            if kind == "serverShutdown":
                m.MESSAGES.labels("server_shutdown").inc()
                return "server_shutdown"
            if kind == "eventStreamTerminated":
                return "terminated"
            self._on_user_event(event)

    def _on_user_event(self, event: dict) -> None:
        if event.get("e") != "executionReport":
            m.MESSAGES.labels("other").inc()
            return
        m.MESSAGES.labels("execution_report").inc()
        self._progress()
        cid = event.get("C") if event.get("x") == "CANCELED" and event.get("C") else event.get("c") or ""
        if cid.startswith("sp"):  # an exchange-held protection order (protection.md, step 4)
            self._spawn(self._in_thread(port.protection_report, event))
            return
        if not cid.startswith("sm"):
            return  # not one of our closes: never touched
        tracker, new = self.reports.add(event)
        if not new:
            m.DUPLICATE_REPORTS.inc()
            return
        self._settle(tracker.client_order_id)

    def _settle(self, cid: str, waited: bool = False) -> None:
        tracker = self.reports.orders.get(cid)
        if tracker is None or tracker.resolved or not tracker.final:
            return
        if tracker.complete:
            tracker.resolved = True
            self._spawn(self._record_fill(tracker))
        elif not waited:  # out of order: the missing trade reports may still come
            asyncio.get_running_loop().call_later(REPORT_GRACE_SECONDS, self._settle, cid, True)
        else:  # 0 filled, or trades missing: not proof — the engine's REST reconcile decides
            tracker.resolved = True
            log.info("pushed report is not proof; REST reconcile decides",
                     extra={"execution_token": cid, "status": tracker.status, "executed_qty": str(tracker.cumulative_qty)})
            self._schedule_reconcile()

    async def _record_fill(self, tracker) -> None:
        decision = await self._in_thread(port.record_pushed_fill, tracker.client_order_id, tracker.result())
        if tracker.event_time_ms:
            m.LAG.labels("execution_report").observe(max(0.0, time.time() - tracker.event_time_ms / 1000))
        if decision is not None and decision.extra.get("operation_status") == "CLOSED" and decision.operation_id:
            self.book.drop({decision.operation_id})

    def _schedule_reconcile(self) -> None:
        """REST reconcile now, and again once executions submitted just before are old enough."""
        self._spawn(self._reconcile())
        asyncio.get_running_loop().call_later(self.config.reconcile_after + 1, lambda: self._spawn(self._reconcile()))

    async def _reconcile(self) -> None:
        try:
            await self._in_thread(port.reconcile_due)
        except Exception as exc:  # noqa: BLE001 - the CronJob's pass reconciles too
            log.warning("reconcile could not run", extra={"error": str(exc)[:300]})


_BOOK_TICKER = m.MESSAGES.labels("book_ticker")
_QUOTE_LAG = m.LAG.labels("quote")


class _SubscribeRefused(Exception):
    """The WebSocket API refused (or never answered) the user data stream subscription."""


def freeze_heap() -> None:
    """Move everything alive after start-up (Django, the engine's modules, python-binance, the
    first watched set) out of the garbage collector's reach: a full collection then scans only
    what was allocated since. Measured in ``bench/bench_stream.py``: full collections of 60 ms
    (105 ms at worst) stopped the event loop and a close in flight — the p99 of quote → order."""
    gc.collect()
    gc.freeze()


def _lag(received: float, event_ms) -> float:
    """Seconds from the exchange's event time (when the message has one) or its receipt, to now."""
    if event_ms:
        return max(0.0, time.time() - int(event_ms) / 1000)
    return time.monotonic() - received


def progress_age(path: str) -> float | None:
    """Seconds since the progress file was written, None when it does not exist."""
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return None
