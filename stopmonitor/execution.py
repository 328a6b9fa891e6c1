"""The execution state machine: event types, ``decide_outcome`` and the ``apply`` fold.

Plain Python: no Django, no exchange, no clock. ``apply(state, event)`` folds one stored
event into the execution projection; the same fold serves the live append and the rebuild
(invariant 8), so both give the same rows. Quantities in the base asset, prices in the quote
asset, as ``Decimal``; payload values are strings (see :func:`stopmonitor.rules.decimal_str`).

States: TRIGGERED → SUBMITTED → EXECUTED | PARTIALLY_EXECUTED | FAILED. SUBMITTED with an
unknown outcome stays SUBMITTED until reconciled (invariant 3).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from stopmonitor.rules import decimal_str, slippage_pct

class EventType(StrEnum):
    """The event types of a stream (stop-execution.md, "Event types")."""

    STOP_TRIGGERED = "STOP_TRIGGERED"
    EXECUTION_SUBMITTED = "EXECUTION_SUBMITTED"
    EXECUTED = "EXECUTED"
    PARTIALLY_EXECUTED = "PARTIALLY_EXECUTED"
    FAILED = "FAILED"
    BLOCKED = "BLOCKED"
    RECONCILED = "RECONCILED"
    GUARD_WARNING = "GUARD_WARNING"
    STOP_SET = "STOP_SET"
    STOP_MOVED = "STOP_MOVED"
    TARGET_SET = "TARGET_SET"
    OPERATION_CLOSED = "OPERATION_CLOSED"
    TRAILING_SET = "TRAILING_SET"
    # exchange-held protection (protection.md; folded by stopmonitor.protection into StopMonitorProtection)
    PROTECTION_REQUESTED = "PROTECTION_REQUESTED"
    PROTECTION_PLACED = "PROTECTION_PLACED"
    PROTECTION_MOVED = "PROTECTION_MOVED"
    PROTECTION_CANCELLED = "PROTECTION_CANCELLED"
    PROTECTION_TRIGGERED = "PROTECTION_TRIGGERED"
    UNPROTECTED = "UNPROTECTED"


# the same members under their short names (the event store, the projection and the backfill use these)
(STOP_TRIGGERED, EXECUTION_SUBMITTED, EXECUTED, PARTIALLY_EXECUTED, FAILED, BLOCKED, RECONCILED, GUARD_WARNING,
 STOP_SET, STOP_MOVED, TARGET_SET, OPERATION_CLOSED, TRAILING_SET, *_PROTECTION_EVENT_TYPES) = EventType


class Source(StrEnum):
    """Who appended an event (every event records it)."""

    CRON = "cron"
    LOOP = "loop"
    STREAM = "stream"
    API = "api"
    MANUAL = "manual"
    BACKFILL = "backfill"
    TRAILING = "trailing"
    BREAK_EVEN = "break_even"
    EXCHANGE = "exchange"  # a fill the exchange made (an exchange-held stop)


class Venue(StrEnum):
    """Where an order goes, so a simulated fill is never mistaken for a real one."""

    BINANCE = "binance"
    BINANCE_TESTNET = "binance-testnet"
    PAPER = "paper"


COMMISSION_ASSET_MAX = 12  # the projection column; the event payload keeps every asset in full


@dataclass(frozen=True)
class NewEvent:
    """An event to append: type, JSON payload (strings for Decimals) and its execution token."""

    event_type: str
    payload: dict[str, Any]
    execution_token: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """An event as read back from the store (what :func:`apply` folds)."""

    operation_id: int
    tenant_id: int
    symbol: str
    version: int
    event_type: str
    execution_token: str | None
    source: str
    venue: str
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class ExecutionState:
    """One close attempt. Field names equal ``api.models.StopMonitorExecution`` columns
    (a test compares them); ``operation_id``/``tenant_id`` are the foreign keys."""

    execution_token: str
    operation_id: int
    tenant_id: int
    symbol: str
    attempt: int
    trigger: str
    status: str
    side: str
    trigger_price: Decimal | None
    observed_price: Decimal | None
    requested_quantity: Decimal | None
    executed_quantity: Decimal | None
    avg_fill_price: Decimal | None
    commission: Decimal | None
    commission_asset: str
    slippage_pct: Decimal | None
    exchange_order_id: int | None
    exchange_status: str
    error_code: int | None
    error_message: str
    source: str
    venue: str
    last_version: int
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None


_COLUMN_QUANTUM = Decimal("0.00000001")


def _dec(value) -> Decimal | None:
    """A payload value as the projection's ``DecimalField(20, 8)`` column stores it: more than 8
    decimals are rounded once, half away from zero as PostgreSQL's ``numeric`` does, so the fold
    and the stored row agree (``rebuild_projections --verify``; issue #12 item 16)."""
    if value is None or value == "":
        return None
    d = Decimal(str(value))
    if d.as_tuple().exponent < -8:
        d = d.quantize(_COLUMN_QUANTUM, rounding=ROUND_HALF_UP)
    return d


# The fold builds its states without the frozen dataclass ``__init__``: that ``__init__`` sets each
# of the 26 fields through ``object.__setattr__``, and ``dataclasses.replace`` reads every field
# and calls it again, which made them most of the cost of folding a million events. A state made
# here is an ordinary ``ExecutionState`` (frozen, same ``__eq__``/``__hash__``/``repr``); the
# checks below keep the one guarantee ``__init__`` and ``replace`` gave: every field, and no other.
_FIELD_NAMES = frozenset(f.name for f in fields(ExecutionState))
_FIELD_COUNT = len(_FIELD_NAMES)
_new_object = object.__new__
_set_attribute = object.__setattr__


def _state(values: dict[str, Any]) -> ExecutionState:
    """``ExecutionState(**values)``; ``values`` (taken, not copied) must name every field and nothing else."""
    if values.keys() != _FIELD_NAMES:
        raise TypeError(f"ExecutionState fields: missing {sorted(_FIELD_NAMES - values.keys())}, "
                        f"unknown {sorted(values.keys() - _FIELD_NAMES)}")
    state = _new_object(ExecutionState)
    _set_attribute(state, "__dict__", values)
    return state


def _evolve(state: ExecutionState, changes: dict[str, Any]) -> ExecutionState:
    """``dataclasses.replace(state, **changes)``: a new state; ``TypeError`` on a name that is not a field."""
    values = state.__dict__.copy()
    values.update(changes)
    if len(values) != _FIELD_COUNT:
        raise TypeError(f"not ExecutionState fields: {sorted(changes.keys() - _FIELD_NAMES)}")
    new = _new_object(ExecutionState)
    _set_attribute(new, "__dict__", values)
    return new


def apply(state: ExecutionState | None, event: StoredEvent) -> ExecutionState | None:
    """Fold ``event`` into the execution it belongs to; returns the new state.

    Events without an execution token leave the state unchanged. ``STOP_TRIGGERED`` starts the
    execution; any other event before it raises ``ValueError``; an event type without a fold of
    its own (:data:`_FOLDS`) only advances ``last_version``/``updated_at``. Never appends, never
    calls the exchange, never reads the clock (times come from the event).
    """
    if event.execution_token is None:
        return state
    if event.event_type == STOP_TRIGGERED:
        return _triggered(event)
    if state is None:
        raise ValueError(f"{event.event_type} v{event.version} for {event.execution_token} before STOP_TRIGGERED")
    return _FOLDS.get(event.event_type, _touched)(state, event)


def _triggered(event: StoredEvent) -> ExecutionState:
    """``STOP_TRIGGERED``: a new execution, TRIGGERED, with the level, observed price and quantity."""
    p = event.payload
    return _state({
        "execution_token": event.execution_token,
        "operation_id": event.operation_id,
        "tenant_id": event.tenant_id,
        "symbol": event.symbol,
        "attempt": int(p["attempt"]),
        "trigger": p["trigger"],
        "status": "TRIGGERED",
        "side": p["close_side"],
        "trigger_price": _dec(p.get("level")),
        "observed_price": _dec(p.get("observed_price")),
        "requested_quantity": _dec(p.get("quantity")),
        "executed_quantity": None,
        "avg_fill_price": None,
        "commission": None,
        "commission_asset": "",
        "slippage_pct": None,
        "exchange_order_id": None,
        "exchange_status": "",
        "error_code": None,
        "error_message": "",
        "source": event.source,
        "venue": event.venue,
        "last_version": event.version,
        "created_at": event.created_at,
        "updated_at": event.created_at,
        "submitted_at": None,
    })


def _submitted(state: ExecutionState, event: StoredEvent) -> ExecutionState:
    """``EXECUTION_SUBMITTED``: SUBMITTED at the event's time, with the quantity asked for."""
    return _evolve(state, {"status": "SUBMITTED", "requested_quantity": _dec(event.payload.get("quantity")),
                           "submitted_at": event.created_at,
                           "last_version": event.version, "updated_at": event.created_at})


def _filled(state: ExecutionState, event: StoredEvent) -> ExecutionState:
    """``EXECUTED`` / ``PARTIALLY_EXECUTED``: that status with the fill's quantity, price, fee and slippage."""
    p = event.payload
    return _evolve(state, {
        "status": event.event_type,
        "executed_quantity": _dec(p.get("executed_qty")),
        "avg_fill_price": _dec(p.get("avg_price")),
        "commission": _dec(p.get("commission")),
        "commission_asset": (p.get("commission_asset") or "")[:COMMISSION_ASSET_MAX],
        "slippage_pct": _dec(p.get("slippage_pct")),
        "exchange_order_id": p.get("order_id"),
        "exchange_status": p.get("exchange_status", ""),
        "last_version": event.version,
        "updated_at": event.created_at,
    })


def _failed(state: ExecutionState, event: StoredEvent) -> ExecutionState:
    """``FAILED``: the error; order id, exchange status and executed quantity kept unless the payload has them."""
    p = event.payload
    return _evolve(state, {
        "status": "FAILED",
        "error_code": p.get("code"),
        "error_message": (p.get("message") or "")[:300],
        "exchange_order_id": p.get("order_id", state.exchange_order_id),
        "exchange_status": p.get("exchange_status", state.exchange_status),
        "executed_quantity": _dec(p.get("executed_qty")) if "executed_qty" in p else state.executed_quantity,
        "last_version": event.version,
        "updated_at": event.created_at,
    })


def _reconciled(state: ExecutionState, event: StoredEvent) -> ExecutionState:
    """``RECONCILED``: SUBMITTED again at the event's time when the order was resubmitted, else only touched."""
    if not event.payload.get("resubmitted"):
        return _touched(state, event)
    return _evolve(state, {"status": "SUBMITTED", "submitted_at": event.created_at,
                           "last_version": event.version, "updated_at": event.created_at})


def _touched(state: ExecutionState, event: StoredEvent) -> ExecutionState:
    """Any other event with the execution's token: only ``last_version`` and ``updated_at`` move."""
    return _evolve(state, {"last_version": event.version, "updated_at": event.created_at})


#: the fold of each event type after ``STOP_TRIGGERED`` (others: :func:`_touched`)
_FOLDS = {
    EXECUTION_SUBMITTED: _submitted,
    EXECUTED: _filled,
    PARTIALLY_EXECUTED: _filled,
    FAILED: _failed,
    RECONCILED: _reconciled,
}


def fold(events) -> dict[str, ExecutionState]:
    """Fold a stream (or the whole log) in order; returns ``{execution_token: state}``."""
    states: dict[str, ExecutionState] = {}
    for event in events:
        if event.execution_token is None:
            continue
        states[event.execution_token] = apply(states.get(event.execution_token), event)
    return states


def state_field_names() -> list[str]:
    """The projection's field names (compared with the Django model's columns by a test)."""
    return [f.name for f in fields(ExecutionState)]


@dataclass(frozen=True)
class Outcome:
    """What an exchange answer means for the execution and the operation.

    ``event`` is EXECUTED, PARTIALLY_EXECUTED or FAILED — or None when the order is not final
    yet (stay SUBMITTED). ``closed_qty`` is what the fills closed (base asset); ``failure``
    counts for the symbol's circuit breaker.
    """

    event: NewEvent | None
    closed_qty: Decimal
    failure: bool


def decide_outcome(token: str, requested: Decimal, level: Decimal | None, result, source_note: str = "") -> Outcome:
    """Invariant 4 — record fills, not wishes.

    ``result`` is an :class:`~stopmonitor.exchange.base.OrderResult`. FILLED with the full
    quantity → EXECUTED; any final status with ``0 < executedQty < requested`` (a MARKET order
    that ends EXPIRED) → PARTIALLY_EXECUTED; a final status with ``executedQty`` 0 → FAILED
    (closes nothing); not final → None (reconcile later).
    """
    executed = result.executed_qty
    if not result.is_final:
        return Outcome(None, Decimal("0"), False)
    if executed <= 0:
        return Outcome(NewEvent(FAILED, _no_fill_payload(result), token), Decimal("0"), True)
    payload = _fill_payload(requested, level, result, source_note)
    kind = EXECUTED if (result.status == "FILLED" and executed >= requested) else PARTIALLY_EXECUTED
    if kind == PARTIALLY_EXECUTED:
        payload["unfilled_qty"] = decimal_str(requested - executed)
    if getattr(result, "expiry_reason", None):  # price-range rule, self-trade prevention, liquidity (issue #12 item 14)
        payload["expiry_reason"] = result.expiry_reason
    return Outcome(NewEvent(kind, payload, token), executed, False)


def _no_fill_payload(result) -> dict[str, Any]:
    """The ``FAILED`` payload of a final order that filled nothing (``definite``: nothing was sold)."""
    payload = {
        "code": None,
        "message": f"order {result.status} with executedQty 0",
        "reason": f"{result.status}_NO_FILL",
        "order_id": result.exchange_order_id,
        "exchange_status": result.status,
        "executed_qty": "0",
        "definite": True,
    }
    if getattr(result, "expiry_reason", None):
        payload["expiry_reason"] = result.expiry_reason
    return payload


def _fill_payload(requested: Decimal, level: Decimal | None, result, source_note: str) -> dict[str, Any]:
    """The ``EXECUTED`` / ``PARTIALLY_EXECUTED`` payload: the order, its fills, the average price
    (8 decimals), the slippage from ``level`` (None without a level or a price) and ``note``."""
    avg = result.avg_price
    slip = slippage_pct(result.side, level, avg) if (level and avg) else None
    payload = {
        "order_id": result.exchange_order_id,
        "client_order_id": result.client_order_id,
        "exchange_status": result.status,
        "requested_qty": decimal_str(requested),
        "executed_qty": decimal_str(result.executed_qty),
        "avg_price": decimal_str(avg.quantize(Decimal("0.00000001")) if avg is not None else None),
        "cummulative_quote_qty": decimal_str(result.cummulative_quote_qty),
        "commission": decimal_str(result.commission),
        "commission_asset": result.commission_asset,
        "slippage_pct": decimal_str(slip),
        "fills": [
            {"price": decimal_str(f.price), "qty": decimal_str(f.qty), "commission": decimal_str(f.commission),
             "commission_asset": f.commission_asset}
            for f in result.fills
        ],
    }
    if source_note:
        payload["note"] = source_note
    return payload
