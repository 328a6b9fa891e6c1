"""Exchange-held protection, the use cases: arm, audit, move, resolve, and the close through cancelReplace.

The I/O around :mod:`stopmonitor.protection`'s decisions (../shared/design/protection.md, P1–P7).
Every function here that reaches the exchange does it outside any transaction and commits its
intent first (invariant 2: ``PROTECTION_REQUESTED`` before the order). Called by the pass
(:func:`protection_pass`, once per pass, batched: one ``openOrders`` request for the account, or
one per symbol when that weighs less), by the close (:func:`place_close`) and by the
``protect_operations`` command. Its reads of the projection rows are :mod:`stopmonitor.engine.store`'s
(section "protection").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from stopmonitor import protection as p
from stopmonitor.events import append_events, stream_head
from stopmonitor.exchange.base import (
    CancelReplaceResult,
    ClockSkew,
    ExchangeError,
    ExchangeUnavailable,
    KeysMissing,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    OrderResult,
    ProtectionPort,
    RateLimited,
)
from stopmonitor.execution import (
    EXECUTED,
    FAILED,
    OPERATION_CLOSED,
    STOP_TRIGGERED,
    NewEvent,
    decide_outcome,
)
from stopmonitor.engine import store
from stopmonitor.engine.accounts import AccountUnavailable
from stopmonitor.engine.decisions import Decision
from stopmonitor.engine.store import ALL_ACCOUNTS, lock_operation
from stopmonitor.rules import STOP_LOSS, close_side, decimal_str

#: openOrders weights (Binance "Current open orders"): one symbol, or every symbol in one request
OPEN_ORDERS_WEIGHT_SYMBOL = 6
OPEN_ORDERS_WEIGHT_ALL = 80


@dataclass
class ProtectionReport:
    """What one protection step did: counts, and one line per action (for the pass's decisions)."""

    requests: int = 0
    weight: int = 0
    armed: int = 0
    moved: int = 0
    cancelled: int = 0
    resolved: int = 0
    exchange_fills: int = 0
    unprotected: int = 0
    waiting: int = 0
    lines: list[dict] = field(default_factory=list)

    def add(self, other: "ProtectionReport", lines: bool = True) -> None:
        """Add ``other``'s counts (and, with ``lines``, its lines) to this report."""
        for name in ("requests", "weight", "armed", "moved", "cancelled", "resolved", "exchange_fills",
                     "unprotected", "waiting"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if lines:
            self.lines.extend(other.lines)

    def note(self, action: str, operation_id: int, **detail) -> None:
        self.lines.append({"action": action, "operation_id": operation_id, **detail})


def _interval() -> timedelta:
    return timedelta(seconds=settings.STOPMONITOR.get("PROTECTION_MOVE_INTERVAL_SECONDS", 60))


def _visibility() -> timedelta:
    return timedelta(seconds=settings.STOPMONITOR.get("PROTECTION_VISIBILITY_SECONDS", 60))


def _state_of(row) -> p.ProtectionState | None:
    return None if row is None else p.ProtectionState(**{n: getattr(row, n) for n in p.protection_field_names()})


def _append(op, events: list[NewEvent], *, source: str, venue: str, now: datetime) -> None:
    """Append under the operation's row lock (the caller's transaction)."""
    version, _ = stream_head(op.pk)
    append_events(op, version, events, source=source, venue=venue, now=now)


def protected_operations(venue: str, operation_ids=None, account=ALL_ACCOUNTS) -> list:
    """ACTIVE operations of ``venue`` (or of no recorded venue, as before migration 0026) with a
    stop whose tenant has protection on for ``venue``, oldest first, with their symbol, tenant
    settings and protection row (one query); only ``account``'s (an id, or None for the default
    account) when given."""
    out = []
    for op in store.stop_operations(venue, operation_ids, account):
        cfg = getattr(op.client, "risk_config", None)
        if p.protection_enabled(cfg.protection_enabled if cfg else None, venue):
            out.append(op)
    return out


def _buffer(op) -> int:
    cfg = getattr(op.client, "risk_config", None)
    return cfg.protection_buffer_bps if cfg is not None else p.DEFAULT_BUFFER_BPS


# ---------------------------------------------------------------------------------------- arm (P1)

def arm(operation_id: int, exchange, filters, available: Decimal, last_price: Decimal | None, *, now: datetime,
        source: str, report: ProtectionReport) -> None:
    """Rest protection for one ACTIVE operation: commit ``PROTECTION_REQUESTED`` (or ``UNPROTECTED``
    with the reason, once per reason), then place it, then record ``PROTECTION_PLACED`` — or
    ``UNPROTECTED`` on a definite refusal. An unknown answer leaves it REQUESTED for the audit to ask
    by client order id. Must be called outside any transaction."""
    plan = _request_protection(operation_id, exchange, filters, available, last_price, now=now, source=source,
                               report=report)
    if plan is not None:
        _place_protection(plan, exchange, now=now, source=source, report=report)


def _request_protection(operation_id: int, exchange, filters, available: Decimal, last_price: Decimal | None, *,
                        now: datetime, source: str, report: ProtectionReport) -> p.ProtectionPlan | None:
    """Under the operation's row lock: plan its protection (P1) and commit ``PROTECTION_REQUESTED``;
    the plan to place, or None when it is not ACTIVE, already protected or unprotectable."""
    with transaction.atomic():
        op = lock_operation(operation_id)
        state = _state_of(store.protection_row(op))
        if op.status != "ACTIVE" or (state and state.status in (p.REQUESTED, p.PLACED)):
            return None
        plan = _plan(op, state, filters, available, last_price)
        if isinstance(plan, p.Unprotectable):
            _say_unprotectable(op, state, plan, venue=exchange.venue, now=now, source=source, report=report)
            return None
        _append(op, [NewEvent(p.PROTECTION_REQUESTED, plan.payload())], source=source, venue=exchange.venue, now=now)
    return plan


def _plan(op, state: p.ProtectionState | None, filters, available: Decimal,
          last_price: Decimal | None) -> p.ProtectionPlan | p.Unprotectable:
    """The operation's next protection (P1): its share ``available`` capped by what remains, the
    next generation after ``state``'s."""
    return p.plan_protection(op.pk, op.side, min(available, op.remaining_quantity), op.stop_price, op.target_price,
                             filters, _buffer(op), (state.generation if state else 0) + 1, last_price)


def _say_unprotectable(op, state: p.ProtectionState | None, why: p.Unprotectable, *, venue: str, now: datetime,
                       source: str, report: ProtectionReport) -> None:
    """Append ``UNPROTECTED`` with ``why`` unless its last one already says it (caller holds the row lock)."""
    # PRICE_THROUGH_STOP is transient and the monitor's own trigger closes at market: no event
    # (alternating reasons would also defeat the monitor's once-only BLOCKED dedupe)
    if why.reason == "PRICE_THROUGH_STOP" or (
            state and state.status == p.UNPROTECTED_STATUS and state.reason == why.reason):
        return
    _append(op, [why.event()], source=source, venue=venue, now=now)
    report.unprotected += 1
    report.note("unprotected", op.pk, reason=why.reason, detail=why.detail)


def _place_protection(plan: p.ProtectionPlan, exchange, *, now: datetime, source: str,
                      report: ProtectionReport) -> None:
    """Place the planned stop (or OCO) and record ``PROTECTION_PLACED``, or ``UNPROTECTED(REJECTED)``
    on a definite refusal; an unknown answer is only noted (it stays REQUESTED)."""
    operation_id = plan.operation_id
    try:
        report.requests += 1
        report.weight += 1
        placed = exchange.place_oco(plan.request()) if plan.kind == p.OCO else exchange.place_stop_order(plan.request())
    except OrderOutcomeUnknown as exc:
        report.note("protection_unknown", operation_id, client_order_id=plan.client_order_id, detail=str(exc)[:200])
        return
    except (OrderRejected, RateLimited, ClockSkew) as exc:
        _record(operation_id, [p.Unprotectable("REJECTED", f"code {exc.code}: {exc}"[:300]).event(
            code=exc.code, client_order_id=plan.client_order_id)], exchange, now, source)
        report.unprotected += 1
        report.note("unprotected", operation_id, reason="REJECTED", code=exc.code)
        return
    stop = placed.leg("STOP_LOSS") if plan.kind == p.OCO else placed
    _record(operation_id, [NewEvent(p.PROTECTION_PLACED, p.order_payload(stop, kind=plan.kind))], exchange, now, source)
    report.armed += 1
    report.note("protected", operation_id, client_order_id=plan.client_order_id, stop_price=decimal_str(plan.stop_price),
                quantity=decimal_str(plan.quantity), kind=plan.kind)


def _record(operation_id: int, events: list[NewEvent], exchange, now: datetime, source: str) -> None:
    with transaction.atomic():
        op = lock_operation(operation_id)
        _append(op, events, source=source, venue=exchange.venue, now=now)


# ---------------------------------------------------------------------------------------- fills the exchange made (P4)

def record_exchange_fill(op, order: OrderResult, *, venue: str, now: datetime, superseded_token: str | None = None) -> None:
    """Record a protection order that executed (caller holds the operation's row lock, in a
    transaction): ``PROTECTION_TRIGGERED``, then the fill as an execution of its own (token = the
    protection's client order id: ``STOP_TRIGGERED`` + ``EXECUTED``/``PARTIALLY_EXECUTED``, source
    ``exchange``), the closed quantity, and ``OPERATION_CLOSED`` when nothing remains. A close of
    ours in flight (``superseded_token``) is ``FAILED`` first: not placed, the exchange sold."""
    events = []
    if superseded_token:
        events.append(NewEvent(FAILED, {"code": None, "reason": "PROTECTION_TRIGGERED", "definite": True,
                                        "placed": False, "message": f"the exchange-held stop {order.client_order_id} "
                                                                    f"fired first: no market order sent"},
                               superseded_token))
        _append(op, events, source="exchange", venue=venue, now=now)
        events = []
    token = order.client_order_id
    take_profit = order.order_type == "LIMIT_MAKER"  # the OCO's take-profit leg filled, not its stop
    level = op.target_price if take_profit else op.stop_price
    attempt = 1 + store.attempts_so_far(op.pk)
    events.append(NewEvent(p.PROTECTION_TRIGGERED, p.order_payload(order)))
    events.append(NewEvent(STOP_TRIGGERED, {
        "trigger": "TAKE_PROFIT" if take_profit else STOP_LOSS, "level": decimal_str(level),
        "observed_price": decimal_str(order.price if take_profit else order.stop_price),
        "close_side": order.side, "quantity": decimal_str(order.requested_qty),
        "remaining_before": decimal_str(op.remaining_quantity), "attempt": attempt, "exchange_held": True,
    }, token))
    outcome = decide_outcome(token, order.requested_qty, level, order, "filled by the exchange-held stop")
    if outcome.event is not None:
        events.append(outcome.event)
    op.closed_quantity = (op.closed_quantity or Decimal(0)) + outcome.closed_qty
    if op.status not in ("ACTIVE", "CLOSING"):  # sold after the operation ended: the truth, for review
        events.append(NewEvent("BLOCKED", {"reason": "NEEDS_REVIEW", "detail": f"the exchange-held stop {token} "
                                           f"executed after the operation was {op.status}"}))
    elif op.remaining_quantity <= 0:
        events.append(NewEvent(OPERATION_CLOSED, {"closed_quantity": decimal_str(op.closed_quantity),
                                                  "execution_token": token}))
        op.status = "CLOSED"
    else:
        op.status = "ACTIVE"
    op.stop_execution_token = None
    op.save(update_fields=["closed_quantity", "status", "stop_execution_token", "updated_at"])
    _append(op, events, source="exchange", venue=venue, now=now)


def protection_order(exchange, symbol: str, client_order_id: str, report: ProtectionReport | None = None):
    """``(order, finding)`` of a protection: its stop, or — when the stop is a leg of an OCO that
    ended with nothing executed — the take-profit leg if that one executed (the stop leg expires
    when the other leg fills: its fill is the exchange's). Raises the port's read errors."""
    order = exchange.get_order(symbol, client_order_id)
    finding = p.interpret_protection_order(order)
    if finding.kind == "GONE" and order is not None and order.order_list_id != -1:
        if report is not None:
            report.requests += 1
            report.weight += 4
        leg = exchange.get_order(symbol, client_order_id + "t")
        leg_finding = p.interpret_protection_order(leg)
        if leg_finding.final_fill:
            return leg, leg_finding
    return order, finding


def ask_moving(exchange, symbol: str, protection, order, finding, report: ProtectionReport | None = None):
    """``(order, finding)`` of ``protection`` (a projection row or a :class:`~stopmonitor.protection.ProtectionState`)
    once its current order was asked: when that is a move still REQUESTED (``replaces`` set) and the
    exchange does not show its new order, the order it replaces is asked too — it may have fired
    (its fill is the exchange's) or still rest (the move never reached the exchange). That one's
    answer is returned when it executed or rests; else the new order's. Raises the port's read errors."""
    if finding.kind != "NOT_VISIBLE" or protection.status != p.REQUESTED or not protection.replaces:
        return order, finding
    if report is not None:
        report.requests += 1
        report.weight += 4
    old, old_finding = protection_order(exchange, symbol, protection.replaces, report)
    if old_finding.kind == "RESTING" or old_finding.final_fill:
        return old, old_finding
    return order, finding


def resolve(operation_id: int, client_order_id: str, exchange, *, now: datetime, source: str,
            report: ProtectionReport) -> None:
    """Ask the exchange about one protection (P4/P5) and record what it says: resting → PLACED or
    MOVED (a lost answer); executed → the exchange's fill; gone (cancelled outside us, expired) →
    ``PROTECTION_CANCELLED`` (the next audit re-arms); not visible → nothing before the window,
    then ``UNPROTECTED(NOT_FOUND)``."""
    order, finding = _ask_protection(operation_id, client_order_id, exchange, report)
    report.resolved += 1
    with transaction.atomic():
        op = lock_operation(operation_id)
        state = _state_of(store.protection_row(op))
        if state is None or state.client_order_id != client_order_id:
            return
        record = _Recorder(op, exchange.venue, now, source, report)
        if order is not None and order.client_order_id != client_order_id:
            record.other_order(state, order, finding)
        else:
            record.finding(state, client_order_id, order, finding)


def _ask_protection(operation_id: int, client_order_id: str, exchange,
                    report: ProtectionReport) -> tuple[OrderResult | None, p.Finding]:
    """``(order, finding)`` of the protection ``client_order_id`` (outside any transaction): its
    order (:func:`protection_order`), and when it is the current one, the order a move still
    REQUESTED replaces (:func:`ask_moving`). Raises the port's read errors."""
    symbol = store.get_operation(operation_id).symbol.symbol
    report.requests += 1
    report.weight += 4
    order, finding = protection_order(exchange, symbol, client_order_id, report)
    seen = _state_of(store.protection_of(operation_id))
    if seen is not None and seen.client_order_id == client_order_id:
        order, finding = ask_moving(exchange, symbol, seen, order, finding, report)
    return order, finding


@dataclass(frozen=True)
class _Recorder:
    """Records what :func:`resolve` found about ``op``'s protection (the caller holds its row lock)."""

    op: object
    venue: str
    now: datetime
    source: str
    report: ProtectionReport

    def other_order(self, state: p.ProtectionState, order: OrderResult, finding: p.Finding) -> None:
        """The answer is another order than the one asked: the OCO's take-profit leg, or the stop
        a move meant to replace. Executed → the exchange's fill; resting past the visibility
        window → the move never reached the exchange: the stop it was to replace still protects."""
        if finding.final_fill:
            self.exchange_fill(order)
        elif finding.kind == "RESTING" and state.updated_at <= self.now - _visibility():
            self.append(NewEvent(p.PROTECTION_MOVED, p.order_payload(
                order, generation=state.generation, kind=state.kind, reason="MOVE_NOT_MADE")))

    def finding(self, state: p.ProtectionState, client_order_id: str, order: OrderResult | None,
                finding: p.Finding) -> None:
        """The answer about the order asked (``order`` None: the exchange does not show it)."""
        if finding.kind == "RESTING" and state.status == p.REQUESTED:
            kind = p.PROTECTION_MOVED if state.replaces else p.PROTECTION_PLACED
            self.append(NewEvent(kind, p.order_payload(order, generation=state.generation, kind=state.kind,
                                                       reason="FOUND")))
        elif finding.final_fill:
            self.exchange_fill(order)
        elif finding.kind == "GONE":
            self.append(NewEvent(p.PROTECTION_CANCELLED, p.order_payload(order, reason="GONE")))
        elif finding.kind == "NOT_VISIBLE" and state.updated_at <= self.now - _visibility():
            self.append(p.Unprotectable("NOT_FOUND", f"{client_order_id} not on the exchange after "
                                                     f"{_visibility().seconds}s").event())
            self.report.unprotected += 1

    def exchange_fill(self, order: OrderResult) -> None:
        record_exchange_fill(self.op, order, venue=self.venue, now=self.now)
        self.report.exchange_fills += 1
        self.report.note("exchange_fill", self.op.pk, client_order_id=order.client_order_id,
                         executed_qty=decimal_str(order.executed_qty), exchange_status=order.status)

    def append(self, event: NewEvent) -> None:
        _append(self.op, [event], source=self.source, venue=self.venue, now=self.now)


# ---------------------------------------------------------------------------------------- the pass (P3, P5)

@dataclass(frozen=True)
class _Expected:
    """What one audit compares with the exchange's open orders: the protected operations (``by_op``:
    id -> ``Operation``), their folded protection (``expected``: id -> state or None), the finished
    operations whose protection still rests in the projection (``finished``: id -> state) and
    every one's symbol (``symbol_of``)."""

    by_op: dict
    expected: dict
    finished: dict
    symbol_of: dict


def _expected(venue: str, operation_ids, account) -> _Expected:
    """The audit's expectations for ``account`` on ``venue`` (two queries), only ``operation_ids`` when given."""
    ops = protected_operations(venue, operation_ids, account)
    expected = {op.pk: _state_of(store.protection_row(op)) for op in ops}
    leftovers = [row for row in store.leftover_protections(venue, set(expected), account)
                 if operation_ids is None or row.operation_id in set(operation_ids)]
    symbol_of = {op.pk: op.symbol.symbol for op in ops} | {r.operation_id: r.operation.symbol.symbol for r in leftovers}
    return _Expected({op.pk: op for op in ops}, expected, {row.operation_id: _state_of(row) for row in leftovers},
                     symbol_of)


def _read_open_orders(exchange, symbols: list[str], report: ProtectionReport) -> list[OrderResult]:
    """The account's open orders: one request per symbol when that weighs less than one for all."""
    if len(symbols) * OPEN_ORDERS_WEIGHT_SYMBOL < OPEN_ORDERS_WEIGHT_ALL:
        open_orders = [o for s in symbols for o in exchange.open_orders(s)]
        report.requests += len(symbols)
        report.weight += OPEN_ORDERS_WEIGHT_SYMBOL * len(symbols)
        return open_orders
    open_orders = exchange.open_orders()
    report.requests += 1
    report.weight += OPEN_ORDERS_WEIGHT_ALL
    return open_orders


def _of_operations(open_orders: list[OrderResult], operation_ids) -> list[OrderResult]:
    """The open orders whose client id is one of ours for one of ``operation_ids``."""
    scope = set(operation_ids)
    return [o for o in open_orders if (p.parse_client_id(o.client_order_id) or (0,))[0] in scope]


def _actions(actions: list[p.AuditAction], *kinds: str) -> list[p.AuditAction]:
    """The audit's actions of ``kinds``, in the audit's order."""
    return [a for a in actions if a.action in kinds]


def protection_pass(exchange, *, now: datetime, source: str, report: ProtectionReport | None = None,
                    operation_ids=None, dry_run: bool = False, quotes: dict | None = None,
                    account=ALL_ACCOUNTS) -> ProtectionReport:
    """One protection step: one ``openOrders`` read for the account (or one per symbol when fewer
    than 14 symbols: 6 each against 80), the audit diff, then cancel leftovers, resolve, arm and
    move. Nothing at all (no request) when no tenant has protection on and nothing of ours rests.
    ``dry_run`` reads and reports the actions without appending or placing. ``quotes`` (symbol ->
    Quote) are the pass's own best bid/ask (invariant 9: one quote request per pass): arming reads
    only the symbols missing from them. ``account`` (an account id, None for the default one) runs
    the audit of that exchange account: its operations are the expected ones and every order of
    ours on it is judged (one left over from a finished operation is cancelled). Operations CLOSING
    (a close in flight) are neither expected nor left over: their protection rests until the close
    is known (the reconcile asks both ids). Must be called outside any transaction. Raises
    RateLimited/ExchangeUnavailable/ClockSkew when the open orders cannot be read (nothing was changed)."""
    report = report or ProtectionReport()
    if not isinstance(exchange, ProtectionPort) and not hasattr(exchange, "open_orders"):
        return report
    audited = _expected(exchange.venue, operation_ids, account)
    if not audited.by_op and not audited.finished:
        return report
    open_orders = _read_open_orders(exchange, sorted(set(audited.symbol_of.values())), report)
    if operation_ids is not None:  # a scoped run (the command's batches) judges only its own operations' orders
        open_orders = _of_operations(open_orders, operation_ids)
    actions = p.audit(audited.expected, open_orders, now, _visibility(), audited.symbol_of, audited.finished)
    if dry_run:
        _dry_run(actions, audited.by_op, exchange, report=report, quotes=quotes)
        return report
    _carry_out(actions, audited.by_op, exchange, now=now, source=source, report=report, quotes=quotes)
    return report


def _dry_run(actions: list[p.AuditAction], by_op: dict, exchange, *, report: ProtectionReport,
             quotes: dict | None) -> None:
    """What :func:`_carry_out` would do, read and noted, nothing appended or placed: each audit
    action as ``would_<action>``, except that an operation to arm is planned as the real run plans
    it (filters, its share of the free balance, the last price): ``would_arm`` with the order's
    client order id, or ``would_refuse`` with the reason the real run would record (a position
    below minQty/minNotional was counted as "would arm" and then refused)."""
    for a in actions:
        if a.action != p.ARM:
            report.note(f"would_{a.action.lower()}", a.operation_id, client_order_id=a.client_order_id, reason=a.reason)
    arming = [by_op[a.operation_id] for a in _actions(actions, p.ARM)]
    if arming:
        _arm_and_move(arming, [], exchange, now=None, source="", report=report, quotes=quotes, arm_one=_would_arm)


def _would_arm(operation_id: int, exchange, filters, available: Decimal, last_price: Decimal | None, *, now,
               source: str, report: ProtectionReport) -> None:
    """The dry run's :func:`arm`: the same plan (P1), read without the lock, noted, nothing written."""
    op = store.get_operation(operation_id)
    plan = _plan(op, _state_of(store.protection_row(op)), filters, available, last_price)
    if isinstance(plan, p.Unprotectable):
        report.note("would_refuse", op.pk, client_order_id=None, reason=plan.reason)
    else:
        report.note("would_arm", op.pk, client_order_id=plan.client_order_id, reason=None)


def _carry_out(actions: list[p.AuditAction], by_op: dict, exchange, *, now: datetime, source: str,
               report: ProtectionReport, quotes: dict | None) -> None:
    """Do what the audit found, in this order: cancel leftovers, resolve, then arm what is missing
    and move what rests as expected (the operations the audit did not name)."""
    for a in _actions(actions, p.CANCEL):
        _cancel_leftover(a, exchange, now=now, source=source, report=report)
    # WAIT (placed moments ago, absent) is asked too: a query that finds nothing records nothing
    # inside the visibility window, and one that finds it filled saves the close a cancelReplace
    for a in _actions(actions, p.RESOLVE, p.WAIT):
        try:
            resolve(a.operation_id, a.client_order_id, exchange, now=now, source=source, report=report)
        except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
            report.note("protection_unresolved", a.operation_id, detail=str(exc)[:200])
    report.waiting += len(_actions(actions, p.WAIT))
    arming = [by_op[a.operation_id] for a in _actions(actions, p.ARM)]
    resting_ids = set(by_op) - {a.operation_id for a in actions}  # not touched by the audit: resting as expected
    if arming or resting_ids:
        _arm_and_move(arming, [by_op[i] for i in sorted(resting_ids)], exchange, now=now, source=source, report=report,
                      quotes=quotes)


def _cancel_leftover(action: p.AuditAction, exchange, *, now: datetime, source: str, report: ProtectionReport) -> None:
    """Cancel one order of ours the audit found left over (P5; freqtrade #12528) and say so."""
    report.requests += 1
    report.weight += 1
    try:
        cancelled = exchange.cancel_order(action.symbol, action.client_order_id)
    except OrderRejected:  # not open any more: the next audit asks about it
        return
    except (OrderOutcomeUnknown, RateLimited, ClockSkew) as exc:
        report.note("protection_cancel_unknown", action.operation_id, detail=str(exc)[:200])
        return
    if not store.operation_exists(action.operation_id):
        return
    report.cancelled += 1
    report.note("protection_cancelled", action.operation_id, client_order_id=action.client_order_id,
                reason=action.reason)
    with transaction.atomic():
        op = lock_operation(action.operation_id)
        state = _state_of(store.protection_row(op))
        events = []
        if cancelled.executed_qty > 0:
            report.note("protection_partly_executed", op.pk, executed_qty=decimal_str(cancelled.executed_qty))
        if state is not None and state.client_order_id == action.client_order_id:
            events.append(NewEvent(p.PROTECTION_CANCELLED, p.order_payload(cancelled, reason=action.reason)))
        else:  # a stale generation: said in the stream, the projection keeps the current one
            events.append(NewEvent("GUARD_WARNING", {"reason": "PROTECTION_LEFTOVER_CANCELLED",
                                                     "detail": f"cancelled {action.client_order_id} ({action.reason})",
                                                     **p.order_payload(cancelled)}))
        _append(op, events, source=source, venue=exchange.venue, now=now)


def _arm_and_move(arming: list, resting: list, exchange, *, now: datetime | None,
                  source: str, report: ProtectionReport, quotes: dict | None = None, arm_one=None) -> None:
    """Arm what is missing and move what rests off its level: one filters read, and for arming one
    balances read (P6: each operation's share of the free balance) and the last price from the
    pass's ``quotes`` (a bulk quote read only for arming symbols they lack). ``arm_one``: see
    :func:`_arm_missing`."""
    symbols = sorted({op.symbol.symbol for op in arming + resting})
    filters = exchange.symbol_filters(symbols)
    report.requests += 1
    report.weight += 2
    if arming:
        quotes = _arming_quotes(arming, exchange, quotes, report)
        _arm_missing(arming, exchange, filters, quotes, now=now, source=source, report=report, arm_one=arm_one)
    for op in resting:
        _move_off_level(op, filters.get(op.symbol.symbol), exchange, now=now, source=source, report=report)


def _arming_quotes(arming: list, exchange, quotes: dict | None, report: ProtectionReport) -> dict:
    """The pass's ``quotes`` (symbol -> Quote) plus one bulk read of the arming symbols they lack;
    that read failing is noted and the missing symbols arm without the last price."""
    quotes = dict(quotes or {})
    missing = sorted({op.symbol.symbol for op in arming} - set(quotes))
    if missing:
        report.requests += 1
        report.weight += 2 if len(missing) < 20 else 4
        try:
            answer = exchange.book_tickers(missing)
        except ExchangeUnavailable as exc:  # arm without the last price: Binance refuses a stop that would trigger (-2010)
            report.note("protection_quotes_unavailable", 0, detail=str(exc)[:200])
            return quotes
        report.requests += getattr(answer, "requests", 1) - 1  # one per symbol more after a -1121 (Quotes)
        quotes.update(answer)
    return quotes


def _arm_missing(arming: list, exchange, filters: dict, quotes: dict, *, now: datetime | None, source: str,
                 report: ProtectionReport, arm_one=None) -> None:
    """Arm each operation (oldest first within its asset) with its share of the free balance read
    now, after this pass's cancels (P6); what other operations' resting protection locks stays
    theirs (a move or resize replaces in place, by cancelReplace/amend). A short's close buys:
    not limited by balance. An operation whose symbol has no filters is not armed. ``arm_one``
    (default :func:`arm`) is what is done with each share (the dry run's :func:`_would_arm`)."""
    arm_one = arm_one or arm
    balances = exchange.free_balances()
    report.requests += 1
    report.weight += 20
    for (side, asset), ops in _by_closing_asset(arming, filters).items():
        free = None if balances is None or side == "BUY" else balances.get(asset, Decimal(0))
        shares = p.allocate([(op.pk, op.remaining_quantity) for op in ops], free, Decimal(0))
        for op in ops:
            arm_one(op.pk, exchange, filters[op.symbol.symbol], shares[op.pk], _last_price(op, quotes), now=now,
                    source=source, report=report)


def _by_closing_asset(ops: list, filters: dict) -> dict[tuple[str, str], list]:
    """``{(closing side, asset): operations}``: the asset each operation's close spends (the base
    asset for a SELL, the quote asset for a BUY), in the order given; operations without filters
    are left out. The side is part of the key: a long BTCUSDT and a short ETHBTC both spend BTC,
    but only the long's protection is limited by the free BTC (issue #11 review)."""
    by_asset: dict[tuple[str, str], list] = {}
    for op in ops:
        f = filters.get(op.symbol.symbol)
        if f is not None:
            side = close_side(op.side)
            by_asset.setdefault((side, f.base_asset if side == "SELL" else f.quote_asset), []).append(op)
    return by_asset


def _last_price(op, quotes: dict) -> Decimal | None:
    """The latest price the operation's close would meet (bid for a SELL, ask for a BUY), None without a quote."""
    quote = quotes.get(op.symbol.symbol)
    if quote is None:
        return None
    return quote.bid if close_side(op.side) == "SELL" else quote.ask


def _move_off_level(op, filters, exchange, *, now: datetime, source: str, report: ProtectionReport) -> None:
    """Move one resting stop whose wanted level (the operation's stop plus its buffer, on the tick
    of ``filters``) differs, within the churn limit (P3); a deferred move is noted. An OCO is
    not moved."""
    state = _state_of(store.protection_row(op))
    if filters is None or state is None or op.stop_price is None:
        return
    wanted = p.resting_stop_price(close_side(op.side), op.stop_price, _buffer(op), filters.tick_size)
    move = p.decide_move(state, wanted, filters.tick_size, now, _interval())
    if move.action == "replace" and state.kind == p.STOP_LOSS:
        _move(op.pk, state, move, exchange, now=now, source=source, report=report)
    elif move.action == "defer":
        report.note("protection_move_deferred", op.pk, not_before=move.not_before.isoformat())


def _move(operation_id: int, state: p.ProtectionState, move: p.Move, exchange, *, now: datetime, source: str,
          report: ProtectionReport) -> None:
    """Replace the resting stop by one at ``move.stop_price`` (generation + 1) in one cancelReplace
    (P3): REQUESTED (with the id it replaces) committed first, then MOVED — or, when the stop fired
    meanwhile (400), resolved as the exchange's fill; 409: cancelled, nothing rests → UNPROTECTED."""
    from stopmonitor.exchange.base import CancelReplaceCancelFailed, CancelReplaceNewFailed

    with transaction.atomic():
        op = lock_operation(operation_id)
        current = _state_of(store.protection_row(op))
        if op.status != "ACTIVE" or current != state:
            return
        plan = p.ProtectionPlan(operation_id, move.generation, op.symbol.symbol, p.STOP_LOSS, state.side,
                                state.quantity, move.stop_price, None,
                                p.protection_client_id(operation_id, move.generation))
        _append(op, [NewEvent(p.PROTECTION_REQUESTED, plan.payload(move=True, replaces=state.client_order_id))],
                source=source, venue=exchange.venue, now=now)
    report.requests += 1
    report.weight += 1
    try:
        result = exchange.cancel_replace(plan.symbol, state.client_order_id, plan.stop_request())
    except CancelReplaceCancelFailed:  # the stop it replaces fired, or is gone: ask (both ids, ask_moving)
        resolve(operation_id, plan.client_order_id, exchange, now=now, source=source, report=report)
        return
    except CancelReplaceNewFailed as exc:
        events = [NewEvent(p.PROTECTION_CANCELLED, p.order_payload(exc.cancelled, reason="MOVE"))] if exc.cancelled else []
        events.append(p.Unprotectable("MOVE_REFUSED", str(exc)[:300]).event(code=exc.new_code))
        _record(operation_id, events, exchange, now, source)
        report.unprotected += 1
        return
    except (OrderOutcomeUnknown, OrderRejected, RateLimited, ClockSkew) as exc:
        report.note("protection_move_unknown", operation_id, detail=str(exc)[:200])
        return  # REQUESTED stays: the audit asks by both ids
    _record(operation_id, [NewEvent(p.PROTECTION_MOVED, p.order_payload(
        result.new, generation=move.generation, client_order_id=plan.client_order_id, reason=move.reason))],
        exchange, now, source)
    report.moved += 1
    report.note("protection_moved", operation_id, client_order_id=plan.client_order_id,
                stop_price=decimal_str(move.stop_price))


# ---------------------------------------------------------------------------------------- the monitor's close (P2)

class ProtectionFired(OrderRejected):
    """The close was not sent: the exchange-held stop fired first and its fill is recorded
    (the execution is already FAILED with reason PROTECTION_TRIGGERED)."""


class ProtectionNotCancellable(OrderRejected):
    """The close was not sent: the cancelReplace could not cancel our own protection, which is
    still there (triggered, filling at the next trade). The operation's race with its own stop,
    not a fault of the symbol: it never counts against the symbol's circuit breaker (three
    protected longs in one drop opened it and held every close on the symbol)."""

    counts_against_symbol = False


def place_close(operation_id: int, request: OrderRequest, exchange, *, now: datetime, source: str) -> OrderResult:
    """Send the monitor's (or the API's) close: a plain MARKET order when nothing rests, else ONE
    cancelReplace of the protection by that MARKET order (STOP_ON_FAILURE, ONLY_NEW), P2:

    - 200 → ``PROTECTION_CANCELLED`` recorded; the new order's result returned (recorded by the caller).
    - 400 → the stop fired first: the protection is asked; executed → its fill recorded with source
      ``exchange`` and :class:`ProtectionFired` raised (never a market order); gone with nothing
      executed (our own earlier cancel, a lost answer) → the MARKET order alone; else OrderRejected
      (FAILED, the next pass looks again).
    - 409 → ``PROTECTION_CANCELLED`` + ``UNPROTECTED`` recorded, the refusal raised (FAILED; the next
      pass closes with a plain order, nothing resting any more).
    - unknown → OrderOutcomeUnknown (the execution stays SUBMITTED; reconcile asks both ids).

    Must be called outside any transaction.
    """
    row = store.protection_of(operation_id)
    if row is None or row.status not in (p.PLACED, p.REQUESTED) or not hasattr(exchange, "cancel_replace"):
        return exchange.place_market_order(request)
    return _close_through(operation_id, request, exchange, row, row.client_order_id, now=now, source=source)


def _close_through(operation_id: int, request: OrderRequest, exchange, row, client_order_id: str, *,
                   now: datetime, source: str) -> OrderResult:
    """One cancelReplace of the resting ``client_order_id`` by the close (see :func:`place_close`).
    A move still REQUESTED whose new order the exchange does not show is looked at by both ids
    (:func:`ask_moving`): the old stop fired → its fill; the old stop rests → the close goes
    through that one (once)."""
    try:
        outcome: CancelReplaceResult | ExchangeError = exchange.cancel_replace(request.symbol, client_order_id, request)
    except ExchangeError as exc:
        outcome = exc
    verdict = p.interpret_close(outcome)
    if verdict.kind == "CLOSED":
        _record(operation_id, list(verdict.events), exchange, now, source)
        return verdict.new
    if verdict.kind == "UNPROTECTED":
        _record(operation_id, list(verdict.events), exchange, now, source)
        raise OrderRejected(f"{request.symbol} {request.client_order_id}: protection cancelled, close refused "
                            f"(code {verdict.code}); unprotected until the next pass closes it", verdict.code) from outcome
    if verdict.kind == "EXCHANGE_FIRED":
        order, finding = protection_order(exchange, request.symbol, client_order_id)
        if client_order_id == row.client_order_id:
            order, finding = ask_moving(exchange, request.symbol, row, order, finding)
            if finding.kind == "RESTING" and order.client_order_id == row.replaces:  # the move never happened
                return _close_through(operation_id, request, exchange, row, row.replaces, now=now, source=source)
        if finding.final_fill:
            with transaction.atomic():
                op = lock_operation(operation_id)
                record_exchange_fill(op, order, venue=exchange.venue, now=now, superseded_token=request.client_order_id)
            raise ProtectionFired(f"{request.symbol} {request.client_order_id}: the exchange-held stop "
                                  f"{order.client_order_id} fired first ({order.status} {order.executed_qty})")
        if finding.kind == "GONE":
            _record(operation_id, [NewEvent(p.PROTECTION_CANCELLED, p.order_payload(order, reason="GONE"))],
                    exchange, now, source)
            return exchange.place_market_order(request)
        raise ProtectionNotCancellable(f"{request.symbol} {request.client_order_id}: cancel of {client_order_id} "
                                       f"failed and it is {finding.kind}: not sent, looked at again next pass",
                                       outcome.code)
    raise outcome  # UNKNOWN (OrderOutcomeUnknown) or REJECTED (OrderRejected)/RateLimited/ClockSkew


__all__ = ["ProtectionFired", "ProtectionNotCancellable", "ProtectionReport", "arm", "place_close", "protection_pass", "protected_operations",
           "record_exchange_fill", "resolve"]
_ = EXECUTED  # the event the close records (via decide_outcome)


def protection_step(exchange, *, now: datetime, source: str, emit, quotes: dict | None = None, clients=None) -> int:
    """The pass's protection step (after the reconcile, before the triggers): :func:`protection_pass`,
    each action emitted as a decision; an exchange that cannot be read skips the step for this
    pass with one decision (the closes still run). Returns the requests it sent.

    Per exchange account (issue #20): a stop rests on the account of its operation, through that
    account's client from ``clients`` (an :class:`~stopmonitor.engine.accounts.AccountClients`);
    each account's run is scoped to its own operations, and one account that cannot be read or
    built skips only its own step. Without tenant accounts, one unscoped run on ``exchange``."""
    requests = 0
    for account_id, client, account in _account_runs(exchange, clients, emit):
        try:
            report = protection_pass(client, now=now, source=source, quotes=quotes, account=account)
        except (RateLimited, ExchangeUnavailable, ClockSkew, KeysMissing) as exc:
            where = "" if account_id is None else f"account {account_id}: "
            emit(Decision("skipped", 0, reason="PROTECTION_UNAVAILABLE", detail=f"{where}open orders unreadable: {exc}"[:300]))
            requests += 1
            continue
        for line in report.lines:
            detail = ", ".join(f"{k} {v}" for k, v in line.items() if k not in ("action", "operation_id"))
            emit(Decision(line["action"], line["operation_id"], detail=detail[:300]))
        requests += report.requests
    return requests


def _account_runs(exchange, clients, emit) -> list[tuple]:
    """``(account id, client, account scope)`` of each protection run: one unscoped run on
    ``exchange`` without tenant accounts, else one per account (the default one first, then by id),
    each on its own client; an account whose client cannot be built is emitted as skipped."""
    groups = store.protection_accounts()
    if set(groups) <= {None}:
        return [(None, exchange, ALL_ACCOUNTS)]
    runs = []
    for account_id in sorted(groups, key=lambda a: (a is not None, a or 0)):
        try:
            client = exchange if clients is None or account_id is None else clients.for_account(account_id)
        except AccountUnavailable as exc:
            emit(Decision("skipped", 0, reason="PROTECTION_UNAVAILABLE",
                          detail=f"account {account_id}: {exc}"[:300]))
            continue
        runs.append((account_id, client, account_id))
    return runs
