"""The pure evidence rules (stopmonitor/evidence.py): each verdict with the input that needs it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest

from stopmonitor import evidence as ev
from stopmonitor.exchange.base import OrderResult, Trade

SUBMIT = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
TOKEN = "sm7-S1-0a1b2c3d"


def trade(order_id, qty, price="60000", at=SUBMIT + timedelta(seconds=2), buyer=False, tid=None, fee="0.06"):
    return Trade("BTCUSDT", tid or order_id * 10, order_id, D(price), D(qty), D(price) * D(qty), D(fee), "USDT", at, buyer)


def judge(age_s, trades=(), holds=True, gone=False, known=()):
    return ev.judge_not_found(now=SUBMIT + timedelta(seconds=age_s), submitted_at=SUBMIT, window_seconds=60,
                              symbol="BTCUSDT", side="SELL", client_order_id=TOKEN, requested=D("1"),
                              trades=list(trades), known_order_ids=known, balance_holds=holds, known_orders_gone=gone)


@pytest.mark.parametrize("age", [31, 59])
def test_not_found_inside_the_window_waits(age):
    verdict = judge(age)
    assert verdict.action == ev.WAIT and "window 60 s" in verdict.detail


def test_not_found_after_the_window_without_trades_and_with_the_balance_resends():
    assert judge(61).action == ev.RESEND


def test_a_trade_since_the_submit_time_is_the_fill_even_inside_the_window():
    verdict = judge(5, [trade(9001, "0.4", tid=1), trade(9001, "0.6", price="59990", tid=2)])

    assert verdict.action == ev.RECORD
    order = verdict.order
    assert (order.exchange_order_id, order.status, order.executed_qty, order.client_order_id) == (9001, "FILLED", D("1"), TOKEN)
    assert order.avg_price == D("59994")
    assert (order.commission, order.commission_asset) == (D("0.12"), "USDT")


def test_a_partial_fill_found_in_trades_is_a_partial_close():
    order = judge(70, [trade(9001, "0.25")]).order
    assert (order.status, order.executed_qty) == ("EXPIRED", D("0.25"))


@pytest.mark.parametrize("t", [
    pytest.param(trade(9001, "1", buyer=True), id="other-side"),
    pytest.param(trade(9001, "1", at=SUBMIT - timedelta(seconds=1)), id="before-submit"),
    pytest.param(trade(555, "1"), id="an-order-we-already-recorded"),
])
def test_trades_that_are_not_ours_are_not_evidence(t):
    assert judge(61, [t], known=[555]).action == ev.RESEND


def test_trades_too_large_for_the_close_need_review():
    assert judge(61, [trade(9001, "3")]).reason == "TRADES_UNMATCHED"


def test_a_balance_gone_without_trades_is_never_a_resend():
    verdict = judge(61, holds=False)
    assert (verdict.action, verdict.reason) == (ev.REVIEW, "BALANCE_GONE")
    assert judge(10, holds=False).action == ev.WAIT  # trades may show later


def test_orders_gone_and_the_balance_refilled_is_a_testnet_reset_for_review():
    verdict = judge(61, holds=True, gone=True)
    assert (verdict.action, verdict.reason) == (ev.REVIEW, "ORDERS_GONE")


def order(status="EXPIRED", executed="0", quote="0", order_id=9001, fills=()):
    return OrderResult("BTCUSDT", "SELL", status, order_id, TOKEN, D("1"), D(executed), D(quote), tuple(fills))


def test_a_misreported_zero_fill_is_corrected_from_the_trades():
    fixed = ev.check_zero_fill(order(), [trade(9001, "1"), trade(1234, "5")])
    assert (fixed.status, fixed.executed_qty, fixed.cummulative_quote_qty, fixed.commission) == (
        "FILLED", D("1"), D("60000"), D("0.06"))


def test_a_real_zero_fill_stays_zero():
    assert ev.check_zero_fill(order(), [trade(1234, "1")]) == order()


def test_fills_from_trades_give_commission_and_unknown_stays_none():
    got = ev.fills_from_trades(order("FILLED", "1", "60000"), [trade(9001, "1")])
    assert (got.commission, got.commission_asset, got.avg_price) == (D("0.06"), "USDT", D("60000"))
    unknown = ev.fills_from_trades(order("FILLED", "1", "60000"), [])
    assert (unknown.commission, unknown.commission_asset, unknown.avg_price) == (None, None, D("60000"))
