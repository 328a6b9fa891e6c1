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
any other 4XX ``code`` (-2010, -1013, …)     OrderRejected(code)         ExchangeUnavailable
===========================================  ==========================  =======================

``get_order`` returns None on ``-2013``. ``book_tickers`` with one unknown symbol gets
``-1121`` for the whole request (Binance refuses the list): ExchangeUnavailable(code=-1121);
the caller should drop symbols that ``symbol_filters`` does not know and ask again.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlencode

import requests
from binance.client import Client
from binance.exceptions import BinanceAPIException, BinanceRequestException

from .base import (
    ClockSkew,
    ExchangeError,
    ExchangeUnavailable,
    Fill,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    OrderResult,
    Quote,
    RateLimited,
    SymbolFilters,
)
from .filters import decimal_field as _dec, parse_symbol_filters  # noqa: F401 (re-exported)
from .state import FILTERS_TTL_SECONDS, CacheState, ExchangeState, MemoryState

__all__ = ["BinanceExchange", "CacheState", "MemoryState", "ExchangeState", "format_decimal"]

T = TypeVar("T")

INVALID_TIMESTAMP = -1021
NO_SUCH_ORDER = -2013
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
    return OrderResult(
        symbol=str(data["symbol"]),
        side=str(data["side"]),
        status=str(data["status"]),
        exchange_order_id=int(data["orderId"]),
        client_order_id=str(data["clientOrderId"]),
        requested_qty=_dec(data["origQty"], "origQty"),
        executed_qty=_dec(data["executedQty"], "executedQty"),
        cummulative_quote_qty=_dec(data["cummulativeQuoteQty"], "cummulativeQuoteQty"),
        fills=fills,
        transact_time=_ms_to_utc(when),
    )


class _Client(Client):
    """python-binance 1.0.29's Client, signing a POST/PUT/DELETE body as it goes on the wire.

    The stock client signs ``k=v&…`` with raw values but ``requests`` form-encodes the body, so
    a value with ``:`` or ``/`` (both legal in newClientOrderId) would be refused with -1022.
    GET query strings are sent unencoded by python-binance, so they keep the stock signing.
    """

    _signing_method = "get"

    def _request(self, method, uri, signed, force_params=False, **kwargs):
        self._signing_method = method.lower()
        try:
            return super()._request(method, uri, signed, force_params, **kwargs)
        finally:
            self._signing_method = "get"

    def _generate_signature(self, data, uri_encode=True):
        if self._signing_method == "get" or self.PRIVATE_KEY:
            return super()._generate_signature(data, uri_encode)
        return self._hmac_signature(urlencode(self._order_params(data)))


class BinanceExchange:
    """The :class:`~stopmonitor.exchange.base.Exchange` port on Binance spot (live or testnet).

    ``api_url`` replaces python-binance's REST base for both live and testnet, so a rehearsal
    exchange or the local fake can stand in; give the host root (``https://host``, as
    ``BINANCE_API_URL``) or the REST base (``https://host/api``) — ``/api`` is added if missing. ``timeout`` (seconds) applies to every
    HTTP request. ``state`` keeps the ban horizon, the server-time offset and exchangeInfo
    across processes (default: :class:`CacheState` on Django's cache, per venue).

    Every method reaches the network: call it outside any database transaction.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        testnet: bool,
        api_url: str | None = None,
        timeout: float = 10,
        state: ExchangeState | None = None,
    ) -> None:
        self.venue = "binance-testnet" if testnet else "binance"
        self.state: ExchangeState = state if state is not None else CacheState(prefix=f"stopmonitor:binance:{self.venue}:")
        self._secrets = tuple(s for s in (api_key, api_secret) if s)
        self._client = _Client(api_key, api_secret, testnet=testnet, ping=False, requests_params={"timeout": timeout})
        if api_url:
            base = api_url.rstrip("/")
            if not base.endswith("/api"):
                base += "/api"  # accept the host root too (BINANCE_API_URL as the doctor command uses it)
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

    def book_tickers(self, symbols: Iterable[str]) -> dict[str, Quote]:
        """Best bid/ask (quote asset) and their sizes (base asset) per symbol, from ONE
        ``GET /api/v3/ticker/bookTicker?symbols=[…]`` (invariant 9); ``observed_at`` is now (UTC).

        Symbols missing from the answer are absent from the result. One unknown symbol makes
        Binance refuse the whole list: ExchangeUnavailable(code=-1121). Raises RateLimited,
        ExchangeUnavailable.
        """
        wanted = sorted({s.upper() for s in symbols})
        if not wanted:
            return {}
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

    def symbol_filters(self, symbols: Iterable[str]) -> dict[str, SymbolFilters]:
        """Trading filters per symbol from ``GET /api/v3/exchangeInfo?symbols=[…]``, cached in
        ``state`` for one hour per symbol (only the uncached ones are asked, in one request).

        Symbols Binance does not list are absent; an unknown symbol in the request makes
        Binance refuse it (ExchangeUnavailable code -1121). Raises RateLimited,
        ExchangeUnavailable.
        """
        wanted = sorted({s.upper() for s in symbols})
        entries: dict[str, dict] = {}
        missing = []
        for symbol in wanted:
            info = self.state.get_symbol_info(symbol)
            if info is None:
                missing.append(symbol)
            else:
                entries[symbol] = info
        if missing:
            payload = json.dumps(missing, separators=(",", ":"))
            context = f"exchangeInfo symbols={payload}"
            answer = self._call(
                lambda: self._client._get("exchangeInfo", data={"symbols": payload}, version=Client.PRIVATE_API_VERSION),
                context,
                placing=False,
            )
            try:
                for entry in answer["symbols"]:
                    if entry["symbol"] in missing:
                        parse_symbol_filters(entry)  # refuse to cache what cannot be parsed
                        self.state.set_symbol_info(entry["symbol"], entry, FILTERS_TTL_SECONDS)
                        entries[entry["symbol"]] = entry
            except (KeyError, TypeError, ValueError) as e:
                raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e
        return {symbol: parse_symbol_filters(entry) for symbol, entry in entries.items()}

    def free_balances(self) -> dict[str, Decimal]:
        """Free (not locked) balance per asset, in that asset's units, from signed
        ``GET /api/v3/account``. Raises RateLimited, ClockSkew, ExchangeUnavailable.
        """
        context = "account"
        answer = self._signed_read(lambda: self._client.get_account(), context)
        try:
            return {str(b["asset"]): _dec(b["free"], "free") for b in answer["balances"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ExchangeUnavailable(f"{context}: malformed answer: {self._scrub(str(e))}") from e

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
        Raises OrderRejected (definite, nothing exists), OrderOutcomeUnknown (the order may
        exist: reconcile with :meth:`get_order`), RateLimited, ClockSkew.
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
        status = int(e.status_code)
        code = e.code if isinstance(e.code, int) and e.code != 0 else None
        text = self._scrub(str(e.message or ""))[:200]
        detail = f"{context}: HTTP {status} code {code}: {text}"

        if status in (418, 429):
            banned = status == 418
            retry_after = self._retry_after(e, DEFAULT_RETRY_AFTER_418 if banned else DEFAULT_RETRY_AFTER_429)
            self.state.set_no_calls_until(retry_after)
            return RateLimited(detail + f"; no calls until {retry_after.isoformat()}", retry_after=retry_after, code=code, banned=banned)
        if code == INVALID_TIMESTAMP:
            return ClockSkew(detail)
        if status >= 500 or code in UNKNOWN_OUTCOME_CODES:
            return OrderOutcomeUnknown(detail + " (the order may exist)", code) if placing else ExchangeUnavailable(detail, code)
        if code in RATE_LIMIT_CODES:
            return RateLimited(detail, retry_after=self._retry_after(e, DEFAULT_RETRY_AFTER_429), code=code)
        if code is None:  # a 4XX page from something that is not Binance's matching engine
            return OrderOutcomeUnknown(detail + " (the order may exist)") if placing else ExchangeUnavailable(detail)
        return OrderRejected(detail, code) if placing else ExchangeUnavailable(detail, code)

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
