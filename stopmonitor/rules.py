"""Trigger rule, close quantity and slippage: pure functions on ``Decimal``.

Prices are in the quote asset, quantities in the base asset. No Django, no exchange.
Source of each rule: ../shared/design/stop-execution.md (Vocabulary; invariants 4 and 5).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_UP, Decimal

BUY, SELL = "BUY", "SELL"
STOP_LOSS, TAKE_PROFIT, MANUAL = "STOP_LOSS", "TAKE_PROFIT", "MANUAL"
QTY_QUANTUM = Decimal("0.00000001")
CLIENT_ORDER_ID_RE = re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$")


@dataclass(frozen=True)
class Trigger:
    """A crossed level: ``kind`` STOP_LOSS or TAKE_PROFIT, the ``level`` crossed and the
    ``observed`` price that crossed it (best bid for a long, best ask for a short)."""

    kind: str
    level: Decimal
    observed: Decimal


def close_side(opening_side: str) -> str:
    """The side that closes a position opened with ``opening_side`` (BUY → SELL, SELL → BUY)."""
    if opening_side == BUY:
        return SELL
    if opening_side == SELL:
        return BUY
    raise ValueError(f"side must be BUY or SELL, got {opening_side!r}")


def evaluate_trigger(
    side: str, stop_price: Decimal | None, target_price: Decimal | None, bid: Decimal, ask: Decimal
) -> Trigger | None:
    """Apply the bid/ask trigger rule (inclusive); the stop-loss wins when both are crossed.

    Long (``side`` BUY): ``bid <= stop_price`` → STOP_LOSS, ``bid >= target_price`` → TAKE_PROFIT.
    Short (``side`` SELL): ``ask >= stop_price`` → STOP_LOSS, ``ask <= target_price`` → TAKE_PROFIT.
    Returns None when nothing is crossed. Callers must have rejected zero/empty quotes.
    """
    if side == BUY:
        if stop_price is not None and bid <= stop_price:
            return Trigger(STOP_LOSS, stop_price, bid)
        if target_price is not None and bid >= target_price:
            return Trigger(TAKE_PROFIT, target_price, bid)
        return None
    if side == SELL:
        if stop_price is not None and ask >= stop_price:
            return Trigger(STOP_LOSS, stop_price, ask)
        if target_price is not None and ask <= target_price:
            return Trigger(TAKE_PROFIT, target_price, ask)
        return None
    raise ValueError(f"side must be BUY or SELL, got {side!r}")


def floor_to_step(quantity: Decimal, step: Decimal | None) -> Decimal:
    """``quantity`` floored to a multiple of ``step`` (LOT_SIZE.stepSize); unchanged when step is 0/None."""
    if not step or step <= 0:
        return quantity
    return (quantity / step).to_integral_value(rounding=ROUND_DOWN) * step


def round_to_tick(price: Decimal, tick: Decimal, up: bool) -> Decimal:
    """``price`` rounded to a multiple of ``tick`` (PRICE_FILTER.tickSize), up or down."""
    if not tick or tick <= 0:
        return price
    return (price / tick).to_integral_value(rounding=ROUND_UP if up else ROUND_DOWN) * tick


@dataclass(frozen=True)
class CloseQuantity:
    """Result of :func:`close_quantity`: ``quantity`` to send, or ``blocked_reason`` and why."""

    quantity: Decimal
    blocked_reason: str | None = None
    detail: str = ""


def close_quantity(
    remaining: Decimal,
    available: Decimal | None,
    step_size: Decimal | None,
    min_qty: Decimal | None,
    min_notional: Decimal | None,
    price: Decimal,
    max_qty: Decimal | None = None,
) -> CloseQuantity:
    """Invariant 5: min(remaining position, available balance), floored to stepSize.

    ``max_qty`` (MARKET_LOT_SIZE/LOT_SIZE maxQty) caps one order: the rest stays open and
    protected, and a later pass closes it.

    ``available`` is the free balance of what the close spends: the base asset for a SELL
    close, or the quote balance divided by the price for a BUY close (None = unknown, not
    limiting). Blocked reasons: ``INSUFFICIENT_BALANCE`` (nothing available),
    ``BELOW_MIN_QTY`` (under LOT_SIZE.minQty), ``BELOW_MIN_NOTIONAL`` (quantity × price under
    NOTIONAL.minNotional).
    """
    qty = remaining if available is None else min(remaining, available)
    if max_qty and max_qty > 0:
        qty = min(qty, max_qty)
    if qty <= 0:
        return CloseQuantity(Decimal("0"), "INSUFFICIENT_BALANCE", f"available {available}, remaining {remaining}")
    qty = floor_to_step(qty, step_size)
    # never more precise than the exchange and the DecimalField(20, 8) columns: floor, never round up
    qty = qty.quantize(QTY_QUANTUM, rounding=ROUND_DOWN)
    if qty <= 0 or (min_qty and qty < min_qty):
        return CloseQuantity(qty, "BELOW_MIN_QTY", f"quantity {decimal_str(qty)} < minQty {decimal_str(min_qty)} "
                                                   f"(stepSize {decimal_str(step_size)})")
    if min_notional and qty * price < min_notional:
        return CloseQuantity(qty, "BELOW_MIN_NOTIONAL", f"notional {decimal_str(qty * price)} < minNotional "
                                                        f"{decimal_str(min_notional)} at price {decimal_str(price)}")
    return CloseQuantity(qty)


def slippage_pct(closing_side: str, reference: Decimal, price: Decimal) -> Decimal:
    """Adverse slippage of ``price`` against ``reference`` in percent (positive = worse).

    A SELL close is worse when it fills below the reference, a BUY close when above.
    Rounded to 4 decimals.
    """
    if reference <= 0:
        raise ValueError("reference price must be positive")
    diff = (reference - price) if closing_side == SELL else (price - reference)
    return (diff / reference * 100).quantize(Decimal("0.0001"))


def execution_token(operation_id: int, kind: str, level: Decimal | None, attempt: int) -> str:
    """Deterministic client order id for one close attempt (never from the wall clock).

    ``sm<op>-<S|T|M><attempt>-<8 hex of the level>``, at most 36 characters matching
    Binance's ``^[.A-Z:/a-z0-9_-]{1,36}$`` (newClientOrderId).
    """
    letter = {STOP_LOSS: "S", TAKE_PROFIT: "T", MANUAL: "M"}[kind]
    digest = hashlib.sha256(f"{operation_id}|{kind}|{level}".encode()).hexdigest()[:8]
    token = f"sm{operation_id}-{letter}{attempt}-{digest}"
    if not CLIENT_ORDER_ID_RE.match(token):
        raise ValueError(f"execution token {token!r} does not fit newClientOrderId")
    return token


def decimal_str(value: Decimal | None) -> str | None:
    """Fixed-point string of ``value`` without exponent or trailing zeros (``1E-5`` → ``"0.00001"``)."""
    if value is None:
        return None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def opening_notional_problem(quantity: Decimal, stop_price: Decimal | None, min_notional: Decimal | None,
                             margin_pct: Decimal, market_max_qty: Decimal | None = None) -> str | None:
    """Invariant 5, "notional is checked at the *stop* price when an operation is opened": a
    position we accept must be closable when its stop is crossed.

    The close may be sent in MARKET_LOT_SIZE chunks of ``market_max_qty``; every chunk — the last,
    smallest one included — must reach ``min_notional`` at ``stop_price`` with ``margin_pct`` to
    spare (freqtrade uses 5 %; the fill can be below the stop). Returns the reason (naming the
    figures) or None. Nothing to check without a stop or a minNotional.
    """
    if stop_price is None or not min_notional or min_notional <= 0:
        return None
    required = min_notional * (1 + margin_pct / 100)
    chunk = quantity
    if market_max_qty and market_max_qty > 0 and quantity > market_max_qty:
        rest = quantity % market_max_qty
        chunk = rest if rest > 0 else market_max_qty
    notional = chunk * stop_price
    if notional >= required:
        return None
    what = (f"quantity {decimal_str(quantity)}" if chunk == quantity else
            f"the last MARKET_LOT_SIZE chunk of quantity {decimal_str(quantity)}: {decimal_str(chunk)}")
    return (f"{what} × stop_price "
            f"{decimal_str(stop_price)} = {decimal_str(notional)} is below minNotional {decimal_str(min_notional)} "
            f"+ {decimal_str(margin_pct)}% margin = {decimal_str(required)}: the stop could never close it")
