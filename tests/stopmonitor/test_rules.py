"""The pure rules: trigger (bid/ask, stop wins), close quantity, slippage, execution token."""

from decimal import Decimal as D

import pytest

from stopmonitor.rules import (
    CLIENT_ORDER_ID_RE,
    STOP_LOSS,
    TAKE_PROFIT,
    Trigger,
    close_quantity,
    decimal_str,
    evaluate_trigger,
    execution_token,
    floor_to_step,
    slippage_pct,
)


@pytest.mark.parametrize(
    "side, stop, target, bid, ask, expected",
    [
        pytest.param("BUY", D("100"), None, D("100"), D("100.1"), Trigger(STOP_LOSS, D("100"), D("100")), id="long-stop-touched-at-bid-inclusive"),
        pytest.param("BUY", D("100"), None, D("99.5"), D("99.6"), Trigger(STOP_LOSS, D("100"), D("99.5")), id="long-stop-crossed-at-bid"),
        pytest.param("BUY", D("100"), None, D("100.01"), D("99"), None, id="long-ignores-ask"),
        pytest.param("BUY", D("100"), D("120"), D("120"), D("120.1"), Trigger(TAKE_PROFIT, D("120"), D("120")), id="long-target-at-bid"),
        pytest.param("BUY", D("100"), D("120"), D("119.99"), D("121"), None, id="long-target-not-reached-by-bid"),
        pytest.param("SELL", D("110"), None, D("111"), D("110"), Trigger(STOP_LOSS, D("110"), D("110")), id="short-stop-at-ask"),
        pytest.param("SELL", D("110"), None, D("111"), D("109.99"), None, id="short-ignores-bid"),
        pytest.param("SELL", D("110"), D("90"), D("89"), D("90"), Trigger(TAKE_PROFIT, D("90"), D("90")), id="short-target-at-ask"),
        pytest.param("BUY", D("100"), D("99"), D("99.5"), D("99.6"), Trigger(STOP_LOSS, D("100"), D("99.5")), id="both-crossed-stop-wins-long"),
        pytest.param("SELL", D("100"), D("101"), D("100.5"), D("100.5"), Trigger(STOP_LOSS, D("100"), D("100.5")), id="both-crossed-stop-wins-short"),
        pytest.param("BUY", None, None, D("1"), D("1"), None, id="no-levels"),
    ],
)
def test_trigger_rule(side, stop, target, bid, ask, expected):
    assert evaluate_trigger(side, stop, target, bid, ask) == expected


@pytest.mark.parametrize(
    "qty, step, expected",
    [
        pytest.param(D("0.123456789"), D("0.00001"), D("0.12345"), id="btc-step"),
        pytest.param(D("1234.56"), D("0.1"), D("1234.5"), id="ada-step"),
        pytest.param(D("5"), D("1"), D("5"), id="exact"),
        pytest.param(D("0.000009"), D("0.00001"), D("0"), id="below-one-step"),
        pytest.param(D("0.3"), D("0.1"), D("0.3"), id="decimal-not-float"),
        pytest.param(D("7.77"), None, D("7.77"), id="no-step"),
    ],
)
def test_floor_to_step(qty, step, expected):
    assert floor_to_step(qty, step) == expected


def test_close_quantity_takes_min_of_position_and_balance_floored():
    r = close_quantity(D("0.5"), D("0.123456"), D("0.00001"), D("0.00001"), D("5"), D("9000"))
    assert (r.quantity, r.blocked_reason) == (D("0.12345"), None)


def test_close_quantity_blocks_below_min_notional():
    r = close_quantity(D("0.0005"), None, D("0.00001"), D("0.00001"), D("5"), D("9000"))
    assert r.blocked_reason == "BELOW_MIN_NOTIONAL"
    assert r.quantity == D("0.00050")


def test_close_quantity_blocks_below_min_qty_and_no_balance():
    assert close_quantity(D("0.05"), None, D("0.1"), D("0.1"), D("5"), D("100")).blocked_reason == "BELOW_MIN_QTY"
    assert close_quantity(D("1"), D("0"), D("0.1"), D("0.1"), D("5"), D("100")).blocked_reason == "INSUFFICIENT_BALANCE"


def test_slippage_is_adverse_positive():
    assert slippage_pct("SELL", D("100"), D("99")) == D("1.0000")
    assert slippage_pct("SELL", D("100"), D("101")) == D("-1.0000")
    assert slippage_pct("BUY", D("200"), D("201")) == D("0.5000")


def test_execution_token_is_deterministic_and_fits_binance():
    a = execution_token(123456789, STOP_LOSS, D("9150.00"), 1)
    assert a == execution_token(123456789, STOP_LOSS, D("9150.00"), 1)
    assert a != execution_token(123456789, STOP_LOSS, D("9150.00"), 2)
    assert a.startswith("sm123456789-S1-") and len(a) <= 36 and CLIENT_ORDER_ID_RE.match(a)


def test_decimal_str_never_uses_exponent():
    assert decimal_str(D("1E-5")) == "0.00001"
    assert decimal_str(D("0.12300000")) == "0.123"
    assert decimal_str(D("100")) == "100"


def test_close_quantity_capped_by_market_max_qty():
    r = close_quantity(D("200"), None, D("0.00001"), D("0.00001"), D("5"), D("9000"), max_qty=D("128.52621715"))
    assert (r.quantity, r.blocked_reason) == (D("128.52621"), None)


def test_close_quantity_with_zero_step_is_floored_to_8_decimals():
    """Regression (review D4): 1000 USDT / 6.95 gave 28 digits, then rounded UP by the column."""
    r = close_quantity(D("500"), D("1000") / D("6.95"), D("0"), D("0"), D("0"), D("6.95"))
    assert r.quantity == D("143.88489208")
    assert r.quantity * D("6.95") <= D("1000")


def test_blocked_close_details_print_plain_decimals_never_exponents():
    """A remainder under one step floors to 0: the reason read by a trader says 0, not ``0E-8``."""
    from stopmonitor.rules import close_quantity

    dust = close_quantity(D("0.000005"), None, D("0.00001"), D("0.00001"), D("5"), D("9100"))
    assert (dust.blocked_reason, dust.detail) == ("BELOW_MIN_QTY", "quantity 0 < minQty 0.00001 (stepSize 0.00001)")
    small = close_quantity(D("0.00050000"), None, D("0.00001"), D("0.00001"), D("5.00000000"), D("9100.00000000"))
    assert (small.blocked_reason, small.detail) == ("BELOW_MIN_NOTIONAL", "notional 4.55 < minNotional 5 at price 9100")
