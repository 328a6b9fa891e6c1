"""Paper exchange: an in-memory book that fills MARKET orders with slippage (venue ``paper``).

Quotes are set by the caller (tests, the replay adapter). Orders fill against the best
bid (SELL) or ask (BUY) walking ``slippage_bps`` per ``bid_qty``/``ask_qty`` consumed, with a
0.1 % commission; each fill is also an account trade (:meth:`PaperExchange.account_trades`).
With tracked balances a close larger than the free balance is refused with -2010
(:class:`OrderRejectedMaybeFilled`), as Binance does; a symbol whose filters say HALT, BREAK
or CANCEL_ONLY refuses orders with -2010 too. Tests can script the next order's fate
(rejection, timeout before or after the order exists, EXPIRED with a partial or zero fill and
its expiry reason) to exercise the engine. Every call is recorded in ``calls`` so a test can
count requests.

Resting orders (exchange-held protection, ../shared/design/protection.md): ``STOP_LOSS``
orders and OCO lists (stop + ``LIMIT_MAKER``) rest until the *last trade price* reaches them
(the paper last price is the bid, or what :meth:`PaperExchange.set_last_price` says); a
triggered stop fills as a MARKET order at the *next* observation (so a cancel in between is
refused, as on Binance while it fills). A resting SELL locks its base quantity: ``free`` drops
by it until it fills or is cancelled (``locked`` holds it). ``cancel_replace`` has Binance's
STOP_ON_FAILURE + ONLY_NEW outcomes.
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
    Balances,
    CancelReplaceCancelFailed,
    CancelReplaceNewFailed,
    CancelReplaceResult,
    CancelReplaceUnknown,
    Fill,
    OcoRequest,
    OrderListResult,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRejectedMaybeFilled,
    OrderRequest,
    OrderResult,
    Quote,
    RateLimited,
    StopOrderRequest,
    SymbolFilters,
    Trade,
)
from stopmonitor.exchange.filters import parse_symbol_filters

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EXCHANGE_INFO_FILE = DATA_DIR / "exchangeInfo_BTCUSDT_ETHUSDT_ADAUSDT.json"
COMMISSION_RATE = Decimal("0.001")


def bundled_filters() -> dict[str, SymbolFilters]:
    """Filters of BTCUSDT, ETHUSDT, ADAUSDT from the bundled real exchangeInfo (ccxt, MIT)."""
    data = json.loads(EXCHANGE_INFO_FILE.read_text())
    # the recording (2023) lists STOP_LOSS_LIMIT but not STOP_LOSS in orderTypes; today's Binance
    # lists both (rest-api.md "Exchange information" example) and the paper book rests either
    return {e["symbol"]: replace(parse_symbol_filters(e), stop_loss_allowed=True) for e in data["symbols"]}


@dataclass
class Scripted:
    """The fate of the next order: ``kind`` one of ``reject`` (code), ``timeout_before``
    (nothing placed), ``timeout_after`` (placed, answer lost), ``expire`` (fill ``fill_qty``
    then EXPIRED with ``expiry_reason``), ``rate_limit`` (retry_after); for ``cancel_replace`` also ``reject_new``
    (the protection cancelled, the new order refused with ``code``: Binance's 409)."""

    kind: str
    code: int | None = None
    fill_qty: Decimal | None = None
    retry_after: datetime | None = None
    expiry_reason: str | None = None


class PaperExchange:
    """In-memory exchange implementing the port (see :mod:`stopmonitor.exchange.base`)."""

    venue = "paper"

    def __init__(self, filters: dict[str, SymbolFilters] | None = None, balances: dict[str, Decimal] | None = None,
                 slippage_bps: Decimal = Decimal("1"), now: datetime | None = None):
        self.filters = dict(filters) if filters is not None else bundled_filters()
        self.balances: dict[str, Decimal] = dict(balances or {})
        self.quotes: dict[str, Quote] = {}
        self.orders: dict[str, OrderResult] = {}
        self.trades: list[Trade] = []
        self.order_requests: list[OrderRequest] = []
        self.calls: list[tuple[str, tuple]] = []
        self.script: list[Scripted] = []
        self.slippage_bps = slippage_bps
        self._ids = itertools.count(time.time_ns() // 1_000_000)  # distinct across one-pass processes
        self._now = now
        self.track_balances = balances is not None
        # resting orders (protection): client order id -> (the request, list id or -1)
        self.resting: dict[str, StopOrderRequest | OcoRequest] = {}
        self.triggered: set[str] = set()  # resting stops whose trigger price was reached: fill next
        self.locked: dict[str, Decimal] = {}
        self.last_prices: dict[str, Decimal] = {}
        self.scripts: dict[str, list[Scripted]] = {"place_market_order": self.script}

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
        self.observe_last_price(symbol, Decimal(str(bid)))

    def set_last_price(self, symbol: str, price) -> None:
        """Print a trade at ``price`` without moving the book (resting stops trigger on it)."""
        self.observe_last_price(symbol, Decimal(str(price)))

    def push(self, scripted: Scripted, call: str = "place_market_order") -> None:
        """Script the fate of the next ``call`` (``place_market_order``, ``place_stop_order``,
        ``place_oco``, ``cancel_replace``, ``amend_quantity``, ``cancel_order``)."""
        self.scripts.setdefault(call, []).append(scripted)

    # the port --------------------------------------------------------------------------
    def book_tickers(self, symbols: Iterable[str]) -> dict[str, Quote]:
        wanted = sorted(set(symbols))
        self.calls.append(("book_tickers", tuple(wanted)))
        return {s: self.quotes[s] for s in wanted if s in self.quotes}

    def symbol_filters(self, symbols: Iterable[str], *, fresh: bool = False) -> dict[str, SymbolFilters]:
        wanted = sorted(set(symbols))  # read once: a generator is consumed by the first pass
        self.calls.append(("symbol_filters", tuple(wanted)))
        return {s: self.filters[s] for s in wanted if s in self.filters}

    def free_balances(self) -> dict[str, Decimal] | None:
        """Free balances, or None when this paper account does not limit closes by balance."""
        self.calls.append(("free_balances", ()))
        if not self.track_balances:
            return None
        return Balances(self.balances, locked={a: q for a, q in self.locked.items() if q})

    def account_trades(self, symbol: str, *, since: datetime | None = None,
                       order_id: int | None = None) -> list[Trade]:
        """Trades of this paper account on ``symbol``, oldest first (same filters as Binance's
        myTrades: by order id, else from ``since``)."""
        self.calls.append(("account_trades", (symbol, since, order_id)))
        trades = [t for t in self.trades if t.symbol == symbol]
        if order_id is not None:
            trades = [t for t in trades if t.order_id == order_id]
        elif since is not None:
            trades = [t for t in trades if t.time >= since]
        return trades

    def get_order(self, symbol: str, client_order_id: str) -> OrderResult | None:
        self.calls.append(("get_order", (symbol, client_order_id)))
        order = self.orders.get(client_order_id)
        return order if order is not None and order.symbol == symbol else None

    def place_market_order(self, request: OrderRequest) -> OrderResult:
        self.calls.append(("place_market_order", (request.symbol, request.side, request.quantity, request.client_order_id)))
        self.order_requests.append(request)
        scripted = self.script.pop(0) if self.script else None
        kind = scripted.kind if scripted else None
        what = f"{request.symbol} {request.side} {request.quantity} {request.client_order_id}"
        self._refuse_market_order(request, scripted, what)
        result = self._fill(request, scripted.fill_qty if kind == "expire" else None)
        if result.status == "EXPIRED":
            result = replace(result, expiry_reason=(scripted.expiry_reason if scripted else None) or "INSUFFICIENT_LIQUIDITY")
        self.orders[request.client_order_id] = result
        if kind == "timeout_after":
            raise OrderOutcomeUnknown(f"{what}: timeout after send")
        return result

    def _refuse_market_order(self, request: OrderRequest, scripted: Scripted | None, what: str) -> None:
        """Raise what stops a MARKET order before it fills, in this order: a scripted rejection
        (-2010 as :class:`OrderRejectedMaybeFilled`), the exchange's own -2010 refusals
        (:meth:`_refuse_untradable`), a scripted rate limit, a scripted timeout before the order exists."""
        kind = scripted.kind if scripted else None
        if kind == "reject":
            error = OrderRejectedMaybeFilled if scripted.code == -2010 else OrderRejected
            raise error(f"{what}: rejected", scripted.code)
        self._refuse_untradable(request, what)
        if kind == "rate_limit":
            raise RateLimited(f"{request.symbol}: rate limited", scripted.retry_after or self.clock(), code=-1003)
        if kind == "timeout_before":
            raise OrderOutcomeUnknown(f"{what}: timeout")

    def _refuse_untradable(self, request: OrderRequest, what: str) -> None:
        """-2010 (:class:`OrderRejectedMaybeFilled`, as Binance) for a symbol in HALT, BREAK or
        CANCEL_ONLY, and for a SELL beyond the free base balance when this account tracks balances."""
        filters = self.filters.get(request.symbol)
        if filters is None:
            return
        if filters.not_trading:
            raise OrderRejectedMaybeFilled(f"{what}: symbol is {filters.status}: order not possible", -2010)
        if self.track_balances and request.side == "SELL":
            if self.balances.get(filters.base_asset, Decimal(0)) < request.quantity:
                raise OrderRejectedMaybeFilled(f"{what}: Account has insufficient balance for requested action.", -2010)

    # matching --------------------------------------------------------------------------
    def _fill(self, request: OrderRequest, fill_qty: Decimal | None) -> OrderResult:
        """Fill ``request`` now against the current quote (``fill_qty`` of it when given, then
        EXPIRED); moves tracked balances and records the account trades. -1121 without a quote."""
        quote = self.quotes.get(request.symbol)
        if quote is None:
            raise OrderRejected(f"{request.symbol}: no market", -1121)
        filters = self.filters.get(request.symbol)
        executed = request.quantity if fill_qty is None else fill_qty
        fills = self._walk_book(request.side, quote, filters, executed)
        self._move_balances(request.side, filters, executed, fills)
        status = "FILLED" if executed >= request.quantity else "EXPIRED"
        order_id = next(self._ids)
        at = self.clock()
        self._record_trades(request, order_id, fills, at)
        return OrderResult(
            symbol=request.symbol,
            side=request.side,
            status=status,
            exchange_order_id=order_id,
            client_order_id=request.client_order_id,
            requested_qty=request.quantity,
            executed_qty=executed,
            cummulative_quote_qty=sum((f.price * f.qty for f in fills), Decimal(0)),
            fills=tuple(fills),
            transact_time=at,
        )

    def _walk_book(self, side: str, quote: Quote, filters: SymbolFilters | None, target: Decimal) -> list[Fill]:
        """The fills of ``target`` (base asset): a SELL walks down from the bid, a BUY up from the
        ask, ``slippage_bps`` of the top price per level of ``bid_qty``/``ask_qty`` consumed (no
        depth: one level), each price rounded to the tickSize against the taker; commission
        ``COMMISSION_RATE`` of what is received (quote asset for a SELL, base asset for a BUY)."""
        sell = side == "SELL"
        tick = filters.tick_size if filters else Decimal("0.00000001")
        top, depth = (quote.bid, quote.bid_qty) if sell else (quote.ask, quote.ask_qty)
        depth = depth or target
        rounding = ROUND_DOWN if sell else ROUND_UP
        asset = (filters.quote_asset if sell else filters.base_asset) if filters else ""
        fills: list[Fill] = []
        left = target
        level = 0
        while left > 0:
            step = min(left, depth)
            move = top * self.slippage_bps / Decimal("10000") * level
            price = ((top - move if sell else top + move) / tick).to_integral_value(rounding=rounding) * tick
            commission = (price * step if sell else step) * COMMISSION_RATE
            fills.append(Fill(price, step, commission.quantize(Decimal("0.00000001")), asset))
            left -= step
            level += 1
        return fills

    def _move_balances(self, side: str, filters: SymbolFilters | None, executed: Decimal, fills: list[Fill]) -> None:
        """A fill's effect on the tracked balances: base asset by ``executed``, quote asset by the fills' total."""
        if not (self.track_balances and filters):
            return
        sign = -1 if side == "SELL" else 1
        self.balances[filters.base_asset] = self.balances.get(filters.base_asset, Decimal(0)) + sign * executed
        quote_total = sum((f.price * f.qty for f in fills), Decimal(0))
        self.balances[filters.quote_asset] = self.balances.get(filters.quote_asset, Decimal(0)) - sign * quote_total

    def _record_trades(self, request: OrderRequest, order_id: int, fills: list[Fill], at: datetime) -> None:
        """One account trade per fill (trade id ``order_id * 100 + i``)."""
        for i, f in enumerate(fills):
            self.trades.append(Trade(request.symbol, order_id * 100 + i, order_id, f.price, f.qty, f.price * f.qty,
                                     f.commission, f.commission_asset, at, request.side == "BUY"))

    def forget_order(self, client_order_id: str) -> None:
        """Test helper: make the exchange answer -2013 for ``client_order_id``."""
        self.orders.pop(client_order_id, None)

    def with_status(self, client_order_id: str, **changes) -> None:
        """Test helper: change a stored order (e.g. its status)."""
        self.orders[client_order_id] = replace(self.orders[client_order_id], **changes)

    # resting orders (protection) ------------------------------------------------------------
    def _next_scripted(self, call: str) -> Scripted | None:
        queue = self.scripts.get(call)
        return queue.pop(0) if queue else None

    def _scripted_fault(self, scripted: Scripted | None, context: str) -> None:
        """Raise what ``scripted`` says happens before anything is done (reject, rate limit, timeout)."""
        if scripted is None:
            return
        if scripted.kind == "reject":
            raise OrderRejected(f"{context}: rejected", scripted.code)
        if scripted.kind == "rate_limit":
            raise RateLimited(f"{context}: rate limited", scripted.retry_after or self.clock(), code=-1003)
        if scripted.kind == "timeout_before":
            raise OrderOutcomeUnknown(f"{context}: timeout")

    def _refuse_unfunded(self, request: OrderRequest | StopOrderRequest | OcoRequest) -> None:
        """-2010 for a SELL beyond the free base balance (when this account tracks balances)."""
        filters = self.filters.get(request.symbol)
        if not (self.track_balances and filters and request.side == "SELL"):
            return
        free = self.balances.get(filters.base_asset, Decimal(0))
        if request.quantity > free:
            raise OrderRejected(f"{request.symbol} SELL {request.quantity}: insufficient balance (free {free})", -2010)

    def _lock(self, request: StopOrderRequest | OcoRequest, sign: int) -> None:
        filters = self.filters.get(request.symbol)
        if not (self.track_balances and filters and request.side == "SELL"):
            return
        asset = filters.base_asset
        self.balances[asset] = self.balances.get(asset, Decimal(0)) - sign * request.quantity
        self.locked[asset] = self.locked.get(asset, Decimal(0)) + sign * request.quantity

    def _would_trigger(self, symbol: str, side: str, stop_price: Decimal) -> bool:
        last = self.last_prices.get(symbol)
        return last is not None and (last <= stop_price if side == "SELL" else last >= stop_price)

    def _resting_result(self, symbol: str, side: str, order_type: str, quantity: Decimal, client_order_id: str,
                        stop_price: Decimal | None = None, price: Decimal | None = None, list_id: int = -1) -> OrderResult:
        """A NEW resting order as the exchange answers it (nothing executed)."""
        return OrderResult(symbol=symbol, side=side, status="NEW", exchange_order_id=next(self._ids),
                           client_order_id=client_order_id, requested_qty=quantity, executed_qty=Decimal(0),
                           cummulative_quote_qty=Decimal(0), transact_time=self.clock(), order_type=order_type,
                           stop_price=stop_price, price=price, order_list_id=list_id)

    def _rest_stop(self, request: StopOrderRequest) -> OrderResult:
        context = f"STOP_LOSS {request.side} {request.symbol} {request.quantity} {request.client_order_id}"
        if request.quantity <= 0 or request.stop_price <= 0:
            raise OrderRejected(f"{context}: quantity and stopPrice must be positive", -1013)
        if request.client_order_id in self.resting:
            raise OrderRejected(f"{context}: duplicate client order id among open orders", -2010)
        if self._would_trigger(request.symbol, request.side, request.stop_price):
            raise OrderRejected(f"{context}: order would trigger immediately", -2010)
        self._refuse_unfunded(request)
        result = self._resting_result(request.symbol, request.side, "STOP_LOSS", request.quantity,
                                      request.client_order_id, stop_price=request.stop_price)
        self.orders[request.client_order_id] = result
        self.resting[request.client_order_id] = request
        self._lock(request, +1)
        return result

    def place_stop_order(self, request: StopOrderRequest) -> OrderResult:
        self.calls.append(("place_stop_order", (request.symbol, request.side, request.quantity, request.stop_price,
                                                request.client_order_id)))
        scripted = self._next_scripted("place_stop_order")
        self._scripted_fault(scripted, f"STOP_LOSS {request.symbol} {request.client_order_id}")
        result = self._rest_stop(request)
        if scripted and scripted.kind == "timeout_after":
            raise OrderOutcomeUnknown(f"STOP_LOSS {request.symbol} {request.client_order_id}: timeout after send")
        return result

    def place_oco(self, request: OcoRequest) -> OrderListResult:
        self.calls.append(("place_oco", (request.symbol, request.side, request.quantity, request.stop_price,
                                         request.limit_price, request.stop_client_order_id)))
        context = f"OCO {request.side} {request.symbol} {request.quantity} {request.stop_client_order_id}"
        scripted = self._next_scripted("place_oco")
        self._scripted_fault(scripted, context)
        last = self.last_prices.get(request.symbol)
        sell = request.side == "SELL"
        if last is not None and not ((request.limit_price > last > request.stop_price) if sell
                                     else (request.limit_price < last < request.stop_price)):
            raise OrderRejected(f"{context}: the relationship of the prices for the orders is not correct", -2010)
        if request.stop_client_order_id in self.resting:
            raise OrderRejected(f"{context}: duplicate client order id among open orders", -2010)
        self._refuse_unfunded(request)
        list_id = next(self._ids)
        stop = self._resting_result(request.symbol, request.side, "STOP_LOSS", request.quantity,
                                    request.stop_client_order_id, stop_price=request.stop_price, list_id=list_id)
        limit = self._resting_result(request.symbol, request.side, "LIMIT_MAKER", request.quantity,
                                     request.limit_client_order_id, price=request.limit_price, list_id=list_id)
        for leg in (stop, limit):
            self.orders[leg.client_order_id] = leg
            self.resting[leg.client_order_id] = request
        self._lock(request, +1)
        answer = OrderListResult(request.symbol, list_id, request.list_client_order_id, "EXECUTING", (stop, limit))
        if scripted and scripted.kind == "timeout_after":
            raise OrderOutcomeUnknown(f"{context}: timeout after send")
        return answer

    def _legs(self, client_order_id: str) -> list[str]:
        """The resting client order ids that go with ``client_order_id`` (both legs of an OCO)."""
        request = self.resting[client_order_id]
        if isinstance(request, OcoRequest):
            return [i for i in (request.stop_client_order_id, request.limit_client_order_id) if i in self.resting]
        return [client_order_id]

    def _finish(self, client_order_id: str, status: str) -> OrderResult:
        """Take ``client_order_id`` (and its OCO sibling) off the book as ``status``; unlock the balance."""
        request = self.resting[client_order_id]
        for cid in self._legs(client_order_id):
            self.resting.pop(cid)
            self.triggered.discard(cid)
            if self.orders[cid].status == "NEW":
                self.orders[cid] = replace(self.orders[cid], status=status if cid == client_order_id else "EXPIRED",
                                           transact_time=self.clock())
        self._lock(request, -1)
        return self.orders[client_order_id]

    def _cancellable(self, client_order_id: str) -> bool:
        return client_order_id in self.resting and client_order_id not in self.triggered

    def cancel_order(self, symbol: str, client_order_id: str) -> OrderResult:
        self.calls.append(("cancel_order", (symbol, client_order_id)))
        self._scripted_fault(self._next_scripted("cancel_order"), f"cancel {symbol} {client_order_id}")
        if not self._cancellable(client_order_id) or self.orders[client_order_id].symbol != symbol:
            raise OrderRejected(f"cancel {symbol} {client_order_id}: unknown order sent", -2011)
        return self._finish(client_order_id, "CANCELED")

    def cancel_replace(self, symbol: str, cancel_client_order_id: str,
                       new: OrderRequest | StopOrderRequest) -> CancelReplaceResult:
        self.calls.append(("cancel_replace", (symbol, cancel_client_order_id, type(new).__name__, new.side,
                                              new.quantity, new.client_order_id)))
        context = f"cancelReplace {symbol} {cancel_client_order_id} -> {new.client_order_id}"
        scripted = self._next_scripted("cancel_replace")
        if scripted and scripted.kind == "timeout_before":
            raise CancelReplaceUnknown(f"{context}: timeout", cancel_client_order_id, new.client_order_id)
        self._scripted_fault(scripted, context)
        if new.quantity <= 0:
            raise OrderRejected(f"{context}: quantity must be positive", -1013)
        if not self._cancellable(cancel_client_order_id):
            raise CancelReplaceCancelFailed(f"{context}: cancel failed (order not NEW), new order not attempted",
                                            cancel_code=-2011)
        cancelled = self._finish(cancel_client_order_id, "CANCELED")
        if scripted and scripted.kind == "reject_new":  # 409: cancelled, the new order refused
            raise CancelReplaceNewFailed(f"{context}: cancelled, new order rejected", cancelled, scripted.code)
        try:
            if isinstance(new, StopOrderRequest):
                placed = self._rest_stop(new)
            else:
                self._refuse_unfunded(new)
                placed = self._fill(new, None)
                self.orders[new.client_order_id] = placed
        except OrderRejected as e:
            raise CancelReplaceNewFailed(f"{context}: cancelled, new order failed: {e}", cancelled, e.code) from e
        if scripted and scripted.kind == "timeout_after":
            raise CancelReplaceUnknown(f"{context}: timeout after send", cancel_client_order_id, new.client_order_id)
        return CancelReplaceResult(cancelled, placed)

    def amend_quantity(self, symbol: str, client_order_id: str, new_quantity: Decimal) -> OrderResult:
        self.calls.append(("amend_quantity", (symbol, client_order_id, new_quantity)))
        context = f"amend {symbol} {client_order_id} newQty={new_quantity}"
        self._scripted_fault(self._next_scripted("amend_quantity"), context)
        order = self.orders.get(client_order_id)
        if not self._cancellable(client_order_id) or order.symbol != symbol:
            raise OrderRejected(f"{context}: order not open", -2038)
        if not (0 < new_quantity < order.requested_qty):
            raise OrderRejected(f"{context}: newQty must be above 0 and below the order quantity", -2038)
        request = self.resting[client_order_id]
        self._lock(request, -1)
        smaller = replace(request, quantity=new_quantity)
        for cid in self._legs(client_order_id):
            self.resting[cid] = smaller
            self.orders[cid] = replace(self.orders[cid], requested_qty=new_quantity)
        self._lock(smaller, +1)
        return self.orders[client_order_id]

    def open_orders(self, symbol: str | None = None) -> list[OrderResult]:
        self.calls.append(("open_orders", (symbol,)))
        return [self.orders[cid] for cid in self.resting if symbol is None or self.orders[cid].symbol == symbol]

    def observe_last_price(self, symbol: str, last: Decimal) -> None:
        """A trade printed at ``last``: stops triggered earlier fill now (at the current quote),
        then resting orders reached by ``last`` trigger (stops: fill at the next observation;
        LIMIT_MAKER legs: fill at their price now)."""
        self.last_prices[symbol] = last
        for cid in [c for c in self.triggered if self.orders[c].symbol == symbol]:
            self._fill_triggered(cid)
        for cid, request in list(self.resting.items()):
            order = self.orders[cid]
            if order.symbol != symbol or cid in self.triggered or cid not in self.resting:
                continue
            if order.order_type == "STOP_LOSS" and self._would_trigger(symbol, order.side, order.stop_price):
                self.triggered.add(cid)
            elif order.order_type == "LIMIT_MAKER" and _limit_reached(order, last):
                self._fill_limit(cid)

    def _fill_triggered(self, client_order_id: str) -> None:
        order = self.orders[client_order_id]
        self._finish(client_order_id, "TRIGGERED")  # takes it (and an OCO sibling) off the book, unlocks
        market = OrderRequest(order.symbol, order.side, order.requested_qty, client_order_id)
        filled = self._fill(market, None)
        self.orders[client_order_id] = replace(filled, exchange_order_id=order.exchange_order_id, order_type="STOP_LOSS",
                                               stop_price=order.stop_price, order_list_id=order.order_list_id)

    def _fill_limit(self, client_order_id: str) -> None:
        order = self.orders[client_order_id]
        filters = self.filters.get(order.symbol)
        self._finish(client_order_id, "TRIGGERED")
        qty, price = order.requested_qty, order.price
        commission = (qty * price * COMMISSION_RATE).quantize(Decimal("0.00000001"))
        if self.track_balances and filters:
            sign = -1 if order.side == "SELL" else 1
            self.balances[filters.base_asset] = self.balances.get(filters.base_asset, Decimal(0)) + sign * qty
            self.balances[filters.quote_asset] = self.balances.get(filters.quote_asset, Decimal(0)) - sign * qty * price
        self.orders[client_order_id] = replace(order, status="FILLED", executed_qty=qty, cummulative_quote_qty=qty * price,
                                               fills=(Fill(price, qty, commission, filters.quote_asset if filters else ""),),
                                               transact_time=self.clock())


def _limit_reached(order: OrderResult, last: Decimal) -> bool:
    """A resting LIMIT_MAKER is reached by a trade at ``last``: at or above its price for a SELL, at or below for a BUY."""
    return last >= order.price if order.side == "SELL" else last <= order.price
