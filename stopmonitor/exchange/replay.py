"""Replay exchange: recorded real Binance candles played as a bid/ask path (venue ``paper``).

Each 1-minute candle becomes four observations: open → low → high → close for a bullish
candle (close ≥ open) and open → high → low → close for a bearish one, 15 s apart. The bid
is the path price, the ask one price step above it (the file's own precision: 0.01 for
BTCUSDT 2018, 0.00001 for ADAUSDT 2020). Files of different dates are aligned on one replay
clock starting at the first file's first candle; each quote keeps its real candle time in
:attr:`ReplayExchange.market_time`. Orders fill through :class:`PaperExchange`; resting stops
trigger on the replayed price and fill at the next observation (the paper exchange's model).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from stopmonitor.exchange.base import Quote
from stopmonitor.exchange.paper import DATA_DIR, PaperExchange

DEFAULT_FILES = {
    "BTCUSDT": DATA_DIR / "binance_BTC-USDT_1m_2018-04.csv",
    "ADAUSDT": DATA_DIR / "binance_ADA-USDT_1m_2020-04.csv",
}
POINT_SECONDS = 15


@dataclass(frozen=True)
class PathPoint:
    """One observation of the replay: real candle open time, which OHLC leg, and the price."""

    candle_time: datetime
    leg: str
    price: Decimal


def candle_path(open_: Decimal, high: Decimal, low: Decimal, close: Decimal) -> list[tuple[str, Decimal]]:
    """The intra-candle path: bullish O→L→H→C, bearish O→H→L→C."""
    if close >= open_:
        return [("open", open_), ("low", low), ("high", high), ("close", close)]
    return [("open", open_), ("high", high), ("low", low), ("close", close)]


def load_path(path: Path) -> tuple[list[PathPoint], Decimal]:
    """Read a kline CSV (``open_time_ms,open_time_utc,open,high,low,close,volume``) into its
    path points and the price step of the file (smallest decimal place used)."""
    points: list[PathPoint] = []
    decimals = 0
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            t = datetime.fromtimestamp(int(row["open_time_ms"]) / 1000, tz=timezone.utc)
            values = {k: row[k] for k in ("open", "high", "low", "close")}
            for text in values.values():
                if "." in text:
                    decimals = max(decimals, len(text.split(".")[1]))
            o, h, l, c = (Decimal(values[k]) for k in ("open", "high", "low", "close"))
            for leg, price in candle_path(o, h, l, c):
                points.append(PathPoint(t, leg, price))
    return points, Decimal(1).scaleb(-decimals)


class ReplayExchange(PaperExchange):
    """Plays recorded prices; :meth:`advance` moves every symbol one path point forward.

    ``cursor`` is the index of the current point (0-based); ``cursor_store`` (optional, e.g.
    Django's cache) makes the position survive between one-pass processes.
    """

    venue = "paper"

    def __init__(self, files: dict[str, Path] | None = None, cursor: int = 0, cursor_store=None, **kwargs):
        super().__init__(**kwargs)
        self.paths: dict[str, list[PathPoint]] = {}
        self.steps: dict[str, Decimal] = {}
        for symbol, path in (files or DEFAULT_FILES).items():
            self.paths[symbol], self.steps[symbol] = load_path(Path(path))
        # the recordings are older than today's filters: ADAUSDT traded on a 0.00001 tick in
        # 2020 (0.0001 now), so the replay uses each file's own price step as the tickSize
        for symbol, step in self.steps.items():
            if symbol in self.filters and self.filters[symbol].tick_size > step:
                self.filters[symbol] = replace(self.filters[symbol], tick_size=step)
        self.epoch = min(points[0].candle_time for points in self.paths.values())
        self.cursor_store = cursor_store
        if cursor_store is not None:
            cursor = int(cursor_store.get("stopmonitor:replay:cursor", cursor))
        self.cursor = cursor
        self._publish()

    @property
    def length(self) -> int:
        """Number of path points of the shortest file (the replay ends there)."""
        return min(len(p) for p in self.paths.values())

    def clock(self) -> datetime:
        """Now, UTC: events and executions are stamped with real time; the recorded candle's time
        travels as each quote's ``source_time`` (and ``price_time`` in ``STOP_TRIGGERED``)."""
        return self._now or datetime.now(timezone.utc)

    def replay_time(self) -> datetime:
        """Position in the recording on one common clock: the epoch plus 15 s per path point."""
        return self.epoch + timedelta(seconds=POINT_SECONDS * self.cursor)

    @property
    def at_end(self) -> bool:
        """True when the last recorded observation is being played."""
        return self.cursor + 1 >= self.length

    def market_time(self, symbol: str) -> datetime:
        """Real candle open time (UTC) of the current point of ``symbol``."""
        return self.paths[symbol][self.cursor].candle_time

    def point(self, symbol: str) -> PathPoint:
        return self.paths[symbol][self.cursor]

    def advance(self) -> bool:
        """Move one point forward; False (and no move) at the end of the recording."""
        if self.cursor + 1 >= self.length:
            return False
        self.cursor += 1
        self._publish()
        if self.cursor_store is not None:
            self.cursor_store.set("stopmonitor:replay:cursor", self.cursor, timeout=None)
        return True

    def _publish(self) -> None:
        now = self.clock()
        for symbol, points in self.paths.items():
            point = points[min(self.cursor, len(points) - 1)]
            offset = timedelta(seconds=POINT_SECONDS * (self.cursor % 4))
            step = self.steps[symbol]
            self.quotes[symbol] = Quote(symbol, point.price, point.price + step, Decimal("1000000"), Decimal("1000000"),
                                        now, source_time=point.candle_time + offset)
            self.observe_last_price(symbol, point.price)  # resting stops trigger on the replayed trade

    def book_tickers(self, symbols):
        """The current recorded observation, stamped as observed now (a one-pass process reads it fresh)."""
        now = self.clock()
        self.quotes = {s: replace(q, observed_at=now) for s, q in self.quotes.items()}
        return super().book_tickers(symbols)
