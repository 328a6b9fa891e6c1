"""Guardrails as pure functions: kill switch, circuit breaker, quote sanity, slippage, rate limit.

Each returns a :class:`Block` (reason code + human detail) or None; the service turns a
Block into one ``BLOCKED`` event (invariant 6: guardrails speak through events). Times are
timezone-aware UTC; prices in the quote asset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from stopmonitor.rules import slippage_pct

class BlockReason(StrEnum):
    """Why a guardrail holds a trigger (the ``reason`` of a ``BLOCKED`` event, invariant 6);
    the close-quantity reasons come from :func:`stopmonitor.rules.close_quantity`."""

    KILL_SWITCH = "KILL_SWITCH"
    CIRCUIT_BREAKER = "CIRCUIT_BREAKER"
    STALE_PRICE = "STALE_PRICE"
    MISSING_PRICE = "MISSING_PRICE"
    INVALID_PRICE = "INVALID_PRICE"
    SLIPPAGE_BREACH = "SLIPPAGE_BREACH"
    RATE_LIMITED = "RATE_LIMITED"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    BELOW_MIN_QTY = "BELOW_MIN_QTY"
    BELOW_MIN_NOTIONAL = "BELOW_MIN_NOTIONAL"
    STUCK_SUBMITTED = "STUCK_SUBMITTED"
    SYMBOL_STATUS = "SYMBOL_STATUS"  # HALT / BREAK / CANCEL_ONLY: Binance takes no new order
    NEEDS_REVIEW = "NEEDS_REVIEW"  # contradictory exchange evidence: a human decides, no new order
    SHORTFALL = "SHORTFALL"  # free balance well below the position: what is there is sold, recorded once
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"  # the operation's exchange account is disabled (issue #20)
    ACCOUNT_UNAVAILABLE = "ACCOUNT_UNAVAILABLE"  # its balances cannot be read (refused key, undecryptable secret)


KILL_SWITCH, CIRCUIT_BREAKER, STALE_PRICE, MISSING_PRICE, INVALID_PRICE, SLIPPAGE_BREACH, RATE_LIMITED = (
    BlockReason.KILL_SWITCH, BlockReason.CIRCUIT_BREAKER, BlockReason.STALE_PRICE, BlockReason.MISSING_PRICE,
    BlockReason.INVALID_PRICE, BlockReason.SLIPPAGE_BREACH, BlockReason.RATE_LIMITED)
PROTECTION_STAYS = " (exchange-held protection, if any, stays resting)"


@dataclass(frozen=True)
class Block:
    """Why a trigger is held back: ``reason`` (a code above or a close-quantity reason) and ``detail``."""

    reason: str
    detail: str
    key: str = ""  # the episode (which kill switch, which breaker opening): a new one is recorded again


def kill_switch(enabled: bool, reason: str, since: datetime | None = None) -> Block | None:
    """Tenant kill switch: while on, no close is placed for the tenant. ``since`` (when it was
    switched on) and the reason identify the episode."""
    if enabled:
        key = f"{since.isoformat() if since else ''}|{reason}"
        # halt is not flatten (protection.md P7): the exchange-held stops keep resting
        return Block(KILL_SWITCH, f"kill switch on: {reason or 'no reason given'}{PROTECTION_STAYS}", key)
    return None


def quote_problem(quote, now: datetime, max_age_seconds: int) -> Block | None:
    """Reject a missing quote, a zero/negative/crossed one, or one older than ``max_age_seconds``."""
    if quote is None:
        return Block(MISSING_PRICE, "no best bid/ask for the symbol in this pass")
    if quote.bid is None or quote.ask is None or quote.bid <= 0 or quote.ask <= 0:
        return Block(INVALID_PRICE, f"unusable quote bid={quote.bid} ask={quote.ask}")
    if quote.bid > quote.ask:
        return Block(INVALID_PRICE, f"crossed quote bid={quote.bid} > ask={quote.ask}")
    age = (now - quote.observed_at).total_seconds()
    if age > max_age_seconds:
        return Block(STALE_PRICE, f"quote is {age:.1f}s old (max {max_age_seconds}s)")
    return None


@dataclass(frozen=True)
class SlippageCheck:
    """Pre-trade slippage of the observed price against the trigger level: ``pct`` (adverse, %),
    ``breach`` when over the tenant's limit, and ``block`` when the tenant's action is block."""

    pct: Decimal
    breach: bool
    block: Block | None


def check_slippage(closing_side: str, level: Decimal, observed: Decimal, max_pct: Decimal, action: str) -> SlippageCheck:
    """Tenant slippage guard. ``action`` ``warn`` (default: close anyway, record the breach —
    holding a stop-loss back usually loses more) or ``block``."""
    pct = slippage_pct(closing_side, level, observed)
    breach = pct > max_pct
    block = None
    if breach and action == "block":
        block = Block(SLIPPAGE_BREACH, f"observed {observed} is {pct}% past level {level} (max {max_pct}%)")
    return SlippageCheck(pct, breach, block)


def rate_limit(executions_last_minute: int, executions_last_hour: int, per_minute: int, per_hour: int) -> Block | None:
    """Per-tenant execution rate limit: counts are STOP_TRIGGERED events in the trailing minute/hour."""
    if per_minute and executions_last_minute >= per_minute:
        return Block(RATE_LIMITED, f"{executions_last_minute} executions in the last minute (max {per_minute})")
    if per_hour and executions_last_hour >= per_hour:
        return Block(RATE_LIMITED, f"{executions_last_hour} executions in the last hour (max {per_hour})")
    return None


@dataclass(frozen=True)
class BreakerState:
    """Per-symbol circuit breaker: CLOSED → OPEN after ``threshold`` consecutive failures →
    HALF_OPEN when ``retry_at`` has passed (one trial) → CLOSED on success, OPEN on failure."""

    state: str = "CLOSED"
    failure_count: int = 0
    opened_at: datetime | None = None
    retry_at: datetime | None = None
    last_error: str = ""


def breaker_allows(b: BreakerState, now: datetime) -> tuple[BreakerState, Block | None]:
    """Whether a close may go through now; returns the (possibly HALF_OPEN) state and a Block."""
    if b.state == "OPEN":
        if b.retry_at is not None and now >= b.retry_at:
            return replace(b, state="HALF_OPEN"), None
        return b, Block(
            CIRCUIT_BREAKER,
            f"circuit open after {b.failure_count} consecutive failures until {b.retry_at.isoformat() if b.retry_at else '?'}: {b.last_error}",
            b.opened_at.isoformat() if b.opened_at else "",
        )
    return b, None


def breaker_on_failure(b: BreakerState, now: datetime, threshold: int, cooldown_seconds: int, error: str) -> BreakerState:
    """Count one failed close; open (or re-open from HALF_OPEN) when the threshold is reached."""
    count = b.failure_count + 1
    if b.state == "HALF_OPEN" or count >= threshold:
        return BreakerState("OPEN", count, now, now + timedelta(seconds=cooldown_seconds), error[:300])
    return replace(b, failure_count=count, last_error=error[:300])


def breaker_on_success(b: BreakerState) -> BreakerState:
    """A close reached the exchange and filled: back to CLOSED with no failures."""
    return BreakerState()
