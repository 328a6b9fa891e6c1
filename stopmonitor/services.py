"""The engine's use cases: :func:`run_pass`, :func:`close_operation`, :func:`reconcile_submitted`.

The monitor command, the loop, the Celery task and the API's "close now" all call these.
Protocol (../shared/design/stop-execution.md, "The pass"): each close takes three short
transactions — (1) row lock, re-check, guardrails, ``STOP_TRIGGERED`` + ``CLOSING``;
(2) ``EXECUTION_SUBMITTED`` with the client order id; then the order is placed with no
transaction and no lock held; (3) the outcome. Functions here commit and reach the network:
they must be called outside any transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from stopmonitor import guardrails as g
from stopmonitor.events import ConcurrencyConflict, append_events, stream_head
from stopmonitor.operations import lock_operation
from stopmonitor.exchange.base import (
    ClockSkew,
    ExchangeError,
    ExchangeUnavailable,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    Quote,
    RateLimited,
)
from stopmonitor.execution import (
    BLOCKED,
    EXECUTION_SUBMITTED,
    FAILED,
    GUARD_WARNING,
    OPERATION_CLOSED,
    RECONCILED,
    STOP_TRIGGERED,
    NewEvent,
    decide_outcome,
)
from stopmonitor.rules import (
    MANUAL,
    Trigger,
    close_quantity,
    close_side,
    decimal_str,
    evaluate_trigger,
    execution_token,
)

log = logging.getLogger("stopmonitor.engine")
PASS_LOCK_KEY = 0x4D4F4E49  # "MONI": one pass at a time across pods (pg_try_advisory_lock)


class PassError(Exception):
    """The pass could not run (database or exchange unreachable, rate-limit ban). Exit non-zero."""


@dataclass
class Decision:
    """One engine decision, printed as a JSON line: what happened to which operation and why."""

    action: str
    operation_id: int | None = None
    tenant_id: int | None = None
    symbol: str | None = None
    execution_token: str | None = None
    event_type: str | None = None
    reason: str | None = None
    detail: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v not in (None, "", {})}
        return {"type": "decision", **d}


@dataclass
class PassSummary:
    """Counts and duration of one pass (the command's last JSON line)."""

    started_at: str
    source: str
    venue: str
    dry_run: bool
    watched: int = 0
    symbols: int = 0
    triggered: int = 0
    executed: int = 0
    partially_executed: int = 0
    failed: int = 0
    unknown: int = 0
    blocked: int = 0
    reconciled: int = 0
    skipped: int = 0
    errors: int = 0
    exchange_requests: int = 0
    duration_s: float = 0.0
    lock_held_elsewhere: bool = False

    def count(self, decision: Decision) -> None:
        key = {
            "triggered": "triggered",
            "would_trigger": "triggered",
            "executed": "executed",
            "partially_executed": "partially_executed",
            "failed": "failed",
            "unknown": "unknown",
            "blocked": "blocked",
            "reconciled": "reconciled",
            "skipped": "skipped",
            "error": "errors",
        }.get(decision.action)
        if key:
            setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict:
        return {"type": "summary", **asdict(self)}


@dataclass(frozen=True)
class EngineSettings:
    """Engine knobs (``settings.STOPMONITOR``)."""

    quote_max_age_seconds: int = 10
    reconcile_after_seconds: int = 30
    breaker_threshold: int = 3
    breaker_cooldown_seconds: int = 300

    @classmethod
    def from_settings(cls) -> "EngineSettings":
        s = getattr(settings, "STOPMONITOR", {})
        return cls(
            quote_max_age_seconds=s.get("QUOTE_MAX_AGE_SECONDS", 10),
            reconcile_after_seconds=s.get("RECONCILE_AFTER_SECONDS", 30),
            breaker_threshold=s.get("CIRCUIT_BREAKER_THRESHOLD", 3),
            breaker_cooldown_seconds=s.get("CIRCUIT_BREAKER_COOLDOWN_SECONDS", 300),
        )


@dataclass(frozen=True)
class Watched:
    """An ACTIVE operation with a stop or target, as loaded by the pass (no ORM objects)."""

    operation_id: int
    symbol: str
    side: str
    stop_price: Decimal | None
    target_price: Decimal | None


def exchange_now(exchange) -> datetime:
    """The venue's clock (replay time for replay), else the wall clock, UTC."""
    clock = getattr(exchange, "clock", None)
    return clock() if callable(clock) else datetime.now(timezone.utc)


Emit = Callable[[Decision], None]


def _noop(_: Decision) -> None:
    pass


# --------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------


@contextmanager
def session_lock(key: int):
    """Try a PostgreSQL session-level advisory lock (``pg_try_advisory_lock``) without waiting;
    yields whether it is held, and releases it on exit. Elsewhere (SQLite: one process) yields True."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


@contextmanager
def pass_lock():
    """Session-level advisory lock so overlapping CronJob pods don't both work (PostgreSQL).

    Yields True when this process holds it, False when another pass does. Row locks keep
    correctness either way; this only avoids duplicate work. Elsewhere always yields True.
    """
    with session_lock(PASS_LOCK_KEY) as acquired:
        yield acquired


def load_watched() -> list[Watched]:
    """Every ACTIVE operation with a stop or target, in one query (partial index from 0018)."""
    from api.models import Operation

    rows = (
        Operation.objects.filter(status="ACTIVE")
        .filter(Q(stop_price__isnull=False) | Q(target_price__isnull=False))
        .values_list("id", "symbol__symbol", "side", "stop_price", "target_price")
    )
    return [Watched(*row) for row in rows]


def run_pass(
    exchange,
    *,
    source: str = "cron",
    dry_run: bool = False,
    now: datetime | None = None,
    emit: Emit = _noop,
    engine: EngineSettings | None = None,
    use_lock: bool = True,
    log_decisions: bool = True,
) -> PassSummary:
    """One monitor pass: reconcile SUBMITTED executions, then evaluate and close triggers.

    ``dry_run`` evaluates and reports without appending events or placing orders. Each
    decision goes to ``emit``, is counted, and is logged as one JSON line unless
    ``log_decisions`` is False (a caller that prints them itself, ``monitor_stops --json``); the summary is
    recorded as one ``MonitorPass`` row (:mod:`stopmonitor.metrics`). Raises
    :class:`PassError` when the pass cannot run (quotes unavailable, rate-limit ban).
    Must be called outside any transaction.
    """
    from stopmonitor import metrics

    def observed(decision: Decision) -> None:
        metrics.observe_decision(decision, log=log_decisions)
        emit(decision)

    try:
        summary = _run_pass(metrics.instrument(exchange), source=source, dry_run=dry_run, now=now, emit=observed,
                            engine=engine, use_lock=use_lock)
    except PassError as exc:
        metrics.record_pass(PassSummary(started_at=(now or exchange_now(exchange)).isoformat(), source=source,
                                        venue=exchange.venue, dry_run=dry_run), error=str(exc))
        raise
    metrics.record_pass(summary)
    return summary


def _run_pass(exchange, *, source: str, dry_run: bool, now: datetime | None, emit: Emit,
              engine: EngineSettings | None, use_lock: bool) -> PassSummary:
    engine = engine or EngineSettings.from_settings()
    started = time.monotonic()
    now = now or exchange_now(exchange)
    summary = PassSummary(started_at=now.isoformat(), source=source, venue=exchange.venue, dry_run=dry_run)

    def record(decision: Decision) -> None:
        decision.source = decision.source or source
        summary.count(decision)
        emit(decision)

    with (pass_lock() if use_lock else _always()) as acquired:
        if not acquired:
            summary.lock_held_elsewhere = True
            summary.duration_s = round(time.monotonic() - started, 4)
            return summary
        if not dry_run:
            reconcile_submitted(exchange, now=now, source=source, emit=record, engine=engine)
        watched = load_watched()
        summary.watched = len(watched)
        symbols = sorted({w.symbol for w in watched})
        summary.symbols = len(symbols)
        if not symbols:
            summary.duration_s = round(time.monotonic() - started, 4)
            return summary
        quotes, requests = fetch_quotes(exchange, symbols)
        summary.exchange_requests += requests

        triggered: list[tuple[Watched, Trigger, Quote]] = []
        quote_blocks: list[tuple[Watched, g.Block]] = []
        for w in watched:
            quote = quotes.get(w.symbol)
            problem = g.quote_problem(quote, now, engine.quote_max_age_seconds)
            if problem is not None:
                quote_blocks.append((w, problem))
                continue
            trig = evaluate_trigger(w.side, w.stop_price, w.target_price, quote.bid, quote.ask)
            if trig is not None:
                triggered.append((w, trig, quote))

        for w, block in quote_blocks:
            if dry_run:
                record(Decision("blocked", w.operation_id, symbol=w.symbol, reason=block.reason, detail=block.detail))
            else:
                for decision in isolated(w.operation_id, w.symbol, None, lambda: [
                        _record_block_outside(w.operation_id, block, None, exchange.venue, source, now)]):
                    record(decision)
        if not triggered:
            summary.duration_s = round(time.monotonic() - started, 4)
            return summary
        if dry_run:
            for w, trig, quote in triggered:
                record(Decision("would_trigger", w.operation_id, symbol=w.symbol, reason=trig.kind,
                                detail=f"level {decimal_str(trig.level)} observed {decimal_str(trig.observed)}"))
            summary.duration_s = round(time.monotonic() - started, 4)
            return summary
        try:
            context = CloseContext.fetch(exchange, {w.symbol for w, _, _ in triggered})
        except (RateLimited, ExchangeUnavailable, ClockSkew) as exc:
            raise PassError(f"balances or filters unavailable: {exc}") from exc
        summary.exchange_requests += 2
        for w, trig, quote in triggered:
            for decision in isolated(w.operation_id, w.symbol, None, lambda: close_triggered(
                    w.operation_id, trig, quote, exchange, context, now=now, source=source, engine=engine)):
                record(decision)
    summary.duration_s = round(time.monotonic() - started, 4)
    return summary


@contextmanager
def _always():
    yield True


def isolated(operation_id: int, symbol: str | None, token: str | None, work: Callable[[], list]) -> list[Decision]:
    """Run one operation's work so that its failure cannot stop the pass for the others.

    A :class:`ConcurrencyConflict` is another writer winning (skipped); :class:`PassError`
    still ends the pass (the exchange is unusable for everyone); any other exception —
    a bug, bad data, a database error — is logged with its traceback and reported as an
    ``error`` decision, and the pass goes on with the next operation. Whatever was not
    committed was rolled back; a SUBMITTED execution is reconciled by a later pass.
    """
    try:
        return work()
    except ConcurrencyConflict as exc:
        return [Decision("skipped", operation_id, symbol=symbol, execution_token=token,
                         reason="CONCURRENT_WRITER", detail=str(exc))]
    except PassError:
        raise
    except Exception as exc:  # noqa: BLE001 - one operation must not unprotect the others
        log.exception("close of one operation failed", extra={"operation_id": operation_id, "symbol": symbol,
                                                              "execution_token": token})
        return [Decision("error", operation_id, symbol=symbol, execution_token=token, reason=type(exc).__name__,
                         detail=str(exc)[:300])]


INVALID_SYMBOL = -1121


def fetch_quotes(exchange, symbols: list[str]) -> tuple[dict[str, Quote], int]:
    """Best bid/ask for ``symbols`` in one request (invariant 9); returns quotes and requests made.

    Binance refuses the whole bulk request with -1121 when one symbol is unknown (delisted,
    renamed). Rather than leave every position unprotected, the pass then asks symbol by
    symbol once; the unknown ones are simply absent (their operations get MISSING_PRICE).
    Raises :class:`PassError` when quotes cannot be read at all.
    """
    try:
        return exchange.book_tickers(symbols), 1
    except ExchangeUnavailable as exc:
        if exc.code != INVALID_SYMBOL or len(symbols) == 1:
            raise PassError(f"best bid/ask unavailable for {len(symbols)} symbols: {exc}") from exc
        first_error = exc
    except (RateLimited, ClockSkew) as exc:
        raise PassError(f"best bid/ask unavailable for {len(symbols)} symbols: {exc}") from exc
    log.warning("bulk book ticker refused with -1121; asking symbol by symbol",
                extra={"symbols": len(symbols), "error": str(first_error)[:200]})
    quotes: dict[str, Quote] = {}
    requests = 1
    for symbol in symbols:
        requests += 1
        try:
            quotes.update(exchange.book_tickers([symbol]))
        except ExchangeUnavailable as exc:
            if exc.code != INVALID_SYMBOL:
                raise PassError(f"best bid/ask unavailable for {symbol}: {exc}") from exc
        except (RateLimited, ClockSkew) as exc:
            raise PassError(f"best bid/ask unavailable for {symbol}: {exc}") from exc
    return quotes, requests


# --------------------------------------------------------------------------------------
# Closing one operation
# --------------------------------------------------------------------------------------


@dataclass
class CloseContext:
    """What a close needs from the exchange, fetched once per pass: free balances (None = not
    limiting) and symbol filters. Balances are decremented locally as closes fill."""

    balances: dict[str, Decimal] | None
    filters: dict

    @classmethod
    def fetch(cls, exchange, symbols) -> "CloseContext":
        filters = exchange.symbol_filters(sorted(symbols))
        balances = exchange.free_balances()
        return cls(balances, filters)

    def available(self, symbol: str, closing: str, price: Decimal, assets: tuple[str, str] | None = None) -> Decimal | None:
        """What the close can spend, in the base asset: free base for a SELL, free quote / price
        for a BUY. ``assets`` (base, quote) from our Symbol row stands in when the exchange gave
        no filters for the symbol."""
        if self.balances is None:
            return None
        f = self.filters.get(symbol)
        base, quote = (f.base_asset, f.quote_asset) if f else (assets or (None, None))
        if base is None:
            return None
        if closing == "SELL":
            return self.balances.get(base, Decimal("0"))
        quote_free = self.balances.get(quote, Decimal("0"))
        return quote_free / price if price > 0 else Decimal("0")

    def spend(self, symbol: str, closing: str, qty: Decimal, price: Decimal) -> None:
        if self.balances is None or symbol not in self.filters:
            return
        f = self.filters[symbol]
        if closing == "SELL":
            self.balances[f.base_asset] = self.balances.get(f.base_asset, Decimal("0")) - qty
        else:
            self.balances[f.quote_asset] = self.balances.get(f.quote_asset, Decimal("0")) - qty * price


def _tenant_config(client_id: int, lock: bool):
    from api.models import TenantConfig

    if lock:  # the row is the tenant's mutex for the rate limit: create it so there is one to lock
        cfg, _ = TenantConfig.objects.select_for_update().get_or_create(client_id=client_id)
        return cfg
    return TenantConfig.objects.filter(client_id=client_id).first() or TenantConfig(client_id=client_id)


def _breaker(symbol: str, lock: bool):
    from api.models import CircuitBreakerState

    if lock:
        row, _ = CircuitBreakerState.objects.select_for_update().get_or_create(symbol=symbol)
        return row
    return CircuitBreakerState.objects.filter(symbol=symbol).first() or CircuitBreakerState(symbol=symbol)


def _breaker_domain(row) -> g.BreakerState:
    return g.BreakerState(row.state, row.failure_count, row.opened_at, row.retry_at, row.last_error)


def _save_breaker(row, state: g.BreakerState) -> None:
    row.state, row.failure_count, row.opened_at, row.retry_at, row.last_error = (
        state.state, state.failure_count, state.opened_at, state.retry_at, state.last_error
    )
    row.save()


def _already_blocked(last, block: g.Block) -> bool:
    """Invariant 5/6: a block is recorded once — not again while the same block (reason and
    episode key: which kill switch, which breaker opening) is the stream's last event."""
    return (last is not None and last.event_type == BLOCKED and last.payload.get("reason") == block.reason
            and last.payload.get("key", "") == block.key)


def _record_block(op, version: int, last, block: g.Block, trig: Trigger | None, venue: str, source: str,
                  now: datetime) -> Decision:
    """Append one BLOCKED event unless the same block is already the stream's last event.
    Caller holds the operation's row lock inside a transaction."""
    symbol = op.symbol.symbol
    if _already_blocked(last, block):
        return Decision("skipped", op.pk, op.client_id, symbol, reason=block.reason, detail="block already recorded")
    payload = {"reason": block.reason, "detail": block.detail}
    if block.key:
        payload["key"] = block.key
    if trig is not None:
        payload.update(trigger=trig.kind, level=decimal_str(trig.level), observed_price=decimal_str(trig.observed))
    append_events(op, version, [NewEvent(BLOCKED, payload)], source=source, venue=venue, now=now)
    return Decision("blocked", op.pk, op.client_id, symbol, event_type=BLOCKED, reason=block.reason, detail=block.detail)


def _record_block_outside(operation_id: int, block: g.Block, trig, venue: str, source: str, now: datetime) -> Decision:
    from api.models import Operation

    with transaction.atomic():
        op = lock_operation(operation_id)
        version, last = stream_head(op.pk)
        return _record_block(op, version, last, block, trig, venue, source, now)


def _close_in_flight(symbol: str) -> bool:
    from api.models import StopMonitorExecution

    return StopMonitorExecution.objects.filter(symbol=symbol, status__in=("TRIGGERED", "SUBMITTED")).exists()


def _attempts_so_far(operation_id: int) -> int:
    from api.models import StopMonitorEvent

    return StopMonitorEvent.objects.filter(operation_id=operation_id, event_type=STOP_TRIGGERED).count()


def begin_close(operation_id: int, trig: Trigger, quote: Quote, exchange, context: CloseContext, *, now: datetime,
                source: str, engine: EngineSettings) -> tuple[Decision, str | None]:
    """Transaction 1 (invariant 1): lock the operation, re-check the trigger, run the guardrails
    and the close-quantity rule, then append ``STOP_TRIGGERED`` and move it ACTIVE → CLOSING.

    Returns the decision and the execution token (None when nothing was started). A
    ``MANUAL`` trigger skips the level re-check. Commits before returning.
    """
    from api.models import Operation, StopMonitorEvent

    with transaction.atomic():
        op = lock_operation(operation_id)
        symbol = op.symbol.symbol
        if op.status != "ACTIVE":
            return Decision("skipped", op.pk, op.client_id, symbol, reason="NOT_ACTIVE",
                            detail=f"status {op.status}: another closer holds it"), None
        if trig.kind != MANUAL:
            # re-check under the lock: the levels may have moved since the pass loaded them; act on
            # what is crossed now (a stop moved to another crossed level still closes this pass)
            again = evaluate_trigger(op.side, op.stop_price, op.target_price, quote.bid, quote.ask)
            if again is None:
                return Decision("skipped", op.pk, op.client_id, symbol, reason="LEVEL_MOVED",
                                detail="no level is crossed after the stop or target moved"), None
            trig = again
        version, last = stream_head(op.pk)
        cfg = _tenant_config(op.client_id, lock=True)
        closing = close_side(op.side)
        observed = quote.bid if closing == "SELL" else quote.ask

        block = g.kill_switch(cfg.kill_switch, cfg.kill_switch_reason, cfg.kill_switch_at)
        breaker_row = _breaker(symbol, lock=True)
        breaker_state, breaker_block = g.breaker_allows(_breaker_domain(breaker_row), now)
        if breaker_block is None and breaker_row.state == "HALF_OPEN" and _close_in_flight(symbol):
            breaker_block = g.Block(g.CIRCUIT_BREAKER, "circuit half-open: the trial close is still in flight")
        block = block or breaker_block
        if block is None:
            recent = StopMonitorEvent.objects.filter(
                tenant_id=op.client_id, event_type=STOP_TRIGGERED, created_at__gt=now - timedelta(hours=1)
            ).values_list("created_at", flat=True)
            recent = list(recent)
            last_minute = sum(1 for t in recent if t > now - timedelta(minutes=1))
            block = g.rate_limit(last_minute, len(recent), cfg.max_executions_per_minute, cfg.max_executions_per_hour)
        slip = None
        if block is None and trig.kind != MANUAL:
            slip = g.check_slippage(closing, trig.level, observed, Decimal(cfg.max_slippage_pct), cfg.slippage_action)
            block = slip.block
        f = context.filters.get(symbol)
        qty = None
        if block is None:
            qty = close_quantity(
                op.remaining_quantity,
                context.available(symbol, closing, observed, (op.symbol.base_asset, op.symbol.quote_asset)),
                (f.market_step_size or f.step_size) if f else op.symbol.step_size,
                (f.market_min_qty or f.min_qty) if f else op.symbol.min_qty,
                f.min_notional if f else op.symbol.min_notional,
                observed,
                (f.market_max_qty or f.max_qty) if f else None,
            )
            if qty.blocked_reason:
                block = g.Block(qty.blocked_reason, qty.detail)
        if block is not None:
            return _record_block(op, version, last, block, trig, exchange.venue, source, now), None

        attempt = _attempts_so_far(op.pk) + 1
        token = execution_token(op.pk, trig.kind, trig.level, attempt)
        payload = {
            "trigger": trig.kind,
            "level": decimal_str(trig.level),
            "observed_price": decimal_str(observed),
            "bid": decimal_str(quote.bid),
            "ask": decimal_str(quote.ask),
            "quote_time": quote.observed_at.isoformat(),
            **({"price_time": quote.source_time.isoformat()} if quote.source_time else {}),
            "close_side": closing,
            "quantity": decimal_str(qty.quantity),
            "remaining_before": decimal_str(op.remaining_quantity),
            "attempt": attempt,
        }
        events = [NewEvent(STOP_TRIGGERED, payload, token)]
        if slip is not None:
            payload["observed_slippage_pct"] = decimal_str(slip.pct)
            if slip.breach:
                events.append(NewEvent(GUARD_WARNING, {
                    "reason": g.SLIPPAGE_BREACH,
                    "detail": f"observed {observed} is {slip.pct}% past level {trig.level} (max {cfg.max_slippage_pct}%); closing anyway (action warn)",
                }, token))
        if breaker_state.state != breaker_row.state:
            _save_breaker(breaker_row, breaker_state)  # OPEN → HALF_OPEN: this close is the trial
        op.status = "CLOSING"
        op.stop_execution_token = token
        op.last_stop_check_at = now
        op.stop_check_count = (op.stop_check_count or 0) + 1
        op.save(update_fields=["status", "stop_execution_token", "last_stop_check_at", "stop_check_count", "updated_at"])
        append_events(op, version, events, source=source, venue=exchange.venue, now=now)
    context.spend(symbol, closing, qty.quantity, observed)
    return Decision("triggered", op.pk, op.client_id, symbol, token, STOP_TRIGGERED, trig.kind,
                    f"level {decimal_str(trig.level)} observed {decimal_str(observed)} qty {decimal_str(qty.quantity)}"), token


def close_triggered(operation_id: int, trig: Trigger, quote: Quote, exchange, context: CloseContext, *,
                    now: datetime, source: str, engine: EngineSettings) -> list[Decision]:
    """Run the whole close protocol for one crossed level; returns the decisions made."""
    decision, token = begin_close(operation_id, trig, quote, exchange, context, now=now, source=source, engine=engine)
    decisions = [decision]
    if token is not None:
        decisions.extend(submit_and_place(operation_id, token, exchange, now=now, source=source, engine=engine))
    return decisions


@contextmanager
def execution_claim(token: str):
    """Claim one execution for this process while its order is in flight (PostgreSQL
    session-level advisory lock keyed by the client order id; not a row lock).

    Yields False when another process holds it: the order may be on its way, so nobody else
    may ask "does it exist?" and re-send it. A crash releases it with the session. Re-entrant
    within one process. Elsewhere (SQLite: one process) always yields True.
    """
    key = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "big", signed=True)
    with session_lock(key) as acquired:
        yield acquired


def _guard_before_placing(op, now: datetime) -> g.Block | None:
    """Kill switch and circuit breaker, checked again right before an order is sent — a
    reconcile may place an order long after the trigger's guardrails ran (invariant 6)."""
    cfg = _tenant_config(op.client_id, lock=False)
    block = g.kill_switch(cfg.kill_switch, cfg.kill_switch_reason, cfg.kill_switch_at)
    if block is None:
        _, block = g.breaker_allows(_breaker_domain(_breaker(op.symbol.symbol, lock=False)), now)
    return block


def submit_and_place(operation_id: int, token: str, exchange, *, now: datetime, source: str,
                     engine: EngineSettings, resubmit_note: str = "") -> list[Decision]:
    """Transaction 2 then the order (invariants 2 and 3).

    Under the execution's claim (:func:`execution_claim`), commits ``EXECUTION_SUBMITTED``
    (or, with ``resubmit_note``, a ``RECONCILED`` resubmission) only if the execution is still
    where the caller saw it and no kill switch or open breaker holds it (held: ``FAILED``
    with the guard's reason, nothing sent, the operation back to ACTIVE), then places the
    MARKET order with ``newClientOrderId`` = ``token`` outside any transaction, then records
    the outcome.
    """
    with execution_claim(token) as claimed:
        if not claimed:
            return [Decision("skipped", operation_id, execution_token=token, reason="IN_FLIGHT",
                             detail="another process holds this execution's claim")]
        return _submit_and_place(operation_id, token, exchange, now=now, source=source, engine=engine,
                                 resubmit_note=resubmit_note)


def _submit_and_place(operation_id: int, token: str, exchange, *, now: datetime, source: str,
                      engine: EngineSettings, resubmit_note: str) -> list[Decision]:
    from api.models import Operation, StopMonitorExecution

    with transaction.atomic():
        op = lock_operation(operation_id)
        execution = StopMonitorExecution.objects.get(pk=token)
        symbol = op.symbol.symbol
        expected = "SUBMITTED" if resubmit_note else "TRIGGERED"
        if op.status != "CLOSING" or op.stop_execution_token != token or execution.status != expected:
            return [Decision("skipped", op.pk, op.client_id, symbol, token, reason="NOT_OURS",
                             detail=f"execution is {execution.status}, operation {op.status}")]
        version, _ = stream_head(op.pk)
        held = _guard_before_placing(op, now)
        if held is not None:
            payload = {"code": None, "message": held.detail, "reason": held.reason, "definite": True,
                       "placed": False}
            append_events(op, version, [NewEvent(FAILED, payload, token)], source=source, venue=exchange.venue, now=now)
            _release(op)
            return [Decision("failed", op.pk, op.client_id, symbol, token, FAILED, held.reason,
                             f"not sent: {held.detail}")]
        request = OrderRequest(symbol, execution.side, execution.requested_quantity, token)
        if resubmit_note:
            event = NewEvent(RECONCILED, {"found": False, "resubmitted": True, "note": resubmit_note,
                                          "client_order_id": token, "quantity": decimal_str(request.quantity)}, token)
        else:
            event = NewEvent(EXECUTION_SUBMITTED, {
                "client_order_id": token, "symbol": symbol, "side": request.side, "type": "MARKET",
                "quantity": decimal_str(request.quantity),
            }, token)
        append_events(op, version, [event], source=source, venue=exchange.venue, now=now)
    decisions = [Decision("submitted", op.pk, op.client_id, symbol, token, event.event_type, source=source,
                          detail=f"MARKET {request.side} {decimal_str(request.quantity)} client order id {token}")]
    try:
        result = exchange.place_market_order(request)
    except OrderOutcomeUnknown as exc:
        decisions.append(Decision("unknown", op.pk, op.client_id, symbol, token, reason="OUTCOME_UNKNOWN",
                                  detail=str(exc)[:300]))
        return decisions
    except (OrderRejected, ClockSkew, RateLimited) as exc:
        decisions.append(record_failure(operation_id, token, exc, exchange.venue, now=now, source=source, engine=engine))
        return decisions
    decisions.append(record_outcome(operation_id, token, result, exchange.venue, now=now, source=source, engine=engine))
    return decisions


def record_failure(operation_id: int, token: str, exc: ExchangeError, venue: str, *, now: datetime, source: str,
                   engine: EngineSettings) -> Decision:
    """Transaction 3 after a definite refusal: ``FAILED``, the operation back to ACTIVE (a later
    pass may try again with the next attempt), one failure on the symbol's circuit breaker
    (a rate-limit refusal does not count against the symbol)."""
    from api.models import Operation, StopMonitorExecution

    with transaction.atomic():
        op = lock_operation(operation_id)
        execution = StopMonitorExecution.objects.get(pk=token)
        symbol = op.symbol.symbol
        if execution.status not in ("SUBMITTED", "TRIGGERED"):
            return Decision("skipped", op.pk, op.client_id, symbol, token, reason="ALREADY_RECORDED")
        version, _ = stream_head(op.pk)
        reason = "RATE_LIMITED" if isinstance(exc, RateLimited) else ("CLOCK_SKEW" if isinstance(exc, ClockSkew) else "REJECTED")
        payload = {"code": exc.code, "message": str(exc)[:300], "reason": reason, "definite": True}
        append_events(op, version, [NewEvent(FAILED, payload, token)], source=source, venue=venue, now=now)
        _release(op)
        if not isinstance(exc, RateLimited):
            row = _breaker(symbol, lock=True)
            _save_breaker(row, g.breaker_on_failure(_breaker_domain(row), now, engine.breaker_threshold,
                                                    engine.breaker_cooldown_seconds, f"{exc.code}: {exc}"))
    return Decision("failed", op.pk, op.client_id, symbol, token, FAILED, reason, f"code {exc.code}: {exc}"[:300])


def _release(op) -> None:
    """The close is over without closing everything: back to ACTIVE (the rest stays protected)."""
    op.status = "ACTIVE"
    op.stop_execution_token = None
    op.save(update_fields=["status", "stop_execution_token", "updated_at"])


def record_outcome(operation_id: int, token: str, result, venue: str, *, now: datetime, source: str,
                   engine: EngineSettings, reconciled: bool = False) -> Decision:
    """Transaction 3 with the exchange's answer (invariant 4): EXECUTED / PARTIALLY_EXECUTED /
    FAILED (zero fill), the operation's closed quantity and status, the breaker.

    Not final yet (NEW) → nothing recorded, the execution stays SUBMITTED.
    """
    from api.models import Operation, StopMonitorExecution

    with transaction.atomic():
        op = lock_operation(operation_id)
        execution = StopMonitorExecution.objects.get(pk=token)
        symbol = op.symbol.symbol
        if execution.status not in ("SUBMITTED",):
            return Decision("skipped", op.pk, op.client_id, symbol, token, reason="ALREADY_RECORDED",
                            detail=f"execution is {execution.status}")
        outcome = decide_outcome(token, execution.requested_quantity, execution.trigger_price, result)
        if outcome.event is None:
            return Decision("unknown", op.pk, op.client_id, symbol, token, reason="NOT_FINAL",
                            detail=f"order status {result.status}")
        version, _ = stream_head(op.pk)
        events = []
        if reconciled:
            events.append(NewEvent(RECONCILED, {"found": True, "exchange_status": result.status,
                                                "order_id": result.exchange_order_id}, token))
        events.append(outcome.event)
        op.closed_quantity = (op.closed_quantity or Decimal("0")) + outcome.closed_qty
        closed = op.remaining_quantity <= 0
        if closed:
            events.append(NewEvent(OPERATION_CLOSED, {"closed_quantity": decimal_str(op.closed_quantity),
                                                      "execution_token": token}))
            op.status = "CLOSED"
        else:
            op.status = "ACTIVE"
            op.stop_execution_token = None
        op.save(update_fields=["closed_quantity", "status", "stop_execution_token", "updated_at"])
        append_events(op, version, events, source=source, venue=venue, now=now)
        row = _breaker(symbol, lock=True)
        current = _breaker_domain(row)
        new = (g.breaker_on_failure(current, now, engine.breaker_threshold, engine.breaker_cooldown_seconds,
                                    outcome.event.payload.get("message", ""))
               if outcome.failure else g.breaker_on_success(current))
        if new != current:
            _save_breaker(row, new)
    ev = outcome.event
    action = {"EXECUTED": "executed", "PARTIALLY_EXECUTED": "partially_executed", "FAILED": "failed"}[ev.event_type]
    return Decision(action, op.pk, op.client_id, symbol, token, ev.event_type,
                    detail=f"executed {ev.payload.get('executed_qty')} at {ev.payload.get('avg_price')}",
                    extra={"operation_status": op.status})


# --------------------------------------------------------------------------------------
# Reconcile (invariant 7)
# --------------------------------------------------------------------------------------


def reconcile_submitted(exchange, *, now: datetime, source: str, emit: Emit = _noop,
                        engine: EngineSettings | None = None) -> int:
    """Resolve executions left TRIGGERED or SUBMITTED for longer than ``reconcile_after_seconds``.

    TRIGGERED (crash before the submission was committed: no order can exist) → submitted
    and placed now. SUBMITTED → asked by ``origClientOrderId``: found and final → its fills
    are recorded (no second order); not found (-2013) → claimed with a ``RECONCILED``
    resubmission and placed once with the same client order id. Returns how many it handled.
    """
    from api.models import StopMonitorExecution

    engine = engine or EngineSettings.from_settings()
    cutoff = now - timedelta(seconds=engine.reconcile_after_seconds)
    pending = list(
        StopMonitorExecution.objects.filter(status__in=("TRIGGERED", "SUBMITTED"), updated_at__lte=cutoff)
        .order_by("created_at")
        .values_list("execution_token", "operation_id", "symbol", "status", "last_version")
    )
    handled = 0
    for token, operation_id, symbol, status, last_version in pending:
        if status == "TRIGGERED":
            decisions = isolated(operation_id, symbol, token, lambda: submit_and_place(
                operation_id, token, exchange, now=now, source=source, engine=engine))
        else:
            decisions = isolated(operation_id, symbol, token, lambda: _reconcile_one(
                operation_id, token, symbol, last_version, exchange, now, source, engine))
        for d in decisions:
            if d.action in ("executed", "partially_executed", "failed", "submitted"):
                d.extra = {**d.extra, "reconciled": True}
            emit(d)
        handled += 1
    return handled


def _reconcile_one(operation_id, token, symbol, last_version, exchange, now, source, engine) -> list[Decision]:
    with execution_claim(token) as claimed:
        if not claimed:  # its order is in flight in another process: not ours to ask about or re-send
            return [Decision("skipped", operation_id, symbol=symbol, execution_token=token, reason="IN_FLIGHT",
                             detail="another process holds this execution's claim")]
        return _reconcile_claimed(operation_id, token, symbol, exchange, now, source, engine)


def _reconcile_claimed(operation_id, token, symbol, exchange, now, source, engine) -> list[Decision]:
    try:
        order = exchange.get_order(symbol, token)
    except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
        return [Decision("unknown", operation_id, symbol=symbol, execution_token=token, reason="RECONCILE_DEFERRED",
                         detail=str(exc)[:300])]
    if order is not None:
        outcome = record_outcome(operation_id, token, order, exchange.venue, now=now, source=source, engine=engine,
                                 reconciled=True)
        if outcome.reason == "NOT_FINAL":
            return [outcome, *_warn_if_stuck(operation_id, token, order.status, exchange.venue, now, source)]
        if outcome.action == "skipped":
            return [outcome]
        return [Decision("reconciled", operation_id, symbol=symbol, execution_token=token, event_type=RECONCILED,
                         detail=f"order found: {order.status}"), outcome]
    return submit_and_place(operation_id, token, exchange, now=now, source=source, engine=engine,
                            resubmit_note="no order with this client order id at the exchange (-2013); placing it once")


STUCK_AFTER = timedelta(minutes=10)


def _warn_if_stuck(operation_id: int, token: str, status: str, venue: str, now: datetime, source: str) -> list[Decision]:
    """An order the exchange still reports as not final after :data:`STUCK_AFTER` holds its
    operation in CLOSING: say so once with ``GUARD_WARNING`` ``STUCK_SUBMITTED`` (an operator
    must look: the position cannot be moved or closed meanwhile)."""
    from api.models import Operation, StopMonitorExecution

    with transaction.atomic():
        op = lock_operation(operation_id)
        execution = StopMonitorExecution.objects.get(pk=token)
        if execution.status != "SUBMITTED" or not execution.submitted_at or now - execution.submitted_at < STUCK_AFTER:
            return []
        version, last = stream_head(op.pk)
        if last is not None and last.event_type == GUARD_WARNING and last.payload.get("reason") == "STUCK_SUBMITTED":
            return []
        detail = f"order {token} still {status} at the exchange since {execution.submitted_at.isoformat()}"
        append_events(op, version, [NewEvent(GUARD_WARNING, {"reason": "STUCK_SUBMITTED", "detail": detail,
                                                             "exchange_status": status}, token)],
                      source=source, venue=venue, now=now)
    return [Decision("blocked", operation_id, op.client_id, op.symbol.symbol, token, GUARD_WARNING, "STUCK_SUBMITTED",
                     detail)]


# --------------------------------------------------------------------------------------
# Manual close (API, admin)
# --------------------------------------------------------------------------------------


def close_operation(operation_id: int, exchange, *, source: str = "api", now: datetime | None = None,
                    engine: EngineSettings | None = None) -> list[Decision]:
    """Close an operation now at market (the API's and the admin's "close now").

    Same protocol and guarantees as the monitor: if the monitor (or another request) is
    already closing it, this returns a ``skipped`` decision and places nothing. Raises
    :class:`PassError` when the quote, balances or filters cannot be read.
    """
    from api.models import Operation

    engine = engine or EngineSettings.from_settings()
    now = now or exchange_now(exchange)
    op = Operation.objects.select_related("symbol").get(pk=operation_id)
    symbol = op.symbol.symbol
    try:
        quote = exchange.book_tickers([symbol]).get(symbol)
        context = CloseContext.fetch(exchange, {symbol})
    except (RateLimited, ExchangeUnavailable, ClockSkew) as exc:
        raise PassError(f"cannot close {symbol} now: {exc}") from exc
    problem = g.quote_problem(quote, now, engine.quote_max_age_seconds)
    if problem is not None:
        return [_record_block_outside(operation_id, problem, None, exchange.venue, source, now)]
    closing = close_side(op.side)
    observed = quote.bid if closing == "SELL" else quote.ask
    trig = Trigger(MANUAL, op.stop_price or observed, observed)
    from stopmonitor import metrics

    decisions = close_triggered(operation_id, trig, quote, exchange, context, now=now, source=source, engine=engine)
    for decision in decisions:  # the same one JSON line per decision as a pass writes
        decision.source = decision.source or source
        metrics.observe_decision(decision, log=True)
    return decisions
