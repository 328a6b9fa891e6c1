"""The trailing/break-even rule (stopmonitor.trailing): exact values and properties, no database."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stopmonitor.trailing import (
    BREAK_EVEN,
    TRAILING,
    InvalidTrailing,
    StopMove,
    TrailingSettings,
    fold_stops,
    next_stop,
    validate,
)


@pytest.mark.parametrize(
    ("side", "stop", "cfg", "observed", "tick", "expected"),
    [
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("5")), D("103"), D("0.01"),
                     StopMove(D("95"), D("98"), D("103"), TRAILING), id="long-absolute"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("5")), D("99.5"), D("0.01"),
                     None, id="long-absolute-not-tighter"),
        pytest.param("SELL", D("105"), TrailingSettings(distance=D("5")), D("97"), D("0.01"),
                     StopMove(D("105"), D("102"), D("97"), TRAILING), id="short-absolute"),
        pytest.param("BUY", D("90"), TrailingSettings(distance_percent=D("2")), D("101.37"), D("0.01"),
                     # 101.37 × 0.98 = 99.3426 → up to the tick (protective) 99.35
                     StopMove(D("90"), D("99.35"), D("101.37"), TRAILING), id="long-percent-tick-0.01"),
        pytest.param("BUY", D("90"), TrailingSettings(distance_percent=D("2")), D("101.37"), D("0.5"),
                     StopMove(D("90"), D("99.5"), D("101.37"), TRAILING), id="long-percent-tick-0.5"),
        pytest.param("SELL", D("110"), TrailingSettings(distance_percent=D("2")), D("98.63"), D("0.01"),
                     # 98.63 × 1.02 = 100.6026 → down to the tick (protective) 100.60
                     StopMove(D("110"), D("100.60"), D("98.63"), TRAILING), id="short-percent-tick-0.01"),
        pytest.param("SELL", D("110"), TrailingSettings(distance_percent=D("2")), D("98.63"), D("1"),
                     StopMove(D("110"), D("100"), D("98.63"), TRAILING), id="short-percent-tick-1"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("5"), activation_price=D("110")), D("108"),
                     D("0.01"), None, id="long-not-yet-activated"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("5"), activation_price=D("110")), D("110"),
                     D("0.01"), StopMove(D("95"), D("105"), D("110"), TRAILING), id="long-activated-at-level"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("5"), step=D("2")), D("106.9"), D("0.01"),
                     # raw 101.9 floored onto 100 + 2k → 100
                     StopMove(D("95"), D("100"), D("106.9"), TRAILING), id="long-step-ladder-at-entry"),
        pytest.param("BUY", D("100"), TrailingSettings(distance=D("5"), step=D("2")), D("106.9"), D("0.01"),
                     None, id="long-step-wiggle-writes-nothing"),
        pytest.param("BUY", D("95"), TrailingSettings(break_even_price=D("104"), break_even_fee_percent=D("0.2")),
                     D("104"), D("0.01"), StopMove(D("95"), D("100.20"), D("104"), BREAK_EVEN), id="long-break-even"),
        pytest.param("SELL", D("105"), TrailingSettings(break_even_price=D("96"), break_even_fee_percent=D("0.2")),
                     D("95.5"), D("0.01"), StopMove(D("105"), D("99.80"), D("95.5"), BREAK_EVEN), id="short-break-even"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("1"), break_even_price=D("104")), D("104"), D("0.01"),
                     StopMove(D("95"), D("103"), D("104"), TRAILING), id="long-trail-beats-break-even"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("0.001")), D("100.004"), D("0.01"),
                     # protective rounding would reach the bid (100.01 > 100.004): the other way, 100.00
                     StopMove(D("95"), D("100.00"), D("100.004"), TRAILING), id="long-never-at-the-bid"),
    ],
)
def test_next_stop_exact(side, stop, cfg, observed, tick, expected):
    assert next_stop(side, stop, D("100"), cfg, observed, tick) == expected


@pytest.mark.parametrize(
    ("side", "stop", "cfg", "field"),
    [
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("0")), "trail_distance", id="distance-zero"),
        pytest.param("BUY", D("95"), TrailingSettings(distance_percent=D("100")), "trail_distance_percent",
                     id="percent-100"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("1"), distance_percent=D("1")),
                     "trail_distance_percent", id="both-distances"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("1"), activation_price=D("99")),
                     "trail_activation_price", id="long-activation-below-entry"),
        pytest.param("SELL", D("105"), TrailingSettings(distance=D("1"), activation_price=D("101")),
                     "trail_activation_price", id="short-activation-above-entry"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("1"), activation_price=D("101.005")),
                     "trail_activation_price", id="activation-off-tick"),
        pytest.param("BUY", D("95"), TrailingSettings(distance=D("1"), step=D("0.015")), "trail_step",
                     id="step-off-tick"),
        pytest.param("BUY", D("95"), TrailingSettings(break_even_price=D("100")), "break_even_price",
                     id="break-even-at-entry"),
        pytest.param("BUY", None, TrailingSettings(distance=D("1")), "trail_distance", id="no-stop"),
        # the field the trader set is named (it said trail_distance for a percent distance too)
        pytest.param("BUY", None, TrailingSettings(distance_percent=D("2")), "trail_distance_percent",
                     id="no-stop-percent"),
        pytest.param("BUY", D("95"), TrailingSettings(activation_price=D("110")), "trail_activation_price",
                     id="activation-without-distance"),
    ],
)
def test_validate_refuses(side, stop, cfg, field):
    with pytest.raises(InvalidTrailing) as caught:
        validate(side, D("100"), stop, cfg, D("0.01"))
    assert caught.value.field == field


def test_validate_accepts_a_full_configuration():
    validate("BUY", D("100"), D("95"), TrailingSettings(distance=D("2.5"), activation_price=D("103"), step=D("0.5"),
                                                        break_even_price=D("102"), break_even_fee_percent=D("0.2")),
             D("0.01"))


# ---------------------------------------------------------------- properties

TICKS = st.sampled_from([D("0.01"), D("0.05"), D("0.5"), D("1")])
PRICES = st.lists(st.decimals(min_value=D("80"), max_value=D("140"), places=3), min_size=1, max_size=25)


@st.composite
def configs(draw):
    kind = draw(st.sampled_from(["absolute", "percent"]))
    distance = draw(st.decimals(min_value=D("0.1"), max_value=D("10"), places=2)) if kind == "absolute" else None
    percent = draw(st.decimals(min_value=D("0.1"), max_value=D("9"), places=2)) if kind == "percent" else None
    activation = draw(st.none() | st.sampled_from([D("101"), D("105"), D("120")]))
    step = draw(st.none() | st.sampled_from([D("1"), D("2"), D("5")]))
    break_even = draw(st.none() | st.sampled_from([D("102"), D("110")]))
    return TrailingSettings(distance=distance, distance_percent=percent, activation_price=activation, step=step,
                            break_even_price=break_even, break_even_fee_percent=D("0.1"))


@settings(max_examples=300, deadline=None)
@given(configs(), PRICES, TICKS, st.randoms(use_true_random=False))
def test_final_stop_depends_only_on_the_set_of_prices(cfg, prices, tick, rnd):
    stop0 = D("90")
    final, _ = fold_stops("BUY", stop0, D("100"), cfg, prices, tick)
    # A price at or below a tightened stop would have closed the position; those below the final stop
    # add no candidate above it, so the prices that never cross are the ones above the final stop.
    kept = [p for p in prices if p > final]
    if kept:
        ascending, _ = fold_stops("BUY", stop0, D("100"), cfg, sorted(set(kept)), tick)
        assert ascending == final
    shuffled = kept + rnd.sample(kept, k=len(kept) // 2)  # another order, with duplicates
    rnd.shuffle(shuffled)
    again, _ = fold_stops("BUY", stop0, D("100"), cfg, shuffled, tick)
    assert again == final


@settings(max_examples=300, deadline=None)
@given(configs(), PRICES, TICKS, st.sampled_from(["BUY", "SELL"]))
def test_never_loosens_and_never_through_the_price(cfg, prices, tick, side):
    entry = D("100")
    stop = D("90") if side == "BUY" else D("110")
    if side == "SELL":  # mirror the configuration and prices around the entry for a short
        cfg = TrailingSettings(distance=cfg.distance, distance_percent=cfg.distance_percent,
                               activation_price=None if cfg.activation_price is None else 2 * entry - cfg.activation_price,
                               step=cfg.step,
                               break_even_price=None if cfg.break_even_price is None else 2 * entry - cfg.break_even_price,
                               break_even_fee_percent=cfg.break_even_fee_percent)
        prices = [2 * entry - p for p in prices]
    _, moves = fold_stops(side, stop, entry, cfg, prices, tick)
    for move in moves:
        if side == "BUY":
            assert move.new_stop > move.old_stop and move.new_stop < move.observed
        else:
            assert move.new_stop < move.old_stop and move.new_stop > move.observed
        assert move.new_stop % tick == 0


@settings(max_examples=300, deadline=None)
@given(PRICES, st.sampled_from([D("1"), D("2"), D("5")]), st.decimals(min_value=D("0.5"), max_value=D("8"), places=2))
def test_step_moves_only_in_whole_steps(prices, step, distance):
    cfg = TrailingSettings(distance=distance, step=step)
    _, moves = fold_stops("BUY", D("90"), D("100"), cfg, prices, D("0.01"))
    for move in moves:
        assert (move.new_stop - D("100")) % step == 0  # on the ladder anchored at the entry
    for earlier, later in zip(moves, moves[1:]):
        assert (later.new_stop - earlier.new_stop) % step == 0


@settings(max_examples=300, deadline=None)
@given(PRICES, st.sampled_from([D("102"), D("110")]))
def test_break_even_moves_at_most_once(prices, level):
    cfg = TrailingSettings(break_even_price=level, break_even_fee_percent=D("0.2"))
    _, moves = fold_stops("BUY", D("90"), D("100"), cfg, prices, D("0.01"))
    assert [m.source for m in moves] in ([], [BREAK_EVEN])
    if moves:
        assert moves[0].new_stop == D("100.20")
