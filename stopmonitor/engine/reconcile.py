"""Reconcile (invariant 7): resolve executions left TRIGGERED or SUBMITTED before deciding anything new."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django.db import transaction

from stopmonitor.engine import close, store
from stopmonitor.engine.accounts import AccountUnavailable, clients_for
from stopmonitor.engine.context import EngineContext
from stopmonitor.engine.decisions import Action, Decision, Emit, isolated, noop
from stopmonitor.events import append_events, stream_head
from stopmonitor.exchange.base import ClockSkew, ExchangeUnavailable, RateLimited
from stopmonitor.execution import GUARD_WARNING, RECONCILED, EventType, NewEvent
from stopmonitor.guardrails import BlockReason
from stopmonitor.vocabulary import ExecutionStatus, SkipReason

STUCK_AFTER = timedelta(minutes=10)
_MARKED_RECONCILED = (Action.EXECUTED, Action.PARTIALLY_EXECUTED, Action.FAILED, Action.SUBMITTED)


def reconcile_submitted(exchange, ctx: EngineContext, emit: Emit = noop) -> int:
    """Resolve executions left TRIGGERED or SUBMITTED for longer than ``reconcile_after_seconds``.

    TRIGGERED (crash before the submission was committed: no order can exist) → submitted
    and placed now. SUBMITTED → asked by ``origClientOrderId``: found and final → its fills
    are recorded (no second order); not found (-2013) → claimed with a ``RECONCILED``
    resubmission and placed once with the same client order id. Returns how many it handled.
    Each execution is asked about on its operation's account (``exchange``: the default client
    or an :class:`~stopmonitor.engine.accounts.AccountClients`); an account whose client cannot
    be built defers only its own executions.
    """
    clients = clients_for(exchange)
    cutoff = ctx.now - timedelta(seconds=ctx.settings.reconcile_after_seconds)
    pending = store.pending_executions(cutoff)
    for token, operation_id, symbol, status, account_id in pending:
        try:
            client = clients.for_account(account_id)
        except AccountUnavailable as exc:
            emit(Decision(Action.UNKNOWN, operation_id, symbol=symbol, execution_token=token,
                          reason=SkipReason.RECONCILE_DEFERRED, detail=str(exc)[:300]))
            continue
        if status == ExecutionStatus.TRIGGERED:
            decisions = isolated(operation_id, symbol, token, lambda: close.submit_and_place(
                operation_id, token, client, ctx))
        else:
            decisions = isolated(operation_id, symbol, token, lambda: reconcile_one(
                operation_id, token, symbol, client, ctx))
        for d in decisions:
            if d.action in _MARKED_RECONCILED:
                d.extra = {**d.extra, "reconciled": True}
            emit(d)
    return len(pending)


def reconcile_one(operation_id: int, token: str, symbol: str, exchange, ctx: EngineContext) -> list[Decision]:
    """One SUBMITTED execution under its claim: skipped while another process has its order in flight."""
    with store.execution_claim(token) as claimed:
        if not claimed:  # its order is in flight in another process: not ours to ask about or re-send
            return [Decision(Action.SKIPPED, operation_id, symbol=symbol, execution_token=token,
                             reason=SkipReason.IN_FLIGHT, detail="another process holds this execution's claim")]
        return reconcile_claimed(operation_id, token, symbol, exchange, ctx)


def reconcile_claimed(operation_id: int, token: str, symbol: str, exchange, ctx: EngineContext,
                      resend: bool = True) -> list[Decision]:
    """Ask the exchange by client order id and record what the evidence says (invariant 3 and its
    "Evidence" section; issue #12 items 1–4).

    Found: its fills (from its trades when the answer has none; a "0 filled" checked against
    them) are recorded. Not found (-2013): :func:`stopmonitor.evidence.judge_not_found` on the
    account's trades since the submit time and the free balance — not visible yet (nothing
    sent), filled (recorded from the trades), contradictory (BLOCKED NEEDS_REVIEW once) or, only
    after the window, sent once more with the same client order id (when ``resend``).
    """
    try:
        order = exchange.get_order(symbol, token)
        if order is not None:
            order = close.with_evidence(order, exchange)
    except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
        return [Decision(Action.UNKNOWN, operation_id, symbol=symbol, execution_token=token,
                         reason=SkipReason.RECONCILE_DEFERRED, detail=str(exc)[:300])]
    if order is None:
        return not_found(operation_id, token, symbol, exchange, ctx, resend)
    outcome = close.record_outcome(operation_id, token, order, ctx, reconciled=True)
    if outcome.reason == SkipReason.NOT_FINAL:
        return [outcome, *warn_if_stuck(operation_id, token, order.status, ctx)]
    if outcome.action == Action.SKIPPED:
        return [outcome]
    return [Decision(Action.RECONCILED, operation_id, symbol=symbol, execution_token=token, event_type=RECONCILED,
                     detail=f"order found: {order.status}"), outcome]


def not_found(operation_id: int, token: str, symbol: str, exchange, ctx: EngineContext,
              resend: bool) -> list[Decision]:
    """-2013 for ``token``: gather the evidence (trades since the submit time, free balance, the
    account's last recorded order) and act on :func:`stopmonitor.evidence.judge_not_found`."""
    from stopmonitor import evidence

    execution = store.get_execution(token)
    submitted_at = execution.submitted_at or execution.created_at
    now = ctx.at()
    window = ctx.settings.not_found_window_seconds
    try:
        trades = exchange.account_trades(symbol, since=submitted_at - timedelta(seconds=5))
        balance_holds = None
        gone = False
        if (now - submitted_at).total_seconds() >= window:
            balances = exchange.free_balances()
            filters = exchange.symbol_filters([symbol]).get(symbol)
            if balances is not None and filters is not None:
                if execution.side == "SELL":
                    balance_holds = balances.get(filters.base_asset, Decimal("0")) >= execution.requested_quantity
                else:
                    price = execution.observed_price or execution.trigger_price or Decimal("0")
                    balance_holds = balances.get(filters.quote_asset, Decimal("0")) >= execution.requested_quantity * price
            last = store.last_recorded_order(symbol, ctx.venue)
            if last is not None and last[0] != token:
                gone = exchange.get_order(symbol, last[0]) is None
    except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
        return [Decision(Action.UNKNOWN, operation_id, symbol=symbol, execution_token=token,
                         reason=SkipReason.RECONCILE_DEFERRED, detail=f"order not visible; evidence unreadable: {exc}"[:300])]
    verdict = evidence.judge_not_found(
        now=now, submitted_at=submitted_at, window_seconds=window, symbol=symbol, side=execution.side,
        client_order_id=token, requested=execution.requested_quantity, trades=trades,
        known_order_ids=store.recorded_order_ids(symbol), balance_holds=balance_holds, known_orders_gone=gone)
    if verdict.action == evidence.RECORD:
        outcome = close.record_outcome(operation_id, token, verdict.order, ctx, reconciled=True)
        return [Decision(Action.RECONCILED, operation_id, symbol=symbol, execution_token=token, event_type=RECONCILED,
                         detail=verdict.detail[:300]), outcome]
    if verdict.action == evidence.RESEND and resend:
        return close.submit_and_place(operation_id, token, exchange, ctx, resubmit_note=verdict.detail)
    if verdict.action == evidence.REVIEW:
        return [needs_review(operation_id, token, verdict, ctx)]
    return [Decision(Action.UNKNOWN, operation_id, symbol=symbol, execution_token=token,
                     reason=SkipReason.NOT_VISIBLE_YET, detail=verdict.detail[:300])]


def needs_review(operation_id: int, token: str, verdict, ctx: EngineContext) -> Decision:
    """BLOCKED(NEEDS_REVIEW) once for ``token``: the execution stays SUBMITTED and the operation
    CLOSING (nothing is sent again) until an operator resolves it."""
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        if store.review_already_recorded(op.pk, token):
            return Decision(Action.SKIPPED, op.pk, op.client_id, op.symbol.symbol, token,
                            reason=BlockReason.NEEDS_REVIEW, detail="review already recorded")
        version, _ = stream_head(op.pk)
        append_events(op, version, [NewEvent(EventType.BLOCKED, {
            "reason": BlockReason.NEEDS_REVIEW, "evidence": verdict.reason, "detail": verdict.detail,
            "client_order_id": token})], source=ctx.source, venue=ctx.venue, now=ctx.at())
    return Decision(Action.BLOCKED, operation_id, op.client_id, op.symbol.symbol, token, EventType.BLOCKED,
                    BlockReason.NEEDS_REVIEW, verdict.detail[:300])


def warn_if_stuck(operation_id: int, token: str, status: str, ctx: EngineContext) -> list[Decision]:
    """An order the exchange still reports as not final after :data:`STUCK_AFTER` holds its
    operation in CLOSING: say so once with ``GUARD_WARNING`` ``STUCK_SUBMITTED`` (an operator
    must look: the position cannot be moved or closed meanwhile)."""
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        execution = store.get_execution(token)
        if (execution.status != ExecutionStatus.SUBMITTED or not execution.submitted_at
                or ctx.now - execution.submitted_at < STUCK_AFTER):
            return []
        version, last = stream_head(op.pk)
        if last is not None and last.event_type == GUARD_WARNING and last.payload.get("reason") == BlockReason.STUCK_SUBMITTED:
            return []
        detail = f"order {token} still {status} at the exchange since {execution.submitted_at.isoformat()}"
        append_events(op, version, [NewEvent(GUARD_WARNING, {"reason": BlockReason.STUCK_SUBMITTED, "detail": detail,
                                                             "exchange_status": status}, token)],
                      source=ctx.source, venue=ctx.venue, now=ctx.at())
    return [Decision(Action.BLOCKED, operation_id, op.client_id, op.symbol.symbol, token, GUARD_WARNING,
                     BlockReason.STUCK_SUBMITTED, detail)]
