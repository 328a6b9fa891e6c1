"""Exchange-held protection as pure functions: the plan, moves, the audit diff, cancelReplace outcomes, the fold.

No Django, no network, no clock (times are arguments). Prices in the quote asset, quantities in
the base asset, as ``Decimal``; payload values are strings (:func:`stopmonitor.rules.decimal_str`).
The protocol is ../shared/design/protection.md (sections "The protocol" 1–7 are cited as P1…P7);
the engine (``stopmonitor/engine/protection.py``) does the I/O around these decisions.

A protection is one resting order per operation: a ``STOP_LOSS`` on the closing side (or an OCO
list of that stop and a ``LIMIT_MAKER`` take-profit when a target is set and the symbol allows
it), a buffer beyond the monitor's own stop so the monitor normally acts first. Its client order
id is ``sp<operation>-<generation>`` (the take-profit leg adds ``t``, the list ``l``); every
replacement takes the next generation, so an id names exactly one order for ever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Any, Iterable, Mapping

from stopmonitor.exchange.base import (
    CancelReplaceCancelFailed,
    CancelReplaceNewFailed,
    CancelReplaceResult,
    CancelReplaceUnknown,
    OcoRequest,
    OrderRejected,
    OrderResult,
    StopOrderRequest,
    SymbolFilters,
)
from stopmonitor.execution import EventType, NewEvent, StoredEvent
from stopmonitor.rules import close_quantity, close_side, decimal_str, floor_to_step

# the event types (one vocabulary: stopmonitor.execution.EventType)
PROTECTION_REQUESTED = EventType.PROTECTION_REQUESTED
PROTECTION_PLACED = EventType.PROTECTION_PLACED
PROTECTION_MOVED = EventType.PROTECTION_MOVED
PROTECTION_CANCELLED = EventType.PROTECTION_CANCELLED
PROTECTION_TRIGGERED = EventType.PROTECTION_TRIGGERED
UNPROTECTED = EventType.UNPROTECTED
PROTECTION_EVENT_TYPES = (PROTECTION_REQUESTED, PROTECTION_PLACED, PROTECTION_MOVED, PROTECTION_CANCELLED,
                          PROTECTION_TRIGGERED, UNPROTECTED)

# protection status in the projection (``api.models.StopMonitorProtection.status``)
REQUESTED, PLACED, TRIGGERED, CANCELLED, UNPROTECTED_STATUS = "REQUESTED", "PLACED", "TRIGGERED", "CANCELLED", "UNPROTECTED"
STOP_LOSS, OCO = "STOP_LOSS", "OCO"

BINANCE_VENUES = frozenset({"binance", "binance-testnet"})
DEFAULT_BUFFER_BPS = 50  # 0.5 % beyond the monitor's stop
MAX_BUFFER_BPS = 2000  # 20 %: a wider buffer is a configuration mistake, not protection
BPS = Decimal("10000")

_CLIENT_ID_RE = re.compile(r"^sp(\d+)-(\d+)([tl]?)$")
_BINANCE_CLIENT_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")


# ------------------------------------------------------------------------------------ settings

def protection_enabled(setting: bool | None, venue: str) -> bool:
    """The tenant's protection switch: ``None`` means the venue's default (on for Binance
    venues, off for paper); True/False are explicit choices."""
    return venue in BINANCE_VENUES if setting is None else bool(setting)


def check_buffer_bps(value: Any) -> int:
    """A buffer in basis points (integer 0 … :data:`MAX_BUFFER_BPS`). Raises ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BUFFER_BPS:
        raise ValueError(f"protection buffer must be an integer number of basis points from 0 to {MAX_BUFFER_BPS}")
    return value


# ------------------------------------------------------------------------------------ ids

def protection_client_id(operation_id: int, generation: int) -> str:
    """``sp<operation>-<generation>``: the newClientOrderId of one generation of protection.

    Deterministic (never the wall clock), ≤ 36 characters of ``^[.A-Z:/a-z0-9_-]``; the OCO's
    take-profit leg is this id + ``t`` and its list id + ``l``. Raises ValueError when it
    would not fit Binance's rule.
    """
    if operation_id <= 0 or generation <= 0:
        raise ValueError("operation id and generation must be positive")
    cid = f"sp{operation_id}-{generation}"
    if len(cid) > 34 or not _BINANCE_CLIENT_ID_RE.match(cid + "t"):
        raise ValueError(f"protection client order id {cid!r} does not fit newClientOrderId")
    return cid


def parse_client_id(client_order_id: str) -> tuple[int, int, str] | None:
    """``(operation id, generation, leg)`` of one of our protection ids (leg ``""`` stop, ``t``
    take-profit, ``l`` list), or None for an order we did not place (never touched, P5)."""
    m = _CLIENT_ID_RE.match(client_order_id or "")
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


# ------------------------------------------------------------------------------------ prices and quantities

def resting_stop_price(closing_side: str, stop_price: Decimal, buffer_bps: int, tick: Decimal | None) -> Decimal:
    """The resting stop: ``buffer_bps`` beyond the monitor's stop, on ``tick`` (PRICE_FILTER.tickSize),
    rounded away from the market (the safe direction: the monitor, triggering at the stop on the
    bid/ask, acts first; Binance stops trigger on the last trade).

    SELL (long): ``stop × (1 − bps/10000)`` rounded down; BUY (short): ``stop × (1 + bps/10000)``
    rounded up. Raises ValueError when the result is not a positive price.
    """
    if stop_price <= 0:
        raise ValueError("stop price must be positive")
    factor = (BPS - buffer_bps) / BPS if closing_side == "SELL" else (BPS + buffer_bps) / BPS
    raw = stop_price * factor
    price = _on_tick(raw, tick, up=closing_side != "SELL")
    if price <= 0:
        raise ValueError(f"resting stop {price} is not a positive price")
    return price


def resting_limit_price(closing_side: str, target_price: Decimal, buffer_bps: int, tick: Decimal | None) -> Decimal:
    """The OCO's ``LIMIT_MAKER`` take-profit: ``buffer_bps`` beyond the target, on ``tick``, away
    from the market (SELL: above, rounded up; BUY: below, rounded down)."""
    factor = (BPS + buffer_bps) / BPS if closing_side == "SELL" else (BPS - buffer_bps) / BPS
    return _on_tick(target_price * factor, tick, up=closing_side == "SELL")


def _on_tick(price: Decimal, tick: Decimal | None, up: bool) -> Decimal:
    if not tick or tick <= 0:
        return price.quantize(Decimal("0.00000001"), rounding=ROUND_UP if up else ROUND_DOWN)
    return (price / tick).to_integral_value(rounding=ROUND_UP if up else ROUND_DOWN) * tick


def allocate(operations: Iterable[tuple[int, Decimal]], free: Decimal | None, own_locked: Decimal) -> dict[int, Decimal]:
    """The quantity each operation may protect (P6), in the order given (oldest first).

    ``operations`` are ``(operation id, remaining quantity)`` of one account's ACTIVE operations
    on one base asset; ``free`` the free balance (None: the venue does not limit by balance) and
    ``own_locked`` what our own resting protection locks. Each gets min(remaining, what is left
    of free + own_locked): never more than its remaining, and Σ ≤ free + own_locked.
    """
    left = None if free is None else max(free + own_locked, Decimal(0))
    out: dict[int, Decimal] = {}
    for operation_id, remaining in operations:
        qty = max(remaining, Decimal(0)) if left is None else min(max(remaining, Decimal(0)), left)
        out[operation_id] = qty
        if left is not None:
            left -= qty
    return out


# ------------------------------------------------------------------------------------ the plan (P1)

@dataclass(frozen=True)
class ProtectionPlan:
    """One protection order to rest: ``kind`` STOP_LOSS or OCO, on ``side`` (the closing side)."""

    operation_id: int
    generation: int
    symbol: str
    kind: str
    side: str
    quantity: Decimal
    stop_price: Decimal
    limit_price: Decimal | None
    client_order_id: str

    def request(self) -> StopOrderRequest | OcoRequest:
        """The port request that rests this plan."""
        if self.kind == OCO:
            return OcoRequest(self.symbol, self.side, self.quantity, self.stop_price, self.limit_price,
                              self.client_order_id, self.client_order_id + "t", self.client_order_id + "l")
        return StopOrderRequest(self.symbol, self.side, self.quantity, self.stop_price, self.client_order_id)

    def stop_request(self) -> StopOrderRequest:
        """The plan as a single ``STOP_LOSS`` (what a cancelReplace move places)."""
        return StopOrderRequest(self.symbol, self.side, self.quantity, self.stop_price, self.client_order_id)

    def payload(self, **extra: Any) -> dict[str, Any]:
        """The ``PROTECTION_REQUESTED`` payload (committed before the call: invariant 2)."""
        return {"client_order_id": self.client_order_id, "generation": self.generation, "kind": self.kind,
                "side": self.side, "quantity": decimal_str(self.quantity), "stop_price": decimal_str(self.stop_price),
                "limit_price": decimal_str(self.limit_price), **extra}


@dataclass(frozen=True)
class Unprotectable:
    """Why an operation cannot rest protection now (the ``UNPROTECTED`` event's reason and detail)."""

    reason: str
    detail: str

    def event(self, **extra: Any) -> NewEvent:
        return NewEvent(UNPROTECTED, {"reason": self.reason, "detail": self.detail, **extra})


def plan_protection(operation_id: int, opening_side: str, available: Decimal, stop_price: Decimal | None,
                    target_price: Decimal | None, filters: SymbolFilters, buffer_bps: int, generation: int,
                    last_price: Decimal | None) -> ProtectionPlan | Unprotectable:
    """What to rest for one operation (P1), or why nothing can rest.

    ``available`` is its share from :func:`allocate`; ``last_price`` the latest price seen (the
    bid for a long, the ask for a short; None when unknown). The quantity is ``available`` on the
    symbol's LOT_SIZE (:func:`stopmonitor.rules.close_quantity`, minQty/minNotional checked at the
    resting stop price). Reasons: ``NO_STOP``, ``SYMBOL_STATUS``, ``ORDER_TYPE_NOT_ALLOWED``
    (no STOP_LOSS, or no cancelReplace: our close could not replace it), ``PRICE_THROUGH_STOP``
    (the market is already beyond the resting stop: the monitor's trigger closes at market) and
    the close-quantity reasons (``INSUFFICIENT_BALANCE``, ``BELOW_MIN_QTY``, ``BELOW_MIN_NOTIONAL``).
    """
    refused = _cannot_rest(stop_price, filters)
    if refused is not None:
        return refused
    side = close_side(opening_side)
    stop = resting_stop_price(side, stop_price, buffer_bps, filters.tick_size)
    if last_price is not None and (last_price <= stop if side == "SELL" else last_price >= stop):
        return Unprotectable("PRICE_THROUGH_STOP", f"price {decimal_str(last_price)} already through the resting "
                                                   f"stop {decimal_str(stop)}")
    qty = close_quantity(available, None, filters.step_size, filters.min_qty, filters.min_notional, stop,
                         filters.max_qty)
    if qty.blocked_reason:
        return Unprotectable(qty.blocked_reason, qty.detail)
    limit = _take_profit(side, target_price, filters, buffer_bps, stop, last_price)
    return ProtectionPlan(operation_id, generation, filters.symbol, STOP_LOSS if limit is None else OCO, side,
                          qty.quantity, stop, limit, protection_client_id(operation_id, generation))


def _cannot_rest(stop_price: Decimal | None, filters: SymbolFilters) -> Unprotectable | None:
    """Why no protection can rest whatever the price and balance (no stop, symbol not trading, order types), or None."""
    if stop_price is None:
        return Unprotectable("NO_STOP", "no stop price set")
    if filters.status != "TRADING":
        return Unprotectable("SYMBOL_STATUS", f"{filters.symbol} is {filters.status}")
    if not filters.stop_loss_allowed or not filters.cancel_replace_allowed:
        missing = "STOP_LOSS orders" if not filters.stop_loss_allowed else "cancelReplace"
        return Unprotectable("ORDER_TYPE_NOT_ALLOWED", f"{filters.symbol} does not allow {missing}")
    return None


def _take_profit(side: str, target_price: Decimal | None, filters: SymbolFilters, buffer_bps: int, stop: Decimal,
                 last_price: Decimal | None) -> Decimal | None:
    """The OCO's take-profit limit when a target is set, the symbol allows OCO and the last price
    (when known) lies between the limit and the resting ``stop``; None: rest the stop alone (a
    take-profit already crossed is the monitor's to take)."""
    if target_price is None or not filters.oco_allowed:
        return None
    limit = resting_limit_price(side, target_price, buffer_bps, filters.tick_size)
    if last_price is None or (limit > last_price > stop if side == "SELL" else limit < last_price < stop):
        return limit
    return None


# ------------------------------------------------------------------------------------ the fold

@dataclass(frozen=True)
class ProtectionState:
    """The protection of one operation, folded from its protection events (the projection row).

    ``status``: REQUESTED (intent committed, answer not yet recorded), PLACED (resting),
    TRIGGERED (the exchange stop fired), CANCELLED, UNPROTECTED (``reason`` says why).
    ``replaced_at`` is the last cancelReplace move (bounded churn, P3); a REQUESTED move names
    the order it replaces in ``replaces`` (both ids are asked when its answer is lost). Times UTC.
    """

    operation_id: int
    status: str
    generation: int
    client_order_id: str
    kind: str
    side: str
    quantity: Decimal | None
    stop_price: Decimal | None
    limit_price: Decimal | None
    exchange_order_id: int | None
    reason: str
    replaces: str  # while a move is REQUESTED: the client id of the order it replaces
    requested_at: datetime | None
    placed_at: datetime | None
    replaced_at: datetime | None
    updated_at: datetime
    last_version: int


def protection_field_names() -> list[str]:
    """The projection's field names (compared with ``api.models.StopMonitorProtection`` by a test)."""
    return [f.name for f in fields(ProtectionState)]


def _d(value) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


def apply_protection(state: ProtectionState | None, event: StoredEvent) -> ProtectionState | None:
    """Fold one event into the operation's protection; other event types leave it unchanged.

    Never appends, never calls the exchange, never reads the clock. Raises ValueError for a
    protection event other than REQUESTED/UNPROTECTED on an operation without protection.
    """
    kind = event.event_type
    if kind not in PROTECTION_EVENT_TYPES:
        return state
    if kind == PROTECTION_REQUESTED:
        return _requested(state, event)
    if kind == UNPROTECTED and state is None:
        return ProtectionState(event.operation_id, UNPROTECTED_STATUS, 0, "", "", "", None, None, None, None,
                               event.payload.get("reason", ""), "", None, None, None, event.created_at, event.version)
    if state is None:
        raise ValueError(f"{kind} v{event.version} for operation {event.operation_id} before any protection")
    return _FOLD_ONTO[kind](state, event.payload, updated_at=event.created_at, last_version=event.version)


def _requested(state: ProtectionState | None, event: StoredEvent) -> ProtectionState:
    """A new generation's intent: everything from the payload; the last placement and move times carry over."""
    p, at = event.payload, event.created_at
    return ProtectionState(
        event.operation_id, REQUESTED, int(p["generation"]), p["client_order_id"], p["kind"], p["side"],
        _d(p["quantity"]), _d(p["stop_price"]), _d(p.get("limit_price")), None, "",
        p.get("replaces") or "", at, state.placed_at if state else None, state.replaced_at if state else None,
        updated_at=at, last_version=event.version)


def _placed(state: ProtectionState, p: Mapping[str, Any], **common: Any) -> ProtectionState:
    return replace(state, status=PLACED, exchange_order_id=p.get("order_id"), placed_at=common["updated_at"],
                   quantity=_d(p.get("quantity")) or state.quantity, replaces="", **common)


def _moved(state: ProtectionState, p: Mapping[str, Any], **common: Any) -> ProtectionState:
    """A cancelReplace (or a lost answer found): the payload's new order, what it does not say kept."""
    return replace(state, status=PLACED, generation=int(p.get("generation", state.generation)),
                   client_order_id=p.get("client_order_id", state.client_order_id),
                   kind=p.get("kind", state.kind),
                   quantity=_d(p.get("quantity")) or state.quantity,
                   stop_price=_d(p.get("stop_price")) or state.stop_price,
                   limit_price=_d(p["limit_price"]) if "limit_price" in p else state.limit_price,
                   exchange_order_id=p.get("order_id", state.exchange_order_id),
                   replaced_at=common["updated_at"], reason=p.get("reason", ""), replaces="", **common)


def _cancelled(state: ProtectionState, p: Mapping[str, Any], **common: Any) -> ProtectionState:
    return replace(state, status=CANCELLED, reason=p.get("reason", ""), **common)


def _triggered(state: ProtectionState, p: Mapping[str, Any], **common: Any) -> ProtectionState:
    return replace(state, status=TRIGGERED, reason=p.get("exchange_status", ""), **common)


def _unprotected(state: ProtectionState, p: Mapping[str, Any], **common: Any) -> ProtectionState:
    return replace(state, status=UNPROTECTED_STATUS, reason=p.get("reason", ""), **common)


#: how each protection event after the first REQUESTED changes the state (``apply_protection``)
_FOLD_ONTO = {PROTECTION_PLACED: _placed, PROTECTION_MOVED: _moved, PROTECTION_CANCELLED: _cancelled,
              PROTECTION_TRIGGERED: _triggered, UNPROTECTED: _unprotected}


def fold_protection(events: Iterable[StoredEvent]) -> dict[int, ProtectionState]:
    """Fold a log (any order of streams, each stream in version order): ``{operation id: state}``."""
    states: dict[int, ProtectionState] = {}
    for event in events:
        if event.event_type in PROTECTION_EVENT_TYPES:
            states[event.operation_id] = apply_protection(states.get(event.operation_id), event)
    return states


# ------------------------------------------------------------------------------------ moves and resizes (P3)

@dataclass(frozen=True)
class Move:
    """``action``: ``none`` (nothing to do), ``defer`` (moved, but not before ``not_before``),
    ``replace`` (cancelReplace to ``stop_price`` as generation ``generation``), ``amend``
    (reduce to ``quantity`` keeping priority), ``cancel`` (nothing left worth protecting)."""

    action: str
    reason: str
    stop_price: Decimal | None = None
    quantity: Decimal | None = None
    generation: int | None = None
    not_before: datetime | None = None


def decide_move(state: ProtectionState | None, wanted_stop: Decimal, tick: Decimal | None, now: datetime,
                min_interval: timedelta) -> Move:
    """Bounded churn (P3; freqtrade #11788): replace the resting stop only when it is PLACED, the
    wanted resting price (:func:`resting_stop_price` of the new stop) differs by at least one
    tick, and the last replacement is at least ``min_interval`` old."""
    if state is None or state.status != PLACED or state.stop_price is None:
        return Move("none", "NOT_RESTING")
    step = tick if tick and tick > 0 else Decimal("0.00000001")
    if abs(wanted_stop - state.stop_price) < step:
        return Move("none", "LESS_THAN_A_TICK")
    if state.replaced_at is not None and now - state.replaced_at < min_interval:
        return Move("defer", "CHURN_LIMIT", stop_price=wanted_stop, not_before=state.replaced_at + min_interval)
    return Move("replace", "STOP_MOVED", stop_price=wanted_stop, generation=state.generation + 1)


def decide_resize(state: ProtectionState | None, wanted: Decimal, filters: SymbolFilters) -> Move:
    """After a partial close the protection shrinks to ``wanted`` (P3): floored to stepSize; below
    minQty → cancel; smaller → amend keepPriority; larger (balance came back) → replace."""
    if state is None or state.status != PLACED or state.quantity is None:
        return Move("none", "NOT_RESTING")
    qty = floor_to_step(wanted, filters.step_size).quantize(Decimal("0.00000001"), rounding=ROUND_DOWN)
    if qty == state.quantity:
        return Move("none", "SAME_QUANTITY")
    if qty <= 0 or (filters.min_qty and qty < filters.min_qty):
        return Move("cancel", "BELOW_MIN_QTY", quantity=qty)
    if qty < state.quantity:
        return Move("amend", "PARTIAL_CLOSE", quantity=qty)
    return Move("replace", "QUANTITY_GREW", stop_price=state.stop_price, quantity=qty, generation=state.generation + 1)


# ------------------------------------------------------------------------------------ the audit (P5)

ARM, RESOLVE, CANCEL, WAIT = "ARM", "RESOLVE", "CANCEL", "WAIT"


@dataclass(frozen=True)
class AuditAction:
    """One thing the audit found: ARM (expected, not resting), RESOLVE (ask the exchange by
    ``client_order_id``: intent without answer, or resting no more), CANCEL (our order left over:
    ``reason`` ORPHANED or STALE_GENERATION), WAIT (placed moments ago: not visible yet)."""

    action: str
    operation_id: int
    client_order_id: str
    symbol: str
    reason: str


def audit(expected: Mapping[int, ProtectionState | None], open_orders: Iterable[OrderResult], now: datetime,
          visibility: timedelta, symbols: Mapping[int, str] | None = None,
          finished: Mapping[int, ProtectionState] | None = None) -> list[AuditAction]:
    """Compare expected protection with the exchange's open orders (one account; P5).

    ``expected`` holds every ACTIVE operation of that account that should be protected (enabled,
    with a stop), with its folded state (None: never armed). ``open_orders`` is the account's
    ``openOrders`` answer. Orders whose client id is not ours (:func:`parse_client_id`) are never
    touched. An expected protection PLACED less than ``visibility`` ago and absent is WAIT
    (Binance shows new orders late). ``finished`` holds operations no longer protected (closed,
    cancelled, protection off) whose protection is still PLACED/REQUESTED in the projection: resting →
    CANCEL (ORPHANED), absent → RESOLVE (it filled, or our close's cancelReplace took it). Returns
    the actions sorted by (action, operation).
    """
    symbols = symbols or {}
    resting = _ours(open_orders)
    actions = _leftovers(expected, resting)
    for operation_id, state in expected.items():
        action = _expected_action(operation_id, state, resting, symbols.get(operation_id, ""), now, visibility)
        if action is not None:
            actions.append(action)
    actions += _finished_not_open(expected, finished or {}, resting, symbols)
    return sorted(actions, key=lambda a: (a.action, a.operation_id, a.client_order_id))


def _ours(open_orders: Iterable[OrderResult]) -> dict[str, OrderResult]:
    """``{client order id: order}`` of the open orders whose client id is one of ours."""
    return {order.client_order_id: order for order in open_orders if parse_client_id(order.client_order_id)}


def _leftovers(expected: Mapping[int, ProtectionState | None], resting: Mapping[str, OrderResult]) -> list[AuditAction]:
    """CANCEL for each resting order of ours that is not an expected operation's current protection
    (ORPHANED: not expected; STALE_GENERATION: not its current id, nor the one a REQUESTED move
    replaces). A list is judged once, by its stop leg."""
    actions = []
    for cid, order in resting.items():
        operation_id, _generation, leg = parse_client_id(cid)
        if leg and cid[:-1] in resting:
            continue  # the stop leg speaks for its list: cancelling one leg cancels the list
        if operation_id not in expected:
            actions.append(AuditAction(CANCEL, operation_id, cid, order.symbol, "ORPHANED"))
        elif not _is_current(expected[operation_id], cid[:-1] if leg else cid):
            actions.append(AuditAction(CANCEL, operation_id, cid, order.symbol, "STALE_GENERATION"))
    return actions


def _is_current(state: ProtectionState | None, client_order_id: str) -> bool:
    """Whether ``client_order_id`` (a stop's or a list's stop leg's) is the protection ``state``
    rests: its current id, or while a move is REQUESTED the id that move replaces."""
    return state is not None and state.status in (PLACED, REQUESTED) and (
        client_order_id == state.client_order_id or (state.status == REQUESTED and client_order_id == state.replaces))


def _expected_action(operation_id: int, state: ProtectionState | None, resting: Mapping[str, OrderResult],
                     symbol: str, now: datetime, visibility: timedelta) -> AuditAction | None:
    """What one expected operation needs: ARM (never armed; or cancelled/unprotected with nothing of
    ours resting for it — what rests is cancelled first, a later audit arms), nothing (its current
    protection rests), WAIT (PLACED less than ``visibility`` ago, absent) or RESOLVE (absent)."""
    if state is None:
        return AuditAction(ARM, operation_id, "", symbol, "MISSING")
    if state.status in (CANCELLED, UNPROTECTED_STATUS):
        if any(parse_client_id(c)[0] == operation_id for c in resting):
            return None
        return AuditAction(ARM, operation_id, "", symbol, "MISSING")
    if state.client_order_id in resting:
        return None
    if state.status == PLACED and state.updated_at > now - visibility:
        return AuditAction(WAIT, operation_id, state.client_order_id, symbol, "NOT_VISIBLE_YET")
    return AuditAction(RESOLVE, operation_id, state.client_order_id, symbol, f"{state.status}_NOT_OPEN")


def _finished_not_open(expected: Mapping[int, ProtectionState | None], finished: Mapping[int, ProtectionState],
                       resting: Mapping[str, OrderResult], symbols: Mapping[int, str]) -> list[AuditAction]:
    """RESOLVE for each finished operation's protection that no longer rests (it filled, or our
    close's cancelReplace took it)."""
    return [AuditAction(RESOLVE, operation_id, state.client_order_id, symbols.get(operation_id, ""),
                        "FINISHED_NOT_OPEN")
            for operation_id, state in finished.items()
            if operation_id not in expected and state.client_order_id and state.client_order_id not in resting]


# ------------------------------------------------------------------------------------ outcomes (P2, P4)

def order_payload(order: OrderResult, **extra: Any) -> dict[str, Any]:
    """An exchange order in a protection event's payload (ids, status, quantities, prices)."""
    return {"client_order_id": order.client_order_id, "order_id": order.exchange_order_id,
            "order_list_id": order.order_list_id, "exchange_status": order.status, "type": order.order_type,
            "quantity": decimal_str(order.requested_qty), "executed_qty": decimal_str(order.executed_qty),
            "stop_price": decimal_str(order.stop_price), **extra}


@dataclass(frozen=True)
class CloseVerdict:
    """What one cancelReplace close means (P2). ``kind``:

    - ``CLOSED`` — 200: ``events`` records the cancel; ``new`` is the close to record as usual.
    - ``EXCHANGE_FIRED`` — 400: the stop fired first. Never a market order; query the protection
      (:func:`interpret_protection_order`) and record PROTECTION_TRIGGERED and its fills.
    - ``UNPROTECTED`` — 409: cancelled, close refused (``events``: the cancel + UNPROTECTED);
      act at once (retry the close with evidence, or re-arm).
    - ``UNKNOWN`` — query both client ids before anything else.
    - ``REJECTED`` — refused before either leg: the protection still rests; the close FAILED.
    """

    kind: str
    events: tuple[NewEvent, ...] = ()
    new: OrderResult | None = None
    code: int | None = None
    detail: str = ""


def interpret_close(outcome: CancelReplaceResult | Exception) -> CloseVerdict:
    """Classify a cancelReplace close's answer (a result, or the error the port raised)."""
    if isinstance(outcome, CancelReplaceResult):
        cancelled = NewEvent(PROTECTION_CANCELLED, order_payload(outcome.cancelled, reason="CLOSE"))
        return CloseVerdict("CLOSED", (cancelled,), outcome.new)
    if isinstance(outcome, CancelReplaceCancelFailed):
        return CloseVerdict("EXCHANGE_FIRED", code=outcome.cancel_code, detail=str(outcome))
    if isinstance(outcome, CancelReplaceNewFailed):
        events = []
        if outcome.cancelled is not None:
            events.append(NewEvent(PROTECTION_CANCELLED, order_payload(outcome.cancelled, reason="CLOSE")))
        events.append(NewEvent(UNPROTECTED, {"reason": "CLOSE_REFUSED_AFTER_CANCEL", "code": outcome.new_code,
                                             "detail": str(outcome)[:300]}))
        return CloseVerdict("UNPROTECTED", tuple(events), code=outcome.new_code, detail=str(outcome))
    if isinstance(outcome, CancelReplaceUnknown):
        return CloseVerdict("UNKNOWN", code=outcome.code, detail=str(outcome))
    if isinstance(outcome, OrderRejected):
        return CloseVerdict("REJECTED", code=outcome.code, detail=str(outcome))
    raise TypeError(f"not a cancelReplace outcome: {outcome!r}")


@dataclass(frozen=True)
class Finding:
    """What the exchange says about a protection order (P4). ``kind``: RESTING, FILLED (all of
    it), PARTIAL (some executed; ``final`` says whether more can come), GONE (final with nothing
    executed: cancelled outside us or expired — check trades before trusting the zero), or
    NOT_VISIBLE (the exchange has no such order: not proof of anything alone)."""

    kind: str
    executed_qty: Decimal = Decimal(0)
    final: bool = False
    events: tuple[NewEvent, ...] = ()

    @property
    def final_fill(self) -> bool:
        """Whether it executed (all or part) and nothing more can come: the fill is the exchange's to record."""
        return self.kind in ("FILLED", "PARTIAL") and self.final


def interpret_protection_order(order: OrderResult | None) -> Finding:
    """Classify ``GET /api/v3/order`` of the protection's client id."""
    if order is None:
        return Finding("NOT_VISIBLE")
    executed = order.executed_qty
    if not order.is_final:
        if executed > 0:
            return Finding("PARTIAL", executed, False, (NewEvent(PROTECTION_TRIGGERED, order_payload(order)),))
        return Finding("RESTING")
    if executed <= 0:
        return Finding("GONE", final=True)
    kind = "FILLED" if executed >= order.requested_qty else "PARTIAL"
    return Finding(kind, executed, True, (NewEvent(PROTECTION_TRIGGERED, order_payload(order)),))


__all__ = [name for name in dir() if name.isupper() or name[0].isupper() or name in (
    "allocate", "apply_protection", "audit", "check_buffer_bps", "decide_move", "decide_resize", "fold_protection",
    "interpret_close", "interpret_protection_order", "order_payload", "parse_client_id", "plan_protection",
    "protection_client_id", "protection_enabled", "protection_field_names", "resting_limit_price",
    "resting_stop_price")]
