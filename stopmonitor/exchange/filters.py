"""Parse Binance exchangeInfo symbol entries into :class:`SymbolFilters` (shared by every adapter).

Source: Binance Spot API docs, "Filters" (PRICE_FILTER, LOT_SIZE, MARKET_LOT_SIZE, NOTIONAL,
and the older MIN_NOTIONAL).
"""

from __future__ import annotations

from decimal import Decimal

from stopmonitor.exchange.base import SymbolFilters


def parse_symbol_filters(entry: dict) -> SymbolFilters:
    """One ``exchangeInfo.symbols[]`` entry → :class:`SymbolFilters` (Decimals from the strings).

    A MARKET_LOT_SIZE stepSize of 0 means "use LOT_SIZE" (Binance sends 0.00000000 there).
    Raises ``KeyError``/``ValueError`` on an entry without PRICE_FILTER or LOT_SIZE.
    """
    by_type = {f["filterType"]: f for f in entry.get("filters", [])}
    price, lot = by_type["PRICE_FILTER"], by_type["LOT_SIZE"]
    market = by_type.get("MARKET_LOT_SIZE")
    notional = by_type.get("NOTIONAL") or by_type.get("MIN_NOTIONAL") or {}

    def dec(value) -> Decimal:
        return Decimal(str(value))

    market_step = dec(market["stepSize"]) if market else None
    return SymbolFilters(
        symbol=entry["symbol"],
        base_asset=entry.get("baseAsset", ""),
        quote_asset=entry.get("quoteAsset", ""),
        tick_size=dec(price["tickSize"]),
        step_size=dec(lot["stepSize"]),
        min_qty=dec(lot["minQty"]),
        max_qty=dec(lot["maxQty"]),
        min_notional=dec(notional.get("minNotional", "0")),
        market_step_size=market_step if market_step else None,
        market_min_qty=dec(market["minQty"]) if market else None,
        market_max_qty=dec(market["maxQty"]) if market else None,
        status=entry.get("status", "TRADING"),
    )
