"""The exchange port: value types, the adapter protocol and the typed error taxonomy.

Adapters (``binance``, ``paper``, ``replay``) return only these types and raise only these
errors, so the engine never sees python-binance. Prices are in the quote asset, quantities
in the base asset, all ``Decimal``; times are timezone-aware UTC ``datetime``.

What the caller must do after each error (invariant 3 of ../shared/design/stop-execution.md):

- :class:`OrderRejected` — definite: the order was refused before matching and does not
  exist. Record ``FAILED``; a new attempt (new client order id) is allowed later.
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
    def commission(self) -> Decimal:
        return sum((f.commission for f in self.fills), Decimal("0"))

    @property
    def commission_asset(self) -> str:
        assets = sorted({f.commission_asset for f in self.fills if f.commission_asset})
        return ",".join(assets)

    @property
    def is_final(self) -> bool:
        """True when the order can no longer fill (FILLED, CANCELED, EXPIRED, REJECTED, EXPIRED_IN_MATCH)."""
        return self.status in FINAL_STATUSES


FINAL_STATUSES = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})


class ExchangeError(Exception):
    """Base of every adapter error. Messages carry symbol, side, quantity, client order id — never secrets."""

    code: int | None = None


class OrderRejected(ExchangeError):
    """Definite refusal before matching (e.g. -2010, -1013, -1100, -1121): the order does not exist."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


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
        """Best bid/ask for ``symbols`` in ONE request (invariant 9). Missing symbols are absent
        from the result. Raises RateLimited, ExchangeUnavailable."""

    def symbol_filters(self, symbols: Iterable[str]) -> dict[str, SymbolFilters]:
        """Filters per symbol (cached by the adapter). Raises RateLimited, ExchangeUnavailable."""

    def free_balances(self) -> dict[str, Decimal] | None:
        """Free balance per asset (in that asset's units); None when the venue does not limit
        closes by balance (paper without an account). Raises RateLimited, ClockSkew,
        ExchangeUnavailable."""

    def place_market_order(self, request: OrderRequest) -> OrderResult:
        """Send one MARKET order (FULL response). Never retried by the adapter itself except once
        after a ClockSkew resync (the request was refused, so nothing exists). Must be called
        outside any database transaction. Raises OrderRejected, OrderOutcomeUnknown,
        RateLimited, ClockSkew."""

    def get_order(self, symbol: str, client_order_id: str) -> OrderResult | None:
        """The order with ``origClientOrderId`` = ``client_order_id``, or None when the exchange
        has none (-2013). Raises RateLimited, ExchangeUnavailable."""
