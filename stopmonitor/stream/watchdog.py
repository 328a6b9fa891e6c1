"""Which symbols the stream may be trusted for, and which fall back to REST polling. Pure.

A feed that connects and stays silent is a failure (issue #15: the successor's feed was
connected and mute for 1 h 50 min). A symbol with no message for ``silence_seconds`` goes to
*fallback*: the REST poller reads it. It comes back only after the stream has delivered for
it for ``hold_down_seconds`` without another silence. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Feed:
    last_message: float
    fallback: bool = False
    resumed_at: float | None = None  # first message after the last silence, while in fallback


@dataclass
class Watchdog:
    silence_seconds: float
    hold_down_seconds: float
    feeds: dict[str, _Feed] = field(default_factory=dict)

    def watch(self, symbols: set[str], now: float) -> None:
        """Follow exactly ``symbols``; a new one counts as heard ``now`` (its subscription starts)."""
        for s in set(self.feeds) - symbols:
            del self.feeds[s]
        for s in symbols - set(self.feeds):
            self.feeds[s] = _Feed(now)

    def heard(self, symbol: str, now: float) -> None:
        """A stream message for ``symbol`` arrived."""
        feed = self.feeds.get(symbol)
        if feed is None:
            return
        if feed.fallback:
            if feed.resumed_at is None or now - feed.last_message > self.silence_seconds:
                feed.resumed_at = now
            elif now - feed.resumed_at >= self.hold_down_seconds:
                feed.fallback, feed.resumed_at = False, None
        feed.last_message = now

    def check(self, now: float) -> tuple[set[str], set[str]]:
        """Apply the silence rule; returns (symbols that just fell back, symbols in fallback)."""
        fell = set()
        for s, feed in self.feeds.items():
            if now - feed.last_message > self.silence_seconds:
                if not feed.fallback:
                    fell.add(s)
                feed.fallback, feed.resumed_at = True, None
        return fell, self.in_fallback

    def force_fallback(self, symbols: set[str]) -> None:
        """A connection dropped: its symbols are not covered until it delivers again (hold-down)."""
        for s in symbols:
            feed = self.feeds.get(s)
            if feed is not None:
                feed.fallback, feed.resumed_at = True, None

    @property
    def in_fallback(self) -> set[str]:
        return {s for s, f in self.feeds.items() if f.fallback}
