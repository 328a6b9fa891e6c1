"""Trailing stops and break-even moves: the pure rule that tightens a stop from the prices seen.

Prices are in the quote asset, ``Decimal`` only; no Django, no exchange, no clock. Source: issue
#14 and ``../shared/design/stop-execution.md`` (``STOP_MOVED`` with ``source=trailing`` or
``source=break_even``). The rule is a fold: ``new_stop = max(stop, candidate(price))`` for a long
(``min`` for a short), with every candidate monotone in the price, so the final stop depends only
on the *set* of prices observed — not on their order, nor on duplicates — and never loosens.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

LONG, SHORT = "BUY", "SELL"
TRAILING, BREAK_EVEN = "trailing", "break_even"
_HUNDRED = Decimal(100)
#: the operation's columns holding the settings, in :meth:`TrailingSettings.from_values` order
COLUMNS = ("trail_distance", "trail_distance_percent", "trail_activation_price", "trail_step", "break_even_price",
           "break_even_fee_percent")


@dataclass(frozen=True)
class TrailingSettings:
    """One operation's trailing configuration; every field optional.

    - ``distance``: trail distance in the quote asset (absolute), or
    - ``distance_percent``: trail distance in percent of the best price seen (exactly one of the two
      enables trailing);
    - ``activation_price``: trailing starts only once the observed price has reached it (long: at or
      above, short: at or below); None = at once;
    - ``step``: the stop only moves on the ladder ``entry + k × step`` (k an integer), so a move is
      always a whole number of steps and a wiggle under one step writes nothing;
    - ``break_even_price``: once the observed price reaches it, the stop moves (once) to the entry
      price plus ``break_even_fee_percent`` of it (long; minus for a short), the fee allowance.
    """

    distance: Decimal | None = None
    distance_percent: Decimal | None = None
    activation_price: Decimal | None = None
    step: Decimal | None = None
    break_even_price: Decimal | None = None
    break_even_fee_percent: Decimal = Decimal("0")

    @classmethod
    def from_values(cls, distance, distance_percent, activation_price, step, break_even_price,
                    break_even_fee_percent) -> TrailingSettings:
        """The settings from the operation's :data:`COLUMNS`, in that order (None = unset)."""
        return cls(distance=distance, distance_percent=distance_percent, activation_price=activation_price, step=step,
                   break_even_price=break_even_price, break_even_fee_percent=break_even_fee_percent or Decimal("0"))

    @classmethod
    def of(cls, row) -> TrailingSettings:
        """The settings of an operation row (any object with the :data:`COLUMNS` attributes)."""
        return cls.from_values(*(getattr(row, column) for column in COLUMNS))

    @property
    def trails(self) -> bool:
        return bool(self.distance) or bool(self.distance_percent)

    @property
    def enabled(self) -> bool:
        return self.trails or self.break_even_price is not None


@dataclass(frozen=True)
class StopMove:
    """A tightening of the stop: ``old_stop`` → ``new_stop`` because ``observed`` was seen.

    ``source`` is ``trailing`` or ``break_even`` (the rule that gave the new level).
    """

    old_stop: Decimal
    new_stop: Decimal
    observed: Decimal
    source: str


class InvalidTrailing(ValueError):
    """Settings that cannot trail: the message names the field and the reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate(side: str, entry_price: Decimal | None, stop_price: Decimal | None, settings: TrailingSettings,
             tick_size: Decimal | None) -> None:
    """Refuse settings that could never work; raises :class:`InvalidTrailing` (field, reason).

    distance > 0 (absolute) or 0 < percent < 100; not both; activation and break-even levels on the
    profitable side of the entry (long: above, short: below) and on the tick; step > 0 and a whole
    number of ticks; break-even needs an entry price; trailing needs a stop to move. The checks run
    in that order and the first refusal is raised.
    """
    _check_distance(settings)
    _check_step(settings.step, entry_price, tick_size)
    _check_fee(settings.break_even_fee_percent)
    _check_has_stop(settings, stop_price)
    for field, level in (("trail_activation_price", settings.activation_price),
                         ("break_even_price", settings.break_even_price)):
        _check_level(side, field, level, entry_price, tick_size)
    if settings.activation_price is not None and not settings.trails:
        raise InvalidTrailing("trail_activation_price", "needs trail_distance or trail_distance_percent")


def _check_distance(settings: TrailingSettings) -> None:
    """Exactly one trail distance at most: absolute > 0, or a percent strictly between 0 and 100."""
    if settings.distance is not None and settings.distance_percent is not None:
        raise InvalidTrailing("trail_distance_percent", "give trail_distance or trail_distance_percent, not both")
    if settings.distance is not None and settings.distance <= 0:
        raise InvalidTrailing("trail_distance", "must be greater than 0")
    if settings.distance_percent is not None and not (0 < settings.distance_percent < 100):
        raise InvalidTrailing("trail_distance_percent", "must be between 0 and 100 (exclusive)")


def _check_step(step: Decimal | None, entry_price: Decimal | None, tick_size: Decimal | None) -> None:
    """A step is > 0, a whole number of ticks, and needs the entry price that anchors its ladder."""
    if step is None:
        return
    if step <= 0:
        raise InvalidTrailing("trail_step", "must be greater than 0")
    if tick_size and step % tick_size:
        raise InvalidTrailing("trail_step", f"must be a multiple of tickSize {_plain(tick_size)}")
    if entry_price is None:
        raise InvalidTrailing("trail_step", "needs an entry_price (the ladder is anchored at the entry)")


def _check_fee(fee_percent: Decimal) -> None:
    if fee_percent < 0 or fee_percent >= 100:
        raise InvalidTrailing("break_even_fee_percent", "must be between 0 and 100")


def _check_has_stop(settings: TrailingSettings, stop_price: Decimal | None) -> None:
    """Trailing and break-even both move a stop: there must be one."""
    if (settings.trails or settings.break_even_price is not None) and stop_price is None:
        field = ("break_even_price" if not settings.trails
                 else "trail_distance" if settings.distance is not None else "trail_distance_percent")
        raise InvalidTrailing(field, "needs a stop_price to move")


def _check_level(side: str, field: str, level: Decimal | None, entry_price: Decimal | None,
                 tick_size: Decimal | None) -> None:
    """An activation or break-even level (None = unset): > 0, on the tick, on the profitable side of
    the entry. Without an entry the side cannot be checked; break-even then has no level to move to."""
    if level is None:
        return
    if level <= 0:
        raise InvalidTrailing(field, "must be greater than 0")
    if tick_size and level % tick_size:
        raise InvalidTrailing(field, f"must be a multiple of tickSize {_plain(tick_size)}")
    if entry_price is None:
        if field == "break_even_price":
            raise InvalidTrailing(field, "needs an entry_price")
        return
    _check_profitable_side(side, field, level, entry_price)


def _check_profitable_side(side: str, field: str, level: Decimal, entry_price: Decimal) -> None:
    """Long: ``level`` above the entry; short: below it."""
    if (side == LONG and level <= entry_price) or (side == SHORT and level >= entry_price):
        where = "above" if side == LONG else "below"
        raise InvalidTrailing(field, f"must be {where} the entry price {_plain(entry_price)} (the profitable side)")


def next_stop(side: str, stop: Decimal, entry_price: Decimal | None, settings: TrailingSettings,
              observed: Decimal, tick_size: Decimal | None) -> StopMove | None:
    """The tightened stop after ``observed`` (best bid for a long, best ask for a short), or None.

    Precondition (the pass's order): ``observed`` did not cross ``stop`` — a crossing fires first.
    Candidates: the trail (observed − distance, long; + for a short), floored onto the entry-anchored
    ladder when ``step`` is set, and the break-even level once ``observed`` reached it. Each is
    rounded to tickSize in the protective direction (long: up, short: down) unless that would reach
    the observed price, then the other way. The result is never looser than ``stop`` and never at
    or through ``observed``; None when nothing tightens.
    """
    best: tuple[Decimal, str] | None = None
    for level, source in _candidates(side, entry_price, settings, observed, tick_size):
        if _tighter(side, level, stop) and _not_through(side, level, observed):
            if best is None or _tighter(side, level, best[0]):
                best = (level, source)
    if best is None:
        return None
    return StopMove(old_stop=stop, new_stop=best[0], observed=observed, source=best[1])


def fold_stops(side: str, stop: Decimal, entry_price: Decimal | None, settings: TrailingSettings,
               prices, tick_size: Decimal | None) -> tuple[Decimal, list[StopMove]]:
    """Apply :func:`next_stop` over ``prices`` in order, skipping any price that crosses the stop
    (that price would have fired the close). Returns the final stop and the moves made."""
    moves: list[StopMove] = []
    for price in prices:
        if _crosses(side, stop, price):
            continue
        move = next_stop(side, stop, entry_price, settings, price, tick_size)
        if move is not None:
            moves.append(move)
            stop = move.new_stop
    return stop, moves


def _candidates(side, entry_price, settings, observed, tick_size):
    if settings.trails and _reached(side, observed, settings.activation_price):
        distance = settings.distance
        if distance is None:
            distance = observed * settings.distance_percent / _HUNDRED
        raw = observed - distance if side == LONG else observed + distance
        if settings.step and entry_price is not None:
            raw = _on_ladder(side, raw, entry_price, settings.step)
        yield _to_tick(side, raw, observed, tick_size), TRAILING
    if settings.break_even_price is not None and entry_price is not None \
            and _reached(side, observed, settings.break_even_price):
        fee = entry_price * settings.break_even_fee_percent / _HUNDRED
        raw = entry_price + fee if side == LONG else entry_price - fee
        yield _to_tick(side, raw, observed, tick_size), BREAK_EVEN


def _reached(side: str, observed: Decimal, level: Decimal | None) -> bool:
    if level is None:
        return True
    return observed >= level if side == LONG else observed <= level


def _on_ladder(side: str, raw: Decimal, entry: Decimal, step: Decimal) -> Decimal:
    """Floor (long) / ceil (short) ``raw`` onto ``entry + k × step``: never closer than the trail."""
    k = ((raw - entry) / step).to_integral_value(rounding=ROUND_FLOOR if side == LONG else ROUND_CEILING)
    return entry + k * step


def _to_tick(side: str, raw: Decimal, observed: Decimal, tick: Decimal | None) -> Decimal:
    if not tick or tick <= 0:
        return raw
    protective = ROUND_CEILING if side == LONG else ROUND_FLOOR
    level = (raw / tick).to_integral_value(rounding=protective) * tick
    if not _not_through(side, level, observed):
        other = ROUND_FLOOR if side == LONG else ROUND_CEILING
        level = (raw / tick).to_integral_value(rounding=other) * tick
    return level


def _tighter(side: str, level: Decimal, than: Decimal) -> bool:
    return level > than if side == LONG else level < than


def _not_through(side: str, level: Decimal, observed: Decimal) -> bool:
    return level < observed if side == LONG else level > observed


def _crosses(side: str, stop: Decimal, observed: Decimal) -> bool:
    return observed <= stop if side == LONG else observed >= stop


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
