"""The README's main job: replay real recorded prices; stops and targets fire at the right candles."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from decimal import Decimal as D
from io import StringIO

import pytest
from django.core.management import call_command

from stopmonitor.exchange.replay import DEFAULT_FILES, POINT_SECONDS, candle_path

pytestmark = pytest.mark.django_db(transaction=True)


def first_crossing(symbol: str, side: str, stop: D, target: D | None):
    """Independent of the engine: the first path point (index, candle time) whose bid
    (long) or ask = bid + one price step (short) crosses the stop or target, from the CSV."""
    step = {"BTCUSDT": D("0.01"), "ADAUSDT": D("0.00001")}[symbol]
    i = 0
    with open(DEFAULT_FILES[symbol], newline="") as fh:
        for row in csv.DictReader(fh):
            o, h, l, c = (D(row[k]) for k in ("open", "high", "low", "close"))
            for _, price in candle_path(o, h, l, c):
                bid, ask = price, price + step
                if side == "BUY" and (bid <= stop or (target and bid >= target)):
                    return i, row["open_time_utc"], ("STOP_LOSS" if bid <= stop else "TAKE_PROFIT"), bid
                if side == "SELL" and (ask >= stop or (target and ask <= target)):
                    return i, row["open_time_utc"], ("STOP_LOSS" if ask >= stop else "TAKE_PROFIT"), ask
                i += 1
    return None


def test_replay_demo_fires_each_level_at_the_first_crossing_candle():
    from api.models import Operation, StopMonitorEvent
    from stopmonitor.management.commands.replay_demo import DEMO_OPERATIONS, DEMO_TRAILING

    out = StringIO()
    call_command("replay_demo", "--quiet", "--monitor-down", "", stdout=out)  # the monitor never down
    ops = list(Operation.objects.order_by("pk"))
    assert len(ops) == len(DEMO_OPERATIONS)
    fired = 0
    for i, (op, (symbol, side, qty, stop, target)) in enumerate(zip(ops, DEMO_OPERATIONS)):
        if i in DEMO_TRAILING:
            continue
        expected = first_crossing(symbol, side, D(stop), D(target) if target else None)
        trig = StopMonitorEvent.objects.filter(operation=op, event_type="STOP_TRIGGERED").first()
        if expected is None:
            assert trig is None and op.status == "ACTIVE"
            continue
        index, candle_time, kind, observed = expected
        if D(qty) * observed < D("5"):  # below minNotional: blocked once, never traded
            assert [e.payload["reason"] for e in StopMonitorEvent.objects.filter(operation=op, event_type="BLOCKED")] == ["BELOW_MIN_NOTIONAL"]
            assert op.status == "ACTIVE"
            continue
        fired += 1
        assert trig.payload["trigger"] == kind
        assert op.status == "CLOSED" and op.closed_quantity == D(qty)
        if trig.source == "exchange":
            # the exchange-held protection (on by default, stopmonitor/protection.py) filled first, on
            # the same observation: the monitor never triggered; its leg rests at or beyond the level
            # (a take-profit BUY at or below the target, ...), so it fills no earlier than the level
            assert trig.payload["exchange_held"] is True and trig.version == StopMonitorEvent.objects.filter(
                operation=op, event_type="PROTECTION_TRIGGERED").get().version + 1
            level, resting = D(trig.payload["level"]), D(trig.payload["observed_price"])
            closing_buy = side == "SELL"
            assert (resting <= level) if closing_buy == (kind == "TAKE_PROFIT") else (resting >= level), (level, resting)
            assert not StopMonitorEvent.objects.filter(operation=op, event_type="STOP_TRIGGERED", source="loop").exists()
            continue
        assert D(trig.payload["observed_price"]) == observed
        # the recorded candle and leg that crossed: candle open time + 15 s per leg (O, L/H, H/L, C)
        leg_time = datetime.fromisoformat(candle_time.replace("Z", "+00:00")) + timedelta(seconds=POINT_SECONDS * (index % 4))
        assert trig.payload["price_time"] == leg_time.isoformat()
        assert op.status == "CLOSED" and op.closed_quantity == D(qty)
        executed = StopMonitorEvent.objects.get(operation=op, event_type="EXECUTED")
        assert executed.venue == "paper" and D(executed.payload["executed_qty"]) == D(qty)
    assert fired == 5
    text = out.getvalue()
    assert "6 of 8 operations closed" in text and "venue paper" in text


def trailing_path(symbol: str, stop: D, distance: D, activation: D):
    """Independent of the engine: a long's stop trailing ``distance`` under the running bid once the bid
    reached ``activation``, checked for a crossing before each move; returns the moves and the crossing."""
    moves = []
    with open(DEFAULT_FILES[symbol], newline="") as fh:
        for row in csv.DictReader(fh):
            o, h, l, c = (D(row[k]) for k in ("open", "high", "low", "close"))
            for _, bid in candle_path(o, h, l, c):
                if bid <= stop:
                    return moves, (stop, bid)
                if bid >= activation and bid - distance > stop:
                    moves.append((stop, bid - distance))
                    stop = bid - distance
    return moves, None


def test_replay_demo_trailing_stop_locks_in_profit():
    from api.models import Operation, StopMonitorEvent
    from stopmonitor.management.commands.replay_demo import DEMO_OPERATIONS, DEMO_TRAILING

    call_command("replay_demo", "--quiet", stdout=StringIO())
    (index, cfg), = DEMO_TRAILING.items()
    symbol, side, qty, stop, _ = DEMO_OPERATIONS[index]
    op = Operation.objects.order_by("pk")[index]
    moves, crossing = trailing_path(symbol, D(stop), D(cfg["distance"]), D(cfg["activation_price"]))
    recorded = [(D(e.payload["from"]), D(e.payload["to"]), e.source)
                for e in StopMonitorEvent.objects.filter(operation=op, event_type="STOP_MOVED").order_by("version")]
    assert recorded == [(a, b, "trailing") for a, b in moves] and len(moves) >= 2
    trig = StopMonitorEvent.objects.get(operation=op, event_type="STOP_TRIGGERED")
    assert (D(trig.payload["level"]), D(trig.payload["observed_price"])) == crossing
    executed = StopMonitorEvent.objects.get(operation=op, event_type="EXECUTED")
    assert D(executed.payload["avg_price"]) > op.entry_price  # the trail closed it above its entry
    assert op.status == "CLOSED"


def test_bullish_and_bearish_candle_paths():
    assert [leg for leg, _ in candle_path(D(1), D(3), D(0), D(2))] == ["open", "low", "high", "close"]
    assert [leg for leg, _ in candle_path(D(2), D(3), D(0), D(1))] == ["open", "high", "low", "close"]


def test_the_summary_counts_the_passes_that_ran_not_the_observations():
    """The observations the monitor is down for run no pass: the last line said "2000 passes" for
    the README's run, of which 65 observations had no pass (a new user's report)."""
    out = StringIO()
    call_command("replay_demo", "--quiet", "--max-steps", "20", "--monitor-down", "5-9", stdout=out)
    assert out.getvalue().strip().splitlines()[-1].startswith(
        "20 observations, 15 passes (none while the monitor was down) in ")
