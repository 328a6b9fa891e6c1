"""A local fake of Binance spot REST on 127.0.0.1 (random port), serving recorded real bodies.

Defaults (bodies from ``tests/data/binance/``):

- ``GET /api/v3/ticker/bookTicker?symbols=[…]`` — the recorded quotes of BTCUSDT, BLZETH,
  LRCBTC, NKNUSDT; any other symbol in the list → HTTP 400 ``-1121`` (as Binance does).
- ``GET /api/v3/exchangeInfo?symbols=[…]`` — the recorded NOTIONAL-era entries of BTCUSDT,
  ETHUSDT, ADAUSDT; unknown symbol → ``-1121``.
- ``GET /api/v3/time``, ``GET /api/v3/account`` — recorded answers.
- ``POST /api/v3/order`` — a FULL answer in the doc example's field set, FILLED in one fill at
  the recorded bid (SELL) / ask (BUY); remembered by client order id.
- ``GET /api/v3/order?origClientOrderId=…`` — the remembered order, or HTTP 400 ``-2013``.

``script(method, path, …)`` queues scripted answers (status, body, headers, delay) that win
over the defaults. Every request is recorded (:class:`Recorded`), including whether its HMAC
signature matches ``secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "binance"
API_KEY = "fake-api-key-ABCDEF0123456789"
API_SECRET = "fake-secret-DO-NOT-LEAK-9f8e7d6c5b4a"


def load(name: str) -> Any:
    """A recorded body from ``tests/data/binance/`` (parsed JSON)."""
    return json.loads((DATA_DIR / name).read_text())


@dataclass
class Recorded:
    """One request as the fake received it. ``query``/``form`` are decoded single values."""

    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    raw_query: str
    raw_body: str
    headers: dict[str, str]
    signature_valid: bool | None  # None when the request carries no signature

    @property
    def params(self) -> dict[str, str]:
        return {**self.query, **self.form}


@dataclass
class Scripted:
    status: int = 200
    body: Any = None  # dict/list → JSON; str/bytes sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    times: int | None = 1  # None: until cleared


class FakeBinance:
    """The server. Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(self, secret: str = API_SECRET) -> None:
        self.secret = secret
        self.requests: list[Recorded] = []
        self.orders: dict[str, dict] = {}
        self._scripts: dict[tuple[str, str], list[Scripted]] = {}
        self._lock = threading.Lock()
        self._next_order_id = 1000
        quotes = [load("bookTicker_BTCUSDT_2021-10.json")]
        quotes += load("bookTicker_array_BLZETH_LRCBTC_NKNUSDT_DERIVED_from_ws_2021-10-12.json")
        self.quotes = {q["symbol"]: q for q in quotes}
        self.exchange_info = load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")
        self.delays: dict[tuple[str, str], float] = {}  # (method, path) -> seconds before the default answer
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def url(self) -> str:
        """The REST base to give python-binance (``API_URL``), e.g. ``http://127.0.0.1:5555/api``."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/api"

    def start(self) -> "FakeBinance":
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-binance", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeBinance":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- scripting
    def script(
        self,
        method: str,
        path: str,
        *,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        times: int | None = 1,
    ) -> None:
        """Queue an answer for ``method path`` (e.g. ``"POST", "/api/v3/order"``), used ``times`` times."""
        with self._lock:
            self._scripts.setdefault((method.upper(), path), []).append(
                Scripted(status=status, body=body, headers=dict(headers or {}), delay=delay, times=times)
            )

    def script_error(self, method: str, path: str, status: int, code: int, msg: str = "", **kw: Any) -> None:
        """Queue a Binance ``{code, msg}`` error answer."""
        self.script(method, path, status=status, body={"code": code, "msg": msg}, **kw)

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """Recorded requests, optionally filtered."""
        return [
            r for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)
        ]

    def _take_script(self, method: str, path: str) -> Scripted | None:
        with self._lock:
            queue = self._scripts.get((method, path))
            if not queue:
                return None
            item = queue[0]
            if item.times is not None:
                item.times -= 1
                if item.times <= 0:
                    queue.pop(0)
            return item

    # -- default behaviour
    def _default(self, rec: Recorded) -> tuple[int, Any]:
        p = rec.params
        route = (rec.method, rec.path)
        if route == ("GET", "/api/v3/time"):
            return 200, {"serverTime": int(time.time() * 1000)}
        if route == ("GET", "/api/v3/ticker/bookTicker"):
            wanted = json.loads(p["symbols"]) if "symbols" in p else list(self.quotes)
            if any(s not in self.quotes for s in wanted):
                return 400, {"code": -1121, "msg": "Invalid symbol."}
            return 200, [self.quotes[s] for s in wanted]
        if route == ("GET", "/api/v3/exchangeInfo"):
            known = {s["symbol"]: s for s in self.exchange_info["symbols"]}
            wanted = json.loads(p["symbols"]) if "symbols" in p else list(known)
            if any(s not in known for s in wanted):
                return 400, {"code": -1121, "msg": "Invalid symbol."}
            return 200, {"timezone": "UTC", "serverTime": int(time.time() * 1000), "symbols": [known[s] for s in wanted]}
        if route == ("GET", "/api/v3/account"):
            return 200, load("account_spot_LTC_ETH.json")
        if route == ("POST", "/api/v3/order"):
            return self._new_order(p)
        if route == ("GET", "/api/v3/order"):
            order = self.orders.get(p.get("origClientOrderId", ""))
            if order is None or order["symbol"] != p.get("symbol"):
                return 400, {"code": -2013, "msg": "Order does not exist."}
            get_shape = {k: v for k, v in order.items() if k not in ("fills", "transactTime")}
            get_shape.update(time=order["transactTime"], updateTime=order["transactTime"], isWorking=True)
            return 200, get_shape
        return 404, "<html><body>404 Not Found</body></html>"

    def _new_order(self, p: dict[str, str]) -> tuple[int, Any]:
        for name in ("symbol", "side", "type", "quantity", "timestamp", "signature"):
            if not p.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
        quote = self.quotes.get(p["symbol"])
        if quote is None:
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        price = quote["bidPrice"] if p["side"] == "SELL" else quote["askPrice"]
        qty = Decimal(p["quantity"])
        quote_qty = Decimal(price) * qty
        with self._lock:
            self._next_order_id += 1
            order_id = self._next_order_id
        now_ms = int(time.time() * 1000)
        order = {
            "symbol": p["symbol"],
            "orderId": order_id,
            "orderListId": -1,
            "clientOrderId": p.get("newClientOrderId") or f"fake{order_id}",
            "transactTime": now_ms,
            "price": "0.00000000",
            "origQty": f"{qty:.8f}",
            "executedQty": f"{qty:.8f}",
            "origQuoteOrderQty": "0.00000000",
            "cummulativeQuoteQty": f"{quote_qty:.8f}",
            "status": "FILLED",
            "timeInForce": "GTC",
            "type": p["type"],
            "side": p["side"],
            "workingTime": now_ms,
            "selfTradePreventionMode": "NONE",
            "fills": [
                {
                    "price": price,
                    "qty": f"{qty:.8f}",
                    "commission": f"{(quote_qty * Decimal('0.001')):.8f}",
                    "commissionAsset": "USDT",
                    "tradeId": order_id * 10,
                }
            ],
        }
        self.orders[order["clientOrderId"]] = order
        return 200, order

    def _verify(self, raw_query: str, raw_body: str) -> bool | None:
        total = "&".join(x for x in (raw_query, raw_body) if x)
        if "signature=" not in total:
            return None
        head, _, sig = total.rpartition("&signature=")
        expected = hmac.new(self.secret.encode(), head.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, sig)


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeBinance
    protocol_version = "HTTP/1.0"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _handle(self) -> None:
        fake = self.server_fake
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length).decode() if length else ""
        rec = Recorded(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            form=dict(parse_qsl(raw_body, keep_blank_values=True)),
            raw_query=parts.query,
            raw_body=raw_body,
            headers={k: v for k, v in self.headers.items()},
            signature_valid=fake._verify(parts.query, raw_body),
        )
        with fake._lock:
            fake.requests.append(rec)
        scripted = fake._take_script(rec.method, rec.path)
        headers: dict[str, str] = {}
        if scripted is not None:
            if scripted.delay:
                time.sleep(scripted.delay)
            status, body, headers = scripted.status, scripted.body, scripted.headers
        else:
            if fake.delays.get((rec.method, rec.path)):
                time.sleep(fake.delays[(rec.method, rec.path)])
            status, body = fake._default(rec)
        if isinstance(body, (dict, list)):
            payload, ctype = json.dumps(body).encode(), "application/json;charset=UTF-8"
        elif isinstance(body, bytes):
            payload, ctype = body, "text/html"
        else:
            payload, ctype = (body or "").encode(), "text/html"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    do_GET = do_POST = do_DELETE = do_PUT = _handle


@pytest.fixture
def fake_binance():
    """A running :class:`FakeBinance`, stopped after the test."""
    with FakeBinance() as fake:
        yield fake
