"""The engine's words as ``StrEnum`` (plain Python): statuses, skip reasons, failure reasons.

``api.models``' ``TextChoices`` hold the same values (a test compares them); engine code uses these.
"""

from __future__ import annotations

from enum import StrEnum


class OperationStatus(StrEnum):
    """``PLANNED → ACTIVE → CLOSING → CLOSED`` (or ``CANCELLED``), stop-execution.md "Vocabulary"."""

    PLANNED = "PLANNED"
    ACTIVE = "ACTIVE"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"
    CANCELLED = "CANCELLED"


class ExecutionStatus(StrEnum):
    """``TRIGGERED → SUBMITTED → EXECUTED | PARTIALLY_EXECUTED | FAILED`` (invariant 3: unknown stays SUBMITTED)."""

    TRIGGERED = "TRIGGERED"
    SUBMITTED = "SUBMITTED"
    EXECUTED = "EXECUTED"
    PARTIALLY_EXECUTED = "PARTIALLY_EXECUTED"
    FAILED = "FAILED"


class BreakerPosition(StrEnum):
    """A per-symbol circuit breaker's position: CLOSED (closes flow), OPEN (held), HALF_OPEN (one trial)."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class SkipReason(StrEnum):
    """Why a decision is ``skipped`` or ``unknown`` (nothing appended by this process)."""

    CONCURRENT_WRITER = "CONCURRENT_WRITER"
    NOT_ACTIVE = "NOT_ACTIVE"
    LEVEL_MOVED = "LEVEL_MOVED"
    NOT_OURS = "NOT_OURS"
    IN_FLIGHT = "IN_FLIGHT"
    ALREADY_RECORDED = "ALREADY_RECORDED"
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"
    NOT_FINAL = "NOT_FINAL"
    RECONCILE_DEFERRED = "RECONCILE_DEFERRED"
    NOT_VISIBLE_YET = "NOT_VISIBLE_YET"  # -2013 inside the window counted from the submit time (issue #12)
    LOCKED = "LOCKED"  # the operation's row is held elsewhere past the lock timeout: next pass


class FailureReason(StrEnum):
    """Why an order was definitely refused (the ``reason`` of a ``FAILED`` event; a new attempt is allowed)."""

    REJECTED = "REJECTED"
    RATE_LIMITED = "RATE_LIMITED"
    CLOCK_SKEW = "CLOCK_SKEW"
    SYMBOL_STATUS = "SYMBOL_STATUS"  # -2010 and the symbol is HALT/BREAK/CANCEL_ONLY: nothing was placed
