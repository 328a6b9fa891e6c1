"""The ``--loop`` of the long-running commands (``monitor_stops --loop``, ``publish_outbox --loop``):
SIGTERM/SIGINT end it after the current unit of work, waits are interruptible, an optional count
stops it. One place for what both loops did in their own ``handle``.
"""

from __future__ import annotations

import signal
import time


class Loop:
    """``for n in Loop(enabled, max_runs): ...`` runs the body once (``enabled`` False) or until a
    signal or ``max_runs`` (0 = no limit). ``wait(seconds)`` sleeps in 0.1 s slices, returning at
    once on a signal. The signal handlers are installed only when ``enabled``."""

    def __init__(self, enabled: bool, max_runs: int = 0, *, slice_seconds: float = 0.1):
        self.enabled, self.max_runs, self.slice = enabled, max_runs, slice_seconds
        self.stopped = False
        self.runs = 0
        if enabled:
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum, frame) -> None:
        self.stopped = True

    @property
    def last(self) -> bool:
        """The current run is the last one (no loop, a signal came, or the count is reached)."""
        return not self.enabled or self.stopped or bool(self.max_runs and self.runs + 1 >= self.max_runs)

    def __iter__(self):
        while True:
            yield self.runs
            last = self.last
            self.runs += 1
            if last:
                return

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (wall clock) unless a signal comes first."""
        deadline = time.monotonic() + seconds
        while not self.stopped and time.monotonic() < deadline:
            time.sleep(min(self.slice, max(0.0, deadline - time.monotonic())))
