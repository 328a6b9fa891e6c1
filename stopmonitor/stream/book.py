"""The watched set indexed by symbol, with the extreme levels that let a quote be dismissed in O(1).

Pure (no Django). The pre-check is the trigger rule itself (:func:`stopmonitor.rules.evaluate_trigger`)
applied to the most easily crossed levels of the symbol: the highest long stop and lowest long
target, the lowest short stop and highest short target. The rule is monotonic in the level, so
when those are not crossed no operation of the symbol is, and the per-operation evaluation
(the engine's, in a worker thread) runs only for quotes that may cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable, Protocol

from stopmonitor.rules import BUY, SELL, evaluate_trigger


class WatchedLike(Protocol):
    operation_id: int
    symbol: str
    side: str
    stop_price: Decimal | None
    target_price: Decimal | None


@dataclass(frozen=True)
class SymbolLevels:
    """The operations of one symbol and its extreme levels (None: no such level)."""

    operations: tuple
    long_stop: Decimal | None  # max stop of longs (bid <= it triggers)
    long_target: Decimal | None  # min target of longs (bid >= it triggers)
    short_stop: Decimal | None  # min stop of shorts (ask >= it triggers)
    short_target: Decimal | None  # max target of shorts (ask <= it triggers)

    def may_trigger(self, bid: Decimal, ask: Decimal) -> bool:
        """True when at least one operation of the symbol may be crossed by this bid/ask."""
        if (self.long_stop is not None or self.long_target is not None) and evaluate_trigger(
                BUY, self.long_stop, self.long_target, bid, ask) is not None:
            return True
        return (self.short_stop is not None or self.short_target is not None) and evaluate_trigger(
            SELL, self.short_stop, self.short_target, bid, ask) is not None


def _levels(ops: list) -> SymbolLevels:
    def pick(side, attr, fn):
        values = [getattr(o, attr) for o in ops if o.side == side and getattr(o, attr) is not None]
        return fn(values) if values else None

    return SymbolLevels(tuple(ops), pick(BUY, "stop_price", max), pick(BUY, "target_price", min),
                        pick(SELL, "stop_price", min), pick(SELL, "target_price", max))


class WatchedBook:
    """Symbol → :class:`SymbolLevels`: replaced as a whole (:meth:`replace`) or per changed
    symbol (:meth:`update`) on each reload of the watched set."""

    def __init__(self, watched: Iterable[WatchedLike] = ()) -> None:
        self.by_symbol: dict[str, SymbolLevels] = {}
        self.replace(watched)

    def replace(self, watched: Iterable[WatchedLike]) -> tuple[set[str], set[str]]:
        """Load a new watched set; returns (symbols added, symbols removed)."""
        grouped: dict[str, list] = {}
        for w in watched:
            grouped.setdefault(w.symbol, []).append(w)
        before = set(self.by_symbol)
        self.by_symbol = {s: _levels(ops) for s, ops in grouped.items()}
        after = set(self.by_symbol)
        return after - before, before - after

    def update(self, symbols: Iterable[str], watched: Iterable[WatchedLike]) -> tuple[set[str], set[str]]:
        """Reload only ``symbols`` with ``watched`` (their operations now; a symbol with none
        leaves the book); the other symbols keep theirs. Returns (symbols added, symbols removed)."""
        grouped: dict[str, list] = {s: [] for s in symbols}
        for w in watched:
            grouped.setdefault(w.symbol, []).append(w)
        before = set(self.by_symbol)
        for symbol, ops in grouped.items():
            if ops:
                self.by_symbol[symbol] = _levels(ops)
            else:
                self.by_symbol.pop(symbol, None)
        after = set(self.by_symbol)
        return after - before, before - after

    def drop(self, operation_ids: set[int]) -> None:
        """Forget operations known to be closing or closed until the next reload."""
        for symbol, levels in list(self.by_symbol.items()):
            if any(o.operation_id in operation_ids for o in levels.operations):
                rest = [o for o in levels.operations if o.operation_id not in operation_ids]
                if rest:
                    self.by_symbol[symbol] = _levels(rest)
                else:
                    del self.by_symbol[symbol]

    @property
    def symbols(self) -> set[str]:
        return set(self.by_symbol)

    def __len__(self) -> int:
        return sum(len(v.operations) for v in self.by_symbol.values())
