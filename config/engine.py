"""The engine's settings from the environment, checked together at start-up (issue #12).

Plain Python (no Django) so tests can feed a dict. ``config.settings`` turns a problem into one
line on stderr and exit status 78, like :mod:`config.env`. Each rule and why:

- ``RECONCILE_AFTER_SECONDS`` must be longer than an order can stay in flight: the HTTP timeout
  (``BINANCE_TIMEOUT_SECONDS``) and Binance's ``recvWindow`` (an order reaching the matching
  engine later than that is refused). A shorter delay lets a reconcile find "no such order"
  while the first request is still on its way, and send it again (seen: 2 s with a 10 s timeout).
- ``NOT_FOUND_WINDOW_SECONDS`` (how long "order does not exist" means "not visible yet",
  counted from the submit time) must be at least the reconcile delay.
- ``BINANCE_RECV_WINDOW_MS`` is 1..60000 (Binance's maximum).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

#: name -> (default, kind) of every engine setting; "int" / "decimal" / "float"
ENGINE_SETTINGS: dict[str, tuple[str, str]] = {
    "QUOTE_MAX_AGE_SECONDS": ("10", "int"),
    "RECONCILE_AFTER_SECONDS": ("30", "int"),
    "NOT_FOUND_WINDOW_SECONDS": ("60", "int"),
    "CIRCUIT_BREAKER_THRESHOLD": ("3", "int"),
    "CIRCUIT_BREAKER_COOLDOWN_SECONDS": ("300", "int"),
    "FEE_DUST_TOLERANCE_PCT": ("1", "decimal"),
    "NOTIONAL_MARGIN_PCT": ("5", "decimal"),
    "ENGINE_LOCK_TIMEOUT_MS": ("2000", "int"),
    "ENGINE_STATEMENT_TIMEOUT_MS": ("30000", "int"),
    "BINANCE_TIMEOUT_SECONDS": ("10", "int"),
    "BINANCE_RECV_WINDOW_MS": ("5000", "int"),
}


class EngineConfigError(Exception):
    """One line naming every problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("configuration error: " + "; ".join(problems))


@dataclass(frozen=True)
class EngineConfig:
    values: dict

    def __getitem__(self, name: str):
        return self.values[name]


def resolve_engine(lookup: Callable[[str], str]) -> EngineConfig:
    """Read and check every engine setting. Raises :class:`EngineConfigError` (all problems at once)."""
    problems: list[str] = []
    values = {name: _number(name, (lookup(name) or "").strip() or default, default, kind, problems)
              for name, (default, kind) in ENGINE_SETTINGS.items()}
    problems += _relations(values)
    if problems:
        raise EngineConfigError(problems)
    return EngineConfig(values)


def _number(name: str, raw: str, default: str, kind: str, problems: list[str]) -> int | Decimal:
    """``raw`` as an int or a finite Decimal (``kind``); the default, with a problem, when it is not one."""
    try:
        value = int(raw) if kind == "int" else Decimal(raw)
        if kind == "decimal" and not value.is_finite():
            raise InvalidOperation
    except (ValueError, InvalidOperation):
        problems.append(f"{name} (not a number: {raw!r})")
        value = int(default) if kind == "int" else Decimal(default)
    if value < 0:
        problems.append(f"{name} (must not be negative, got {raw})")
    return value


def _relations(values: dict) -> list[str]:
    """The rules between settings (module docstring): recvWindow range, reconcile delay longer
    than an order's flight, not-found window at least the reconcile delay."""
    problems = []
    if not 0 < values["BINANCE_RECV_WINDOW_MS"] <= 60000:
        problems.append(f"BINANCE_RECV_WINDOW_MS (1..60000, got {values['BINANCE_RECV_WINDOW_MS']})")
    in_flight = max(values["BINANCE_TIMEOUT_SECONDS"], values["BINANCE_RECV_WINDOW_MS"] / 1000)
    if values["RECONCILE_AFTER_SECONDS"] <= in_flight:
        problems.append(
            f"RECONCILE_AFTER_SECONDS ({values['RECONCILE_AFTER_SECONDS']} s must be longer than an order can stay in "
            f"flight: BINANCE_TIMEOUT_SECONDS {values['BINANCE_TIMEOUT_SECONDS']} s, recvWindow "
            f"{values['BINANCE_RECV_WINDOW_MS']} ms; a shorter delay can send a close twice)")
    if values["NOT_FOUND_WINDOW_SECONDS"] < values["RECONCILE_AFTER_SECONDS"]:
        problems.append(f"NOT_FOUND_WINDOW_SECONDS ({values['NOT_FOUND_WINDOW_SECONDS']} s must be at least "
                        f"RECONCILE_AFTER_SECONDS, {values['RECONCILE_AFTER_SECONDS']} s)")
    return problems
