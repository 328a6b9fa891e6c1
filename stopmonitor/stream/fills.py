"""Rebuild an order's outcome from its pushed ``executionReport`` events. Pure.

Binance "User Data Streams", Order Update: one report per execution (``I``, execution id);
a ``TRADE`` report carries that trade's price ``L``, quantity ``l``, commission ``n`` in
asset ``N`` and trade id ``t``; ``z`` is the order's cumulative filled quantity, ``Z`` its
cumulative quote quantity, ``X`` the order status. Reports can arrive twice (reconnect,
replay) or out of order: each execution id counts once, and an order is resolved only when
its status is final *and* the trades we hold add up to ``z`` — so a fill's price, quantity and
commission always come from its trades (the evidence rules of stop-execution.md). A final
report with ``z`` = 0, or whose trades are missing, is not proof: :class:`OrderTracker` says
``needs_rest`` and the engine's REST reconcile decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from stopmonitor.exchange.base import FINAL_STATUSES, Fill, OrderResult

# order status ranks: a later report never moves an order back (out-of-order delivery)
_RANK = {"NEW": 0, "PENDING_NEW": 0, "PARTIALLY_FILLED": 1, **{s: 2 for s in FINAL_STATUSES}}


@dataclass
class OrderTracker:
    """What the reports of one order (by client order id) have told so far."""

    client_order_id: str
    symbol: str = ""
    side: str = ""
    order_id: int = 0
    requested_qty: Decimal = Decimal("0")
    status: str = "NEW"
    cumulative_qty: Decimal = Decimal("0")
    cumulative_quote: Decimal = Decimal("0")
    event_time_ms: int = 0
    transact_ms: int = 0
    trades: dict[int, Fill] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # execution ids
    resolved: bool = False

    def add(self, report: dict) -> bool:
        """Fold one ``executionReport`` payload; False when its execution id was seen already."""
        exec_id = int(report.get("I", -1))
        if exec_id in self.seen:
            return False
        self.seen.add(exec_id)
        self.symbol = report.get("s", self.symbol)
        self.side = report.get("S", self.side)
        self.order_id = int(report.get("i", self.order_id))
        self.requested_qty = Decimal(report.get("q", self.requested_qty))
        z = Decimal(report.get("z", "0"))
        if z >= self.cumulative_qty:
            self.cumulative_qty = z
            self.cumulative_quote = Decimal(report.get("Z", self.cumulative_quote))
        status = report.get("X", "NEW")
        if _RANK.get(status, 0) >= _RANK.get(self.status, 0):
            self.status = status
        self.event_time_ms = max(self.event_time_ms, int(report.get("E", 0)))
        self.transact_ms = max(self.transact_ms, int(report.get("T", 0)))
        if report.get("x") == "TRADE" and int(report.get("t", -1)) >= 0:
            self.trades[int(report["t"])] = Fill(
                price=Decimal(report["L"]), qty=Decimal(report["l"]), commission=Decimal(report.get("n") or "0"),
                commission_asset=str(report.get("N") or ""))
        return True

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def complete(self) -> bool:
        """Final, something filled, and the trades held add up to the cumulative quantity."""
        traded = sum((f.qty for f in self.trades.values()), Decimal("0"))
        return self.final and self.cumulative_qty > 0 and traded == self.cumulative_qty

    @property
    def needs_rest(self) -> bool:
        """Final but not provable from the pushes alone (0 filled, or trades missing)."""
        return self.final and not self.complete

    def result(self) -> OrderResult:
        """The order as :class:`OrderResult`, fills in trade id order. Only when :attr:`complete`."""
        if not self.complete:
            raise ValueError(f"order {self.client_order_id} is not complete: {self.status}, "
                             f"{len(self.trades)} trades for {self.cumulative_qty}")
        return OrderResult(
            symbol=self.symbol, side=self.side, status=self.status, exchange_order_id=self.order_id,
            client_order_id=self.client_order_id, requested_qty=self.requested_qty,
            executed_qty=self.cumulative_qty, cummulative_quote_qty=self.cumulative_quote,
            fills=tuple(self.trades[t] for t in sorted(self.trades)),
            transact_time=datetime.fromtimestamp(self.transact_ms / 1000, tz=timezone.utc) if self.transact_ms else None,
        )


class Reports:
    """Trackers by client order id, bounded (the oldest resolved ones are forgotten first)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.orders: dict[str, OrderTracker] = {}

    def add(self, report: dict) -> tuple[OrderTracker, bool]:
        """Fold a report; returns its tracker and whether the report was new."""
        cid = report.get("c") or ""
        if report.get("x") == "CANCELED" and report.get("C"):
            cid = report["C"]  # a cancel reports the cancelled order's id as C
        tracker = self.orders.get(cid)
        if tracker is None:
            tracker = self.orders[cid] = OrderTracker(cid)
            if len(self.orders) > self.limit:
                for old in [k for k, t in self.orders.items() if t.resolved][: len(self.orders) - self.limit]:
                    del self.orders[old]
        return tracker, tracker.add(report)
