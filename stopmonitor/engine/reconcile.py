"""Reconcile (invariant 7): resolve executions left TRIGGERED or SUBMITTED before deciding anything new."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
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
    """-2013 for ``token``: gather the evidence (:func:`gather_evidence`: trades since the submit
    time, then — past the window — free balance and the account's last recorded order) and act on
    :func:`stopmonitor.evidence.judge_not_found` (:func:`act_on_verdict`). Evidence that cannot be
    read defers the execution (UNKNOWN ``RECONCILE_DEFERRED``)."""
    from stopmonitor import evidence

    execution = store.get_execution(token)
    submitted_at = execution.submitted_at or execution.created_at
    now = ctx.at()
    window = ctx.settings.not_found_window_seconds
    try:
        seen = gather_evidence(exchange, execution, symbol, token, submitted_at,
                               past_window=(now - submitted_at).total_seconds() >= window, venue=ctx.venue)
    except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
        return [Decision(Action.UNKNOWN, operation_id, symbol=symbol, execution_token=token,
                         reason=SkipReason.RECONCILE_DEFERRED, detail=f"order not visible; evidence unreadable: {exc}"[:300])]
    verdict = evidence.judge_not_found(
        now=now, submitted_at=submitted_at, window_seconds=window, symbol=symbol, side=execution.side,
        client_order_id=token, requested=execution.requested_quantity, trades=seen.trades,
        known_order_ids=store.recorded_order_ids(symbol), balance_holds=seen.balance_holds,
        known_orders_gone=seen.known_orders_gone)
    return act_on_verdict(verdict, operation_id, token, symbol, exchange, ctx, resend)


@dataclass(frozen=True)
class NotFoundEvidence:
    """What the exchange says around a -2013: the account's ``trades`` on the symbol since the
    submit time; ``balance_holds`` (None before the window or when the venue does not say) and
    ``known_orders_gone`` (False before the window), the inputs of
    :func:`stopmonitor.evidence.judge_not_found`."""

    trades: list
    balance_holds: bool | None = None
    known_orders_gone: bool = False


def gather_evidence(exchange, execution, symbol: str, token: str, submitted_at: datetime, *, past_window: bool,
                    venue: str) -> NotFoundEvidence:
    """Read the evidence in this order: trades since 5 s before ``submitted_at``; only
    ``past_window``: the free balances, the symbol's filters, then whether the account's last
    recorded order (another one than ``token``) is gone too. Network reads, no transaction.
    Raises the exchange's ``ExchangeUnavailable`` / ``RateLimited`` / ``ClockSkew``."""
    trades = exchange.account_trades(symbol, since=submitted_at - timedelta(seconds=5))
    if not past_window:
        return NotFoundEvidence(trades)
    balances = exchange.free_balances()
    filters = exchange.symbol_filters([symbol]).get(symbol)
    holds = balance_holds(execution, balances, filters)
    return NotFoundEvidence(trades, holds, known_orders_gone(exchange, symbol, token, venue))


def balance_holds(execution, balances: dict | None, filters) -> bool | None:
    """Whether the free balance still holds what the close would spend: ``requested_quantity`` of
    the base asset for a SELL; for a BUY, of the quote asset ``requested_quantity`` × the observed
    (else the trigger) price. None when the venue reports no balances or no filters for the symbol."""
    if balances is None or filters is None:
        return None
    if execution.side == "SELL":
        return balances.get(filters.base_asset, Decimal("0")) >= execution.requested_quantity
    price = execution.observed_price or execution.trigger_price or Decimal("0")
    return balances.get(filters.quote_asset, Decimal("0")) >= execution.requested_quantity * price


def known_orders_gone(exchange, symbol: str, token: str, venue: str) -> bool:
    """The account's last recorded order on ``symbol`` (when it is not ``token`` itself) is no
    longer shown by the exchange either (a testnet reset). False when there is no such order."""
    last = store.last_recorded_order(symbol, venue)
    if last is None or last[0] == token:
        return False
    return exchange.get_order(symbol, last[0]) is None


def act_on_verdict(verdict, operation_id: int, token: str, symbol: str, exchange, ctx: EngineContext,
                   resend: bool) -> list[Decision]:
    """The verdict's decisions: RECORD → the fill from the trades (``RECONCILED`` + its outcome);
    RESEND (when ``resend``) → the same client order id once more; REVIEW → BLOCKED NEEDS_REVIEW
    once; else (WAIT, or RESEND without ``resend``) → UNKNOWN ``NOT_VISIBLE_YET``, nothing sent."""
    from stopmonitor import evidence

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
