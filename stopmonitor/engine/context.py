"""What every engine step carries: the settings and the frozen context of one run (now, source, venue)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable

from django.conf import settings


@dataclass(frozen=True)
class EngineSettings:
    """Engine knobs (``settings.STOPMONITOR``)."""

    quote_max_age_seconds: int = 10
    reconcile_after_seconds: int = 30
    breaker_threshold: int = 3
    breaker_cooldown_seconds: int = 300
    #: -2013 means "not visible yet" this long after the submit time (issue #12 item 1)
    not_found_window_seconds: int = 60
    #: an unsellable remainder up to this share of the position closes it as dust (item 5)
    fee_dust_tolerance_pct: Decimal = Decimal("1")

    @classmethod
    def from_settings(cls) -> "EngineSettings":
        s = getattr(settings, "STOPMONITOR", {})
        return cls(
            quote_max_age_seconds=s.get("QUOTE_MAX_AGE_SECONDS", 10),
            reconcile_after_seconds=s.get("RECONCILE_AFTER_SECONDS", 30),
            breaker_threshold=s.get("CIRCUIT_BREAKER_THRESHOLD", 3),
            breaker_cooldown_seconds=s.get("CIRCUIT_BREAKER_COOLDOWN_SECONDS", 300),
            not_found_window_seconds=s.get("NOT_FOUND_WINDOW_SECONDS", 60),
            fee_dust_tolerance_pct=Decimal(str(s.get("FEE_DUST_TOLERANCE_PCT", 1))),
        )


@dataclass(frozen=True)
class EngineContext:
    """One run of the engine (a pass, a manual close): the time it decides at (UTC), the
    ``source`` and ``venue`` every appended event records, and the engine settings."""

    now: datetime
    source: str
    venue: str
    settings: EngineSettings = field(default_factory=EngineSettings)
    clock: Callable[[], datetime] | None = None

    @classmethod
    def build(cls, exchange, *, source: str, now: datetime | None = None,
              engine: EngineSettings | None = None) -> "EngineContext":
        """The context for a run on ``exchange``: ``now`` defaults to the venue's clock."""
        return cls(now or exchange_now(exchange), source, exchange.venue, engine or EngineSettings.from_settings(),
                   clock=lambda: exchange_now(exchange))

    def at(self) -> datetime:
        """Now, as each event is appended and each close decided (issue #12 items 7, 8): the
        venue's clock, never earlier than the run's ``now`` (a run told a later ``now`` keeps it)."""
        if self.clock is None:
            return self.now
        return max(self.now, self.clock())


def exchange_now(exchange) -> datetime:
    """The venue's clock (replay time for replay), else the wall clock, UTC."""
    clock = getattr(exchange, "clock", None)
    return clock() if callable(clock) else datetime.now(timezone.utc)
