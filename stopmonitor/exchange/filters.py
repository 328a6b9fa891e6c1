"""Parse Binance exchangeInfo entries into :class:`SymbolFilters` — the one parser every adapter uses.

Source: Binance Spot API docs, "Filters" (PRICE_FILTER, LOT_SIZE, MARKET_LOT_SIZE, NOTIONAL,
and the older MIN_NOTIONAL).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from stopmonitor.exchange.base import SymbolFilters


def decimal_field(value: Any, field: str) -> Decimal:
    """Parse a Binance decimal string field; floats are refused so no binary rounding sneaks in."""
    if isinstance(value, float) or value is None or isinstance(value, bool):
        raise ValueError(f"field {field!r} is not a decimal string: {value!r}")
    try:
        parsed = Decimal(str(value))
    except InvalidOperation as e:
        raise ValueError(f"field {field!r} is not a decimal: {value!r}") from e
    if not parsed.is_finite():
        raise ValueError(f"field {field!r} is not finite: {value!r}")
    return parsed


def parse_symbol_filters(entry: dict) -> SymbolFilters:
    """SymbolFilters from one exchangeInfo ``symbols[]`` entry.

    ``market_*`` are the effective limits of a MARKET order: LOT_SIZE and MARKET_LOT_SIZE both
    apply, so min = the larger minQty, max = the smaller non-zero maxQty, step = MARKET_LOT_SIZE
    stepSize unless it is 0 (then LOT_SIZE's). They are None when MARKET_LOT_SIZE is absent.
    ``min_notional`` comes from NOTIONAL (or the older MIN_NOTIONAL) and is 0 when the filter
    says it does not apply to MARKET orders (``applyMinToMarket``/``applyToMarket`` false) or
    is absent. Raises ValueError/KeyError on a malformed entry.
    """
    filters = {f["filterType"]: f for f in entry.get("filters", ())}
    price = filters["PRICE_FILTER"]
    lot = filters["LOT_SIZE"]
    step = decimal_field(lot["stepSize"], "LOT_SIZE.stepSize")
    min_qty = decimal_field(lot["minQty"], "LOT_SIZE.minQty")
    max_qty = decimal_field(lot["maxQty"], "LOT_SIZE.maxQty")

    market_step, market_min, market_max = _market_lot(filters.get("MARKET_LOT_SIZE"), step, min_qty, max_qty)
    min_notional = _min_notional(filters)

    return SymbolFilters(
        symbol=str(entry["symbol"]),
        base_asset=str(entry["baseAsset"]),
        quote_asset=str(entry["quoteAsset"]),
        tick_size=decimal_field(price["tickSize"], "PRICE_FILTER.tickSize"),
        step_size=step,
        min_qty=min_qty,
        max_qty=max_qty,
        min_notional=min_notional,
        market_step_size=market_step,
        market_min_qty=market_min,
        market_max_qty=market_max,
        status=str(entry.get("status", "TRADING")),
        **_resting_order_permissions(entry),
    )


def _market_lot(market: dict | None, step: Decimal, min_qty: Decimal,
                max_qty: Decimal) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
    """``(step, min, max)`` of a MARKET order from the MARKET_LOT_SIZE filter and LOT_SIZE's ``step``,
    ``min_qty``, ``max_qty``: its stepSize unless 0 (then LOT_SIZE's), the larger minQty, the smaller
    non-zero maxQty; ``(None, None, None)`` without the filter."""
    if market is None:
        return None, None, None
    m_step = decimal_field(market["stepSize"], "MARKET_LOT_SIZE.stepSize")
    m_min = decimal_field(market["minQty"], "MARKET_LOT_SIZE.minQty")
    m_max = decimal_field(market["maxQty"], "MARKET_LOT_SIZE.maxQty")
    return (m_step if m_step > 0 else step), max(min_qty, m_min), (min(max_qty, m_max) if m_max > 0 else max_qty)


def _min_notional(filters: dict) -> Decimal:
    """A MARKET order's minimum notional (quote asset): NOTIONAL's, else the older MIN_NOTIONAL's; 0 when
    the filter present does not apply to MARKET orders (``applyMinToMarket``/``applyToMarket`` false) or
    neither is there."""
    notional = filters.get("NOTIONAL")
    if notional is not None:
        if notional.get("applyMinToMarket", True):
            return decimal_field(notional["minNotional"], "NOTIONAL.minNotional")
        return Decimal("0")
    legacy = filters.get("MIN_NOTIONAL")
    if legacy is not None and legacy.get("applyToMarket", True):
        return decimal_field(legacy["minNotional"], "MIN_NOTIONAL.minNotional")
    return Decimal("0")


def _resting_order_permissions(entry: dict) -> dict:
    """What the symbol allows for exchange-held protection: ``orderTypes`` has STOP_LOSS,
    ``ocoAllowed``, ``cancelReplaceAllowed`` (exchangeInfo; absent → assumed allowed)."""
    types = entry.get("orderTypes")
    return {"stop_loss_allowed": types is None or "STOP_LOSS" in types,
            "oco_allowed": bool(entry.get("ocoAllowed", True)),
            "cancel_replace_allowed": bool(entry.get("cancelReplaceAllowed", True))}
