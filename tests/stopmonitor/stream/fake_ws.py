"""A local fake of Binance's WebSocket servers on 127.0.0.1 (random port), scripted from the test.

- Market streams (``/stream?streams=a@bookTicker/…``, "WebSocket Streams"): combined payloads
  ``{"stream", "data"}``; SUBSCRIBE / UNSUBSCRIBE answered ``{"result": null, "id"}``.
  :meth:`quote` pushes a bookTicker to every connection carrying the symbol, unless the symbol
  (or everything) is muted; :meth:`server_shutdown` sends ``serverShutdown`` then closes;
  :meth:`disconnect` drops every market connection.
- WebSocket API (``/ws-api/v3``): ``userDataStream.subscribe.signature`` checked against the
  Ed25519 public key or the HMAC secret (status 401 ``-1022`` when the signature is wrong);
  :meth:`report` pushes an ``executionReport`` to every subscribed session;
  :meth:`drop_user_streams` closes them.

The server runs on its own event loop in a thread; every method here is called from the test's
thread. ``ticker`` (seconds) re-sends each subscribed symbol's last quote periodically so a feed
that is not muted is never silent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from stopmonitor.stream.signing import signature_payload


class FakeBinanceWs:
    def __init__(self, *, secret: str | None = None, public_key=None, ticker: float | None = 0.2) -> None:
        self.secret = secret
        self.public_key = public_key
        #: more accounts (issue #20): API key -> its HMAC secret (str) or Ed25519 public key
        self.keys: dict[str, object] = {}
        self.subscribed_keys: list[str] = []  # the apiKey of every accepted subscription, in order
        self.ticker = ticker
        self.last: dict[str, dict] = {}  # symbol -> last bookTicker data
        self.muted: set[str] = set()  # symbols, or "*" for everything
        self.market: dict[object, set[str]] = {}  # connection -> symbols
        self.user: set[object] = set()
        self.market_connects = 0
        self.user_connects = 0
        self.control: list[dict] = []  # SUBSCRIBE / UNSUBSCRIBE messages received
        self.api_requests: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._ready = threading.Event()
        self.port = 0
        self._update_id = 1

    # -- lifecycle
    def start(self) -> "FakeBinanceWs":
        self._thread = threading.Thread(target=self._run, name="fake-binance-ws", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "fake WebSocket server did not start"
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, compression=None, max_queue=None) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            ticker = asyncio.ensure_future(self._tick()) if self.ticker else None
            self._ready.set()
            await self._stopped.wait()
            if ticker:
                ticker.cancel()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> "FakeBinanceWs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws-api/v3"

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- scripting (test thread)
    def quote(self, symbol: str, bid: str, ask: str, bid_qty: str = "1.00000000", ask_qty: str = "1.00000000",
              event_ms: int | None = None) -> int:
        """Push one bookTicker; returns to how many connections it went (0 when muted)."""
        return self._call(self._quote(symbol, bid, ask, bid_qty, ask_qty, event_ms))

    def quote_nowait(self, symbol: str, bid: str, ask: str, event_ms: int | None = None) -> None:
        asyncio.run_coroutine_threadsafe(self._quote(symbol, bid, ask, "1", "1", event_ms), self._loop)

    def mute(self, *symbols: str) -> None:
        """Stop delivering ``symbols`` (none given: everything); connections stay open."""
        self.muted |= set(symbols or ("*",))

    def unmute(self) -> None:
        self.muted.clear()

    def disconnect(self) -> None:
        self._call(self._close_all(list(self.market)))

    def server_shutdown(self, close_after: float = 0.5) -> None:
        self._call(self._shutdown(close_after))

    def report(self, event: dict) -> int:
        """Push one user data event (``executionReport`` payload) to every subscribed session."""
        return self._call(self._report(event))

    def drop_user_streams(self) -> None:
        self._call(self._close_all(list(self.user)))

    def subscribed(self) -> set[str]:
        return set().union(*self.market.values()) if self.market else set()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return False

    # -- server side
    async def _handler(self, ws) -> None:
        parts = urlsplit(ws.request.path)
        if parts.path.startswith("/ws-api"):
            await self._api(ws)
        elif parts.path.startswith("/stream"):
            names = parse_qs(parts.query).get("streams", [""])[0]
            await self._market(ws, {n.split("@")[0].upper() for n in names.split("/") if n})
        else:
            await ws.close(1008, "unknown path")

    async def _market(self, ws, symbols: set[str]) -> None:
        self.market[ws] = symbols
        self.market_connects += 1
        try:
            async for raw in ws:
                msg = json.loads(raw)
                self.control.append(msg)
                names = {n.split("@")[0].upper() for n in msg.get("params", [])}
                if msg.get("method") == "SUBSCRIBE":
                    self.market[ws] |= names
                elif msg.get("method") == "UNSUBSCRIBE":
                    self.market[ws] -= names
                await ws.send(json.dumps({"result": None, "id": msg.get("id")}))
        except ConnectionClosed:
            pass
        finally:
            self.market.pop(ws, None)

    async def _quote(self, symbol, bid, ask, bid_qty, ask_qty, event_ms) -> int:
        self._update_id += 1
        data = {"u": self._update_id, "s": symbol, "b": bid, "B": bid_qty, "a": ask, "A": ask_qty}
        if event_ms is not None:
            data["E"] = event_ms
        self.last[symbol] = data
        return await self._push(symbol, data)

    async def _push(self, symbol, data) -> int:
        if "*" in self.muted or symbol in self.muted:
            return 0
        text = json.dumps({"stream": f"{symbol.lower()}@bookTicker", "data": data})
        sent = 0
        for ws, symbols in list(self.market.items()):
            if symbol in symbols:
                try:
                    await ws.send(text)
                    sent += 1
                except ConnectionClosed:
                    pass
        return sent

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.ticker)
            for symbol in set().union(*self.market.values()) if self.market else ():
                data = self.last.get(symbol)
                if data is not None:
                    await self._push(symbol, data)

    async def _close_all(self, connections) -> None:
        for ws in connections:
            await ws.close(1001, "going away")

    async def _shutdown(self, close_after: float) -> None:
        text = json.dumps({"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": int(time.time() * 1000)}})
        victims = list(self.market)
        for ws in victims:
            await ws.send(text)
        for ws in list(self.user):
            await ws.send(json.dumps({"event": {"e": "serverShutdown", "E": int(time.time() * 1000)}}))
            victims.append(ws)
        self._loop.call_later(close_after, lambda: asyncio.ensure_future(self._close_all(victims)))

    async def _api(self, ws) -> None:
        self.user_connects += 1
        try:
            async for raw in ws:
                msg = json.loads(raw)
                self.api_requests.append(msg)
                if msg.get("method") != "userDataStream.subscribe.signature":
                    await ws.send(json.dumps({"id": msg.get("id"), "status": 400,
                                              "error": {"code": -1100, "msg": "unknown method"}}))
                    continue
                if not self._signature_ok(msg.get("params") or {}):
                    await ws.send(json.dumps({"id": msg.get("id"), "status": 401,
                                              "error": {"code": -1022, "msg": "Signature for this request is not valid."}}))
                    continue
                self.user.add(ws)
                self.subscribed_keys.append((msg.get("params") or {}).get("apiKey", ""))
                await ws.send(json.dumps({"id": msg["id"], "status": 200,
                                          "result": {"subscriptionId": len(self.subscribed_keys) - 1}}))
        except ConnectionClosed:
            pass
        finally:
            self.user.discard(ws)

    def _signature_ok(self, params: dict) -> bool:
        payload = signature_payload(params).encode()
        signature = params.get("signature", "")
        account = self.keys.get(params.get("apiKey", ""))
        if isinstance(account, str):
            return hmac.compare_digest(hmac.new(account.encode(), payload, hashlib.sha256).hexdigest(), signature)
        if account is not None:
            try:
                account.verify(base64.b64decode(signature), payload)
                return True
            except Exception:  # noqa: BLE001 - InvalidSignature or bad base64
                return False
        if self.public_key is not None:
            try:
                self.public_key.verify(base64.b64decode(signature), payload)
                return True
            except Exception:  # noqa: BLE001 - InvalidSignature or bad base64
                return False
        if self.secret is not None:
            return hmac.compare_digest(hmac.new(self.secret.encode(), payload, hashlib.sha256).hexdigest(), signature)
        return True

    async def _report(self, event: dict) -> int:
        text = json.dumps({"subscriptionId": 0, "event": event})
        sent = 0
        for ws in list(self.user):
            try:
                await ws.send(text)
                sent += 1
            except ConnectionClosed:
                pass
        return sent


def execution_reports(order: dict, *, first_exec_id: int = 1) -> list[dict]:
    """The ``executionReport`` events Binance pushes for a MARKET order that filled: NEW, then one
    TRADE per fill (the last with status FILLED), shaped as in "User Data Streams", Order Update."""
    now = int(time.time() * 1000)
    base = {"e": "executionReport", "E": now, "s": order["symbol"], "c": order["clientOrderId"], "S": order["side"],
            "o": "MARKET", "f": "GTC", "q": order["origQty"], "p": "0.00000000", "P": "0.00000000",
            "F": "0.00000000", "g": -1, "C": "", "r": "NONE", "i": order["orderId"], "T": order["transactTime"],
            "w": False, "m": False, "M": False, "O": order["transactTime"], "Q": "0.00000000", "V": "NONE"}
    events = [{**base, "x": "NEW", "X": "NEW", "l": "0.00000000", "z": "0.00000000", "L": "0.00000000", "n": "0",
               "N": None, "t": -1, "I": first_exec_id, "Z": "0.00000000", "Y": "0.00000000"}]
    z = 0
    zq = 0
    from decimal import Decimal

    fills = order.get("fills") or []
    for k, fill in enumerate(fills, start=1):
        qty, price = Decimal(fill["qty"]), Decimal(fill["price"])
        z += qty
        zq += qty * price
        events.append({**base, "x": "TRADE", "X": "FILLED" if k == len(fills) else "PARTIALLY_FILLED",
                       "l": fill["qty"], "z": f"{z:.8f}", "L": fill["price"], "n": fill["commission"],
                       "N": fill["commissionAsset"], "t": fill["tradeId"], "I": first_exec_id + k,
                       "Z": f"{zq:.8f}", "Y": f"{qty * price:.8f}"})
    return events
