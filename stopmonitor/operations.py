"""Lifecycle use cases that change what is monitored: open an operation, set or move its levels.

Each appends ``STOP_SET`` / ``STOP_MOVED`` / ``TARGET_SET`` in the same transaction as the
row change, so an operation's history says where every level came from. Prices in the quote
asset, quantities in the base asset.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from django.db import transaction

from stopmonitor.engine.store import create_operation, lock_operation
from stopmonitor.events import append_events, stream_head
from stopmonitor import trailing
from stopmonitor.execution import STOP_MOVED, STOP_SET, TARGET_SET, TRAILING_SET, NewEvent
from stopmonitor.rules import decimal_str
from stopmonitor.trailing import InvalidTrailing, TrailingSettings
from stopmonitor.vocabulary import OperationStatus


class LevelError(ValueError):
    """A stop or target on the wrong side of the entry price, or a non-positive level.
    ``field`` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StateConflict(Exception):
    """The operation's status does not allow the change (CLOSING, CLOSED, CANCELLED)."""


def check_levels(side: str, entry: Decimal | None, stop: Decimal | None, target: Decimal | None,
                 tick_size: Decimal | None = None) -> None:
    """A long's stop below the entry and target above it; a short's the mirror; each level a
    multiple of the symbol's tickSize (PRICE_FILTER) when known. Raises :class:`LevelError`
    (the stop's faults before the target's, the level's own before its side of the entry)."""
    for name, value in (("stop_price", stop), ("target_price", target)):
        _check_level_value(name, value, tick_size)
    if entry is None:
        return
    if side == "BUY":
        _check_long_levels(entry, stop, target)
    else:
        _check_short_levels(entry, stop, target)


def _check_level_value(name: str, value: Decimal | None, tick_size: Decimal | None) -> None:
    """``value`` (None = not given) positive and on the tick when the tickSize is known."""
    if value is not None and value <= 0:
        raise LevelError(name, f"{name} must be positive")
    if value is not None and tick_size and tick_size > 0 and value % tick_size != 0:
        raise LevelError(name, f"{name} {decimal_str(value)} is not a multiple of the symbol's tickSize "
                               f"{decimal_str(tick_size)}")


def _check_long_levels(entry: Decimal, stop: Decimal | None, target: Decimal | None) -> None:
    if stop is not None and stop >= entry:
        raise LevelError("stop_price", f"a long's stop must be below the entry price {decimal_str(entry)}")
    if target is not None and target <= entry:
        raise LevelError("target_price", f"a long's target must be above the entry price {decimal_str(entry)}")


def _check_short_levels(entry: Decimal, stop: Decimal | None, target: Decimal | None) -> None:
    if stop is not None and stop <= entry:
        raise LevelError("stop_price", f"a short's stop must be above the entry price {decimal_str(entry)}")
    if target is not None and target >= entry:
        raise LevelError("target_price", f"a short's target must be below the entry price {decimal_str(entry)}")


def check_trailing(side: str, entry: Decimal | None, stop: Decimal | None, settings: TrailingSettings,
                   tick_size: Decimal | None) -> None:
    """:func:`stopmonitor.trailing.validate` with its error as a :class:`LevelError` (field, reason)."""
    try:
        trailing.validate(side, entry, stop, settings, tick_size)
    except InvalidTrailing as exc:
        raise LevelError(exc.field, exc.reason) from None


def trailing_event(columns: dict) -> NewEvent:
    """``TRAILING_SET`` with the operation's trailing columns (:func:`_columns`) as plain decimal strings."""
    return NewEvent(TRAILING_SET, {column: decimal_str(value) for column, value in columns.items()})


_SETTING_NAMES = ("distance", "distance_percent", "activation_price", "step", "break_even_price",
                  "break_even_fee_percent")


def open_operation(client, symbol, side: str, quantity: Decimal, entry_price: Decimal | None,
                   stop_price: Decimal | None, target_price: Decimal | None = None, *, source: str = "api",
                   venue: str = "paper", status: str = OperationStatus.ACTIVE, now: datetime | None = None,
                   trailing_settings: TrailingSettings | None = None, account=None):
    """Create an ACTIVE operation with its levels and append ``STOP_SET``/``TARGET_SET`` (and
    ``TRAILING_SET`` when ``trailing_settings`` enable trailing or break-even). ``account``: its
    exchange account (None: the default account). Raises :class:`LevelError`. Commits."""
    check_levels(side, entry_price, stop_price, target_price, symbol.tick_size)
    trailing_settings = trailing_settings or TrailingSettings()
    check_trailing(side, entry_price, stop_price, trailing_settings, symbol.tick_size)
    now = now or datetime.now(timezone.utc)
    with transaction.atomic():
        op = create_operation(client=client, symbol=symbol, side=side, quantity=quantity,
                              entry_price=entry_price, stop_price=stop_price, target_price=target_price,
                              status=status, account=account, **_columns(trailing_settings))
        events = []
        if stop_price is not None:
            events.append(NewEvent(STOP_SET, {"stop_price": decimal_str(stop_price), "entry_price": decimal_str(entry_price)}))
        if target_price is not None:
            events.append(NewEvent(TARGET_SET, {"target_price": decimal_str(target_price), "entry_price": decimal_str(entry_price)}))
        if trailing_settings.enabled:
            events.append(trailing_event(_columns(trailing_settings)))
        append_events(op, 0, events, source=source, venue=venue, now=now)
    return op


def _columns(settings: TrailingSettings) -> dict:
    """The operation's trailing columns for ``settings`` (the fee allowance None when break-even is off)."""
    values = dict(zip(trailing.COLUMNS, (getattr(settings, name) for name in _SETTING_NAMES)))
    if settings.break_even_price is None and not settings.break_even_fee_percent:
        values["break_even_fee_percent"] = None
    return values


def move_levels(operation_id: int, *, stop_price: Decimal | None = None, target_price: Decimal | None = None,
                source: str = "api", venue: str = "paper", actor: str = "", now: datetime | None = None,
                trailing_changes: dict | None = None):
    """Move the stop and/or target of an ACTIVE (or PLANNED) operation under its row lock.

    Appends ``TRAILING_SET`` (trailing columns changed), ``STOP_SET`` (first stop) or ``STOP_MOVED``
    (with the previous level) and ``TARGET_SET``, in that order. Raises :class:`StateConflict` while
    CLOSING or once closed, :class:`LevelError` for a level on the wrong side. Commits.
    """
    now = now or datetime.now(timezone.utc)
    with transaction.atomic():
        op = lock_operation(operation_id)
        if op.status not in (OperationStatus.ACTIVE, OperationStatus.PLANNED):
            raise StateConflict(f"operation {op.pk} is {op.status}: its levels cannot change")
        # only the levels given are checked: a stop trailed past the entry stays where the trail put it
        check_levels(op.side, op.entry_price, stop_price, target_price, op.symbol.tick_size)
        events = []
        if trailing_changes:
            events += _change_trailing(op, trailing_changes, stop_price)
        events += _move_stop(op, stop_price, actor)
        events += _move_target(op, target_price, actor)
        if events:
            version, _ = stream_head(op.pk)
            op.save(update_fields=["stop_price", "target_price", *trailing.COLUMNS, "updated_at"])
            append_events(op, version, events, source=source, venue=venue, now=now)
    return op


def _change_trailing(op, changes: dict, stop_price: Decimal | None) -> list[NewEvent]:
    """Merge ``changes`` into ``op``'s trailing columns, checked against the stop it will have
    (``stop_price`` when given, else its current one); ``[TRAILING_SET]`` when a column changed,
    else ``[]``. Sets the columns on ``op`` (not saved). Raises :class:`LevelError`."""
    current = {**{c: getattr(op, c) for c in trailing.COLUMNS}, **changes}
    settings = TrailingSettings.from_values(*(current[c] for c in trailing.COLUMNS))
    check_trailing(op.side, op.entry_price, stop_price if stop_price is not None else op.stop_price,
                   settings, op.symbol.tick_size)
    columns = _columns(settings)
    if not any(getattr(op, c) != v for c, v in columns.items()):
        return []
    for column, value in columns.items():
        setattr(op, column, value)
    return [trailing_event(columns)]


def _move_stop(op, stop_price: Decimal | None, actor: str) -> list[NewEvent]:
    """``[STOP_SET]`` (no stop yet) or ``[STOP_MOVED]`` (from the previous level) when ``stop_price``
    is given and differs, setting it on ``op`` (not saved); else ``[]``."""
    if stop_price is None or stop_price == op.stop_price:
        return []
    if op.stop_price is None:
        event = NewEvent(STOP_SET, {"stop_price": decimal_str(stop_price), "actor": actor})
    else:
        event = NewEvent(STOP_MOVED, {"from": decimal_str(op.stop_price), "to": decimal_str(stop_price),
                                      "actor": actor})
    op.stop_price = stop_price
    return [event]


def _move_target(op, target_price: Decimal | None, actor: str) -> list[NewEvent]:
    """``[TARGET_SET]`` (with the previous level) when ``target_price`` is given and differs, setting
    it on ``op`` (not saved); else ``[]``."""
    if target_price is None or target_price == op.target_price:
        return []
    event = NewEvent(TARGET_SET, {"target_price": decimal_str(target_price),
                                  "previous": decimal_str(op.target_price), "actor": actor})
    op.target_price = target_price
    return [event]
