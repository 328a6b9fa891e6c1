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

Resting orders (exchange-held protection):

- ``POST /api/v3/order`` with ``type=STOP_LOSS`` rests the stop (NEW; RESULT shape with
  ``stopPrice``); ``-2010`` when the last price is already through it ("would trigger
  immediately") or the free balance is short.
- ``POST /api/v3/orderList/oco`` rests a STOP_LOSS + LIMIT_MAKER list.
- ``POST /api/v3/order/cancelReplace`` (STOP_ON_FAILURE, ONLY_NEW): 200 both done; 400 ``-2022``
  cancel FAILURE / new NOT_ATTEMPTED when the order is not NEW; 409 ``-2021`` cancelled / new
  FAILURE when the new order is refused (e.g. ``-2010`` balance); bodies as Binance's doc.
- ``PUT /api/v3/order/amend/keepPriority``, ``GET /api/v3/openOrders``, ``DELETE /api/v3/order``.
- :meth:`FakeBinance.set_last_price` prints a trade: resting stops reached by it trigger and
  FILL at once at that price (an OCO's other leg EXPIRES); a LIMIT_MAKER leg fills at its price.
- :attr:`FakeBinance.wallet` (``{asset: {"free": D, "locked": D}}``), when set, is what
  ``GET /api/v3/account`` answers and what orders spend: a resting SELL locks its quantity.

``script(method, path, …)`` queues scripted answers (status, body, headers, delay) that win
over the defaults. Every request is recorded (:class:`Recorded`), including whether its HMAC
signature matches the secret of the API key it names.

Accounts (issue #20): :meth:`FakeBinance.add_account` registers an API key with its secret and
its own balances (before any is added, any key is accepted and checked against ``secret``). A
default signed request (``/api/v3/account``, ``/api/v3/order``) is checked
like Binance does: an unknown ``X-MBX-APIKEY`` → HTTP 401 ``-2015``; a signature that does not
match the key's secret → HTTP 400 ``-1022``. An account added with balances answers
``/api/v3/account`` with them, refuses an order it cannot pay for (``-2010`` insufficient
balance) and moves its balances as its orders fill; the built-in key keeps the recorded body.
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
from urllib.parse import parse_qsl, unquote, urlsplit

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

    @property
    def api_key(self) -> str | None:
        """The ``X-MBX-APIKEY`` header (any case), or None."""
        return next((v for k, v in self.headers.items() if k.lower() == "x-mbx-apikey"), None)


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
        self.keys: dict[str, str] = {API_KEY: secret}  # API key -> its secret
        # until an account is added, any key is accepted and checked against ``secret`` (one-key tests)
        self.only_known_keys = False
        self.balances: dict[str, dict[str, Decimal]] = {}  # API key -> asset -> free (accounts with balances)
        self.requests: list[Recorded] = []
        self.orders: dict[str, dict] = {}
        self.order_keys: dict[str, str] = {}  # client order id -> the API key that placed it
        self._scripts: dict[tuple[str, str], list[Scripted]] = {}
        self._lock = threading.Lock()
        self._next_order_id = 1000
        quotes = [load("bookTicker_BTCUSDT_2021-10.json")]
        quotes += load("bookTicker_array_BLZETH_LRCBTC_NKNUSDT_DERIVED_from_ws_2021-10-12.json")
        self.quotes = {q["symbol"]: q for q in quotes}
        self.exchange_info = load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")
        self.clock_offset_ms = 0  # the server's clock ahead of ours (GET /api/v3/time), at the moment it answers
        self.delays: dict[tuple[str, str], float] = {}  # (method, path) -> seconds before the default answer
        #: balances, MARKET orders, trades and evidence faults (see :class:`Account` below)
        self.account = Account(quotes=self.quotes)
        self.public_key = None  # an Ed25519/RSA public key: verify signatures with it instead of the secret
        self.wallet: dict[str, dict[str, Decimal]] | None = None  # None: the recorded account answer
        self.last_prices: dict[str, Decimal] = {}
        self.lists: dict[str, dict] = {}  # listClientOrderId -> order list body
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

    def add_account(self, api_key: str, secret, balances: dict[str, str] | None = None) -> None:
        """Register an account: its key, its secret (or its Ed25519/RSA public key object, for an
        account that signs asymmetrically) and (optionally) its free balances per asset."""
        with self._lock:
            self.keys[api_key] = secret
            self.only_known_keys = True
            if balances is not None:
                self.balances[api_key] = {asset: Decimal(v) for asset, v in balances.items()}

    def revoke(self, api_key: str) -> None:
        """Forget a key: its next signed request is refused with -2015 (a revoked key)."""
        with self._lock:
            self.keys.pop(api_key, None)
            self.only_known_keys = True

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
    SIGNED = frozenset({("GET", "/api/v3/account"), ("POST", "/api/v3/order"), ("GET", "/api/v3/order")})

    def _refuse_credentials(self, rec: Recorded) -> tuple[int, Any] | None:
        """Binance's answer to a signed request with an unknown key or a bad signature, else None."""
        if rec.api_key not in self.keys and (self.only_known_keys or not rec.api_key):
            return 401, {"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."}
        if rec.signature_valid is not True:
            return 400, {"code": -1022, "msg": "Signature for this request is not valid."}
        return None

    def _default(self, rec: Recorded) -> tuple[int, Any]:
        # a registered account key (issue #20) keeps its own balances and orders (below); otherwise the
        # evidence account model answers first
        owned = NOT_MINE if (rec.api_key or "") in self.balances else self.account.route(rec)
        if owned is not NOT_MINE:
            status, body, fate = owned
            if fate is not None and fate.delay:
                time.sleep(fate.delay)  # the order exists; its answer comes too late (timeout after accept)
            return status, body
        p = rec.params
        route = (rec.method, rec.path)
        if route in self.SIGNED:
            refused = self._refuse_credentials(rec)
            if refused is not None:
                return refused
        if route == ("GET", "/api/v3/time"):
            return 200, {"serverTime": int(time.time() * 1000) + self.clock_offset_ms}
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
            own = self.balances.get(rec.api_key or "")
            if own is not None:  # a registered account key (issue #20): its own balances
                return 200, {"accountType": "SPOT", "canTrade": True, "balances": [
                    {"asset": a, "free": f"{v:.8f}", "locked": "0.00000000"} for a, v in sorted(own.items())]}
            return 200, load("account_spot_LTC_ETH.json") if self.wallet is None else self._account()
        if route == ("POST", "/api/v3/order") and p.get("type") == "STOP_LOSS":
            return self._rest_stop(p)
        if route in _RESTING_ROUTES:
            return getattr(self, _RESTING_ROUTES[route])(p)
        if route == ("POST", "/api/v3/order"):
            refused = self._unfunded(p)
            if refused:
                return refused
            status, order = self._new_order(p, rec.api_key or "")
            if status == 200:
                self._spend(order)
            return status, order
        if route == ("GET", "/api/v3/order"):
            cid = p.get("origClientOrderId", "")
            order = self.orders.get(cid)
            owner = self.order_keys.get(cid, rec.api_key)  # an order put in by a test belongs to whoever asks
            if order is None or order["symbol"] != p.get("symbol") or owner != rec.api_key:
                return 400, {"code": -2013, "msg": "Order does not exist."}
            get_shape = {k: v for k, v in order.items() if k not in ("fills", "transactTime")}
            get_shape.update(time=order["transactTime"], updateTime=order["transactTime"], isWorking=True)
            return 200, get_shape
        return 404, "<html><body>404 Not Found</body></html>"

    def _assets(self, symbol: str) -> tuple[str, str]:
        entry = next((s for s in self.exchange_info["symbols"] if s["symbol"] == symbol), None)
        if entry is not None:
            return entry["baseAsset"], entry["quoteAsset"]
        return symbol[:-4], symbol[-4:]  # the recorded quotes' symbols all end in a 4-letter quote (USDT)

    def _spend_key(self, api_key: str, symbol: str, side: str, qty: Decimal, price: Decimal) -> bool:
        """Move an account's balances for a fill; False (nothing moved) when it cannot pay."""
        own = self.balances.get(api_key)
        if own is None:
            return True
        base, quote = self._assets(symbol)
        pay, pay_qty, get, get_qty = (base, qty, quote, qty * price) if side == "SELL" else (quote, qty * price, base, qty)
        with self._lock:
            if own.get(pay, Decimal("0")) < pay_qty:
                return False
            own[pay] = own.get(pay, Decimal("0")) - pay_qty
            own[get] = own.get(get, Decimal("0")) + get_qty
        return True

    def _new_order(self, p: dict[str, str], api_key: str = API_KEY) -> tuple[int, Any]:
        for name in ("symbol", "side", "type", "quantity", "timestamp", "signature"):
            if not p.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
        quote = self.quotes.get(p["symbol"])
        if quote is None:
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        price = quote["bidPrice"] if p["side"] == "SELL" else quote["askPrice"]
        qty = Decimal(p["quantity"])
        quote_qty = Decimal(price) * qty
        if not self._spend_key(api_key, p["symbol"], p["side"], qty, Decimal(price)):
            return 400, {"code": -2010, "msg": "Account has insufficient balance for requested action."}
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
        self.order_keys[order["clientOrderId"]] = api_key
        return 200, order

    # -- resting orders (protection)
    def set_last_price(self, symbol: str, price: Any) -> None:
        """A trade prints at ``price``: resting orders it reaches fill now (see the module doc)."""
        last = Decimal(str(price))
        with self._lock:
            self.last_prices[symbol] = last
        for order in [o for o in self.orders.values() if o["symbol"] == symbol and o["status"] == "NEW"]:
            if order["status"] != "NEW":  # its OCO sibling filled a moment ago
                continue
            if order["type"] == "STOP_LOSS" and self._through(order["side"], last, Decimal(order["stopPrice"])):
                self._fill_resting(order, last)
            elif order["type"] == "LIMIT_MAKER" and (last >= Decimal(order["price"]) if order["side"] == "SELL"
                                                     else last <= Decimal(order["price"])):
                self._fill_resting(order, Decimal(order["price"]))

    def set_wallet(self, **balances: Any) -> None:
        """Track balances: ``set_wallet(BTC="1", USDT="0")`` (all free)."""
        self.wallet = {a: {"free": Decimal(str(v)), "locked": Decimal(0)} for a, v in balances.items()}

    def open(self) -> list[dict]:
        """The open orders (status NEW), as ``GET /api/v3/openOrders`` answers them."""
        return [self._query_shape(o) for o in self.orders.values() if o["status"] == "NEW"]

    @staticmethod
    def _through(side: str, last: Decimal, stop: Decimal) -> bool:
        return last <= stop if side == "SELL" else last >= stop

    def _assets(self, symbol: str) -> tuple[str, str]:
        entry = next(s for s in self.exchange_info["symbols"] if s["symbol"] == symbol) if any(
            s["symbol"] == symbol for s in self.exchange_info["symbols"]) else {"baseAsset": symbol[:-4], "quoteAsset": symbol[-4:]}
        return entry["baseAsset"], entry["quoteAsset"]

    def _unfunded(self, p: dict[str, str]) -> tuple[int, Any] | None:
        """-2010 when a SELL needs more base asset than is free (with a wallet)."""
        if self.wallet is None or p.get("side") != "SELL":
            return None
        base, _ = self._assets(p["symbol"])
        if Decimal(p["quantity"]) > self.wallet.get(base, {}).get("free", Decimal(0)):
            return 400, {"code": -2010, "msg": "Account has insufficient balance for requested action."}
        return None

    def _move(self, asset: str, free: Decimal = Decimal(0), locked: Decimal = Decimal(0)) -> None:
        if self.wallet is None:
            return
        entry = self.wallet.setdefault(asset, {"free": Decimal(0), "locked": Decimal(0)})
        entry["free"] += free
        entry["locked"] += locked

    def _spend(self, order: dict) -> None:
        """Move the wallet for an executed order (base out/in, quote in/out)."""
        base, quote = self._assets(order["symbol"])
        sign = -1 if order["side"] == "SELL" else 1
        self._move(base, free=sign * Decimal(order["executedQty"]))
        self._move(quote, free=-sign * Decimal(order["cummulativeQuoteQty"]))

    def _account(self) -> dict:
        return {"makerCommission": 10, "takerCommission": 10, "canTrade": True, "accountType": "SPOT",
                "updateTime": int(time.time() * 1000),
                "balances": [{"asset": a, "free": f"{v['free']:.8f}", "locked": f"{v['locked']:.8f}"}
                             for a, v in sorted(self.wallet.items())]}

    def _next_id(self) -> int:
        with self._lock:
            self._next_order_id += 1
            return self._next_order_id

    def _resting_body(self, p: dict[str, str], order_type: str, client_order_id: str, list_id: int = -1,
                      stop_price: str | None = None, price: str | None = None) -> dict:
        order_id = self._next_id()
        now_ms = int(time.time() * 1000)
        body = {"symbol": p["symbol"], "orderId": order_id, "orderListId": list_id, "clientOrderId": client_order_id,
                "transactTime": now_ms, "price": f"{Decimal(price or 0):.8f}", "origQty": f"{Decimal(p['quantity']):.8f}",
                "executedQty": "0.00000000", "origQuoteOrderQty": "0.00000000", "cummulativeQuoteQty": "0.00000000",
                "status": "NEW", "timeInForce": "GTC", "type": order_type, "side": p["side"], "workingTime": -1,
                "selfTradePreventionMode": "NONE"}
        if stop_price is not None:
            body["stopPrice"] = f"{Decimal(stop_price):.8f}"
        return body

    def _lock_for(self, body: dict, sign: int) -> None:
        if body["side"] == "SELL":
            base, _ = self._assets(body["symbol"])
            qty = Decimal(body["origQty"]) - Decimal(body["executedQty"])
            self._move(base, free=-sign * qty, locked=sign * qty)

    def _rest_stop(self, p: dict[str, str]) -> tuple[int, Any]:
        for name in ("symbol", "side", "quantity", "stopPrice", "timestamp", "signature"):
            if not p.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
        cid = p.get("newClientOrderId") or f"fake{self._next_order_id + 1}"
        if cid in self.orders and self.orders[cid]["status"] == "NEW":
            return 400, {"code": -2010, "msg": "Duplicate order sent."}
        last = self.last_prices.get(p["symbol"])
        if last is not None and self._through(p["side"], last, Decimal(p["stopPrice"])):
            return 400, {"code": -2010, "msg": "Order would trigger immediately."}
        refused = self._unfunded(p)
        if refused:
            return refused
        body = self._resting_body(p, "STOP_LOSS", cid, stop_price=p["stopPrice"])
        self.orders[cid] = body
        self._lock_for(body, +1)
        return 200, body

    def _new_oco(self, p: dict[str, str]) -> tuple[int, Any]:
        for name in ("symbol", "side", "quantity", "aboveType", "belowType", "timestamp", "signature"):
            if not p.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
        stop_leg, limit_leg = ("below", "above") if p["side"] == "SELL" else ("above", "below")
        if p[f"{stop_leg}Type"] != "STOP_LOSS" or p[f"{limit_leg}Type"] != "LIMIT_MAKER":
            return 400, {"code": -1196 if p["side"] == "BUY" else -1197, "msg": "A stop loss order in an OCO must be on its side."}
        stop, limit = Decimal(p[f"{stop_leg}StopPrice"]), Decimal(p[f"{limit_leg}Price"])
        last = self.last_prices.get(p["symbol"])
        if last is not None and not ((limit > last > stop) if p["side"] == "SELL" else (limit < last < stop)):
            return 400, {"code": -2010, "msg": "The relationship of the prices for the orders is not correct."}
        refused = self._unfunded(p)
        if refused:
            return refused
        list_id = self._next_id()
        legs = [self._resting_body(p, "STOP_LOSS", p[f"{stop_leg}ClientOrderId"], list_id, stop_price=str(stop)),
                self._resting_body(p, "LIMIT_MAKER", p[f"{limit_leg}ClientOrderId"], list_id, price=str(limit))]
        if p["side"] == "BUY":
            legs.reverse()  # Binance lists the legs below, above
        for leg in legs:
            self.orders[leg["clientOrderId"]] = leg
        self._lock_for(legs[0], +1)  # the list locks its quantity once
        body = {"orderListId": list_id, "contingencyType": "OCO", "listStatusType": "EXEC_STARTED",
                "listOrderStatus": "EXECUTING", "listClientOrderId": p.get("listClientOrderId") or f"list{list_id}",
                "transactionTime": legs[0]["transactTime"], "symbol": p["symbol"],
                "orders": [{"symbol": p["symbol"], "orderId": leg["orderId"], "clientOrderId": leg["clientOrderId"]}
                           for leg in legs],
                "orderReports": legs}
        self.lists[body["listClientOrderId"]] = body
        return 200, body

    def _siblings(self, order: dict) -> list[dict]:
        if order["orderListId"] == -1:
            return [order]
        return [o for o in self.orders.values() if o["orderListId"] == order["orderListId"]]

    def _take_off(self, order: dict, status: str) -> None:
        """``order`` (and its list) leave the book: ``status`` for it, EXPIRED for a sibling; unlock."""
        self._lock_for(order, -1)
        for leg in self._siblings(order):
            if leg["status"] == "NEW":
                leg["status"] = status if leg is order else "EXPIRED"

    def _fill_resting(self, order: dict, price: Decimal) -> None:
        self._take_off(order, "FILLED")
        qty = Decimal(order["origQty"])
        quote_qty = qty * price
        order_id = order["orderId"]
        order.update(executedQty=f"{qty:.8f}", cummulativeQuoteQty=f"{quote_qty:.8f}",
                     transactTime=int(time.time() * 1000),
                     fills=[{"price": f"{price:.8f}", "qty": f"{qty:.8f}",
                             "commission": f"{quote_qty * Decimal('0.001'):.8f}", "commissionAsset": "USDT",
                             "tradeId": order_id * 10}])
        self._spend(order)

    @staticmethod
    def _cancelled_shape(order: dict, cancel_id: str | None) -> dict:
        body = {k: v for k, v in order.items() if k not in ("fills", "workingTime")}
        body.update(origClientOrderId=order["clientOrderId"], clientOrderId=cancel_id or f"cancel{order['orderId']}",
                    transactTime=int(time.time() * 1000))
        return body

    @staticmethod
    def _query_shape(order: dict) -> dict:
        shape = {k: v for k, v in order.items() if k not in ("fills", "transactTime")}
        shape.update(time=order["transactTime"], updateTime=order["transactTime"], isWorking=order["type"] != "STOP_LOSS")
        return shape

    def _cancel(self, p: dict[str, str]) -> tuple[int, Any]:
        order = self.orders.get(p.get("origClientOrderId", ""))
        if order is None or order["symbol"] != p.get("symbol") or order["status"] != "NEW":
            return 400, {"code": -2011, "msg": "Unknown order sent."}
        self._take_off(order, "CANCELED")
        return 200, self._cancelled_shape(order, p.get("newClientOrderId"))

    def _cancel_replace(self, p: dict[str, str]) -> tuple[int, Any]:
        for name in ("symbol", "side", "type", "cancelReplaceMode", "timestamp", "signature"):
            if not p.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}
        if p["cancelReplaceMode"] != "STOP_ON_FAILURE":
            return 400, {"code": -1102, "msg": "this fake knows STOP_ON_FAILURE only"}
        order = self.orders.get(p.get("cancelOrigClientOrderId", ""))
        if order is None or order["symbol"] != p["symbol"] or order["status"] != "NEW":
            # ONLY_NEW: an order that triggered or filled is refused like an unknown one
            code, msg = (-2011, "Order was not canceled due to cancel restrictions.") if order is not None \
                else (-2011, "Unknown order sent.")
            return 400, {"code": -2022, "msg": "Order cancel-replace failed.",
                         "data": {"cancelResult": "FAILURE", "newOrderResult": "NOT_ATTEMPTED",
                                  "cancelResponse": {"code": code, "msg": msg}, "newOrderResponse": None}}
        self._take_off(order, "CANCELED")
        cancelled = self._cancelled_shape(order, p.get("cancelNewClientOrderId"))
        new_params = {k: v for k, v in p.items() if not k.startswith("cancel")}
        if p["type"] == "STOP_LOSS":
            status, new = self._rest_stop(new_params)
        else:
            status, new = self._unfunded(new_params) or self._new_order(new_params)
            if status == 200:
                self._spend(new)
        if status != 200:
            return 409, {"code": -2021, "msg": "Order cancel-replace partially failed.",
                         "data": {"cancelResult": "SUCCESS", "newOrderResult": "FAILURE",
                                  "cancelResponse": cancelled, "newOrderResponse": new}}
        return 200, {"cancelResult": "SUCCESS", "newOrderResult": "SUCCESS", "cancelResponse": cancelled,
                     "newOrderResponse": new}

    def _amend(self, p: dict[str, str]) -> tuple[int, Any]:
        order = self.orders.get(p.get("origClientOrderId", ""))
        if order is None or order["symbol"] != p.get("symbol") or order["status"] != "NEW":
            return 400, {"code": -2013, "msg": "Order does not exist."}
        new_qty = Decimal(p.get("newQty") or "0")
        if not (0 < new_qty < Decimal(order["origQty"])):
            return 400, {"code": -2038, "msg": "Order amend (quantity increase) is not supported."}
        self._lock_for(order, -1)
        for leg in self._siblings(order):
            leg["origQty"] = f"{new_qty:.8f}"
        self._lock_for(order, +1)
        if p.get("newClientOrderId") and p["newClientOrderId"] != order["clientOrderId"]:
            self.orders.pop(order["clientOrderId"])
            order["clientOrderId"] = p["newClientOrderId"]
            self.orders[order["clientOrderId"]] = order
        amended = {k: v for k, v in order.items() if k not in ("fills", "transactTime", "origQty",
                                                                 "cummulativeQuoteQty", "origQuoteOrderQty")}
        amended.update(origClientOrderId=p["origClientOrderId"], qty=order["origQty"], preventedQty="0.00000000",
                       quoteOrderQty="0.00000000", cumulativeQuoteQty=order["cummulativeQuoteQty"])
        return 200, {"transactTime": int(time.time() * 1000), "executionId": self._next_id(), "amendedOrder": amended}

    def _open_orders(self, p: dict[str, str]) -> tuple[int, Any]:
        return 200, [o for o in self.open() if "symbol" not in p or o["symbol"] == p["symbol"]]

    def _verify(self, raw_query: str, raw_body: str, api_key: str | None = None) -> bool | None:
        """Binance's rule: the signature covers the payload exactly as sent (percent-encoded); with
        registered account keys (issue #20), by the secret of the key that sent it."""
        total = "&".join(x for x in (raw_query, raw_body) if x)
        if "signature=" not in total:
            return None
        head, _, sig = total.rpartition("&signature=")
        if self.public_key is not None:
            return verify_asymmetric(self.public_key, head, unquote(sig))
        secret = self.keys.get(api_key or "", self.secret)
        if not isinstance(secret, str):  # an account registered with its Ed25519/RSA public key
            return verify_asymmetric(secret, head, unquote(sig))
        expected = hmac.new(secret.encode(), head.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, sig)


_RESTING_ROUTES = {
    ("POST", "/api/v3/orderList/oco"): "_new_oco",
    ("POST", "/api/v3/order/cancelReplace"): "_cancel_replace",
    ("PUT", "/api/v3/order/amend/keepPriority"): "_amend",
    ("GET", "/api/v3/openOrders"): "_open_orders",
    ("DELETE", "/api/v3/order"): "_cancel",
}


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
            signature_valid=fake._verify(parts.query, raw_body, self.headers.get("X-MBX-APIKEY")),
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


def verify_asymmetric(public_key, payload: str, signature_b64: str) -> bool:
    """Check a base64 Ed25519 (RFC 8032) or RSA PKCS#1 v1.5 SHA-256 signature of ``payload``."""
    import base64

    from Crypto.Hash import SHA256
    from Crypto.PublicKey import RSA
    from Crypto.Signature import eddsa, pkcs1_15

    try:
        raw = base64.b64decode(signature_b64, validate=True)
        if isinstance(public_key, RSA.RsaKey):
            pkcs1_15.new(public_key).verify(SHA256.new(payload.encode()), raw)
        else:
            eddsa.new(public_key, "rfc8032").verify(payload.encode(), raw)
        return True
    except (ValueError, TypeError):
        return False


@pytest.fixture
def fake_binance():
    """A running :class:`FakeBinance`, stopped after the test."""
    with FakeBinance() as fake:
        yield fake


# =====================================================================================
# The account: balances, trades and scripted evidence faults (issue #12). Kept apart from
# the server plumbing above (other engineers add resting orders there): the server asks
# :meth:`Account.route` first, and the same model also backs :class:`AccountExchange`, an
# in-process adapter of the port for the model-based test (no HTTP, same behaviour).
# =====================================================================================

#: The answer the server gives when :meth:`Account.route` does not own a route.
NOT_MINE = None


@dataclass
class OrderFate:
    """What happens to the next MARKET order the account accepts.

    ``fill_qty``: how much fills (None = all) — less than requested ends ``EXPIRED`` with
    ``expiry_reason``; ``report_zero``: the answer says EXPIRED with executedQty 0 although it
    filled (a misreported zero fill); ``invisible_queries``/``invisible_seconds``: GET /order
    answers -2013 for that many queries / seconds after acceptance (late visibility);
    ``lost``: the order is made but the answer never reaches the client (``delay`` seconds
    late for the HTTP server: a timeout after accept; :class:`AccountExchange` raises
    OrderOutcomeUnknown).
    """

    fill_qty: Decimal | None = None
    expiry_reason: str = "INSUFFICIENT_LIQUIDITY"
    status: str | None = None  # e.g. EXPIRED_IN_MATCH
    report_zero: bool = False
    invisible_queries: int = 0
    invisible_seconds: float = 0.0
    lost: bool = False
    delay: float = 0.0


class Account:
    """One Binance spot account as the evidence rules see it (thread-safe).

    Balances are free amounts per asset (Decimal). A MARKET SELL larger than the free base
    balance is refused with ``-2010`` (as Binance does); otherwise it fills at the quote's bid
    (SELL) or ask (BUY) in one trade, 0.1 % commission in the quote asset (SELL) or the base
    asset (BUY), moving the balances. A repeated ``newClientOrderId`` is accepted once the
    first order is FILLED (Binance's rule): both orders exist, queries see the newest.
    """

    COMMISSION = Decimal("0.001")

    def __init__(self, balances: dict[str, Any] | None = None, quotes: dict[str, dict] | None = None,
                 clock=time.time) -> None:
        self.lock = threading.RLock()
        self.balances: dict[str, Decimal] = {k: Decimal(str(v)) for k, v in (balances or {}).items()}
        self.active = balances is not None
        self.quotes = quotes if quotes is not None else {}
        self.assets: dict[str, tuple[str, str]] = {}
        self.clock = clock
        self.offset = 0.0  # seconds added to the clock (tests move time without sleeping)
        self.history: list[dict] = []  # every accepted order, in acceptance order
        self.by_cid: dict[str, dict] = {}  # newest accepted order per client order id
        self.trades: list[dict] = []
        self.fates: list[OrderFate] = []
        self.invisible: dict[str, tuple[float, int]] = {}  # cid -> (visible from, queries left)
        self.vanished: set[str] = set()
        self.status_of: dict[str, str] = {}  # symbol -> HALT / BREAK / CANCEL_ONLY
        self.query_answers: list[Any] = []  # scripted GET /order answers, "real" = the real one
        self._ids = 5000

    # -- time
    def now(self) -> float:
        return self.clock() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    # -- scripting
    def next_order(self, **fate: Any) -> OrderFate:
        """Queue the fate of the next accepted MARKET order (see :class:`OrderFate`)."""
        f = OrderFate(**{k: (Decimal(str(v)) if k == "fill_qty" and v is not None else v) for k, v in fate.items()})
        with self.lock:
            self.fates.append(f)
        return f

    def set_balance(self, asset: str, amount: Any) -> None:
        with self.lock:
            self.active = True
            self.balances[asset] = Decimal(str(amount))

    def vanish(self, client_order_id: str) -> None:
        """GET /order answers -2013 for this id from now on; its trades stay."""
        with self.lock:
            self.vanished.add(client_order_id)

    def script_queries(self, *answers: Any) -> None:
        """Answers for the next GET /order queries, in order: ``"not_found"`` (-2013),
        ``"real"`` (what the account knows), ``(status, body)`` as is."""
        with self.lock:
            self.query_answers.extend(answers)

    def testnet_reset(self, balances: dict[str, Any]) -> None:
        """What a Spot Testnet reset does: every order and trade gone, balances refilled."""
        with self.lock:
            self.history.clear()
            self.by_cid.clear()
            self.trades.clear()
            self.invisible.clear()
            self.balances = {k: Decimal(str(v)) for k, v in balances.items()}
            self.active = True

    def filled_orders(self) -> list[dict]:
        with self.lock:
            return [o for o in self.history if Decimal(o["_real_executed"]) > 0]

    def sold(self, symbol: str | None = None) -> Decimal:
        """Base quantity sold by every accepted order (what really executed)."""
        with self.lock:
            return sum((Decimal(o["_real_executed"]) for o in self.history
                        if o["side"] == "SELL" and (symbol is None or o["symbol"] == symbol)), Decimal(0))

    # -- the exchange
    def _split(self, symbol: str) -> tuple[str, str]:
        if symbol in self.assets:
            return self.assets[symbol]
        for quote in ("USDT", "BUSD", "BTC", "ETH", "BNB"):
            if symbol.endswith(quote) and symbol != quote:
                return symbol[: -len(quote)], quote
        return symbol[:3], symbol[3:]

    def place(self, p: dict[str, str]) -> tuple[int, Any, OrderFate | None]:
        """A MARKET order (POST /api/v3/order parameters). Returns (HTTP status, body, fate)."""
        with self.lock:
            symbol, side, cid = p["symbol"], p["side"], p.get("newClientOrderId") or f"fake{self._ids}"
            quote = self.quotes.get(symbol)
            if quote is None:
                return 400, {"code": -1121, "msg": "Invalid symbol."}, None
            if self.status_of.get(symbol) in ("HALT", "BREAK", "CANCEL_ONLY", "END_OF_DAY"):
                return 400, {"code": -2010, "msg": "Market is closed."}, None
            previous = self.by_cid.get(cid)
            if previous is not None and previous["status"] not in ("FILLED", "EXPIRED", "CANCELED", "EXPIRED_IN_MATCH"):
                return 400, {"code": -2010, "msg": "Duplicate order sent."}, None
            base, quote_asset = self._split(symbol)
            qty = Decimal(p["quantity"])
            if self.active and side == "SELL" and self.balances.get(base, Decimal(0)) < qty:
                return 400, {"code": -2010, "msg": "Account has insufficient balance for requested action."}, None
            fate = self.fates.pop(0) if self.fates else OrderFate()
            price = Decimal(quote["bidPrice"] if side == "SELL" else quote["askPrice"])
            filled = qty if fate.fill_qty is None else min(fate.fill_qty, qty)
            quote_qty = price * filled
            self._ids += 1
            order_id = self._ids
            now_ms = self.now_ms()
            fills = []
            if filled > 0:
                commission = (quote_qty if side == "SELL" else filled) * self.COMMISSION
                commission_asset = quote_asset if side == "SELL" else base
                trade = {"symbol": symbol, "id": order_id * 10, "orderId": order_id, "orderListId": -1,
                         "price": f"{price:.8f}", "qty": f"{filled:.8f}", "quoteQty": f"{quote_qty:.8f}",
                         "commission": f"{commission:.8f}", "commissionAsset": commission_asset, "time": now_ms,
                         "isBuyer": side == "BUY", "isMaker": False, "isBestMatch": True}
                self.trades.append(trade)
                fills.append({"price": trade["price"], "qty": trade["qty"], "commission": trade["commission"],
                              "commissionAsset": commission_asset, "tradeId": trade["id"]})
                if self.active:
                    sign = Decimal(-1) if side == "SELL" else Decimal(1)
                    base_fee = commission if side == "BUY" else Decimal(0)
                    quote_fee = commission if side == "SELL" else Decimal(0)
                    self.balances[base] = self.balances.get(base, Decimal(0)) + sign * filled - base_fee
                    self.balances[quote_asset] = self.balances.get(quote_asset, Decimal(0)) - sign * quote_qty - quote_fee
            status = fate.status or ("FILLED" if filled >= qty else "EXPIRED")
            order = {
                "symbol": symbol, "orderId": order_id, "orderListId": -1, "clientOrderId": cid,
                "transactTime": now_ms, "price": "0.00000000", "origQty": f"{qty:.8f}",
                "executedQty": f"{filled:.8f}", "origQuoteOrderQty": "0.00000000",
                "cummulativeQuoteQty": f"{quote_qty:.8f}", "status": status, "timeInForce": "GTC",
                "type": "MARKET", "side": side, "workingTime": now_ms, "selfTradePreventionMode": "NONE",
                "fills": fills, "_real_executed": f"{filled:.8f}",
            }
            if status != "FILLED":
                order["expiryReason"] = fate.expiry_reason
            self.history.append(order)
            self.by_cid[cid] = order
            if fate.invisible_queries or fate.invisible_seconds:
                self.invisible[cid] = (self.now() + fate.invisible_seconds, fate.invisible_queries)
            answer = {k: v for k, v in order.items() if not k.startswith("_")}
            if fate.report_zero:
                answer.update(status="EXPIRED", executedQty="0.00000000", cummulativeQuoteQty="0.00000000", fills=[],
                              expiryReason="INSUFFICIENT_LIQUIDITY")
            return 200, answer, fate

    def query(self, p: dict[str, str]) -> tuple[int, Any]:
        """GET /api/v3/order by origClientOrderId (the newest order with that id)."""
        not_found = (400, {"code": -2013, "msg": "Order does not exist."})
        with self.lock:
            if self.query_answers:
                scripted = self.query_answers.pop(0)
                if scripted == "not_found":
                    return not_found
                if scripted != "real":
                    return scripted
            cid = p.get("origClientOrderId", "")
            order = self.by_cid.get(cid)
            if order is None or order["symbol"] != p.get("symbol") or cid in self.vanished:
                return not_found
            hidden = self.invisible.get(cid)
            if hidden is not None:
                visible_from, queries_left = hidden
                if queries_left > 0 or self.now() < visible_from:
                    self.invisible[cid] = (visible_from, max(queries_left - 1, 0))
                    return not_found
                del self.invisible[cid]
            shape = {k: v for k, v in order.items() if k not in ("fills", "transactTime") and not k.startswith("_")}
            shape.update(time=order["transactTime"], updateTime=order["transactTime"], isWorking=False)
            return 200, shape

    def my_trades(self, p: dict[str, str]) -> tuple[int, Any]:
        """GET /api/v3/myTrades: by symbol, then orderId or startTime (24 h at most), oldest first."""
        with self.lock:
            rows = [t for t in self.trades if t["symbol"] == p.get("symbol")]
            if p.get("orderId"):
                rows = [t for t in rows if t["orderId"] == int(p["orderId"])]
            elif p.get("startTime"):
                start = int(p["startTime"])
                rows = [t for t in rows if start <= t["time"] <= start + 24 * 3600 * 1000]
            return 200, sorted(rows, key=lambda t: t["id"])[: int(p.get("limit") or 500)]

    def account(self) -> tuple[int, Any]:
        with self.lock:
            return 200, {"makerCommission": 10, "takerCommission": 10, "canTrade": True, "accountType": "SPOT",
                         "updateTime": self.now_ms(),
                         "balances": [{"asset": a, "free": f"{v:.8f}", "locked": "0.00000000"}
                                      for a, v in sorted(self.balances.items())]}

    def route(self, rec: "Recorded") -> tuple[int, Any, OrderFate | None] | None:
        """The server's answer for the routes the account owns, else :data:`NOT_MINE`."""
        p = rec.params
        route = (rec.method, rec.path)
        if route == ("GET", "/api/v3/myTrades"):
            return (*self.my_trades(p), None)
        if route == ("GET", "/api/v3/account") and self.active:
            return (*self.account(), None)
        if route == ("POST", "/api/v3/order") and p.get("type") == "MARKET":
            for name in ("symbol", "side", "type", "quantity", "timestamp", "signature"):
                if not p.get(name):
                    return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."}, None
            return self.place(p)
        if route == ("GET", "/api/v3/order"):
            with self.lock:
                cid = p.get("origClientOrderId", "")
                if not self.query_answers and cid not in self.by_cid and cid not in self.vanished:
                    return NOT_MINE  # not a MARKET order of this account: the server's other orders
                return (*self.query(p), None)
        return NOT_MINE


class AccountExchange:
    """The exchange port directly on an :class:`Account` (no HTTP), for the model-based test.

    Faults are queued with :meth:`fault` by method name and map to the port's errors exactly
    as :class:`~stopmonitor.exchange.binance.BinanceExchange` maps the HTTP answers:
    ``"5xx"`` (OrderOutcomeUnknown on an order, ExchangeUnavailable on a read), ``"-1021"``
    (ClockSkew), ``"429"`` (RateLimited), ``"-2010"`` (OrderRejectedMaybeFilled, nothing placed).
    A fate with ``lost=True`` makes the order and raises OrderOutcomeUnknown (timeout after accept).
    """

    venue = "binance-testnet"

    def __init__(self, account: Account, filters: dict | None = None) -> None:
        from stopmonitor.exchange.filters import parse_symbol_filters

        self.account = account
        self.faults: dict[str, list[str]] = {}
        info = load("exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT_NOTIONAL.json")
        self.filters = filters if filters is not None else {e["symbol"]: parse_symbol_filters(e) for e in info["symbols"]}
        self.calls: list[tuple[str, tuple]] = []

    def fault(self, method: str, kind: str, times: int = 1) -> None:
        self.faults.setdefault(method, []).extend([kind] * times)

    def _fault(self, method: str, placing: bool = False) -> None:
        from datetime import datetime, timedelta, timezone

        from stopmonitor.exchange import base

        queue = self.faults.get(method)
        if not queue:
            return
        kind = queue.pop(0)
        if kind == "5xx":
            raise (base.OrderOutcomeUnknown if placing else base.ExchangeUnavailable)(f"{method}: HTTP 503")
        if kind == "-1021":
            raise base.ClockSkew(f"{method}: -1021 Timestamp for this request is outside of the recvWindow.")
        if kind == "429":
            raise base.RateLimited(f"{method}: HTTP 429", retry_after=datetime.now(timezone.utc) + timedelta(seconds=1),
                                   code=-1003)
        if kind == "-2010" and placing:
            raise base.OrderRejectedMaybeFilled(f"{method}: -2010 Account has insufficient balance", -2010)

    def clock(self):
        from datetime import datetime, timezone

        return datetime.fromtimestamp(self.account.now(), tz=timezone.utc)

    def book_tickers(self, symbols):
        from stopmonitor.exchange.base import Quote

        wanted = sorted(set(symbols))
        self.calls.append(("book_tickers", tuple(wanted)))
        self._fault("book_tickers")
        now = self.clock()
        return {s: Quote(s, Decimal(q["bidPrice"]), Decimal(q["askPrice"]), Decimal(q["bidQty"]), Decimal(q["askQty"]), now)
                for s in wanted if (q := self.account.quotes.get(s))}

    def symbol_filters(self, symbols, *, fresh: bool = False):
        from dataclasses import replace

        self.calls.append(("symbol_filters", tuple(sorted(set(symbols)))))
        self._fault("symbol_filters")
        return {s: replace(self.filters[s], status=self.account.status_of.get(s, self.filters[s].status))
                for s in symbols if s in self.filters}

    def free_balances(self):
        self.calls.append(("free_balances", ()))
        self._fault("free_balances")
        _, body = self.account.account()
        return {b["asset"]: Decimal(b["free"]) for b in body["balances"]}

    def account_trades(self, symbol, *, since=None, order_id=None):
        from stopmonitor.exchange.binance import parse_trade

        self.calls.append(("account_trades", (symbol, since, order_id)))
        self._fault("account_trades")
        p = {"symbol": symbol, "limit": "1000"}
        if order_id is not None:
            p["orderId"] = str(order_id)
        elif since is not None:
            p["startTime"] = str(int(since.timestamp() * 1000))
        return [parse_trade(t) for t in self.account.my_trades(p)[1]]

    def get_order(self, symbol, client_order_id):
        from stopmonitor.exchange.binance import parse_order

        self.calls.append(("get_order", (symbol, client_order_id)))
        self._fault("get_order")
        status, body = self.account.query({"symbol": symbol, "origClientOrderId": client_order_id})
        if status == 200:
            return parse_order(body)
        if body.get("code") == -2013:
            return None
        from stopmonitor.exchange.base import ExchangeUnavailable

        raise ExchangeUnavailable(f"get order: HTTP {status} {body}", body.get("code"))

    def place_market_order(self, request):
        from stopmonitor.exchange import base
        from stopmonitor.exchange.binance import format_decimal, parse_order

        self.calls.append(("place_market_order", (request.symbol, request.side, request.quantity, request.client_order_id)))
        self._fault("place_market_order", placing=True)
        status, body, fate = self.account.place({"symbol": request.symbol, "side": request.side, "type": "MARKET",
                                                 "quantity": format_decimal(request.quantity),
                                                 "newClientOrderId": request.client_order_id})
        if status != 200:
            code = body.get("code")
            error = base.OrderRejectedMaybeFilled if code == -2010 else base.OrderRejected
            raise error(f"MARKET {request.side} {request.symbol} {request.client_order_id}: {body.get('msg')}", code)
        if fate is not None and fate.lost:
            raise base.OrderOutcomeUnknown(f"MARKET {request.side} {request.symbol} {request.client_order_id}: timeout")
        return parse_order(body)
