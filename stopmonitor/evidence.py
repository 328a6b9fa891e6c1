"""Evidence before action: what an exchange "no" means once trades and balances are looked at.

Pure functions on the port's value types and ``Decimal`` (no Django, no network, no clock: the
caller passes ``now``). Rules from ../shared/design/stop-execution.md, invariant 3 and its
"Evidence" section, and issue #12 items 1–4:

- ``-2013`` for an order we submitted is "not visible yet" until ``window`` has passed since
  the submit time, the account's trades show no fill for it and the free balance still holds
  what it would have sold. Only then is it sent again (same client order id).
- Trades on the close's side since the submit time that belong to no order we know → it filled:
  record the fill from the trades.
- A balance that vanished without trades → never a re-send: wait for the trades, then review.
- Orders we knew gone *and* the balance refilled (a testnet reset) → ``BLOCKED`` needing review.
- "0 filled" (EXPIRED/CANCELED, executedQty 0) is checked against the order's trades.
- A fill's price, quantity and commission come from its trades; unknown is ``None``, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Iterable

from stopmonitor.exchange.base import OrderResult, Trade, with_trades

WAIT = "WAIT"  # not visible yet: ask again on a later pass, send nothing
RECORD = "RECORD"  # the trades prove a fill: record ``order`` (built from them)
RESEND = "RESEND"  # the window passed, no trade, the balance still there: send again, same id
REVIEW = "REVIEW"  # contradictory evidence: BLOCKED(NEEDS_REVIEW) once, never a new order


@dataclass(frozen=True)
class Verdict:
    """What to do about an order the exchange does not show; ``detail`` says why (for the event)."""

    action: str
    detail: str
    order: OrderResult | None = None
    reason: str = ""


def unexplained_trades(trades: Iterable[Trade], side: str, since: datetime, known_order_ids: Iterable[int]) -> list[Trade]:
    """Trades on ``side`` (the close's side: SELL → not the buyer) at or after ``since`` whose order
    is none of ``known_order_ids`` (orders already recorded for this account's other executions)."""
    known = set(known_order_ids)
    buyer = side == "BUY"
    return [t for t in trades if t.is_buyer == buyer and t.time >= since and t.order_id not in known]


def order_from_trades(trades: list[Trade], *, symbol: str, side: str, client_order_id: str,
                      requested: Decimal) -> OrderResult | None:
    """The order the trades of one order id describe (the first order id whose total quantity is
    not more than ``requested``), with its fills from them: FILLED when it covers ``requested``,
    else EXPIRED (a partial close; the rest stays protected). None when no order id fits."""
    by_order: dict[int, list[Trade]] = {}
    for t in sorted(trades, key=lambda t: t.trade_id):
        by_order.setdefault(t.order_id, []).append(t)
    for order_id, rows in by_order.items():
        qty = sum((t.qty for t in rows), Decimal(0))
        if 0 < qty <= requested:
            base = OrderResult(
                symbol=symbol, side=side, status="FILLED" if qty >= requested else "EXPIRED", exchange_order_id=order_id,
                client_order_id=client_order_id, requested_qty=requested, executed_qty=qty,
                cummulative_quote_qty=sum((t.quote_qty for t in rows), Decimal(0)), transact_time=rows[-1].time,
                expiry_reason=None if qty >= requested else "FROM_TRADES",
            )
            return with_trades(base, rows)
    return None


def judge_not_found(*, now: datetime, submitted_at: datetime, window_seconds: int, symbol: str, side: str,
                    client_order_id: str, requested: Decimal, trades: list[Trade], known_order_ids: Iterable[int],
                    balance_holds: bool | None, known_orders_gone: bool = False) -> Verdict:
    """The verdict on ``-2013`` (or ``-2010`` after a send) for the close ``client_order_id``.

    ``trades``: the account's trades on ``symbol`` since ``submitted_at``; ``known_order_ids``:
    order ids already recorded for other executions; ``balance_holds``: the free balance still
    holds what the close would spend (None = the venue does not say); ``known_orders_gone``: an
    order of this account that the exchange showed before is gone too (a testnet reset).
    """
    mine = unexplained_trades(trades, side, submitted_at, known_order_ids)
    if mine:
        order = order_from_trades(mine, symbol=symbol, side=side, client_order_id=client_order_id, requested=requested)
        if order is not None:
            return Verdict(RECORD, f"no order {client_order_id} visible, but {len(order.fills)} trade(s) of order "
                                   f"{order.exchange_order_id} since the submit time: recorded from the trades", order)
        return Verdict(REVIEW, f"trades since the submit time that do not fit {client_order_id}", reason="TRADES_UNMATCHED")
    age = (now - submitted_at).total_seconds()
    if age < window_seconds:
        return Verdict(WAIT, f"order {client_order_id} not visible {age:.0f} s after its submit time "
                             f"(window {window_seconds} s): asking again later, sending nothing")
    if balance_holds is False:
        return Verdict(REVIEW, f"order {client_order_id} not visible after {window_seconds} s and no trade, but the "
                               "balance it would have sold is gone", reason="BALANCE_GONE")
    if known_orders_gone:
        return Verdict(REVIEW, f"order {client_order_id} and the account's earlier orders are gone and the balance "
                               "is there again (a testnet reset?)", reason="ORDERS_GONE")
    return Verdict(RESEND, f"no order {client_order_id} {age:.0f} s after its submit time, no trade since, the "
                           "balance still holds it: sending it once more with the same client order id")


def check_zero_fill(result: OrderResult, trades: list[Trade]) -> OrderResult:
    """A final answer with executedQty 0 checked against the order's trades (issue #12 item 3):
    when trades of that order id exist, the order as they describe it; else ``result`` as is."""
    if not result.is_final or result.executed_qty > 0:
        return result
    rows = [t for t in trades if t.order_id == result.exchange_order_id]
    qty = sum((t.qty for t in rows), Decimal(0))
    if qty <= 0:
        return result
    status = "FILLED" if qty >= result.requested_qty else "EXPIRED"
    return with_trades(replace(result, status=status, executed_qty=qty,
                               cummulative_quote_qty=sum((t.quote_qty for t in rows), Decimal(0))), rows)


def fills_from_trades(result: OrderResult, trades: list[Trade]) -> OrderResult:
    """``result`` (a GET answer: no fills) with price, quantity and commission from its trades
    (issue #12 item 4). Unchanged when the trades are unknown: commission stays None."""
    if result.fills:
        return result
    return with_trades(result, trades)


def not_found_window(submitted_at: datetime | None, now: datetime, window_seconds: int) -> timedelta:
    """How long is left of the not-visible window (zero or negative when it has passed)."""
    if submitted_at is None:
        return timedelta(0)
    return submitted_at + timedelta(seconds=window_seconds) - now
