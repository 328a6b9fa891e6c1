"""The close plan: from a frozen snapshot of one locked operation, skip, block, or close (pure).

:func:`plan_close` is transaction 1's decision (invariants 1, 5 and 6) with no database and no
exchange: the guardrails run in their business order — kill switch, circuit breaker, rate
limit, slippage, quantity — and the first that holds the trigger is the block recorded.
Prices in the quote asset, quantities in the base asset, times UTC, all ``Decimal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from stopmonitor import guardrails as g
from stopmonitor.exchange.base import NOT_TRADING_STATUSES
from stopmonitor.rules import (MANUAL, SELL, Trigger, close_quantity, close_side, decimal_str, evaluate_trigger,
                               execution_token)
from stopmonitor.vocabulary import BreakerPosition, OperationStatus, SkipReason


@dataclass(frozen=True)
class CloseSnapshot:
    """What the close decides on, read under the operation's row lock.

    ``free_base`` / ``free_quote``: the exchange's free balances of the symbol's assets (None =
    not known, not limiting). ``step_size``/``min_qty``/``min_notional``/``max_qty``: the market
    order's LOT_SIZE / MARKET_LOT_SIZE / NOTIONAL filters. ``close_in_flight``: another execution
    on the symbol is TRIGGERED or SUBMITTED (the half-open breaker's trial). ``attempt``: this
    close's attempt number (``STOP_TRIGGERED`` so far + 1).
    """

    operation_id: int
    status: str
    side: str
    stop_price: Decimal | None
    target_price: Decimal | None
    remaining: Decimal
    kill_switch: bool
    kill_switch_reason: str
    kill_switch_at: datetime | None
    breaker: g.BreakerState
    close_in_flight: bool
    triggers_last_minute: int
    triggers_last_hour: int
    max_per_minute: int
    max_per_hour: int
    max_slippage_pct: Decimal
    slippage_action: str
    step_size: Decimal | None
    min_qty: Decimal | None
    min_notional: Decimal | None
    max_qty: Decimal | None
    free_base: Decimal | None
    free_quote: Decimal | None
    attempt: int
    #: the opened size (base asset), for the fee-dust tolerance
    position: Decimal | None = None
    dust_tolerance_pct: Decimal = Decimal("1")
    #: exchangeInfo status of the symbol (HALT / BREAK / CANCEL_ONLY → SYMBOL_STATUS)
    symbol_status: str = "TRADING"
    #: base quantity the tenant's other ACTIVE operations on this asset still need (never sold here)
    reserved_for_others: Decimal = Decimal("0")
    #: base quantity this operation's own resting protection locks (included in ``free_base``, P6)
    own_protection: Decimal = Decimal("0")


@dataclass(frozen=True)
class Skip:
    """Nothing to do and nothing to record: ``reason`` NOT_ACTIVE or LEVEL_MOVED."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Hold:
    """A guardrail holds the trigger: one ``BLOCKED`` event with ``block`` (invariant 6)."""

    block: g.Block
    trigger: Trigger


@dataclass(frozen=True)
class Close:
    """Start the close: ``quantity`` (base asset) on ``side`` at ``observed``, client order id ``token``.

    ``breaker`` is the breaker state to keep (OPEN → HALF_OPEN: this close is the trial);
    ``slippage`` the pre-trade check (None for a manual close)."""

    trigger: Trigger
    side: str
    observed: Decimal
    quantity: Decimal
    token: str
    attempt: int
    breaker: g.BreakerState
    slippage: g.SlippageCheck | None
    #: what stays unsold and is closed with this close (unsellable, within the fee tolerance)
    dust: Decimal = Decimal("0")
    #: the free balance (for what is ours) falls short of the remaining by more than the tolerance
    shortfall: Decimal = Decimal("0")


@dataclass(frozen=True)
class CloseAsDust:
    """Nothing can be sold and what remains is fee dust: close the operation with ``dust`` recorded."""

    dust: Decimal
    detail: str


Plan = Skip | Hold | Close | CloseAsDust


def available(snapshot: CloseSnapshot, closing: str, price: Decimal) -> Decimal | None:
    """What the close can spend, in the base asset: free base for a SELL — less what the tenant's
    other ACTIVE operations on that asset still need (invariant 5: only what is ours) — or free
    quote / price for a BUY."""
    if closing == SELL:
        if snapshot.free_base is None:
            return None
        return max(snapshot.free_base - snapshot.reserved_for_others, Decimal("0"))
    if snapshot.free_quote is None:
        return None
    return snapshot.free_quote / price if price > 0 else Decimal("0")


def plan_close(snapshot: CloseSnapshot, trigger: Trigger, quote, now: datetime) -> Plan:
    """Decide transaction 1 for one crossed level (``quote``: best bid/ask with ``bid``/``ask``).

    A trigger other than ``MANUAL`` is re-checked against the snapshot's levels (they may have
    moved since the pass loaded them; what is crossed now is acted on). Then the guardrails
    (:func:`_guardrails`, in their business order), then the close quantity.
    """
    trigger = recheck(snapshot.status, snapshot.side, snapshot.stop_price, snapshot.target_price, trigger, quote)
    if isinstance(trigger, Skip):
        return trigger
    closing = close_side(snapshot.side)
    observed = quote.bid if closing == SELL else quote.ask
    breaker, slippage, block = _guardrails(snapshot, trigger, closing, observed, now)
    if block is not None:
        return Hold(block, trigger)
    free = available(snapshot, closing, observed)
    qty = close_quantity(snapshot.remaining, free, snapshot.step_size,
                         snapshot.min_qty, snapshot.min_notional, observed, snapshot.max_qty)
    tolerance = fee_tolerance(snapshot)
    if qty.blocked_reason:
        return _not_closable(snapshot, trigger, qty, tolerance)
    token = execution_token(snapshot.operation_id, trigger.kind, trigger.level, snapshot.attempt)
    dust, shortfall = _left_over(snapshot, qty.quantity, free, tolerance, observed)
    return Close(trigger, closing, observed, qty.quantity, token, snapshot.attempt, breaker, slippage, dust, shortfall)


def _guardrails(snapshot: CloseSnapshot, trigger: Trigger, closing: str, observed: Decimal,
                now: datetime) -> tuple[g.BreakerState, g.SlippageCheck | None, g.Block | None]:
    """The guardrails in their business order — kill switch, circuit breaker, rate limit
    (:func:`_guards`), then slippage (not for ``MANUAL``), then the symbol's trading status; a later
    one runs only when no earlier one blocked. Returns the breaker state to keep, the slippage
    check (None when it did not run) and the first block (None: the close may go on)."""
    breaker, block = _guards(snapshot, now)
    slippage = None
    if block is None and trigger.kind != MANUAL:
        slippage = g.check_slippage(closing, trigger.level, observed, Decimal(snapshot.max_slippage_pct),
                                    snapshot.slippage_action)
        block = slippage.block
    if block is None and snapshot.symbol_status in NOT_TRADING_STATUSES:
        block = g.Block(g.BlockReason.SYMBOL_STATUS, f"symbol status {snapshot.symbol_status}: Binance takes no new "
                                                     "order", key=snapshot.symbol_status)
    return breaker, slippage, block


def _not_closable(snapshot: CloseSnapshot, trigger: Trigger, qty, tolerance: Decimal) -> Hold | CloseAsDust:
    """The close quantity is blocked (``qty.blocked_reason``): close as dust when the remainder can
    never be sold and is within the fee ``tolerance``, else hold with the quantity's block."""
    if qty.blocked_reason in UNSELLABLE and snapshot.remaining <= tolerance:
        return CloseAsDust(snapshot.remaining, f"remaining {decimal_str(snapshot.remaining)} cannot be sold "
                                               f"({qty.detail}) and is within the fee tolerance "
                                               f"{decimal_str(tolerance)}: closed as dust")
    return Hold(g.Block(qty.blocked_reason, qty.detail), trigger)


def _left_over(snapshot: CloseSnapshot, quantity: Decimal, free: Decimal | None, tolerance: Decimal,
               observed: Decimal) -> tuple[Decimal, Decimal]:
    """``(dust, shortfall)`` of a close of ``quantity`` (base asset), at most one of them non-zero.

    dust: an unsellable rest within the fee ``tolerance`` (the fee took it: the operation closes
    with this close); shortfall: the free balance falls short of the remaining by more than the
    tolerance (sell what is there, protection first; recorded once)."""
    rest = snapshot.remaining - quantity
    if rest > 0 and rest <= tolerance and not _sellable(rest, snapshot, observed):
        return rest, Decimal("0")
    if free is not None and rest > tolerance and free < snapshot.remaining:
        return Decimal("0"), snapshot.remaining - free
    return Decimal("0"), Decimal("0")


#: close-quantity blocks that mean "this remainder can never be sold"
UNSELLABLE = (g.BlockReason.BELOW_MIN_QTY, g.BlockReason.BELOW_MIN_NOTIONAL, g.BlockReason.INSUFFICIENT_BALANCE)


def fee_tolerance(snapshot: CloseSnapshot) -> Decimal:
    """The fee-dust tolerance in the base asset: ``dust_tolerance_pct`` of the position (issue #12 item 5)."""
    position = snapshot.position if snapshot.position is not None else snapshot.remaining
    return position * snapshot.dust_tolerance_pct / 100


def _sellable(qty: Decimal, snapshot: CloseSnapshot, price: Decimal) -> bool:
    """Could ``qty`` go out as a MARKET order on its own (step, minQty, minNotional)?"""
    rest = close_quantity(qty, None, snapshot.step_size, snapshot.min_qty, snapshot.min_notional, price)
    return rest.blocked_reason is None and rest.quantity == qty


def recheck(status: str, side: str, stop_price: Decimal | None, target_price: Decimal | None, trigger: Trigger,
            quote) -> Trigger | Skip:
    """The trigger still standing under the row lock: the operation is ACTIVE and (unless
    ``MANUAL``) a level is crossed at ``quote`` now — the one crossed now, which may differ from
    the pass's (a stop moved to another crossed level still closes this pass)."""
    if status != OperationStatus.ACTIVE:
        return Skip(SkipReason.NOT_ACTIVE, f"status {status}: another closer holds it")
    if trigger.kind == MANUAL:
        return trigger
    again = evaluate_trigger(side, stop_price, target_price, quote.bid, quote.ask)
    return again if again is not None else Skip(SkipReason.LEVEL_MOVED, "no level is crossed after the stop or target moved")


def _guards(snapshot: CloseSnapshot, now: datetime) -> tuple[g.BreakerState, g.Block | None]:
    """Kill switch, then circuit breaker, then rate limit: the breaker state to keep and the first block."""
    block = g.kill_switch(snapshot.kill_switch, snapshot.kill_switch_reason, snapshot.kill_switch_at)
    breaker, breaker_block = g.breaker_allows(snapshot.breaker, now)
    if breaker_block is None and snapshot.breaker.state == BreakerPosition.HALF_OPEN and snapshot.close_in_flight:
        breaker_block = g.Block(g.CIRCUIT_BREAKER, "circuit half-open: the trial close is still in flight")
    block = block or breaker_block
    if block is None:
        block = g.rate_limit(snapshot.triggers_last_minute, snapshot.triggers_last_hour, snapshot.max_per_minute,
                             snapshot.max_per_hour)
    return breaker, block
