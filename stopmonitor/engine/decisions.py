"""What the engine reports: one :class:`Decision` per operation handled, a :class:`PassSummary`
per pass, and :func:`isolated`, which keeps one operation's failure from stopping the others."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Callable

from stopmonitor.events import ConcurrencyConflict
from stopmonitor.vocabulary import SkipReason

log = logging.getLogger("stopmonitor.engine")


class EngineUnavailable(Exception):
    """The engine could not run — a pass, or a manual close — because the database or the
    exchange is unreachable (quotes, balances or filters unreadable, rate-limit ban). The
    command exits non-zero; the API answers 503. Nothing was appended."""


class Action(StrEnum):
    """What a decision did (the ``action`` of its JSON line)."""

    TRIGGERED = "triggered"
    WOULD_TRIGGER = "would_trigger"
    SUBMITTED = "submitted"
    EXECUTED = "executed"
    PARTIALLY_EXECUTED = "partially_executed"
    FAILED = "failed"
    UNKNOWN = "unknown"
    BLOCKED = "blocked"
    RECONCILED = "reconciled"
    SKIPPED = "skipped"
    STOP_MOVED = "stop_moved"
    ERROR = "error"


@dataclass
class Decision:
    """One engine decision, printed as a JSON line: what happened to which operation and why.
    Build it with keywords."""

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


_SUMMARY_FIELD = {
    Action.TRIGGERED: "triggered", Action.WOULD_TRIGGER: "triggered", Action.EXECUTED: "executed",
    Action.PARTIALLY_EXECUTED: "partially_executed", Action.FAILED: "failed", Action.UNKNOWN: "unknown",
    Action.BLOCKED: "blocked", Action.RECONCILED: "reconciled", Action.SKIPPED: "skipped", Action.ERROR: "errors",
    Action.STOP_MOVED: "stops_moved",
}


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
    stops_moved: int = 0
    errors: int = 0
    exchange_requests: int = 0
    duration_s: float = 0.0
    lock_held_elsewhere: bool = False

    def count(self, decision: Decision) -> None:
        key = _SUMMARY_FIELD.get(decision.action)
        if key:
            setattr(self, key, getattr(self, key) + 1)

    def as_dict(self) -> dict:
        return {"type": "summary", **asdict(self)}


Emit = Callable[[Decision], None]


def noop(_: Decision) -> None:
    """An :data:`Emit` that drops the decision."""


def isolated(operation_id: int, symbol: str | None, token: str | None, work: Callable[[], list]) -> list[Decision]:
    """Run one operation's work so that its failure cannot stop the pass for the others.

    A :class:`ConcurrencyConflict` is another writer winning (skipped); :class:`EngineUnavailable`
    still ends the pass (the exchange is unusable for everyone); any other exception —
    a bug, bad data, a database error — is logged with its traceback and reported as an
    ``error`` decision, and the pass goes on with the next operation. Whatever was not
    committed was rolled back; a SUBMITTED execution is reconciled by a later pass.
    """
    try:
        return work()
    except ConcurrencyConflict as exc:
        return [Decision(Action.SKIPPED, operation_id, symbol=symbol, execution_token=token,
                         reason=SkipReason.CONCURRENT_WRITER, detail=str(exc))]
    except EngineUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one operation must not unprotect the others
        from stopmonitor.dbhealth import is_lock_timeout

        if is_lock_timeout(exc):  # bounded lock wait (issue #12 item 12): take it next pass
            return [Decision(Action.SKIPPED, operation_id, symbol=symbol, execution_token=token,
                             reason=SkipReason.LOCKED, detail="row held by another session past the lock timeout; "
                                                              "next pass")]
        log.exception("close of one operation failed", extra={"operation_id": operation_id, "symbol": symbol,
                                                              "execution_token": token})
        return [Decision(Action.ERROR, operation_id, symbol=symbol, execution_token=token, reason=type(exc).__name__,
                         detail=str(exc)[:300])]
