"""The exchange port: value types, the adapter protocol and the typed error taxonomy.

Adapters (``binance``, ``paper``, ``replay``) return only these types and raise only these
errors, so the engine never sees python-binance. Prices are in the quote asset, quantities
in the base asset, all ``Decimal``; times are timezone-aware UTC ``datetime``.

What the caller must do after each error (invariant 3 of ../shared/design/stop-execution.md):

- :class:`OrderRejected` — definite: the order was refused before matching and does not
  exist. Record ``FAILED``; a new attempt (new client order id) is allowed later.
- :class:`OrderRejectedMaybeFilled` — ``-2010`` on a close: refused, but "insufficient
  balance" after a re-send usually proves the first order filled ("Evidence" section). Not a
  failure of the close: reconcile (order, trades, balance) before deciding anything.
- :class:`OrderOutcomeUnknown` — the order may exist (timeout, connection reset, HTTP 5XX,
  ``-1007``). Keep the execution ``SUBMITTED``; reconcile by client order id.
- :class:`RateLimited` — 429/418: make no call before ``retry_after`` (UTC).
- :class:`ClockSkew` — ``-1021``: resync the server-time offset, then retry once.
- :class:`ExchangeUnavailable` — a read failed (network, 5XX on a GET); nothing changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Iterable, Protocol, runtime_checkable


@dataclass(frozen=True)
class Quote:
    """Best bid/ask of one symbol at ``observed_at`` (UTC). Sizes in the base asset.

    ``source_time`` is when the market printed this price, when it differs from when we
    observed it: the recorded candle's time (UTC) for the replay exchange; None for live venues.
    """

    symbol: str
    bid: Decimal
    ask: Decimal
    bid_qty: Decimal
    ask_qty: Decimal
    observed_at: datetime
    source_time: datetime | None = None


class Quotes(dict):
    """A ``book_tickers`` answer (``dict[str, Quote]``) that says how many requests it took:
    ``requests`` is 1, or 1 + one per symbol when Binance refused the list for an unknown symbol
    (-1121) and the adapter asked symbol by symbol. An adapter that always sends one request
    may answer a plain dict (one request)."""

    def __init__(self, quotes=(), *, requests: int = 1):
        super().__init__(quotes)
        self.requests = requests


@dataclass(frozen=True)
class SymbolFilters:
    """Trading filters of one symbol (Binance exchangeInfo "Filters": PRICE_FILTER, LOT_SIZE,
    MARKET_LOT_SIZE, NOTIONAL/MIN_NOTIONAL). ``market_step_size`` falls back to ``step_size``
    when MARKET_LOT_SIZE gives 0."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal
    market_step_size: Decimal | None = None
    market_min_qty: Decimal | None = None
    market_max_qty: Decimal | None = None
    status: str = "TRADING"
    # exchange-held protection: orderTypes has STOP_LOSS; ocoAllowed; cancelReplaceAllowed
    stop_loss_allowed: bool = True
    oco_allowed: bool = True
    cancel_replace_allowed: bool = True

    @property
    def not_trading(self) -> bool:
        """True when Binance takes no new order on the symbol (status HALT, BREAK, CANCEL_ONLY,
        END_OF_DAY; Binance spot "ENUM definitions", Symbol status): a close is BLOCKED
        (SYMBOL_STATUS), never FAILED every minute."""
        return self.status in NOT_TRADING_STATUSES


#: Symbol statuses in which a MARKET order is refused (Binance spot enums.md "Symbol status").
NOT_TRADING_STATUSES = frozenset({"HALT", "BREAK", "CANCEL_ONLY", "END_OF_DAY"})


@dataclass(frozen=True)
class OrderRequest:
    """A MARKET order to send: ``side`` is the closing side; ``client_order_id`` the execution token."""

    symbol: str
    side: str  # BUY | SELL
    quantity: Decimal
    client_order_id: str


@dataclass(frozen=True)
class Fill:
    """One fill of an order: price (quote asset), qty (base asset), commission and its asset."""

    price: Decimal
    qty: Decimal
    commission: Decimal
    commission_asset: str


@dataclass(frozen=True)
class OrderResult:
    """What the exchange says about one order (POST FULL answer or GET /api/v3/order).

    ``status`` is Binance's: NEW, PARTIALLY_FILLED, FILLED, CANCELED, EXPIRED, REJECTED,
    EXPIRED_IN_MATCH. ``fills`` may be empty for a GET; ``cummulative_quote_qty`` then gives
    the average price.
    """

    symbol: str
    side: str
    status: str
    exchange_order_id: int
    client_order_id: str
    requested_qty: Decimal
    executed_qty: Decimal
    cummulative_quote_qty: Decimal
    fills: tuple[Fill, ...] = field(default_factory=tuple)
    transact_time: datetime | None = None
    #: why an EXPIRED/EXPIRED_IN_MATCH order expired: Binance's ``expiryReason``
    #: (``INSUFFICIENT_LIQUIDITY``, ``EXECUTION_RULE_PRICE_RANGE_EXCEEDED``, …); for
    #: EXPIRED_IN_MATCH without it, ``SELF_TRADE_PREVENTION``. None when not expired or not said.
    expiry_reason: str | None = None
    # resting orders (protection): Binance's ``type``, ``stopPrice``/``price`` (quote asset) and
    # ``orderListId`` (-1 unless the order is a leg of an OCO list)
    order_type: str = "MARKET"
    stop_price: Decimal | None = None
    price: Decimal | None = None
    order_list_id: int = -1

    @property
    def avg_price(self) -> Decimal | None:
        """Volume-weighted fill price: from ``fills`` when present, else cumulative quote / executed."""
        if self.fills:
            qty = sum((f.qty for f in self.fills), Decimal("0"))
            if qty > 0:
                return sum((f.price * f.qty for f in self.fills), Decimal("0")) / qty
        if self.executed_qty > 0:
            return self.cummulative_quote_qty / self.executed_qty
        return None

    @property
    def commission(self) -> Decimal | None:
        """Sum of the fills' commissions (in :attr:`commission_asset`); None when there are no
        fills to read it from (a GET answer): unknown is null, never 0 ("Evidence" section)."""
        if not self.fills:
            return None
        return sum((f.commission for f in self.fills), Decimal("0"))

    @property
    def commission_asset(self) -> str | None:
        """The commission asset(s), comma-joined; None when there are no fills."""
        if not self.fills:
            return None
        assets = sorted({f.commission_asset for f in self.fills if f.commission_asset})
        return ",".join(assets)

    @property
    def is_final(self) -> bool:
        """True when the order can no longer fill (FILLED, CANCELED, EXPIRED, REJECTED, EXPIRED_IN_MATCH)."""
        return self.status in FINAL_STATUSES


FINAL_STATUSES = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})


@dataclass(frozen=True)
class Trade:
    """One trade of the account (``GET /api/v3/myTrades``): the evidence that an order filled.

    ``price`` in the quote asset, ``qty`` in the base asset, ``quote_qty`` = price × qty as
    Binance reports it, ``commission`` in ``commission_asset``; ``time`` UTC.
    """

    symbol: str
    trade_id: int
    order_id: int
    price: Decimal
    qty: Decimal
    quote_qty: Decimal
    commission: Decimal
    commission_asset: str
    time: datetime
    is_buyer: bool

    def as_fill(self) -> Fill:
        return Fill(self.price, self.qty, self.commission, self.commission_asset)


def with_trades(order: "OrderResult", trades: Iterable[Trade]) -> "OrderResult":
    """``order`` with its fills taken from ``trades`` of the same order id (a GET answer has no
    fills: price, quantity and commission then come from the trades). Unchanged when no trade
    belongs to the order."""
    from dataclasses import replace

    fills = tuple(t.as_fill() for t in sorted(trades, key=lambda t: t.trade_id) if t.order_id == order.exchange_order_id)
    return replace(order, fills=fills) if fills else order


class Balances(dict):
    """Free balance per asset (the mapping, in that asset's units), and ``locked``: what the
    account's open orders hold per asset, as the exchange reported it in the same answer (None:
    not reported). The close plan bounds what it credits to resting protection by ``locked``
    (invariant 5: a stop our projection thinks rests may be gone)."""

    def __init__(self, free=(), locked: dict | None = None):
        super().__init__(free)
        self.locked = None if locked is None else dict(locked)


class ExchangeError(Exception):
    """Base of every adapter error. Messages carry symbol, side, quantity, client order id — never secrets."""

    code: int | None = None


class OrderRejected(ExchangeError):
    """Definite refusal before matching (e.g. -1013, -1100, -1121): the order does not exist.

    ``maybe_filled`` is True only for :class:`OrderRejectedMaybeFilled` (-2010)."""

    maybe_filled = False

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class OrderRejectedMaybeFilled(OrderRejected):
    """``-2010`` (NEW_ORDER_REJECTED: insufficient balance, …) answered to a close.

    This request created no order, but the balance it lacked may have gone to an earlier
    order with the same client order id: the caller reconciles (order, trades, balance) and
    does not record the close as failed (stop-execution.md, "Evidence").
    """

    maybe_filled = True


class KeysMissing(OrderRejected):
    """A signed request was not sent: the venue's adapter holds no API secret and no private key.

    Definite (nothing reached the exchange, so no order exists) and the account's, not the
    symbol's: it never counts against a symbol's circuit breaker (``account_refusal``)."""

    account_refusal = True

    def __init__(self, context: str):
        super().__init__(f"{context}: not sent, no API secret or private key is configured for this venue")


class OrderOutcomeUnknown(ExchangeError):
    """The order may or may not exist (timeout, reset, HTTP 5XX, -1007): reconcile by client order id."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class RateLimited(ExchangeError):
    """HTTP 429/418 (or a ban still in force): no request before ``retry_after`` (UTC)."""

    def __init__(self, message: str, retry_after: datetime, code: int | None = None, banned: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code
        self.banned = banned


class ClockSkew(ExchangeError):
    """-1021: the request timestamp is outside recvWindow; resync the offset and retry once."""

    code = -1021


class ExchangeUnavailable(ExchangeError):
    """A read failed (network, 5XX, malformed answer); nothing changed at the exchange."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@runtime_checkable
class Exchange(Protocol):
    """The port every adapter implements. ``venue`` is recorded on every event."""

    venue: str

    def clock(self) -> datetime:
        """Now, UTC, as the venue sees it (wall clock for Binance, replay time for replay)."""

    def book_tickers(self, symbols: Iterable[str]) -> dict[str, Quote]:
        """Best bid/ask for ``symbols`` in ONE request (invariant 9). Symbols the venue does not
        know are absent from the result, never an error (only unknown symbols: ``{}``); an
        adapter that needed more than one request for that answers :class:`Quotes`. Raises
        RateLimited, ExchangeUnavailable."""

    def symbol_filters(self, symbols: Iterable[str], *, fresh: bool = False) -> dict[str, SymbolFilters]:
        """Filters per symbol (cached by the adapter; ``fresh`` bypasses the cache, e.g. to see a
        symbol's ``status`` change). Symbols the venue does not know are absent, never an error.
        Raises RateLimited, ExchangeUnavailable."""

    def free_balances(self) -> dict[str, Decimal] | None:
        """Free balance per asset (in that asset's units); None when the venue does not limit
        closes by balance (paper without an account). Raises RateLimited, ClockSkew,
        ExchangeUnavailable."""

    def account_trades(self, symbol: str, *, since: datetime | None = None,
                       order_id: int | None = None) -> list[Trade]:
        """The account's trades on ``symbol`` (``GET /api/v3/myTrades``), oldest first: those of
        ``order_id`` when given, else those at or after ``since`` (UTC; Binance serves at most
        24 hours from it and 1000 trades), else the most recent. Raises RateLimited, ClockSkew,
        ExchangeUnavailable."""

    def place_market_order(self, request: OrderRequest) -> OrderResult:
        """Send one MARKET order (FULL response). Never retried by the adapter itself except once
        after a ClockSkew resync (the request was refused, so nothing exists). Must be called
        outside any database transaction. Raises OrderRejected, OrderOutcomeUnknown,
        RateLimited, ClockSkew."""

    def get_order(self, symbol: str, client_order_id: str) -> OrderResult | None:
        """The order with ``origClientOrderId`` = ``client_order_id``, or None when the exchange
        has none (-2013). Raises RateLimited, ExchangeUnavailable."""


# ---------------------------------------------------------------------------------------------
# Resting orders: the exchange-held protection (../shared/design/protection.md).
#
# A protection is a SELL (long) or BUY (short) ``STOP_LOSS`` resting on the exchange, or an OCO
# list of that stop and a ``LIMIT_MAKER`` take-profit leg. The monitor's own close replaces it
# with a MARKET order in one ``POST /api/v3/order/cancelReplace`` (``STOP_ON_FAILURE``,
# ``cancelRestrictions=ONLY_NEW``); its outcomes are distinct types:
#
# ====================================  ==========================================================
# answer                                what it means / what the caller does next
# ====================================  ==========================================================
# :class:`CancelReplaceResult` (200)    protection cancelled, new order placed: record both
# :class:`CancelReplaceCancelFailed`    HTTP 400 -2022, cancel FAILURE, new NOT_ATTEMPTED: the
#                                       protection is no longer NEW (it triggered, is filling,
#                                       or is gone). Never a market order: query it, record
#                                       ``PROTECTION_TRIGGERED`` and its fills
# :class:`CancelReplaceNewFailed`       HTTP 409 -2021, cancel SUCCESS, new FAILURE: cancelled
#                                       and nothing placed: UNPROTECTED, act now
# :class:`CancelReplaceUnknown`         timeout/5XX/-1007: either leg may have happened; query
#                                       both client order ids before anything else
# :class:`OrderRejected`                refused before either leg (filters, -1013, -1102, -1015
#                                       is RateLimited): nothing changed, the protection rests
# ====================================  ==========================================================


@dataclass(frozen=True)
class StopOrderRequest:
    """A resting ``STOP_LOSS`` (a MARKET order once the last trade price reaches ``stop_price``).

    ``side`` is the closing side (SELL for a long: triggers when last ≤ stop; BUY for a short:
    triggers when last ≥ stop, Binance "New order": "Price below market price: STOP_LOSS SELL").
    ``quantity`` in the base asset, ``stop_price`` in the quote asset, both already on the
    symbol's stepSize / tickSize. ``client_order_id`` is the protection's ``sp<op>-<generation>``.
    """

    symbol: str
    side: str
    quantity: Decimal
    stop_price: Decimal
    client_order_id: str


@dataclass(frozen=True)
class OcoRequest:
    """An OCO list (``POST /api/v3/orderList/oco``): a ``STOP_LOSS`` leg at ``stop_price`` and a
    ``LIMIT_MAKER`` take-profit leg at ``limit_price``, both for ``quantity`` on closing ``side``.

    For a SELL list the LIMIT_MAKER is the *above* leg and the stop the *below* one; a BUY list
    the reverse (Binance "New Order list - OCO": SELL: limit price > last > stopPrice).
    ``stop_client_order_id`` is the protection's id (what a cancelReplace names);
    ``limit_client_order_id`` and ``list_client_order_id`` derive from it.
    """

    symbol: str
    side: str
    quantity: Decimal
    stop_price: Decimal
    limit_price: Decimal
    stop_client_order_id: str
    limit_client_order_id: str
    list_client_order_id: str


@dataclass(frozen=True)
class OrderListResult:
    """An accepted OCO list: its ids, ``list_status`` (Binance ``listOrderStatus``) and its legs."""

    symbol: str
    order_list_id: int
    list_client_order_id: str
    list_status: str
    orders: tuple[OrderResult, ...]

    def leg(self, order_type: str) -> OrderResult | None:
        """The leg of Binance type ``order_type`` (``STOP_LOSS`` or ``LIMIT_MAKER``), if any."""
        return next((o for o in self.orders if o.order_type == order_type), None)


@dataclass(frozen=True)
class CancelReplaceResult:
    """HTTP 200: ``cancelled`` (the protection, now CANCELED, with what it had executed) and
    ``new`` (the order placed in its stead: a MARKET close with its fills, or a moved stop)."""

    cancelled: OrderResult
    new: OrderResult


class CancelReplaceCancelFailed(ExchangeError):
    """HTTP 400 -2022: the cancel failed and the new order was not attempted.

    With ``cancelRestrictions=ONLY_NEW`` the protection was not NEW: the exchange stop fired
    (FILLED, PARTIALLY_FILLED, EXPIRED) or the order is gone. ``cancel_code`` is the cancel's own
    code (-2011 usually). Nothing was sold by us; query the protection and record what it did.
    """

    code = -2022

    def __init__(self, message: str, cancel_code: int | None = None):
        super().__init__(message)
        self.cancel_code = cancel_code


class CancelReplaceNewFailed(ExchangeError):
    """HTTP 409 -2021: the protection was cancelled and the new order failed (``new_code``).

    The position is now unprotected: record the cancel (``cancelled``) and act at once (retry
    the close, or re-arm). ``new_code`` -2010 may mean the balance is not there: check evidence.
    """

    code = -2021

    def __init__(self, message: str, cancelled: OrderResult | None, new_code: int | None = None):
        super().__init__(message)
        self.cancelled = cancelled
        self.new_code = new_code


class CancelReplaceUnknown(OrderOutcomeUnknown):
    """No usable answer (timeout, reset, 5XX, -1007): the cancel and the new order may each have
    happened. Query ``cancel_client_order_id`` and ``new_client_order_id`` before anything else."""

    def __init__(self, message: str, cancel_client_order_id: str, new_client_order_id: str, code: int | None = None):
        super().__init__(message, code)
        self.cancel_client_order_id = cancel_client_order_id
        self.new_client_order_id = new_client_order_id


@runtime_checkable
class ProtectionPort(Exchange, Protocol):
    """What a venue that can hold protection adds to :class:`Exchange`. Every call reaches the
    exchange: call it outside any database transaction; placing calls are never retried by the
    adapter (except once after a ClockSkew resync: the first request was refused)."""

    def place_stop_order(self, request: StopOrderRequest) -> OrderResult:
        """Rest one ``STOP_LOSS`` (status NEW until it triggers). Raises OrderRejected (nothing
        rests; -2010 "would trigger immediately" among others: compare the price, never the
        message), OrderOutcomeUnknown (it may rest: query by client order id), RateLimited,
        ClockSkew."""

    def place_oco(self, request: OcoRequest) -> OrderListResult:
        """Rest one OCO list (stop + LIMIT_MAKER). Same errors as :meth:`place_stop_order`."""

    def cancel_replace(self, symbol: str, cancel_client_order_id: str,
                       new: OrderRequest | StopOrderRequest) -> CancelReplaceResult:
        """Cancel the resting order ``cancel_client_order_id`` and place ``new`` (a MARKET
        :class:`OrderRequest` for a close, a :class:`StopOrderRequest` for a move) in one request
        (STOP_ON_FAILURE, ONLY_NEW). Raises CancelReplaceCancelFailed, CancelReplaceNewFailed,
        CancelReplaceUnknown, OrderRejected (nothing happened), RateLimited, ClockSkew."""

    def amend_quantity(self, symbol: str, client_order_id: str, new_quantity: Decimal) -> OrderResult:
        """Reduce a resting order's quantity keeping its priority (``PUT
        /api/v3/order/amend/keepPriority``; the client order id is kept). ``new_quantity`` must
        be below the current one. Raises OrderRejected (e.g. -2038: not amended; the order is
        unchanged), OrderOutcomeUnknown (query it), RateLimited, ClockSkew."""

    def open_orders(self, symbol: str | None = None) -> list[OrderResult]:
        """Open orders of the account (``GET /api/v3/openOrders``): of one symbol (weight 6) or
        of every symbol with ``None`` (weight 80, one request). Raises RateLimited, ClockSkew,
        ExchangeUnavailable."""

    def cancel_order(self, symbol: str, client_order_id: str) -> OrderResult:
        """Cancel one open order (``DELETE /api/v3/order``; a leg cancels its whole OCO list).
        Returns it CANCELED with what it had executed. Raises OrderRejected(-2011) when it is not
        open (filled, expired or unknown: query it), OrderOutcomeUnknown, RateLimited, ClockSkew."""


def port_members(port: type) -> frozenset[str]:
    """The public methods and attributes of a port :class:`~typing.Protocol` (``Exchange``,
    ``ProtectionPort``): what a forwarding wrapper (the lazy Binance adapter) must expose, read
    from the protocol itself so that a call added to the port cannot be forgotten by a wrapper."""
    return frozenset({n for n in dir(port) if not n.startswith("_")} | set(getattr(port, "__annotations__", {})))

