"""Trailing and break-even moves in the pass (stopmonitor.engine.moves): only moves are events, a
crossing fires before any move, the stop never loosens."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from stopmonitor.operations import open_operation
from stopmonitor.trailing import TrailingSettings

from .regressions.helpers import refresh, run, stream, types
from .conftest import NOW

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def trailing_op(tenant, symbols):
    def make(side="BUY", entry="9300", stop="9200", target=None, **cfg):
        settings = TrailingSettings(**{k: D(v) for k, v in cfg.items()})
        return open_operation(tenant, symbols["BTCUSDT"], side, D("0.5"), D(entry), D(stop),
                              D(target) if target else None, now=NOW, trailing_settings=settings)
    return make


def moves(op):
    return [(p["from"], p["to"], p["observed"], p["rule"]) for t, p in stream(op) if t == "STOP_MOVED"]


def test_long_trails_the_bid_and_writes_only_moves(paper, trailing_op):
    op = trailing_op(distance="100")
    assert types(op) == ["STOP_SET", "TRAILING_SET"]
    for i, (bid, ask) in enumerate([("9350.00", "9350.01"), ("9340.00", "9340.01"), ("9420.55", "9420.56"),
                                    ("9420.55", "9420.56"), ("9330.00", "9330.01")]):
        paper.set_quote("BTCUSDT", bid, ask)
        summary, _ = run(paper, at=NOW + timedelta(minutes=i))
    # 9350 → stop 9250; 9340 tightens nothing; 9420.55 → 9320.55; the repeat writes nothing;
    # 9330 does not cross 9320.55 and tightens nothing
    assert moves(op) == [("9200", "9250", "9350", "trailing"), ("9250", "9320.55", "9420.55", "trailing")]
    assert refresh(op).stop_price == D("9320.55")
    assert summary.stops_moved == 0 and summary.triggered == 0
    from api.models import StopMonitorEvent
    sources = list(StopMonitorEvent.objects.filter(operation=op, event_type="STOP_MOVED").values_list("source", flat=True))
    assert sources == ["trailing", "trailing"]


def test_crossing_fires_first_and_does_not_move(paper, trailing_op):
    op = trailing_op(distance="100")
    paper.set_quote("BTCUSDT", "9400.00", "9400.01")
    run(paper)
    assert refresh(op).stop_price == D("9300")
    paper.set_quote("BTCUSDT", "9299.99", "9300.00")  # crosses the trailed stop 9300
    summary, decisions = run(paper, at=NOW + timedelta(minutes=1))
    assert summary.triggered == 1 and summary.stops_moved == 0
    assert types(op)[-4:] == ["STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED", "OPERATION_CLOSED"]
    assert [p["level"] for t, p in stream(op) if t == "STOP_TRIGGERED"] == ["9300"]


def test_short_percent_trail_rounds_to_the_tick_and_break_even_moves_once(paper, trailing_op):
    op = trailing_op(side="SELL", entry="9300", stop="9400", distance_percent="1",
                     break_even_price="9200", break_even_fee_percent="0.1")
    paper.set_quote("BTCUSDT", "9249.98", "9250.00")
    run(paper)
    # 9250 × 1.01 = 9342.50: a short's trail rounds down to the tick (0.01), already on it
    paper.set_quote("BTCUSDT", "9199.98", "9200.00")
    run(paper, at=NOW + timedelta(minutes=1))
    # 9200 reaches break-even: 9300 − 0.1 % = 9290.70, tighter than the trail's 9292.00
    paper.set_quote("BTCUSDT", "9189.98", "9190.00")
    run(paper, at=NOW + timedelta(minutes=2))
    assert moves(op) == [("9400", "9342.5", "9250", "trailing"), ("9342.5", "9290.7", "9200", "break_even"),
                         ("9290.7", "9281.9", "9190", "trailing")]


def test_trailing_with_a_step_moves_in_whole_steps(paper, trailing_op):
    op = trailing_op(distance="50", step="25")
    for i, bid in enumerate(["9330", "9340", "9362", "9399.99", "9401"]):
        paper.set_quote("BTCUSDT", bid, D(bid) + D("0.01"))
        run(paper, at=NOW + timedelta(minutes=i))
    # ladder 9300 + 25k under bid − 50: 9280 → 9275, 9290 → 9275 (no move), 9312 → 9300, 9349.99 → 9325,
    # 9351 → 9350
    assert moves(op) == [("9200", "9275", "9330", "trailing"), ("9275", "9300", "9362", "trailing"),
                         ("9300", "9325", "9399.99", "trailing"), ("9325", "9350", "9401", "trailing")]


def test_an_operation_without_trailing_never_moves(paper, open_op):
    op = open_op(stop="9200")
    paper.set_quote("BTCUSDT", "9900", "9900.01")
    summary, _ = run(paper)
    assert types(op) == ["STOP_SET"] and summary.stops_moved == 0


def test_a_patch_between_plan_and_apply_wins(paper, trailing_op):
    """The move is skipped (nothing written) when the stop changed under it."""
    from stopmonitor.engine.context import EngineContext
    from stopmonitor.engine.moves import apply_move
    from stopmonitor.operations import move_levels
    from stopmonitor.trailing import StopMove

    op = trailing_op(distance="100")
    move_levels(op.pk, stop_price=D("9210"), now=NOW)
    decisions = apply_move(op.pk, StopMove(D("9200"), D("9250"), D("9350"), "trailing"),
                           EngineContext(NOW, "cron", "paper"))
    assert [(d.action, d.reason) for d in decisions] == [("skipped", "LEVEL_MOVED")]
    assert refresh(op).stop_price == D("9210")
    assert [p for t, p in stream(op) if t == "STOP_MOVED"] == [{"from": "9200", "to": "9210", "actor": ""}]


def test_the_resting_protection_follows_a_trailing_move(tenant, trailing_op):
    """Issue 14 with issue 13: a trailed stop moves the exchange-held stop too (cancelReplace to the
    new stop less the buffer), never looser, and a stop that did not move leaves it resting."""
    from api.models import StopMonitorProtection, TenantConfig
    from stopmonitor.exchange.paper import PaperExchange

    TenantConfig.objects.create(client=tenant, protection_enabled=True, protection_buffer_bps=50)
    paper = PaperExchange(now=NOW, balances={"BTC": D("0.5"), "USDT": D("0")})
    paper.set_quote("BTCUSDT", "9300.00", "9300.01")
    op = trailing_op(distance="100")
    run(paper, at=NOW)
    assert types(op)[-2:] == ["PROTECTION_REQUESTED", "PROTECTION_PLACED"]
    assert [o.stop_price for o in paper.open_orders()] == [D("9154.00")]  # 9200 less 50 bps

    paper.set_quote("BTCUSDT", "9400.00", "9400.01")  # trails the stop to 9300
    run(paper, at=NOW + timedelta(minutes=1))
    run(paper, at=NOW + timedelta(minutes=2))
    op = refresh(op)
    assert op.stop_price == D("9300") and moves(op) == [("9200", "9300", "9400", "trailing")]
    assert [t for t in types(op) if t.startswith(("STOP_MOVED", "PROTECTION"))] == [
        "PROTECTION_REQUESTED", "PROTECTION_PLACED", "STOP_MOVED", "PROTECTION_REQUESTED", "PROTECTION_MOVED"]
    (resting,) = paper.open_orders()
    assert (resting.client_order_id, resting.stop_price, resting.requested_qty) == (f"sp{op.pk}-2", D("9253.50"), D("0.5"))
    row = StopMonitorProtection.objects.get(pk=op.pk)
    assert (row.status, row.stop_price) == ("PLACED", D("9253.5"))

    paper.set_quote("BTCUSDT", "9350.00", "9350.01")  # a dip: the stop stays, so does the resting order
    run(paper, at=NOW + timedelta(minutes=3))
    assert [o.client_order_id for o in paper.open_orders()] == [f"sp{op.pk}-2"]
    assert len([c for c in paper.calls if c[0] == "cancel_replace"]) == 1
