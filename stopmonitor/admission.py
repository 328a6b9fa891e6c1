"""What an operation must satisfy to be opened that needs the symbol row and the settings (API, admin, backfill).

The rule itself is pure (:func:`stopmonitor.rules.opening_notional_problem`); this reads the
symbol's filters and ``NOTIONAL_MARGIN_PCT`` so the three ways in call the same thing.
"""

from __future__ import annotations

from decimal import Decimal


def notional_margin_pct() -> Decimal:
    """``settings.STOPMONITOR["NOTIONAL_MARGIN_PCT"]`` (default 5 %)."""
    from django.conf import settings

    return Decimal(str(getattr(settings, "STOPMONITOR", {}).get("NOTIONAL_MARGIN_PCT", 5)))


def opening_notional_error(symbol, quantity: Decimal, stop_price: Decimal | None) -> str | None:
    """The reason ``quantity`` of ``symbol`` (an ``api.models.Symbol``) could not be closed at
    ``stop_price`` (below minNotional with the margin, the last MARKET_LOT_SIZE chunk included),
    or None."""
    from stopmonitor.rules import opening_notional_problem

    return opening_notional_problem(quantity, stop_price, symbol.min_notional, notional_margin_pct(),
                                    getattr(symbol, "market_max_qty", None))
