"""Paper exchange: an in-memory book that fills MARKET orders with slippage (venue ``paper``).

Quotes are set by the caller (tests, the replay adapter). Orders fill against the best
bid (SELL) or ask (BUY) walking ``slippage_bps`` per ``bid_qty``/``ask_qty`` consumed, with a
0.1 % commission. Tests can script the next order's fate (rejection, timeout before or
after the order exists, EXPIRED with a partial or zero fill) to exercise the engine.
Every call is recorded in ``calls`` so a test can count requests.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from pathlib import Path
from typing import Iterable

from stopmonitor.exchange.base import (
    Fill,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    OrderResult,
    Quote,
    RateLimited,
    SymbolFilters,
)
from stopmonitor.exchange.filters import parse_symbol_filters

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EXCHANGE_INFO_FILE = DATA_DIR / "exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT.json"
COMMISSION_RATE = Decimal("0.001")


def bundled_filters() -> dict[str, SymbolFilters]:
    """Filters of BTCUSDT, ETHUSDT, ADAUSDT from the bundled real exchangeInfo (ccxt, MIT)."""
    data = json.loads(EXCHANGE_INFO_FILE.read_text())
    return {e["symbol"]: parse_symbol_filters(e) for e in data["symbols"]}


@dataclass
class Scripted:
    """The fate of the next order: ``kind`` one of ``reject`` (code), ``timeout_before``
    (nothing placed), ``timeout_after`` (placed, answer lost), ``expire`` (fill ``fill_qty``
    then EXPIRED), ``rate_limit`` (retry_after)."""

    kind: str
    code: int | None = None
    fill_qty: Decimal | None = None
    retry_after: datetime | None = None


class PaperExchange:
    """In-memory exchange implementing the port (see :mod:`stopmonitor.exchange.base`)."""

    venue = "paper"

    def __init__(self, filters: dict[str, SymbolFilters] | None = None, balances: dict[str, Decimal] | None = None,
                 slippage_bps: Decimal = Decimal("1"), now: datetime | None = None):
        self.filters = dict(filters) if filters is not None else bundled_filters()
        self.balances: dict[str, Decimal] = dict(balances or {})
        self.quotes: dict[str, Quote] = {}
        self.orders: dict[str, OrderResult] = {}
        self.order_requests: list[OrderRequest] = []
        self.calls: list[tuple[str, tuple]] = []
        self.script: list[Scripted] = []
        self.slippage_bps = slippage_bps
        self._ids = itertools.count(time.time_ns() // 1_000_000)  # distinct across one-pass processes
        self._now = now
        self.track_balances = balances is not None

    # clock -----------------------------------------------------------------------------
    def clock(self) -> datetime:
        """The exchange's notion of now (UTC): the set time, else the wall clock."""
        return self._now or datetime.now(timezone.utc)

    def set_time(self, now: datetime) -> None:
        self._now = now

    # scripting -------------------------------------------------------------------------
    def set_quote(self, symbol: str, bid, ask, bid_qty="1000000", ask_qty="1000000", at: datetime | None = None) -> None:
        """Set the best bid/ask of ``symbol`` (observed at ``at``, default the exchange clock)."""
        self.quotes[symbol] = Quote(symbol, Decimal(str(bid)), Decimal(str(ask)), Decimal(str(bid_qty)),
                                    Decimal(str(ask_qty)), at or self.clock())

    def push(self, scripted: Scripted) -> None:
        """Script the fate of the next order placement."""
        self.script.append(scripted)

    # the port --------------------------------------------------------------------------
    def book_tickers(self, symbols: Iterable[str]) -> dict[str, Quote]:
        wanted = sorted(set(symbols))
        self.calls.append(("book_tickers", tuple(wanted)))
        return {s: self.quotes[s] for s in wanted if s in self.quotes}

    def symbol_filters(self, symbols: Iterable[str]) -> dict[str, SymbolFilters]:
        self.calls.append(("symbol_filters", tuple(sorted(set(symbols)))))
        return {s: self.filters[s] for s in symbols if s in self.filters}

    def free_balances(self) -> dict[str, Decimal] | None:
        """Free balances, or None when this paper account does not limit closes by balance."""
        self.calls.append(("free_balances", ()))
        if not self.track_balances:
            return None
        return dict(self.balances)

    def get_order(self, symbol: str, client_order_id: str) -> OrderResult | None:
        self.calls.append(("get_order", (symbol, client_order_id)))
        order = self.orders.get(client_order_id)
        return order if order is not None and order.symbol == symbol else None

    def place_market_order(self, request: OrderRequest) -> OrderResult:
        self.calls.append(("place_market_order", (request.symbol, request.side, request.quantity, request.client_order_id)))
        self.order_requests.append(request)
        scripted = self.script.pop(0) if self.script else None
        if scripted and scripted.kind == "reject":
            raise OrderRejected(
                f"{request.symbol} {request.side} {request.quantity} {request.client_order_id}: rejected", scripted.code
            )
        if scripted and scripted.kind == "rate_limit":
            raise RateLimited(f"{request.symbol}: rate limited", scripted.retry_after or self.clock(), code=-1003)
        if scripted and scripted.kind == "timeout_before":
            raise OrderOutcomeUnknown(f"{request.symbol} {request.side} {request.quantity} {request.client_order_id}: timeout")
        fill_qty = scripted.fill_qty if scripted and scripted.kind == "expire" else None
        result = self._fill(request, fill_qty)
        self.orders[request.client_order_id] = result
        if scripted and scripted.kind == "timeout_after":
            raise OrderOutcomeUnknown(
                f"{request.symbol} {request.side} {request.quantity} {request.client_order_id}: timeout after send"
            )
        return result

    # matching --------------------------------------------------------------------------
    def _fill(self, request: OrderRequest, fill_qty: Decimal | None) -> OrderResult:
        quote = self.quotes.get(request.symbol)
        if quote is None:
            raise OrderRejected(f"{request.symbol}: no market", -1121)
        filters = self.filters.get(request.symbol)
        tick = filters.tick_size if filters else Decimal("0.00000001")
        target = request.quantity if fill_qty is None else fill_qty
        fills: list[Fill] = []
        left = target
        level = 0
        top = quote.bid if request.side == "SELL" else quote.ask
        depth = (quote.bid_qty if request.side == "SELL" else quote.ask_qty) or target
        while left > 0:
            step = min(left, depth)
            move = top * self.slippage_bps / Decimal("10000") * level
            price = top - move if request.side == "SELL" else top + move
            # a SELL walks down the bids, a BUY up the asks: round against the taker
            price = (price / tick).to_integral_value(rounding=ROUND_DOWN if request.side == "SELL" else ROUND_UP) * tick
            quote_qty = price * step
            commission = (quote_qty if request.side == "SELL" else step) * COMMISSION_RATE
            asset = (filters.quote_asset if request.side == "SELL" else filters.base_asset) if filters else ""
            fills.append(Fill(price, step, commission.quantize(Decimal("0.00000001")), asset))
            left -= step
            level += 1
        executed = target
        if self.track_balances and filters:
            sign = -1 if request.side == "SELL" else 1
            self.balances[filters.base_asset] = self.balances.get(filters.base_asset, Decimal(0)) + sign * executed
            quote_total = sum((f.price * f.qty for f in fills), Decimal(0))
            self.balances[filters.quote_asset] = self.balances.get(filters.quote_asset, Decimal(0)) - sign * quote_total
        status = "FILLED" if executed >= request.quantity else "EXPIRED"
        return OrderResult(
            symbol=request.symbol,
            side=request.side,
            status=status,
            exchange_order_id=next(self._ids),
            client_order_id=request.client_order_id,
            requested_qty=request.quantity,
            executed_qty=executed,
            cummulative_quote_qty=sum((f.price * f.qty for f in fills), Decimal(0)),
            fills=tuple(fills),
            transact_time=self.clock(),
        )

    def forget_order(self, client_order_id: str) -> None:
        """Test helper: make the exchange answer -2013 for ``client_order_id``."""
        self.orders.pop(client_order_id, None)

    def with_status(self, client_order_id: str, **changes) -> None:
        """Test helper: change a stored order (e.g. its status)."""
        self.orders[client_order_id] = replace(self.orders[client_order_id], **changes)
