"""Closing one operation: the three transactions of the protocol, top to bottom (invariants 1–4).

1. :func:`begin_close` — lock, load the snapshot, :func:`~stopmonitor.close_plan.plan_close`,
   persist: ``STOP_TRIGGERED`` + ACTIVE → CLOSING, or one ``BLOCKED`` (commit).
2. :func:`submit_and_place` — ``EXECUTION_SUBMITTED`` with the client order id (commit), then
   the MARKET order with no transaction and no lock held.
3. :func:`record_outcome` / :func:`record_failure` — the exchange's answer (commit).

:func:`close_operation` is the API's and the admin's "close now" through the same three.
Functions here commit and reach the network: they must be called outside any transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from stopmonitor import guardrails as g
from stopmonitor.close_plan import Close, CloseAsDust, CloseSnapshot, Hold, Skip, plan_close, recheck
from stopmonitor.engine import store
from stopmonitor.engine.context import EngineContext, EngineSettings
from stopmonitor.engine.decisions import Action, Decision, EngineUnavailable
from stopmonitor.engine.protection import place_close
from stopmonitor.vocabulary import SkipReason
from stopmonitor.events import append_events, stream_head
from stopmonitor.exchange.base import (
    ClockSkew,
    ExchangeError,
    ExchangeUnavailable,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRejectedMaybeFilled,
    OrderRequest,
    OrderResult,
    Quote,
    RateLimited,
)
from stopmonitor.execution import (
    BLOCKED,
    EXECUTED,
    EXECUTION_SUBMITTED,
    FAILED,
    GUARD_WARNING,
    OPERATION_CLOSED,
    RECONCILED,
    STOP_TRIGGERED,
    NewEvent,
    EventType,
    decide_outcome,
)
from stopmonitor.rules import MANUAL, SELL, Trigger, close_side, decimal_str
from stopmonitor.vocabulary import BreakerPosition, ExecutionStatus, FailureReason, OperationStatus


@dataclass
class AccountView:
    """What a close needs from the exchange, fetched once per pass: free balances (None = not
    limiting), what the account's open orders lock per asset (``locked``; None = not reported),
    and symbol filters. Both balances are decremented locally as closes start."""

    balances: dict[str, Decimal] | None
    filters: dict
    locked: dict[str, Decimal] | None = None
    #: operations triggered in this pass on this account: not reserved from each other's closes
    closing_now: frozenset = frozenset()

    def __post_init__(self):
        if self.locked is None and self.balances is not None:
            reported = getattr(self.balances, "locked", None)
            self.locked = dict(reported) if reported is not None else None

    @classmethod
    def fetch(cls, exchange, symbols) -> "AccountView":
        """Filters of ``symbols`` and the free balances: two requests. Raises the exchange's errors."""
        filters = exchange.symbol_filters(sorted(symbols))
        balances = exchange.free_balances()
        return cls(balances, filters)

    def assets(self, symbol: str, fallback: tuple[str, str]) -> tuple[str | None, str | None]:
        """(base, quote) of ``symbol`` from its filters, else ``fallback`` (our Symbol row)."""
        f = self.filters.get(symbol)
        return (f.base_asset, f.quote_asset) if f else fallback

    def locked_of(self, asset: str | None) -> Decimal | None:
        """What open orders lock of ``asset`` (0 when reported without it); None when not reported."""
        if self.locked is None or asset is None:
            return None
        return self.locked.get(asset, Decimal("0"))

    def spend(self, symbol: str, closing: str, qty: Decimal, price: Decimal, from_locked: Decimal = Decimal("0")) -> None:
        """Take a started close's quantity off the local balances: ``from_locked`` of it (base asset)
        off the locked balance (the operation's own protection, released by its cancelReplace), the
        rest off the free one."""
        if self.balances is None or symbol not in self.filters:
            return
        f = self.filters[symbol]
        if closing == SELL:
            from_locked = min(from_locked, qty)
            self.balances[f.base_asset] = self.balances.get(f.base_asset, Decimal("0")) - (qty - from_locked)
            if self.locked is not None and from_locked:
                self.locked[f.base_asset] = self.locked.get(f.base_asset, Decimal("0")) - from_locked
        else:
            self.balances[f.quote_asset] = self.balances.get(f.quote_asset, Decimal("0")) - qty * price


def close_triggered(operation_id: int, trig: Trigger, quote: Quote, exchange, account: AccountView,
                    ctx: EngineContext) -> list[Decision]:
    """Run the whole close protocol for one crossed level; returns the decisions made.

    The quote's age is judged now, when this close is decided (issue #12 item 7): older than
    ``quote_max_age_seconds``, the symbol's quote is read again and the trigger re-checked on
    it (in transaction 1); a quote that cannot be read fresh blocks the close (STALE_PRICE)."""
    if trig.kind != MANUAL and g.quote_problem(quote, ctx.at(), ctx.settings.quote_max_age_seconds) is not None:
        symbol = quote.symbol
        try:
            fresh = exchange.book_tickers([symbol]).get(symbol)
        except (RateLimited, ExchangeUnavailable, ClockSkew):
            fresh = None
        problem = g.quote_problem(fresh, ctx.at(), ctx.settings.quote_max_age_seconds)
        if problem is not None:
            return [record_block_outside(operation_id, problem, ctx)]
        quote = fresh
    decision, token = begin_close(operation_id, trig, quote, account, ctx)
    decisions = [decision]
    if token is not None:
        decisions.extend(submit_and_place(operation_id, token, exchange, ctx))
    return decisions


# ----------------------------------------------------------------------------- transaction 1


def begin_close(operation_id: int, trig: Trigger, quote: Quote, account: AccountView,
                ctx: EngineContext) -> tuple[Decision, str | None]:
    """Transaction 1 (invariant 1): lock the operation, load its snapshot, plan, persist —
    ``STOP_TRIGGERED`` and ACTIVE → CLOSING, or one ``BLOCKED``.

    Returns the decision and the execution token (None when nothing was started). Commits.
    """
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        plan = recheck(op.status, op.side, op.stop_price, op.target_price, trig, quote)
        if not isinstance(plan, Skip):  # the guards' rows are locked only for a trigger still standing
            version, last = stream_head(op.pk)
            snapshot, breaker_row, cfg = load_snapshot(op, account, ctx)
            plan = plan_close(snapshot, trig, quote, ctx.now)
        if isinstance(plan, Skip):
            return Decision(Action.SKIPPED, op.pk, op.client_id, op.symbol.symbol, reason=plan.reason,
                            detail=plan.detail), None
        if isinstance(plan, Hold):
            return record_block(op, version, last, plan.block, plan.trigger, ctx), None
        if isinstance(plan, CloseAsDust):
            return close_as_dust(op, version, plan, ctx), None
        persist_trigger(op, version, plan, quote, breaker_row, cfg, ctx)
    # what the own protection locked was never in the free balance: only the rest is spent from it
    account.spend(op.symbol.symbol, plan.side, plan.quantity, plan.observed, from_locked=snapshot.own_protection)
    return Decision(Action.TRIGGERED, op.pk, op.client_id, op.symbol.symbol, plan.token, STOP_TRIGGERED,
                    plan.trigger.kind, f"level {decimal_str(plan.trigger.level)} observed "
                    f"{decimal_str(plan.observed)} qty {decimal_str(plan.quantity)}"), plan.token


def load_snapshot(op, account: AccountView, ctx: EngineContext):
    """The :class:`CloseSnapshot` of the locked ``op``; also the locked breaker row and tenant config.

    Lock order: the operation (caller), the tenant config, the symbol's breaker row. Then, in this
    order: the half-open breaker's close in flight, the recent triggers, what the account holds
    (:func:`close_funds`), the attempts so far."""
    symbol = op.symbol.symbol
    cfg = store.tenant_config(op.client_id, lock=True)
    breaker_row = store.breaker(symbol, lock=True)
    in_flight = breaker_row.state == BreakerPosition.HALF_OPEN and store.close_in_flight(symbol)
    last_minute, last_hour, attempts = store.trigger_counts(op.client_id, op.pk, ctx.now)
    limits = market_limits(account.filters.get(symbol), op.symbol)
    funds = close_funds(op, account)
    snapshot = CloseSnapshot(
        operation_id=op.pk, status=op.status, side=op.side, stop_price=op.stop_price,
        target_price=op.target_price, remaining=op.remaining_quantity,
        kill_switch=cfg.kill_switch, kill_switch_reason=cfg.kill_switch_reason, kill_switch_at=cfg.kill_switch_at,
        breaker=store.breaker_domain(breaker_row), close_in_flight=in_flight,
        triggers_last_minute=last_minute, triggers_last_hour=last_hour,
        max_per_minute=cfg.max_executions_per_minute, max_per_hour=cfg.max_executions_per_hour,
        max_slippage_pct=Decimal(cfg.max_slippage_pct), slippage_action=cfg.slippage_action,
        step_size=limits.step_size, min_qty=limits.min_qty, min_notional=limits.min_notional, max_qty=limits.max_qty,
        free_base=funds.free_base, free_quote=funds.free_quote,
        attempt=attempts + 1,
        position=op.quantity,
        dust_tolerance_pct=ctx.settings.fee_dust_tolerance_pct,
        symbol_status=limits.symbol_status,
        reserved_for_others=funds.reserved_for_others,
        own_protection=funds.own_protection,
    )
    return snapshot, breaker_row, cfg


@dataclass(frozen=True)
class MarketLimits:
    """The market order's filters for a close: LOT_SIZE / MARKET_LOT_SIZE step, minimum and maximum
    quantity (base asset), NOTIONAL minimum (quote asset), and the exchangeInfo status."""

    step_size: Decimal | None
    min_qty: Decimal | None
    min_notional: Decimal | None
    max_qty: Decimal | None
    symbol_status: str


def market_limits(f, symbol_row) -> MarketLimits:
    """From the exchange's filters ``f`` (MARKET_LOT_SIZE where it is set, else LOT_SIZE); without
    them, our Symbol row's step, minimum quantity and minNotional, no maximum, status TRADING."""
    if not f:
        return MarketLimits(symbol_row.step_size, symbol_row.min_qty, symbol_row.min_notional, None, "TRADING")
    return MarketLimits(f.market_step_size or f.step_size, f.market_min_qty or f.min_qty, f.min_notional,
                        f.market_max_qty or f.max_qty, f.status)


@dataclass(frozen=True)
class CloseFunds:
    """What the account holds for the close of one operation: the free base and quote balances
    (None = not known, not limiting), the free base including ``own_protection`` (P6 of
    protection.md: what the operation's own resting protection locks is sellable by its close),
    and the base quantity ``reserved_for_others`` (:func:`credit_for_protection`)."""

    free_base: Decimal | None
    free_quote: Decimal | None
    own_protection: Decimal
    reserved_for_others: Decimal


def close_funds(op, account: AccountView) -> CloseFunds:
    """The :class:`CloseFunds` of ``op`` on ``account``; nothing is known (and nothing read) when the
    account reports no balances or the symbol's base asset is unknown."""
    base, quote_asset = account.assets(op.symbol.symbol, (op.symbol.base_asset, op.symbol.quote_asset))
    if account.balances is None or base is None:
        return CloseFunds(None, None, Decimal("0"), Decimal("0"))
    own_protection, reserved = credit_for_protection(op, account, base)
    return CloseFunds(account.balances.get(base, Decimal("0")) + own_protection,
                      account.balances.get(quote_asset, Decimal("0")), own_protection, reserved)


def credit_for_protection(op, account: AccountView, base: str) -> tuple[Decimal, Decimal]:
    """``(own credit, reserved for others)`` in the base asset, for a long's close (invariant 5, P6).

    Resting protection locks coins outside the free balance. The operation's own (PLACED or
    REQUESTED in the projection) is sellable by its close (its cancelReplace releases it); the other
    operations of the same account keep what they still need, less what their own protection locks.
    The projection may be wrong (a stop cancelled or expired outside us, one never placed), so the
    credit is bounded by what the exchange says is locked (``account.locked``): own credit ≤ locked,
    and the two credits together ≤ locked. Then what the close may take, free + own credit −
    reserved, never exceeds free + locked − what the others need: another operation's coins are
    never sold, whichever protection is really resting. Without a locked figure the projection is
    trusted (a venue that does not report it)."""
    own, others_need, others_protected = store.protection_shares(op, account.closing_now)
    locked = account.locked_of(base)
    if locked is not None:
        own = min(own, max(locked, Decimal("0")))
        others_protected = min(others_protected, max(locked - own, Decimal("0")))
    return own, max(others_need - others_protected, Decimal("0"))


def persist_trigger(op, version: int, plan: Close, quote: Quote, breaker_row, cfg, ctx: EngineContext) -> None:
    """Append ``STOP_TRIGGERED`` (and a slippage ``GUARD_WARNING``), keep the breaker's trial, move
    the operation to CLOSING. Caller holds the row lock inside the transaction."""
    trig = plan.trigger
    payload = {
        "trigger": trig.kind,
        "level": decimal_str(trig.level),
        "observed_price": decimal_str(plan.observed),
        "bid": decimal_str(quote.bid),
        "ask": decimal_str(quote.ask),
        "quote_time": quote.observed_at.isoformat(),
        **({"price_time": quote.source_time.isoformat()} if quote.source_time else {}),
        "close_side": plan.side,
        "quantity": decimal_str(plan.quantity),
        "remaining_before": decimal_str(op.remaining_quantity),
        "attempt": plan.attempt,
        "decided_at": ctx.at().isoformat(),
    }
    if plan.dust:
        payload["dust_qty"] = decimal_str(plan.dust)  # unsellable fee dust: closed with this close
    events = [NewEvent(STOP_TRIGGERED, payload, plan.token)]
    if plan.shortfall:
        events.append(NewEvent(GUARD_WARNING, {
            "reason": g.BlockReason.SHORTFALL, "shortfall_qty": decimal_str(plan.shortfall),
            "detail": f"free balance for this operation is {decimal_str(plan.quantity)} of the remaining "
                      f"{decimal_str(op.remaining_quantity)}: selling what is there; {decimal_str(plan.shortfall)} "
                      "short, for review",
        }, plan.token))
    slip = plan.slippage
    if slip is not None:
        payload["observed_slippage_pct"] = decimal_str(slip.pct)
        if slip.breach:
            events.append(NewEvent(GUARD_WARNING, {
                "reason": g.SLIPPAGE_BREACH,
                "detail": f"observed {plan.observed} is {slip.pct}% past level {trig.level} "
                          f"(max {cfg.max_slippage_pct}%); closing anyway (action warn)",
            }, plan.token))
    if plan.breaker.state != breaker_row.state:
        store.save_breaker(breaker_row, plan.breaker)  # OPEN → HALF_OPEN: this close is the trial
    store.start_closing(op, plan.token, ctx.now)
    append_events(op, version, events, source=ctx.source, venue=ctx.venue, now=ctx.at())


def close_as_dust(op, version: int, plan: CloseAsDust, ctx: EngineContext) -> Decision:
    """Nothing sellable remains and it is within the fee tolerance (issue #12 item 5): the
    operation is CLOSED with the dust recorded, no order. Caller holds the row lock."""
    store.record_closed_quantity(op, plan.dust)
    append_events(op, version, [NewEvent(OPERATION_CLOSED, {
        "closed_quantity": decimal_str(op.closed_quantity), "dust_qty": decimal_str(plan.dust), "reason": "DUST",
        "detail": plan.detail})], source=ctx.source, venue=ctx.venue, now=ctx.at())
    return Decision(Action.EXECUTED, op.pk, op.client_id, op.symbol.symbol, event_type=OPERATION_CLOSED,
                    reason="DUST", detail=plan.detail, extra={"operation_status": op.status})


def already_blocked(last, block: g.Block) -> bool:
    """Invariant 5/6: a block is recorded once — not again while the same block (reason and
    episode key: which kill switch, which breaker opening) is the stream's last event."""
    return (last is not None and last.event_type == BLOCKED and last.payload.get("reason") == block.reason
            and last.payload.get("key", "") == block.key)


def record_block(op, version: int, last, block: g.Block, trig: Trigger | None, ctx: EngineContext) -> Decision:
    """Append one BLOCKED event unless the same block is already the stream's last event.
    Caller holds the operation's row lock inside a transaction."""
    symbol = op.symbol.symbol
    if already_blocked(last, block):
        return Decision(Action.SKIPPED, op.pk, op.client_id, symbol, reason=block.reason,
                        detail="block already recorded")
    payload = {"reason": block.reason, "detail": block.detail}
    if block.key:
        payload["key"] = block.key
    if trig is not None:
        payload.update(trigger=trig.kind, level=decimal_str(trig.level), observed_price=decimal_str(trig.observed))
    append_events(op, version, [NewEvent(BLOCKED, payload)], source=ctx.source, venue=ctx.venue, now=ctx.at())
    return Decision(Action.BLOCKED, op.pk, op.client_id, symbol, event_type=BLOCKED, reason=block.reason,
                    detail=block.detail)


def record_block_outside(operation_id: int, block: g.Block, ctx: EngineContext) -> Decision:
    """:func:`record_block` in its own transaction under the operation's row lock (a quote problem)."""
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        version, last = stream_head(op.pk)
        return record_block(op, version, last, block, None, ctx)


# ----------------------------------------------------------------------------- transaction 2 and the order


def submit_and_place(operation_id: int, token: str, exchange, ctx: EngineContext,
                     resubmit_note: str = "") -> list[Decision]:
    """Transaction 2 then the order (invariants 2 and 3).

    Under the execution's claim (:func:`~stopmonitor.engine.store.execution_claim`), commits
    ``EXECUTION_SUBMITTED`` (or, with ``resubmit_note``, a ``RECONCILED`` resubmission) only if
    the execution is still where the caller saw it and no kill switch or open breaker holds it
    (held: ``FAILED`` with the guard's reason, nothing sent, the operation back to ACTIVE),
    then places the MARKET order with ``newClientOrderId`` = ``token`` outside any
    transaction, then records the outcome.
    """
    with store.execution_claim(token) as claimed:
        if not claimed:
            return [Decision(Action.SKIPPED, operation_id, execution_token=token, reason=SkipReason.IN_FLIGHT,
                             detail="another process holds this execution's claim")]
        submitted, request = submit(operation_id, token, ctx, resubmit_note)
        if request is None:
            return [submitted]
        return [submitted, place(submitted, request, exchange, ctx)]


def submit(operation_id: int, token: str, ctx: EngineContext,
           resubmit_note: str) -> tuple[Decision, OrderRequest | None]:
    """Transaction 2: ``EXECUTION_SUBMITTED`` (or the ``RECONCILED`` resubmission) and the order
    request to send; or ``FAILED`` when a guard holds the order, or ``skipped``, and no request."""
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        execution = store.get_execution(token)
        symbol = op.symbol.symbol
        expected = ExecutionStatus.SUBMITTED if resubmit_note else ExecutionStatus.TRIGGERED
        if op.status != OperationStatus.CLOSING or op.stop_execution_token != token or execution.status != expected:
            return Decision(Action.SKIPPED, op.pk, op.client_id, symbol, token, reason=SkipReason.NOT_OURS,
                            detail=f"execution is {execution.status}, operation {op.status}"), None
        version, _ = stream_head(op.pk)
        held = guard_before_placing(op, ctx)
        if held is not None:
            payload = {"code": None, "message": held.detail, "reason": held.reason, "definite": True,
                       "placed": False}
            append_events(op, version, [NewEvent(FAILED, payload, token)], source=ctx.source, venue=ctx.venue,
                          now=ctx.at())
            store.release(op)
            return Decision(Action.FAILED, op.pk, op.client_id, symbol, token, FAILED, held.reason,
                            f"not sent: {held.detail}"), None
        request = OrderRequest(symbol, execution.side, execution.requested_quantity, token)
        event = _submission_event(request, token, resubmit_note)
        append_events(op, version, [event], source=ctx.source, venue=ctx.venue, now=ctx.at())
    return Decision(Action.SUBMITTED, op.pk, op.client_id, symbol, token, event.event_type, source=ctx.source,
                    detail=f"MARKET {request.side} {decimal_str(request.quantity)} client order id {token}"), request


def _submission_event(request: OrderRequest, token: str, resubmit_note: str) -> NewEvent:
    if resubmit_note:
        return NewEvent(RECONCILED, {"found": False, "resubmitted": True, "note": resubmit_note,
                                     "client_order_id": token, "quantity": decimal_str(request.quantity)}, token)
    return NewEvent(EXECUTION_SUBMITTED, {
        "client_order_id": token, "symbol": request.symbol, "side": request.side, "type": "MARKET",
        "quantity": decimal_str(request.quantity),
    }, token)


def guard_before_placing(op, ctx: EngineContext) -> g.Block | None:
    """Kill switch and circuit breaker, checked again right before an order is sent — a
    reconcile may place an order long after the trigger's guardrails ran (invariant 6)."""
    cfg = store.tenant_config(op.client_id, lock=False)
    block = g.kill_switch(cfg.kill_switch, cfg.kill_switch_reason, cfg.kill_switch_at)
    if block is None:
        block = account_block(op.account_id)
    if block is None:
        _, block = g.breaker_allows(store.breaker_domain(store.breaker(op.symbol.symbol, lock=False)), ctx.now)
    return block


def account_block(account_id: int | None) -> g.Block | None:
    """A disabled exchange account holds its operations' orders (issue #20; ``key``: the account, so once)."""
    enabled, why = store.account_enabled(account_id)
    return None if enabled else g.Block(g.BlockReason.ACCOUNT_DISABLED, why, key=str(account_id))


#: Refusals that are the account's, not the symbol's (Binance "Error codes": -1002 unauthorized,
#: -1015 too many new orders for this account, -1022 bad signature, -2014 bad API-key format,
#: -2015 invalid key, IP or permissions): they never count against the symbol's circuit breaker,
#: so one tenant's revoked key cannot hold another tenant's closes on that symbol.
ACCOUNT_REFUSAL_CODES = frozenset({-1002, -1015, -1022, -2014, -2015})


def place(submitted: Decision, request: OrderRequest, exchange, ctx: EngineContext) -> Decision:
    """The MARKET order, outside any transaction (invariant 2); then transaction 3 with its answer.
    An unknown outcome records nothing: the execution stays SUBMITTED (invariant 3)."""
    operation_id, token = submitted.operation_id, submitted.execution_token
    try:
        result = place_close(operation_id, request, exchange, now=ctx.now, source=ctx.source)  # cancelReplace if protected
    except OrderOutcomeUnknown as exc:
        return Decision(Action.UNKNOWN, operation_id, submitted.tenant_id, request.symbol, token,
                        reason=SkipReason.OUTCOME_UNKNOWN, detail=str(exc)[:300])
    except OrderRejectedMaybeFilled as exc:
        return maybe_filled(operation_id, token, request, exc, exchange, ctx)
    except (OrderRejected, ClockSkew, RateLimited) as exc:
        return record_failure(operation_id, token, exc, ctx)
    try:
        result = with_evidence(result, exchange)
    except (RateLimited, ExchangeUnavailable, ClockSkew) as exc:  # a "0 filled" we cannot check yet
        return Decision(Action.UNKNOWN, operation_id, submitted.tenant_id, request.symbol, token,
                        reason=SkipReason.RECONCILE_DEFERRED, detail=f"order answered {result.status} with "
                        f"executedQty {decimal_str(result.executed_qty)}; its trades are unreadable: {exc}"[:300])
    return record_outcome(operation_id, token, result, ctx)


def with_evidence(result: OrderResult, exchange) -> OrderResult:
    """The exchange's answer checked against the order's trades (issue #12 items 3 and 4): a final
    "0 filled" is looked up in the trades before it is believed, and an answer without fills (a GET)
    takes price, quantity and commission from them. Raises the exchange's read errors when a zero
    fill cannot be checked; commission stays None when only the fills are missing."""
    from stopmonitor import evidence

    if result.is_final and result.executed_qty <= 0:
        return evidence.check_zero_fill(result, exchange.account_trades(result.symbol, order_id=result.exchange_order_id))
    if result.executed_qty > 0 and not result.fills:
        try:
            trades = exchange.account_trades(result.symbol, order_id=result.exchange_order_id)
        except (RateLimited, ExchangeUnavailable, ClockSkew):
            return result
        return evidence.fills_from_trades(result, trades)
    return result


def maybe_filled(operation_id: int, token: str, request: OrderRequest, exc: OrderRejectedMaybeFilled, exchange,
                 ctx: EngineContext) -> Decision:
    """``-2010`` on a close (issue #12 item 2): not a failure of the close. A symbol that takes no
    order (HALT/BREAK/CANCEL_ONLY, read fresh) with no earlier send of this id is a definite
    FAILED(SYMBOL_STATUS); otherwise the execution stays SUBMITTED and is reconciled on evidence
    (order, trades, balance) — now, and by later passes."""
    try:
        f = exchange.symbol_filters([request.symbol], fresh=True).get(request.symbol)
    except (RateLimited, ExchangeUnavailable, ClockSkew):
        f = None
    if f is not None and f.not_trading and not store.has_resubmission(token):
        return record_failure(operation_id, token, exc, ctx, reason=FailureReason.SYMBOL_STATUS)
    from stopmonitor.engine.reconcile import reconcile_claimed

    decisions = reconcile_claimed(operation_id, token, request.symbol, exchange, ctx, resend=False)
    last = decisions[-1] if decisions else Decision(Action.UNKNOWN, operation_id)
    last.detail = f"-2010 on the close ({exc.code}): reconciling on evidence; {last.detail}"[:300]
    return last


# ----------------------------------------------------------------------------- transaction 3


def _counts_against_symbol(exc: ExchangeError, reason: str) -> bool:
    """Whether a definite refusal is one failure on the symbol's circuit breaker: not a rate limit,
    a symbol status (said once on its own), the account's refusal, nor a close our own triggered
    protection held (``counts_against_symbol`` False: the operation's race, not the symbol's fault)."""
    return not (isinstance(exc, RateLimited) or reason == FailureReason.SYMBOL_STATUS
                or exc.code in ACCOUNT_REFUSAL_CODES or getattr(exc, "account_refusal", False)
                or not getattr(exc, "counts_against_symbol", True))


def record_failure(operation_id: int, token: str, exc: ExchangeError, ctx: EngineContext,
                   reason: str | None = None) -> Decision:
    """Transaction 3 after a definite refusal: ``FAILED``, the operation back to ACTIVE (a later
    pass may try again with the next attempt), one failure on the symbol's circuit breaker
    unless :func:`_counts_against_symbol` says the refusal is not the symbol's."""
    cfg = ctx.settings
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        execution = store.get_execution(token)
        symbol = op.symbol.symbol
        if execution.status not in store.IN_FLIGHT:
            return Decision(Action.SKIPPED, op.pk, op.client_id, symbol, token, reason=SkipReason.ALREADY_RECORDED)
        version, _ = stream_head(op.pk)
        reason = reason or (FailureReason.RATE_LIMITED if isinstance(exc, RateLimited)
                            else FailureReason.CLOCK_SKEW if isinstance(exc, ClockSkew) else FailureReason.REJECTED)
        payload = {"code": exc.code, "message": str(exc)[:300], "reason": reason, "definite": True}
        append_events(op, version, [NewEvent(FAILED, payload, token)], source=ctx.source, venue=ctx.venue,
                      now=ctx.at())
        store.release(op)
        if _counts_against_symbol(exc, reason):
            row = store.breaker(symbol, lock=True)
            store.save_breaker(row, g.breaker_on_failure(store.breaker_domain(row), ctx.now, cfg.breaker_threshold,
                                                         cfg.breaker_cooldown_seconds, f"{exc.code}: {exc}"))
    return Decision(Action.FAILED, op.pk, op.client_id, symbol, token, FAILED, reason, f"code {exc.code}: {exc}"[:300])


_ACTION_OF_EVENT = {EventType.EXECUTED: Action.EXECUTED, EventType.PARTIALLY_EXECUTED: Action.PARTIALLY_EXECUTED,
                    EventType.FAILED: Action.FAILED}


def record_outcome(operation_id: int, token: str, result, ctx: EngineContext, reconciled: bool = False) -> Decision:
    """Transaction 3 with the exchange's answer (invariant 4): EXECUTED / PARTIALLY_EXECUTED /
    FAILED (zero fill), the operation's closed quantity and status, the breaker.

    Not final yet (NEW) → nothing recorded, the execution stays SUBMITTED.
    """
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        execution = store.get_execution(token)
        symbol = op.symbol.symbol
        if execution.status != ExecutionStatus.SUBMITTED:
            return Decision(Action.SKIPPED, op.pk, op.client_id, symbol, token, reason=SkipReason.ALREADY_RECORDED,
                            detail=f"execution is {execution.status}")
        outcome = decide_outcome(token, execution.requested_quantity, execution.trigger_price, result)
        if outcome.event is None:
            return Decision(Action.UNKNOWN, op.pk, op.client_id, symbol, token, reason=SkipReason.NOT_FINAL,
                            detail=f"order status {result.status}")
        version, _ = stream_head(op.pk)
        events = []
        if reconciled:
            events.append(NewEvent(RECONCILED, {"found": True, "exchange_status": result.status,
                                                "order_id": result.exchange_order_id}, token))
        events.append(outcome.event)
        dust = Decimal(store.trigger_payload(token).get("dust_qty") or "0") if outcome.event.event_type == EXECUTED \
            else Decimal("0")
        if store.record_closed_quantity(op, outcome.closed_qty + dust):
            closed = {"closed_quantity": decimal_str(op.closed_quantity), "execution_token": token}
            if dust:
                closed["dust_qty"] = decimal_str(dust)  # unsold fee dust, closed with this fill (issue #12 item 5)
            events.append(NewEvent(OPERATION_CLOSED, closed))
        append_events(op, version, events, source=ctx.source, venue=ctx.venue, now=ctx.at())
        _update_breaker(symbol, outcome, ctx)
    ev = outcome.event
    return Decision(_ACTION_OF_EVENT[ev.event_type], op.pk, op.client_id, symbol, token, ev.event_type,
                    detail=f"executed {ev.payload.get('executed_qty')} at {ev.payload.get('avg_price')}",
                    extra={"operation_status": op.status})


def _update_breaker(symbol: str, outcome, ctx: EngineContext) -> None:
    """A fill closes the symbol's breaker; a zero fill counts one failure. Inside transaction 3."""
    row = store.breaker(symbol, lock=True)
    current = store.breaker_domain(row)
    new = (g.breaker_on_failure(current, ctx.now, ctx.settings.breaker_threshold,
                                ctx.settings.breaker_cooldown_seconds, outcome.event.payload.get("message", ""))
           if outcome.failure else g.breaker_on_success(current))
    if new != current:
        store.save_breaker(row, new)


# ----------------------------------------------------------------------------- manual close (API, admin)


def close_operation(operation_id: int, exchange, *, source: str = "api", now=None,
                    engine: EngineSettings | None = None) -> list[Decision]:
    """Close an operation now at market (the API's and the admin's "close now").

    Same protocol and guarantees as the monitor: if the monitor (or another request) is
    already closing it, this returns a ``skipped`` decision and places nothing. Raises
    :class:`~stopmonitor.engine.decisions.EngineUnavailable` when the quote, balances or
    filters cannot be read.
    """
    from stopmonitor import metrics

    from stopmonitor.engine.accounts import AccountUnavailable, clients_for

    clients = clients_for(exchange)
    exchange = clients.default
    ctx = EngineContext.build(exchange, source=source, now=now, engine=engine)
    op = store.get_operation(operation_id)
    symbol = op.symbol.symbol
    held = account_block(op.account_id)
    if held is not None:
        return [record_block_outside(operation_id, held, ctx)]
    try:
        client = clients.for_account(op.account_id)  # the operation's own account: its balance, its key
        quote = exchange.book_tickers([symbol]).get(symbol)
        account = AccountView.fetch(client, {symbol})
    except (RateLimited, ExchangeUnavailable, ClockSkew, AccountUnavailable) as exc:
        raise EngineUnavailable(f"cannot close {symbol} now: {exc}") from exc
    problem = g.quote_problem(quote, ctx.now, ctx.settings.quote_max_age_seconds)
    if problem is not None:
        return [record_block_outside(operation_id, problem, ctx)]
    observed = quote.bid if close_side(op.side) == SELL else quote.ask
    trig = Trigger(MANUAL, op.stop_price or observed, observed)
    decisions = close_triggered(operation_id, trig, quote, client, account, ctx)
    for decision in decisions:  # the same one JSON line per decision as a pass writes
        decision.source = decision.source or source
        metrics.observe_decision(decision, log=True)
    return decisions
