"""Binance spot adapter of the exchange port, through python-binance's synchronous ``Client``.

The only module of the project that imports python-binance; its types never leave this file.
Every failure is re-raised as one of :mod:`stopmonitor.exchange.base`'s errors ``from`` the
original, classified on the HTTP status and the integer Binance ``code`` (never on message
text). Rules and their sources (../shared/design/stop-execution.md, invariants 2, 3 and 9;
Binance spot REST "General API Information", "LIMITS" and "Error codes"):

===========================================  ==========================  =======================
condition                                    placing an order            a read
===========================================  ==========================  =======================
a stored ban horizon not yet passed          RateLimited, no HTTP call   RateLimited, no call
HTTP 429 / 418 (any code)                    RateLimited, horizon saved  same
``-1021`` (after one resync + one retry)     ClockSkew                   ClockSkew
HTTP 5XX, ``-1007``, ``-1006``, ``-1000``    OrderOutcomeUnknown         ExchangeUnavailable
timeout, connection error, non-JSON 2XX      OrderOutcomeUnknown         ExchangeUnavailable
``-1003`` / ``-1015`` on a 4XX               RateLimited (not saved)     same
4XX without a Binance ``code`` (proxy page)  OrderOutcomeUnknown         ExchangeUnavailable
``-2010``                                    OrderRejectedMaybeFilled    ExchangeUnavailable
any other 4XX ``code`` (-1013, -1121, …)     OrderRejected(code)         ExchangeUnavailable
===========================================  ==========================  =======================

``-2010`` (NEW_ORDER_REJECTED) on an order is :class:`OrderRejectedMaybeFilled`, the one
rejection that is not proof of nothing: the balance it lacked may have gone to an earlier
order with the same client order id. ``get_order`` returns None on ``-2013``.

``-1121`` (Invalid symbol) on ``book_tickers`` and ``symbol_filters``: Binance refuses the whole
``symbols=[…]`` request when one symbol in it is unknown (delisted, renamed). The adapter then
asks symbol by symbol, once (1 + one request per symbol; a warning line says how many symbols
were unknown); the unknown ones are absent from the answer, and a request whose only symbol is
unknown answers nothing — never an error. Any other error of a per-symbol ask is raised as above.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import quote

import requests
from binance.client import Client
from binance.exceptions import BinanceAPIException, BinanceRequestException

from .base import (
    Balances,
    CancelReplaceCancelFailed,
    CancelReplaceNewFailed,
    CancelReplaceResult,
    CancelReplaceUnknown,
    KeysMissing,
    ClockSkew,
    ExchangeError,
    ExchangeUnavailable,
    Fill,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRejectedMaybeFilled,
    OrderRequest,
    OrderListResult,
    OcoRequest,
    OrderResult,
    Quote,
    Quotes,
    RateLimited,
    StopOrderRequest,
    SymbolFilters,
    Trade,
)
from .filters import decimal_field as _dec, parse_symbol_filters  # noqa: F401 (re-exported)
from .state import FILTERS_TTL_SECONDS, CacheState, ExchangeState, MemoryState

__all__ = ["BinanceExchange", "CacheState", "MemoryState", "ExchangeState", "format_decimal"]

T = TypeVar("T")
log = logging.getLogger("stopmonitor.exchange.binance")

INVALID_TIMESTAMP = -1021
#: Invalid symbol: Binance refuses a whole ``symbols=[…]`` list for one unknown symbol in it.
INVALID_SYMBOL = -1121
NO_SUCH_ORDER = -2013
#: NEW_ORDER_REJECTED (insufficient balance, …): on a close, "maybe it already filled".
NEW_ORDER_REJECTED = -2010
#: Binance's recommendation (rest-api.md "Timing security": 5000 or less; at most 60000).
DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60000
#: myTrades: at most this many trades per request; a startTime window of at most 24 hours.
MY_TRADES_LIMIT = 1000
#: cancelReplace: both legs failed / one leg failed (Binance "Errors regarding placing orders via cancelReplace")
CANCEL_REPLACE_FAILED = -2022
CANCEL_REPLACE_PARTIALLY_FAILED = -2021
#: Binance says the request may have been executed ("execution status unknown").
UNKNOWN_OUTCOME_CODES = frozenset({-1000, -1006, -1007})
#: Request-weight and order-count limits; with HTTP 429/418 the ban horizon is also stored.
RATE_LIMIT_CODES = frozenset({-1003, -1015})
#: Seconds to wait when 429/418 come without a usable Retry-After (418 bans start at 2 minutes).
DEFAULT_RETRY_AFTER_429 = 60
DEFAULT_RETRY_AFTER_418 = 120
#: newClientOrderId rule from Binance's "New order" parameters.
CLIENT_ORDER_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")


def format_decimal(value: Decimal) -> str:
    """A Decimal as Binance wants it: plain digits, no exponent, no trailing zeros ("0.00123", "100").

    Raises ValueError for NaN/infinite values.
    """
    if not value.is_finite():
        raise ValueError(f"not a finite decimal: {value!r}")
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _ms_to_utc(ms: Any) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def parse_order(data: dict) -> OrderResult:
    """An OrderResult from a POST FULL answer or a GET /api/v3/order answer.

    Raises ValueError/KeyError/TypeError on a malformed body (the caller maps them).
    """
    fills = tuple(
        Fill(
            price=_dec(f["price"], "fills.price"),
            qty=_dec(f["qty"], "fills.qty"),
            commission=_dec(f.get("commission", "0"), "fills.commission"),
            commission_asset=str(f.get("commissionAsset") or ""),
        )
        for f in data.get("fills") or ()
    )
    when = data.get("transactTime") or data.get("updateTime") or data.get("time")
    status = str(data["status"])
    expiry = data.get("expiryReason")
    if status == "EXPIRED_IN_MATCH" and not expiry:
        expiry = "SELF_TRADE_PREVENTION"
    return OrderResult(
        symbol=str(data["symbol"]),
        side=str(data["side"]),
        status=status,
        exchange_order_id=int(data["orderId"]),
        client_order_id=str(data["clientOrderId"]),
        requested_qty=_dec(data["origQty"], "origQty"),
        executed_qty=_dec(data["executedQty"], "executedQty"),
        cummulative_quote_qty=_dec(data["cummulativeQuoteQty"], "cummulativeQuoteQty"),
        fills=fills,
        transact_time=_ms_to_utc(when),
        expiry_reason=str(expiry) if expiry and expiry != "NONE" else None,
        **_resting_fields(data),
    )


def _resting_fields(data: dict) -> dict:
    """The resting-order fields of an order body (type, stopPrice, price, orderListId); a
    ``stopPrice``/``price`` of 0 (Binance's "not set") is None."""
    def price(name: str) -> Decimal | None:
        value = data.get(name)
        return None if value in (None, "") or Decimal(str(value)) == 0 else _dec(value, name)

    return {"order_type": str(data.get("type") or "MARKET"), "stop_price": price("stopPrice"),
            "price": price("price"), "order_list_id": int(data.get("orderListId", -1))}


def parse_cancelled(data: dict) -> OrderResult:
    """An OrderResult from a cancel answer (``DELETE /api/v3/order`` or a cancelReplace's
    ``cancelResponse``): ``clientOrderId`` there is the cancel's own id, ``origClientOrderId`` ours."""
    return parse_order({**data, "clientOrderId": data.get("origClientOrderId") or data["clientOrderId"]})


def parse_amended(data: dict) -> OrderResult:
    """An OrderResult from an amend keepPriority answer (its ``amendedOrder`` says ``qty`` and
    ``cumulativeQuoteQty`` where other order bodies say ``origQty``/``cummulativeQuoteQty``)."""
    order = data["amendedOrder"]
    return parse_order({**order, "origQty": order["qty"], "cummulativeQuoteQty": order["cumulativeQuoteQty"],
                        "transactTime": data.get("transactTime")})


def parse_order_list(data: dict) -> OrderListResult:
    """An OrderListResult from an order-list answer (``POST /api/v3/orderList/oco``, RESULT/FULL)."""
    return OrderListResult(
        symbol=str(data["symbol"]),
        order_list_id=int(data["orderListId"]),
        list_client_order_id=str(data["listClientOrderId"]),
        list_status=str(data["listOrderStatus"]),
        orders=tuple(parse_order({**r, "transactTime": r.get("transactTime") or data.get("transactionTime")})
                     for r in data["orderReports"]),
    )


def parse_trade(data: dict) -> Trade:
    """A Trade from one ``GET /api/v3/myTrades`` row. Raises ValueError/KeyError/TypeError."""
    return Trade(
        symbol=str(data["symbol"]),
        trade_id=int(data["id"]),
        order_id=int(data["orderId"]),
        price=_dec(data["price"], "price"),
        qty=_dec(data["qty"], "qty"),
        quote_qty=_dec(data["quoteQty"], "quoteQty"),
        commission=_dec(data["commission"], "commission"),
        commission_asset=str(data["commissionAsset"]),
        time=_ms_to_utc(data["time"]),
        is_buyer=bool(data["isBuyer"]),
    )


class _Client(Client):
    """python-binance's Client, except that a signed request is signed exactly as it is sent.

    Binance requires (since 2026-01-15, rest-api.md "SIGNED Endpoint Examples") the signature
    over the *percent-encoded* payload. python-binance 1.0.37 still signs ``k=v&…`` with raw
    values (only ``symbol`` quoted) while ``requests`` form-encodes a POST body, so any value with
    ``:`` or ``/`` — both legal in newClientOrderId — is refused with -1022 (a test shows it). So
    a signed request here is built once: parameters in order, each value percent-encoded
    (``quote(v, safe="")``), ``timestamp`` and ``recvWindow`` appended, that very string signed
    with the library's own primitives (HMAC-SHA256 hex, or Ed25519/RSA base64, then
    percent-encoded), and the same string sent as the query (GET) or the form body (POST/PUT/
    DELETE). Unsigned requests are the library's.

    Its ``__del__`` never raises: the library's closes ``self.session``, which a client whose
    ``__init__`` did not finish (a worker stopped while the readiness thread was building one)
    does not have — a traceback in gunicorn's log at every such shutdown.
    """

    def __del__(self):
        session = self.__dict__.get("session")
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
                pass

    def _request(self, method, uri, signed, force_params=False, **kwargs):
        if not signed:
            return super()._request(method, uri, signed, force_params, **kwargs)
        params = [(k, str(v)) for k, v in (kwargs.pop("data", None) or {}).items() if v is not None and k != "requests_params"]
        params.append(("timestamp", str(int(time.time() * 1000 + self.timestamp_offset))))
        if self.REQUEST_RECVWINDOW:
            params.append(("recvWindow", str(self.REQUEST_RECVWINDOW)))
        payload = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
        wire = f"{payload}&signature={quote(self._sign_payload(payload), safe='')}"
        options = {"timeout": self.REQUEST_TIMEOUT, **(self._requests_params or {})}
        if method.lower() == "get":
            self.response = self.session.get(f"{uri}?{wire}", **options)
        else:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            self.response = getattr(self.session, method.lower())(uri, headers=headers, data=wire, **options)
        return self._handle_response(self.response)

    def _sign_payload(self, payload: str) -> str:
        """The signature of ``payload``; raises :class:`KeysMissing` (before any network call)
        when neither a private key nor an API secret is set (python-binance would assert)."""
        if self.PRIVATE_KEY is not None:
            return self._rsa_signature(payload) if self._is_rsa else self._ed25519_signature(payload)
        if not self.API_SECRET:
            raise KeysMissing("signed request")
        return self._hmac_signature(payload)


def load_private_key(pem: str, passphrase: str | None = None):
    """An Ed25519 (or RSA) private key from PEM text, for :class:`BinanceExchange`.

    python-binance guesses the type from the text's length (longer than 120 characters →
    RSA), which makes every passphrase-protected Ed25519 key an unreadable "RSA" key; the key
    is read here with pycryptodome instead. Returns ``(key, is_rsa)``. Raises ValueError (no
    key material in the message) when the text is not a key or the passphrase is wrong.
    """
    from Crypto.PublicKey import ECC, RSA

    text = pem.strip()
    try:
        key = ECC.import_key(text, passphrase=passphrase or None)
        if key.curve not in ("Ed25519", "ed25519"):
            raise ValueError(f"private key curve {key.curve} is not Ed25519")
        return key, False
    except ValueError as first:
        try:
            return RSA.import_key(text, passphrase=passphrase or None), True
        except (ValueError, IndexError, TypeError):
            raise ValueError("BINANCE_PRIVATE_KEY is not a readable Ed25519/RSA private key "
                             "(wrong passphrase or not PEM)") from first


def _use_private_key(client: _Client, private_key: str | None, passphrase: str | None) -> str:
    """Give ``client`` the Ed25519/RSA ``private_key`` (PEM text) when there is one; returns the
    key type that signs: ``"HMAC"`` (no private key), ``"Ed25519"`` or ``"RSA"``. Raises
    ValueError (:func:`load_private_key`)."""
    if not private_key:
        return "HMAC"
    client.PRIVATE_KEY, client._is_rsa = load_private_key(private_key, passphrase)
    return "RSA" if client._is_rsa else "Ed25519"


def _rest_base(api_url: str) -> str:
    """The REST base for ``api_url``: ``https://host/api`` from the host root (``BINANCE_API_URL``
    as the doctor command uses it) or from the REST base itself, with or without a trailing slash."""
    base = api_url.rstrip("/")
    return base if base.endswith("/api") else base + "/api"


class BinanceExchange:
    """The :class:`~stopmonitor.exchange.base.Exchange` port on Binance spot (live or testnet).

    ``api_url`` replaces python-binance's REST base for both live and testnet, so a rehearsal
    exchange or the local fake can stand in; give the host root (``https://host``, as
    ``BINANCE_API_URL``) or the REST base (``https://host/api``) — ``/api`` is added if missing. ``timeout`` (seconds) applies to every
    HTTP request. ``state`` keeps the ban horizon, the server-time offset and exchangeInfo
    across processes (default: :class:`CacheState` on Django's cache, per venue).

    Keys: HMAC (``api_secret``) or an Ed25519 key (``private_key`` PEM text, with
    ``private_key_passphrase`` when it is encrypted); with a private key the secret is not
    used. ``recv_window_ms`` is sent with every signed request (default 5000, at most 60000;
    ValueError otherwise).

    Every method reaches the network: call it outside any database transaction.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None,
        *,
        testnet: bool,
        api_url: str | None = None,
        timeout: float = 10,
        state: ExchangeState | None = None,
        private_key: str | None = None,
        private_key_passphrase: str | None = None,
        recv_window_ms: int = DEFAULT_RECV_WINDOW_MS,
    ) -> None:
        if not 0 < int(recv_window_ms) <= MAX_RECV_WINDOW_MS:
            raise ValueError(f"recvWindow must be 1..{MAX_RECV_WINDOW_MS} ms, got {recv_window_ms}")
        self.venue = "binance-testnet" if testnet else "binance"
        self.state: ExchangeState = state if state is not None else CacheState(prefix=f"stopmonitor:binance:{self.venue}:")
        self._secrets = tuple(s for s in (api_key, api_secret, private_key, private_key_passphrase) if s)
        self._client = _Client(api_key, None if private_key else api_secret, testnet=testnet, ping=False,
                               requests_params={"timeout": timeout})
        self.key_type = _use_private_key(self._client, private_key, private_key_passphrase)
        self._client.REQUEST_RECVWINDOW = int(recv_window_ms)
        if api_url:
            base = _rest_base(api_url)
            self._client.API_URL = base
            self._client.API_TESTNET_URL = base
        offset = self.state.get_time_offset_ms()
        if offset is not None:
            self._client.timestamp_offset = offset

    def __repr__(self) -> str:  # never show the key or the secret
        return f"BinanceExchange(venue={self.venue!r})"

    def clock(self) -> datetime:
        """Now, UTC, by the local wall clock (the server-time offset only shifts signed timestamps)."""
        return _now()

    def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        self._client.session.close()

    # ------------------------------------------------------------------ reads

    def book_tickers(self, symbols: Iterable[str]) -> Quotes:
        """Best bid/ask (quote asset) and their sizes (base asset) per symbol, from ONE
        ``GET /api/v3/ticker/bookTicker?symbols=[…]`` (invariant 9); ``observed_at`` is now (UTC).

        Symbols missing from the answer are absent from the result. One unknown symbol makes
        Binance refuse the whole list (-1121): then one request per symbol, the unknown ones
        absent (:meth:`_per_symbol_after_1121`); ``requests`` of the answer says how many were
        sent. Raises RateLimited, ExchangeUnavailable.
        """
        wanted = sorted({s.upper() for s in symbols})
        if not wanted:
            return Quotes(requests=0)
        quotes, requests = self._per_symbol_after_1121(self._book_tickers_request, wanted, "book ticker")
        return Quotes(quotes, requests=requests)

    def _book_tickers_request(self, wanted: list[str]) -> dict[str, Quote]:
        """One ``GET /api/v3/ticker/bookTicker?symbols=[…]`` for ``wanted`` (upper case, sorted)."""
        payload = json.dumps(wanted, separators=(",", ":"))
        context = f"bookTicker symbols={payload}"
        answer = self._call(lambda: self._client.get_orderbook_tickers(symbols=payload), context, placing=False)
        rows = answer if isinstance(answer, list) else [answer]
        observed_at = _now()
        quotes: dict[str, Quote] = {}
        try:
            for row in rows:
                symbol = row["symbol"]
                if symbol not in wanted:
                    continue
                quotes[symbol] = Quote(
                    symbol=symbol,
                    bid=_dec(row["bidPrice"], "bidPrice"),
                    ask=_dec(row["askPrice"], "askPrice"),
                    bid_qty=_dec(row["bidQty"], "bidQty"),
                    ask_qty=_dec(row["askQty"], "askQty"),
                    observed_at=observed_at,
                )
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e
        return quotes

    def symbol_filters(self, symbols: Iterable[str], *, fresh: bool = False) -> dict[str, SymbolFilters]:
        """Trading filters per symbol from ``GET /api/v3/exchangeInfo?symbols=[…]``, cached in
        ``state`` for one hour per symbol (only the uncached ones are asked, in one request);
        ``fresh`` asks every symbol again (a symbol's ``status`` — HALT, BREAK, CANCEL_ONLY —
        can change within the hour) and refreshes the cache.

        Symbols Binance does not list are absent: an unknown symbol in the request makes Binance
        refuse it (-1121), and the uncached symbols are then asked one by one
        (:meth:`_per_symbol_after_1121`). Raises RateLimited, ExchangeUnavailable.
        """
        wanted = sorted({s.upper() for s in symbols})
        entries: dict[str, dict] = {}
        missing = []
        for symbol in wanted:
            info = None if fresh else self.state.get_symbol_info(symbol)
            if info is None:
                missing.append(symbol)
            else:
                entries[symbol] = info
        if missing:
            asked, _ = self._per_symbol_after_1121(self._exchange_info_request, missing, "exchangeInfo")
            entries.update(asked)
        return {symbol: parse_symbol_filters(entry) for symbol, entry in entries.items()}

    def _exchange_info_request(self, missing: list[str]) -> dict[str, dict]:
        """One ``GET /api/v3/exchangeInfo?symbols=[…]`` for ``missing``: each readable entry is
        cached in ``state`` for ``FILTERS_TTL_SECONDS`` and returned by symbol."""
        payload = json.dumps(missing, separators=(",", ":"))
        context = f"exchangeInfo symbols={payload}"
        answer = self._call(
            lambda: self._client._get("exchangeInfo", data={"symbols": payload}, version=Client.PRIVATE_API_VERSION),
            context,
            placing=False,
        )
        entries: dict[str, dict] = {}
        try:
            for entry in answer["symbols"]:
                if entry["symbol"] in missing:
                    parse_symbol_filters(entry)  # refuse to cache what cannot be parsed
                    self.state.set_symbol_info(entry["symbol"], entry, FILTERS_TTL_SECONDS)
                    entries[entry["symbol"]] = entry
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e
        return entries

    @staticmethod
    def _per_symbol_after_1121(read: Callable[[list[str]], dict[str, T]], wanted: list[str],
                               what: str) -> tuple[dict[str, T], int]:
        """``read(wanted)`` in one request; when Binance refuses the list for an unknown symbol
        (-1121), ``read([symbol])`` once per symbol, the unknown ones absent (one warning line:
        how many of how many were unknown). A request whose only symbol is unknown answers
        ``{}``. Returns the answer and the number of requests sent. Any other error propagates,
        also from a per-symbol ask."""
        try:
            return read(wanted), 1
        except ExchangeUnavailable as exc:
            if exc.code != INVALID_SYMBOL:
                raise
            refused = exc
        if len(wanted) == 1:
            return {}, 1
        answer: dict[str, T] = {}
        unknown = 0
        for symbol in wanted:
            try:
                answer.update(read([symbol]))
            except ExchangeUnavailable as exc:
                if exc.code != INVALID_SYMBOL:
                    raise
                unknown += 1
        log.warning(f"bulk {what} refused with -1121; asked symbol by symbol",
                    extra={"symbols": len(wanted), "unknown": unknown, "error": str(refused)[:200]})
        return answer, 1 + len(wanted)

    def free_balances(self) -> Balances:
        """Free (not locked) balance per asset, in that asset's units, from signed
        ``GET /api/v3/account``, with ``locked`` per asset from the same answer (:class:`Balances`).
        Raises RateLimited, ClockSkew, ExchangeUnavailable.
        """
        context = "account"
        answer = self._signed_read(lambda: self._client.get_account(), context)
        try:
            rows = answer["balances"]
            return Balances({str(b["asset"]): _dec(b["free"], "free") for b in rows},
                            locked={str(b["asset"]): _dec(b["locked"], "locked") for b in rows if "locked" in b})
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e

    def account_trades(self, symbol: str, *, since: datetime | None = None,
                       order_id: int | None = None) -> list[Trade]:
        """The account's trades on ``symbol``, oldest first, from signed ``GET /api/v3/myTrades``
        (weight 5 with ``orderId``, 20 without): those of ``order_id`` when given; else from
        ``since`` (``startTime``; Binance serves at most 24 hours from it); else the most
        recent. At most 1000 trades. Raises RateLimited, ClockSkew, ExchangeUnavailable.
        """
        params: dict[str, Any] = {"symbol": symbol, "limit": MY_TRADES_LIMIT}
        if order_id is not None:
            params["orderId"] = int(order_id)
        elif since is not None:
            params["startTime"] = int(since.timestamp() * 1000)
        context = f"myTrades {symbol}" + (f" orderId={order_id}" if order_id is not None else "")
        answer = self._signed_read(lambda: self._client.get_my_trades(**dict(params)), context)
        try:
            trades = [parse_trade(row) for row in answer]
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e
        return sorted(trades, key=lambda t: t.trade_id)

    def get_order(self, symbol: str, client_order_id: str) -> OrderResult | None:
        """The order with ``origClientOrderId`` = ``client_order_id`` (signed
        ``GET /api/v3/order``), or None when Binance has none (-2013). ``fills`` is empty; use
        ``cummulative_quote_qty`` for the average price. Raises RateLimited, ClockSkew,
        ExchangeUnavailable.
        """
        context = f"get order {symbol} client_order_id={client_order_id}"
        try:
            answer = self._signed_read(
                lambda: self._client.get_order(symbol=symbol, origClientOrderId=client_order_id), context
            )
        except ExchangeUnavailable as e:
            if e.code == NO_SUCH_ORDER:
                return None
            raise
        try:
            return parse_order(answer)
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e

    # ------------------------------------------------------------------ the order

    def place_market_order(self, request: OrderRequest) -> OrderResult:
        """Send one MARKET order: signed ``POST /api/v3/order`` with ``quantity`` as a decimal
        string (:func:`format_decimal`), ``newClientOrderId`` = ``request.client_order_id``,
        ``newOrderRespType=FULL``; returns the executed quantity (base asset) and the fills.

        Must be called outside any database transaction (invariant 2; AssertionError
        otherwise, before any network call). Never retried, except once after -1021 and a
        ``GET /api/v3/time`` resync (the first request was refused, so no order exists).
        Raises OrderRejected (definite, nothing exists; :class:`OrderRejectedMaybeFilled` for
        -2010: an earlier order with this id may have taken the balance — reconcile),
        OrderOutcomeUnknown (the order may exist: reconcile with :meth:`get_order`),
        RateLimited, ClockSkew.
        """
        from django.db import connections

        if any(c.in_atomic_block for c in connections.all(initialized_only=True)):
            raise AssertionError("place_market_order called inside a database transaction (invariant 2)")

        side = request.side.upper()
        context = (
            f"MARKET {side} {request.symbol} quantity={request.quantity} client_order_id={request.client_order_id}"
        )
        if side not in ("BUY", "SELL"):
            raise OrderRejected(f"{context}: side must be BUY or SELL (not sent)")
        if not request.quantity.is_finite() or request.quantity <= 0:
            raise OrderRejected(f"{context}: quantity must be a positive decimal (not sent)")
        if not CLIENT_ORDER_ID_RE.match(request.client_order_id):
            raise OrderRejected(f"{context}: client order id does not match {CLIENT_ORDER_ID_RE.pattern} (not sent)")
        params = {
            "symbol": request.symbol,
            "side": side,
            "type": "MARKET",
            "quantity": format_decimal(request.quantity),
            "newClientOrderId": request.client_order_id,
            "newOrderRespType": "FULL",
        }

        # python-binance writes timestamp/signature into the dict it is given: a fresh copy each time.
        def send() -> Any:
            return self._client.create_order(**dict(params))

        try:
            answer = self._call(send, context, placing=True)
        except ClockSkew as first:
            self._resync_clock(context, cause=first)
            answer = self._call(send, context + " (after clock resync)", placing=True)
        try:
            return parse_order(answer)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OrderOutcomeUnknown(f"{context}: unreadable answer to an accepted request: {self._scrub(str(e))}") from e

    # ------------------------------------------------------------------ resting orders (protection)
    # ../shared/design/protection.md; Binance spot REST "New order", "New Order list - OCO",
    # "Cancel an Existing Order and Send a New Order", "Order Amend Keep Priority",
    # "Current open orders", "Cancel order".

    def place_stop_order(self, request: StopOrderRequest) -> OrderResult:
        """Rest one ``STOP_LOSS``: signed ``POST /api/v3/order`` (``type=STOP_LOSS``,
        ``stopPrice``, ``newOrderRespType=RESULT``); returns it NEW. Errors as
        :meth:`place_market_order` (see :class:`~stopmonitor.exchange.base.ProtectionPort`)."""
        context = (f"STOP_LOSS {request.side} {request.symbol} quantity={request.quantity} "
                   f"stopPrice={request.stop_price} client_order_id={request.client_order_id}")
        params = self._stop_params(request, context)
        params.update(newClientOrderId=request.client_order_id, newOrderRespType="RESULT")
        answer = self._place(lambda: self._client._post("order", True, data=dict(params)), context)
        return self._parsed(parse_order, answer, context)

    def place_oco(self, request: OcoRequest) -> OrderListResult:
        """Rest one OCO list: signed ``POST /api/v3/orderList/oco`` with a ``STOP_LOSS`` leg and a
        ``LIMIT_MAKER`` leg (above for a SELL list, below for a BUY list)."""
        context = (f"OCO {request.side} {request.symbol} quantity={request.quantity} stopPrice={request.stop_price} "
                   f"limitPrice={request.limit_price} client_order_id={request.stop_client_order_id}")
        side = self._check_order(context, request.side, request.quantity,
                                 (request.stop_client_order_id, request.limit_client_order_id,
                                  request.list_client_order_id), (request.stop_price, request.limit_price))
        stop, limit = ("below", "above") if side == "SELL" else ("above", "below")
        params = {
            "symbol": request.symbol, "side": side, "quantity": format_decimal(request.quantity),
            "listClientOrderId": request.list_client_order_id, "newOrderRespType": "RESULT",
            f"{stop}Type": "STOP_LOSS", f"{stop}StopPrice": format_decimal(request.stop_price),
            f"{stop}ClientOrderId": request.stop_client_order_id,
            f"{limit}Type": "LIMIT_MAKER", f"{limit}Price": format_decimal(request.limit_price),
            f"{limit}ClientOrderId": request.limit_client_order_id,
        }
        answer = self._place(lambda: self._client._post("orderList/oco", True, data=dict(params)), context)
        return self._parsed(parse_order_list, answer, context)

    def cancel_replace(self, symbol: str, cancel_client_order_id: str,
                       new: OrderRequest | StopOrderRequest) -> CancelReplaceResult:
        """Cancel ``cancel_client_order_id`` and place ``new`` in one signed
        ``POST /api/v3/order/cancelReplace`` (``cancelReplaceMode=STOP_ON_FAILURE``,
        ``cancelRestrictions=ONLY_NEW``, ``newOrderRespType=FULL``).

        200 → :class:`CancelReplaceResult`; 400 -2022 (cancel FAILURE, new NOT_ATTEMPTED) →
        :class:`CancelReplaceCancelFailed`; 409 -2021 (cancel SUCCESS, new FAILURE) →
        :class:`CancelReplaceNewFailed`; no usable answer → :class:`CancelReplaceUnknown`; any
        other refusal → OrderRejected (nothing happened). Classified on the HTTP status, the
        integer codes and the ``data.cancelResult``/``newOrderResult`` fields, never on text.
        """
        kind = "STOP_LOSS" if isinstance(new, StopOrderRequest) else "MARKET"
        context = (f"cancelReplace {symbol} cancel={cancel_client_order_id} new={kind} {new.side} "
                   f"quantity={new.quantity} client_order_id={new.client_order_id}")
        if new.symbol != symbol:
            raise OrderRejected(f"{context}: the new order is for {new.symbol} (not sent)")
        if kind == "STOP_LOSS":
            params = self._stop_params(new, context, also=(cancel_client_order_id,))
        else:
            side = self._check_order(context, new.side, new.quantity, (new.client_order_id, cancel_client_order_id), ())
            params = {"symbol": symbol, "side": side, "type": "MARKET", "quantity": format_decimal(new.quantity)}
        params.update(cancelReplaceMode="STOP_ON_FAILURE", cancelRestrictions="ONLY_NEW",
                      cancelOrigClientOrderId=cancel_client_order_id, newClientOrderId=new.client_order_id,
                      newOrderRespType="FULL")
        try:
            answer = self._place(lambda: self._client._post("order/cancelReplace", True, data=dict(params)), context)
        except OrderRejected as e:
            raise self._cancel_replace_failure(e, context, cancel_client_order_id, new.client_order_id) from e
        except OrderOutcomeUnknown as e:
            raise CancelReplaceUnknown(str(e), cancel_client_order_id, new.client_order_id, e.code) from e
        try:
            return CancelReplaceResult(parse_cancelled(answer["cancelResponse"]), parse_order(answer["newOrderResponse"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CancelReplaceUnknown(f"{context}: unreadable 200 answer: {self._scrub(str(e))}",
                                       cancel_client_order_id, new.client_order_id) from e

    def amend_quantity(self, symbol: str, client_order_id: str, new_quantity: Decimal) -> OrderResult:
        """Reduce a resting order to ``new_quantity`` (base asset) keeping its priority and its
        client order id: signed ``PUT /api/v3/order/amend/keepPriority`` (weight 4, no order count)."""
        context = f"amend keepPriority {symbol} client_order_id={client_order_id} newQty={new_quantity}"
        self._check_order(context, "SELL", new_quantity, (client_order_id,), ())
        params = {"symbol": symbol, "origClientOrderId": client_order_id, "newClientOrderId": client_order_id,
                  "newQty": format_decimal(new_quantity)}
        answer = self._place(lambda: self._client._put("order/amend/keepPriority", True, data=dict(params)), context)
        return self._parsed(parse_amended, answer, context)

    def open_orders(self, symbol: str | None = None) -> list[OrderResult]:
        """Open orders: signed ``GET /api/v3/openOrders`` for ``symbol`` (weight 6) or, with None,
        for every symbol in one request (weight 80). Raises RateLimited, ClockSkew, ExchangeUnavailable."""
        context = f"openOrders symbol={symbol or '*'}"
        params = {"symbol": symbol} if symbol else {}
        answer = self._signed_read(lambda: self._client._get("openOrders", True, data=dict(params)), context)
        try:
            return [parse_order(row) for row in answer]
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e

    def cancel_order(self, symbol: str, client_order_id: str) -> OrderResult:
        """Cancel one open order: signed ``DELETE /api/v3/order`` by ``origClientOrderId``.
        Raises OrderRejected(-2011) when it is not open, OrderOutcomeUnknown, RateLimited, ClockSkew."""
        context = f"cancel {symbol} client_order_id={client_order_id}"
        self._check_order(context, "SELL", Decimal(1), (client_order_id,), ())
        params = {"symbol": symbol, "origClientOrderId": client_order_id}
        answer = self._place(lambda: self._client._delete("order", True, data=dict(params)), context)
        return self._parsed(parse_cancelled, answer, context)

    def _stop_params(self, request: StopOrderRequest, context: str, also: tuple[str, ...] = ()) -> dict:
        side = self._check_order(context, request.side, request.quantity, (request.client_order_id, *also),
                                 (request.stop_price,))
        return {"symbol": request.symbol, "side": side, "type": "STOP_LOSS",
                "quantity": format_decimal(request.quantity), "stopPrice": format_decimal(request.stop_price)}

    @staticmethod
    def _check_order(context: str, side: str, quantity: Decimal, client_order_ids: tuple[str, ...],
                     prices: tuple[Decimal, ...]) -> str:
        """Refuse, before any network call, what Binance would refuse or what would break
        invariant 2 (a call inside a transaction: AssertionError). Returns the side upper-cased."""
        from django.db import connections

        if any(c.in_atomic_block for c in connections.all(initialized_only=True)):
            raise AssertionError(f"{context}: called inside a database transaction (invariant 2)")
        side = side.upper()
        if side not in ("BUY", "SELL"):
            raise OrderRejected(f"{context}: side must be BUY or SELL (not sent)")
        for value in (quantity, *prices):
            if not value.is_finite() or value <= 0:
                raise OrderRejected(f"{context}: quantities and prices must be positive decimals (not sent)")
        for client_order_id in client_order_ids:
            if not CLIENT_ORDER_ID_RE.match(client_order_id):
                raise OrderRejected(f"{context}: client order id {client_order_id!r} does not match "
                                    f"{CLIENT_ORDER_ID_RE.pattern} (not sent)")
        return side

    def _place(self, send: Callable[[], T], context: str) -> T:
        """One placing request; after -1021 resync the clock and send once more (refused, so nothing exists)."""
        try:
            return self._call(send, context, placing=True)
        except ClockSkew as first:
            self._resync_clock(context, cause=first)
            return self._call(send, context + " (after clock resync)", placing=True)

    def _parsed(self, parse: Callable[[Any], T], answer: Any, context: str) -> T:
        """``parse(answer)``; an unreadable answer to an accepted request is OrderOutcomeUnknown."""
        try:
            return parse(answer)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OrderOutcomeUnknown(f"{context}: unreadable answer to an accepted request: {self._scrub(str(e))}") from e

    def _cancel_replace_failure(self, e: OrderRejected, context: str, cancel_id: str, new_id: str) -> ExchangeError:
        """Map a refused cancelReplace on its codes and its ``data`` (Binance's table for
        STOP_ON_FAILURE: 400 = cancel FAILURE / new NOT_ATTEMPTED, 409 = cancel SUCCESS / new FAILURE)."""
        if e.code not in (CANCEL_REPLACE_FAILED, CANCEL_REPLACE_PARTIALLY_FAILED):
            return e
        data = _cancel_replace_data(e)
        cancel, new = data.get("cancelResult"), data.get("newOrderResult")
        cancel_body = data.get("cancelResponse") or {}
        new_body = data.get("newOrderResponse") or {}
        if e.code == CANCEL_REPLACE_FAILED and cancel == "FAILURE" and new == "NOT_ATTEMPTED":
            return CancelReplaceCancelFailed(f"{context}: cancel failed, new order not attempted: {e}",
                                             cancel_code=cancel_body.get("code"))
        if e.code == CANCEL_REPLACE_PARTIALLY_FAILED and cancel == "SUCCESS" and new == "FAILURE":
            return CancelReplaceNewFailed(f"{context}: protection cancelled, new order failed: {e}",
                                          _cancelled_or_none(cancel_body), new_code=new_body.get("code"))
        return CancelReplaceUnknown(f"{context}: cancelReplace answer not in Binance's STOP_ON_FAILURE table: {e}",
                                    cancel_id, new_id, e.code)

    # ------------------------------------------------------------------ plumbing

    def _signed_read(self, fn: Callable[[], T], context: str) -> T:
        """A signed read: on -1021 resync the clock and retry once (reads may retry)."""
        try:
            return self._call(fn, context, placing=False)
        except ClockSkew as first:
            self._resync_clock(context, cause=first)
            return self._call(fn, context + " (after clock resync)", placing=False)

    def _resync_clock(self, context: str, cause: ClockSkew) -> None:
        """``GET /api/v3/time``; store server minus local time (ms, at the request midpoint).

        Raises RateLimited, or ClockSkew when the server time cannot be read.
        """
        before = time.time() * 1000
        try:
            answer = self._call(self._client.get_server_time, f"{context}: clock resync", placing=False)
            server_ms = int(answer["serverTime"])
        except RateLimited:
            raise
        except ExchangeUnavailable as e:
            raise ClockSkew(f"{context}: -1021 and the server time could not be read: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise ClockSkew(f"{context}: -1021 and the server time answer is malformed") from e
        after = time.time() * 1000
        offset = int(round(server_ms - (before + after) / 2))
        self.state.set_time_offset_ms(offset)
        self._client.timestamp_offset = offset

    def _call(self, fn: Callable[[], T], context: str, *, placing: bool) -> T:
        """Run one python-binance request behind the ban gate and map every failure to ours."""
        until = self.state.get_no_calls_until()
        if until is not None and _now() < until:
            raise RateLimited(f"{context}: not sent, no calls to {self.venue} until {until.isoformat()}", retry_after=until)
        try:
            return fn()
        except BinanceAPIException as e:
            raise self._map_api_error(e, context, placing) from e
        except BinanceRequestException as e:  # 2XX with a body that is not JSON
            detail = f"{context}: answer is not JSON: {self._scrub(str(e.message))[:200]}"
            if placing:
                raise OrderOutcomeUnknown(detail) from e
            raise ExchangeUnavailable(detail) from e
        except requests.exceptions.RequestException as e:  # timeout, reset, refused, …
            detail = f"{context}: {type(e).__name__}"
            if placing:
                raise OrderOutcomeUnknown(detail + " (the order may exist)") from e
            raise ExchangeUnavailable(detail) from e

    def _map_api_error(self, e: BinanceAPIException, context: str, placing: bool) -> ExchangeError:
        """Our error for one refused request, in the order of the module's table (the HTTP
        status first, then the Binance ``code``)."""
        status = int(e.status_code)
        code = e.code if isinstance(e.code, int) and e.code != 0 else None
        text = self._scrub(str(e.message or ""))[:200]
        detail = f"{context}: HTTP {status} code {code}: {text}"

        if status in (418, 429):
            return self._banned(e, detail, code, banned=status == 418)
        if code == INVALID_TIMESTAMP:
            return ClockSkew(detail)
        if status >= 500 or code in UNKNOWN_OUTCOME_CODES:
            return _no_answer(detail, code, placing)
        if code in RATE_LIMIT_CODES:
            return RateLimited(detail, retry_after=self._retry_after(e, DEFAULT_RETRY_AFTER_429), code=code)
        if code is None:  # a 4XX page from something that is not Binance's matching engine
            return _no_answer(detail, None, placing)
        return _refusal(detail, code, placing)

    def _banned(self, e: BinanceAPIException, detail: str, code: int | None, *, banned: bool) -> RateLimited:
        """HTTP 429 (or 418, ``banned``): the horizon (Retry-After, else 60 s / 120 s) is saved in
        ``state`` so that no call goes out before it, from any process sharing the state."""
        retry_after = self._retry_after(e, DEFAULT_RETRY_AFTER_418 if banned else DEFAULT_RETRY_AFTER_429)
        self.state.set_no_calls_until(retry_after)
        return RateLimited(detail + f"; no calls until {retry_after.isoformat()}", retry_after=retry_after, code=code, banned=banned)

    @staticmethod
    def _retry_after(e: BinanceAPIException, default_seconds: int) -> datetime:
        """UTC time from the Retry-After header (seconds or an HTTP date), else now + default."""
        headers = getattr(e.response, "headers", None) or {}
        raw = headers.get("Retry-After")
        now = _now()
        if raw:
            raw = raw.strip()
            if raw.isdigit():
                return now + timedelta(seconds=int(raw))
            try:
                when = parsedate_to_datetime(raw)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
                return max(when, now)
            except (TypeError, ValueError):
                pass
        return now + timedelta(seconds=default_seconds)

    def _scrub(self, text: str) -> str:
        """Remove the API key and secret from text that may echo a request (defence in depth)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _no_answer(detail: str, code: int | None, placing: bool) -> ExchangeError:
    """No definite answer (5XX, -1000/-1006/-1007, a 4XX without a Binance code): an order may
    exist (OrderOutcomeUnknown); a read is ExchangeUnavailable."""
    if placing:
        return OrderOutcomeUnknown(detail + " (the order may exist)", code)
    return ExchangeUnavailable(detail, code)


def _refusal(detail: str, code: int, placing: bool) -> ExchangeError:
    """Any other 4XX Binance ``code``: a refused order is OrderRejected (nothing exists), except
    -2010, OrderRejectedMaybeFilled; a refused read is ExchangeUnavailable."""
    if not placing:
        return ExchangeUnavailable(detail, code)
    if code == NEW_ORDER_REJECTED:
        return OrderRejectedMaybeFilled(detail + " (an earlier order with this id may have filled)", code)
    return OrderRejected(detail, code)


def _cancel_replace_data(e: OrderRejected) -> dict:
    """The ``data`` object of a refused cancelReplace's body (``{}`` when there is none)."""
    try:
        return e.__cause__.response.json().get("data") or {}
    except (AttributeError, ValueError, TypeError):
        return {}


def _cancelled_or_none(cancel_body: dict) -> OrderResult | None:
    """The cancelled order of a cancelReplace's ``cancelResponse``, or None when it cannot be read."""
    try:
        return parse_cancelled(cancel_body)
    except (KeyError, TypeError, ValueError):
        return None
