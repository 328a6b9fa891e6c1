"""The pure protection core: resting prices, quantities, ids, the plan, moves, the audit diff,
cancelReplace outcomes and the fold (../shared/design/protection.md)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stopmonitor import protection as p
from stopmonitor.exchange.base import (
    CancelReplaceCancelFailed,
    CancelReplaceNewFailed,
    CancelReplaceResult,
    CancelReplaceUnknown,
    OcoRequest,
    OrderRejected,
    OrderResult,
    StopOrderRequest,
    SymbolFilters,
)
from stopmonitor.execution import StoredEvent

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
BTC = SymbolFilters("BTCUSDT", "BTC", "USDT", tick_size=D("0.01"), step_size=D("0.00001"), min_qty=D("0.00001"),
                    max_qty=D("9000"), min_notional=D("5"))


def order(cid, status="NEW", qty="0.4", executed="0", symbol="BTCUSDT", stop="57000") -> OrderResult:
    return OrderResult(symbol, "SELL", status, 77, cid, D(qty), D(executed), D(executed) * D(stop), (), NOW,
                       "STOP_LOSS", D(stop), None, -1)


def state(op=1, status=p.PLACED, gen=1, stop="57000", qty="0.4", updated=NOW - timedelta(hours=1),
          replaced=None, replaces="") -> p.ProtectionState:
    return p.ProtectionState(op, status, gen, f"sp{op}-{gen}", p.STOP_LOSS, "SELL", D(qty), D(stop), None, 77, "",
                             replaces, updated, updated, replaced, updated, 3)


# ----------------------------------------------------------------------------- prices


@pytest.mark.parametrize("side, stop, bps, tick, expected", [
    pytest.param("SELL", D("60000"), 50, D("0.01"), D("59700.00"), id="long-50bps-below"),
    pytest.param("SELL", D("60000.03"), 10, D("0.01"), D("59940.02"), id="long-rounds-down-away-from-market"),
    pytest.param("BUY", D("60000.03"), 10, D("0.01"), D("60060.04"), id="short-rounds-up-away-from-market"),
    pytest.param("SELL", D("0.0421"), 0, D("0.0001"), D("0.0421"), id="zero-buffer-on-tick-unchanged"),
    pytest.param("SELL", D("0.04215"), 0, D("0.0001"), D("0.0421"), id="zero-buffer-off-tick-down"),
    pytest.param("BUY", D("0.04215"), 0, D("0.0001"), D("0.0422"), id="zero-buffer-off-tick-up"),
])
def test_resting_stop_price(side, stop, bps, tick, expected):
    assert p.resting_stop_price(side, stop, bps, tick) == expected


@given(stop=st.decimals(min_value=D("0.0001"), max_value=D("1000000"), places=4),
       bps=st.integers(0, p.MAX_BUFFER_BPS), tick=st.sampled_from([D("0.01"), D("0.0001"), D("1"), D("0.00000001")]))
@settings(max_examples=300, deadline=None)
def test_resting_stop_is_on_tick_and_never_on_the_market_side_of_our_stop(stop, bps, tick):
    for side in ("SELL", "BUY"):
        try:
            price = p.resting_stop_price(side, stop, bps, tick)
        except ValueError:
            assert side == "SELL"  # only a long's stop can round to zero
            continue
        assert price % tick == 0
        assert (price <= stop) if side == "SELL" else (price >= stop)


def test_limit_leg_is_beyond_the_target():
    assert p.resting_limit_price("SELL", D("65000.001"), 10, D("0.01")) == D("65065.01")
    assert p.resting_limit_price("BUY", D("55000"), 10, D("0.01")) == D("54945.00")


# ----------------------------------------------------------------------------- ids and settings


def test_client_ids_are_deterministic_and_ours_are_recognised():
    assert p.protection_client_id(42, 3) == "sp42-3"
    assert p.parse_client_id("sp42-3") == (42, 3, "")
    assert p.parse_client_id("sp42-3t") == (42, 3, "t")
    for foreign in ("x-R4BD3S82102a551f8c1642bba06728", "sm42-S1-a1b2c3d4", "sp42", "SP42-3", "sp42-3x", ""):
        assert p.parse_client_id(foreign) is None
    with pytest.raises(ValueError):
        p.protection_client_id(0, 1)
    assert len(p.protection_client_id(10**15, 10**6) + "t") <= 36


@pytest.mark.parametrize("setting, venue, on", [
    pytest.param(None, "binance", True, id="default-on-binance"),
    pytest.param(None, "binance-testnet", True, id="default-on-testnet"),
    pytest.param(None, "paper", False, id="default-off-paper"),
    pytest.param(False, "binance", False, id="explicit-off"),
    pytest.param(True, "paper", True, id="explicit-on"),
])
def test_protection_enabled(setting, venue, on):
    assert p.protection_enabled(setting, venue) is on


@pytest.mark.parametrize("value", [-1, p.MAX_BUFFER_BPS + 1, 1.5, "50", True, None])
def test_buffer_refuses_what_is_not_bps(value):
    with pytest.raises(ValueError, match="basis points"):
        p.check_buffer_bps(value)


# ----------------------------------------------------------------------------- quantities (P6)


def test_allocate_gives_each_its_remaining_until_free_plus_own_locked_runs_out():
    assert p.allocate([(1, D("0.5")), (2, D("0.4")), (3, D("0.3"))], free=D("0.2"), own_locked=D("0.5")) == {
        1: D("0.5"), 2: D("0.2"), 3: D("0")}
    assert p.allocate([(1, D("0.5"))], free=None, own_locked=D("0")) == {1: D("0.5")}


@given(ops=st.lists(st.decimals(min_value=0, max_value=10, places=8), max_size=8),
       free=st.one_of(st.none(), st.decimals(min_value=0, max_value=20, places=8)),
       locked=st.decimals(min_value=0, max_value=20, places=8))
@settings(max_examples=300, deadline=None)
def test_allocation_never_exceeds_remaining_nor_free_plus_locked(ops, free, locked):
    shares = p.allocate(list(enumerate(ops, start=1)), free, locked)
    for op_id, remaining in enumerate(ops, start=1):
        assert D(0) <= shares[op_id] <= remaining
    if free is not None:
        assert sum(shares.values(), D(0)) <= free + locked
    assert sum(shares.values(), D(0)) <= sum(ops, D(0))


# ----------------------------------------------------------------------------- the plan (P1)


@pytest.mark.parametrize("kwargs, expected", [
    pytest.param(dict(), p.ProtectionPlan(7, 1, "BTCUSDT", p.STOP_LOSS, "SELL", D("0.4"), D("59700.00"), None, "sp7-1"),
                 id="long-stop"),
    pytest.param(dict(opening_side="SELL", stop_price=D("61000"), last_price=D("60000.01")),
                 p.ProtectionPlan(7, 1, "BTCUSDT", p.STOP_LOSS, "BUY", D("0.4"), D("61305.00"), None, "sp7-1"),
                 id="short-stop"),
    pytest.param(dict(target_price=D("65000")),
                 p.ProtectionPlan(7, 1, "BTCUSDT", p.OCO, "SELL", D("0.4"), D("59700.00"), D("65325.00"), "sp7-1"),
                 id="long-oco-with-target"),
    pytest.param(dict(target_price=D("60000")),
                 p.ProtectionPlan(7, 1, "BTCUSDT", p.STOP_LOSS, "SELL", D("0.4"), D("59700.00"), None, "sp7-1"),
                 id="target-already-crossed-stop-alone"),
    pytest.param(dict(available=D("0.123456789")),
                 p.ProtectionPlan(7, 1, "BTCUSDT", p.STOP_LOSS, "SELL", D("0.12345"), D("59700.00"), None, "sp7-1"),
                 id="quantity-floored-to-step"),
    pytest.param(dict(generation=4),
                 p.ProtectionPlan(7, 4, "BTCUSDT", p.STOP_LOSS, "SELL", D("0.4"), D("59700.00"), None, "sp7-4"),
                 id="generation-in-the-id"),
    pytest.param(dict(stop_price=None), p.Unprotectable("NO_STOP", "no stop price set"), id="no-stop"),
    pytest.param(dict(last_price=D("59700")), "PRICE_THROUGH_STOP", id="price-already-through"),
    pytest.param(dict(available=D("0")), "INSUFFICIENT_BALANCE", id="nothing-to-protect"),
    pytest.param(dict(available=D("0.00008")), "BELOW_MIN_NOTIONAL", id="below-min-notional-at-the-resting-stop"),
    pytest.param(dict(filters=replace(BTC, status="HALT")), "SYMBOL_STATUS", id="halted"),
    pytest.param(dict(filters=replace(BTC, stop_loss_allowed=False)), "ORDER_TYPE_NOT_ALLOWED", id="no-stop-loss-type"),
    pytest.param(dict(filters=replace(BTC, cancel_replace_allowed=False)), "ORDER_TYPE_NOT_ALLOWED", id="no-cancel-replace"),
])
def test_plan(kwargs, expected):
    args = dict(operation_id=7, opening_side="BUY", available=D("0.4"), stop_price=D("60000"), target_price=None,
                filters=BTC, buffer_bps=50, generation=1, last_price=D("60500"))
    args.update(kwargs)
    got = p.plan_protection(**args)
    if isinstance(expected, str):
        assert isinstance(got, p.Unprotectable) and got.reason == expected
    else:
        assert got == expected


def test_plan_requests():
    stop = p.ProtectionPlan(7, 1, "BTCUSDT", p.STOP_LOSS, "SELL", D("0.4"), D("59700"), None, "sp7-1")
    oco = replace(stop, kind=p.OCO, limit_price=D("65325"))
    assert stop.request() == StopOrderRequest("BTCUSDT", "SELL", D("0.4"), D("59700"), "sp7-1")
    assert oco.request() == OcoRequest("BTCUSDT", "SELL", D("0.4"), D("59700"), D("65325"), "sp7-1", "sp7-1t", "sp7-1l")
    assert stop.payload() == {"client_order_id": "sp7-1", "generation": 1, "kind": "STOP_LOSS", "side": "SELL",
                              "quantity": "0.4", "stop_price": "59700", "limit_price": None}


# ----------------------------------------------------------------------------- moves (P3)


@pytest.mark.parametrize("current, wanted, expected", [
    pytest.param(state(), D("57000.005"), p.Move("none", "LESS_THAN_A_TICK"), id="less-than-a-tick"),
    pytest.param(state(), D("57100"), p.Move("replace", "STOP_MOVED", stop_price=D("57100"), generation=2),
                 id="moved-a-tick-or-more"),
    pytest.param(state(replaced=NOW - timedelta(seconds=20)), D("57100"),
                 p.Move("defer", "CHURN_LIMIT", stop_price=D("57100"), not_before=NOW + timedelta(seconds=40)),
                 id="replaced-20s-ago-waits"),
    pytest.param(state(replaced=NOW - timedelta(seconds=60)), D("57100"),
                 p.Move("replace", "STOP_MOVED", stop_price=D("57100"), generation=2), id="interval-passed"),
    pytest.param(state(status=p.REQUESTED), D("57100"), p.Move("none", "NOT_RESTING"), id="a-move-already-requested"),
    pytest.param(None, D("57100"), p.Move("none", "NOT_RESTING"), id="nothing-resting"),
])
def test_decide_move(current, wanted, expected):
    assert p.decide_move(current, wanted, D("0.01"), NOW, timedelta(seconds=60)) == expected


@given(moves=st.lists(st.tuples(st.integers(0, 200), st.integers(-500, 500)), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_at_most_one_replacement_per_interval_and_never_below_a_tick(moves):
    """Whatever the sequence of wanted stops (freqtrade #11788: 175 reposts in 14 minutes)."""
    current, now, replacements = state(), NOW, []
    for seconds, cents in moves:
        now += timedelta(seconds=seconds)
        wanted = current.stop_price + D(cents) / 100
        move = p.decide_move(current, wanted, D("0.01"), now, timedelta(seconds=60))
        if move.action == "replace":
            assert abs(wanted - current.stop_price) >= D("0.01")
            replacements.append(now)
            current = replace(current, stop_price=wanted, generation=move.generation, replaced_at=now)
    assert all(b - a >= timedelta(seconds=60) for a, b in zip(replacements, replacements[1:]))


@pytest.mark.parametrize("wanted, expected", [
    pytest.param(D("0.25"), p.Move("amend", "PARTIAL_CLOSE", quantity=D("0.25")), id="partial-close-amends"),
    pytest.param(D("0.4"), p.Move("none", "SAME_QUANTITY"), id="same"),
    pytest.param(D("0.000001"), p.Move("cancel", "BELOW_MIN_QTY", quantity=D("0")), id="dust-cancels"),
    pytest.param(D("0.5"), p.Move("replace", "QUANTITY_GREW", stop_price=D("57000"), quantity=D("0.5"), generation=2),
                 id="grew-replaces"),
])
def test_decide_resize(wanted, expected):
    assert p.decide_resize(state(), wanted, BTC) == expected


# ----------------------------------------------------------------------------- the audit (P5)


def test_audit_diff():
    expected = {
        1: state(1),                                        # resting: nothing to do
        2: state(2),                                        # placed an hour ago, gone: ask
        3: state(3, updated=NOW - timedelta(seconds=5)),    # placed 5 s ago, not visible yet
        4: None,                                            # never armed
        5: state(5, status=p.REQUESTED),                    # intent without an answer: ask
        6: state(6, gen=2),                                 # gen 1 still resting: stale
        8: state(8, status=p.REQUESTED, gen=3, replaces="sp8-2"),  # a move in flight: the old one is expected
    }
    open_orders = [order("sp1-1"), order("sp6-1"), order("sp6-2"), order("sp9-4"), order("sp9-4t"),
                   order("x-foreign-1"), order("sm1-S1-deadbeef"), order("sp8-2")]

    actions = p.audit(expected, open_orders, NOW, timedelta(seconds=60), symbols={k: "BTCUSDT" for k in expected})

    assert [(a.action, a.operation_id, a.client_order_id, a.reason) for a in actions] == [
        ("ARM", 4, "", "MISSING"),
        ("CANCEL", 6, "sp6-1", "STALE_GENERATION"),
        ("CANCEL", 9, "sp9-4", "ORPHANED"),            # one cancel for the list, never the foreign orders
        ("RESOLVE", 2, "sp2-1", "PLACED_NOT_OPEN"),
        ("RESOLVE", 5, "sp5-1", "REQUESTED_NOT_OPEN"),
        ("RESOLVE", 8, "sp8-3", "REQUESTED_NOT_OPEN"),
        ("WAIT", 3, "sp3-1", "NOT_VISIBLE_YET"),
    ]


@given(expected_ids=st.sets(st.integers(1, 30), max_size=15), resting_ids=st.sets(st.integers(1, 40), max_size=20),
       foreign=st.lists(st.text("abcxyz0123456789-", min_size=1, max_size=12), max_size=5))
@settings(max_examples=200, deadline=None)
def test_audit_never_touches_foreign_orders_and_leaves_nothing_unexplained(expected_ids, resting_ids, foreign):
    expected = {op: state(op) for op in expected_ids}
    open_orders = [order(f"sp{op}-1") for op in resting_ids] + [order(f"x{f}") for f in foreign]
    actions = p.audit(expected, open_orders, NOW, timedelta(seconds=60))
    cancelled = {a.client_order_id for a in actions if a.action == p.CANCEL}
    assert all(p.parse_client_id(c) for c in cancelled)               # only ours
    assert cancelled == {f"sp{op}-1" for op in resting_ids - expected_ids}  # every leftover, after this audit
    resolved = {a.operation_id for a in actions if a.action == p.RESOLVE}
    assert resolved == expected_ids - resting_ids                     # every expected-but-absent is asked


# ----------------------------------------------------------------------------- outcomes (P2, P4)


def test_interpret_close_outcomes():
    cancelled, market = order("sp1-1", status="CANCELED"), order("sm1-S1-x", status="FILLED", executed="0.4")
    closed = p.interpret_close(CancelReplaceResult(cancelled, market))
    assert (closed.kind, closed.new, [e.event_type for e in closed.events]) == ("CLOSED", market, ["PROTECTION_CANCELLED"])
    assert closed.events[0].payload["reason"] == "CLOSE" and closed.events[0].payload["client_order_id"] == "sp1-1"

    fired = p.interpret_close(CancelReplaceCancelFailed("cancel failed", cancel_code=-2011))
    assert (fired.kind, fired.events, fired.new, fired.code) == ("EXCHANGE_FIRED", (), None, -2011)

    unprotected = p.interpret_close(CancelReplaceNewFailed("new failed", cancelled, new_code=-2010))
    assert unprotected.kind == "UNPROTECTED"
    assert [e.event_type for e in unprotected.events] == ["PROTECTION_CANCELLED", "UNPROTECTED"]
    assert unprotected.events[1].payload["reason"] == "CLOSE_REFUSED_AFTER_CANCEL"

    assert p.interpret_close(CancelReplaceUnknown("timeout", "sp1-1", "sm1-S1-x")).kind == "UNKNOWN"
    assert p.interpret_close(OrderRejected("filter", -1013)).kind == "REJECTED"
    with pytest.raises(TypeError):
        p.interpret_close(ValueError("nope"))


@pytest.mark.parametrize("found, kind, executed, final, events", [
    pytest.param(None, "NOT_VISIBLE", D(0), False, [], id="not-found-is-not-proof"),
    pytest.param(order("sp1-1"), "RESTING", D(0), False, [], id="still-resting"),
    pytest.param(order("sp1-1", "FILLED", executed="0.4"), "FILLED", D("0.4"), True, ["PROTECTION_TRIGGERED"],
                 id="fired-and-filled"),
    pytest.param(order("sp1-1", "PARTIALLY_FILLED", executed="0.1"), "PARTIAL", D("0.1"), False,
                 ["PROTECTION_TRIGGERED"], id="filling"),
    pytest.param(order("sp1-1", "EXPIRED", executed="0.1"), "PARTIAL", D("0.1"), True, ["PROTECTION_TRIGGERED"],
                 id="expired-part-filled"),
    pytest.param(order("sp1-1", "CANCELED"), "GONE", D(0), True, [], id="cancelled-outside-us"),
])
def test_interpret_protection_order(found, kind, executed, final, events):
    finding = p.interpret_protection_order(found)
    assert (finding.kind, finding.executed_qty, finding.final, [e.event_type for e in finding.events]) == (
        kind, executed, final, events)


# ----------------------------------------------------------------------------- the fold


def ev(version, event_type, payload, seconds=0):
    return StoredEvent(1, 1, "BTCUSDT", version, event_type, None, "cron", "binance", payload,
                       NOW + timedelta(seconds=seconds))


def test_fold_of_arm_move_and_trigger():
    events = [
        ev(1, "STOP_SET", {"stop_price": "60000"}),
        ev(2, p.PROTECTION_REQUESTED, {"client_order_id": "sp1-1", "generation": 1, "kind": "STOP_LOSS", "side": "SELL",
                                       "quantity": "0.4", "stop_price": "59700", "limit_price": None}),
        ev(3, p.PROTECTION_PLACED, {"client_order_id": "sp1-1", "order_id": 77, "quantity": "0.4"}, 1),
        ev(4, p.PROTECTION_REQUESTED, {"client_order_id": "sp1-2", "generation": 2, "kind": "STOP_LOSS", "side": "SELL",
                                       "quantity": "0.4", "stop_price": "59800", "limit_price": None,
                                       "replaces": "sp1-1", "move": True}, 60),
    ]
    mid = p.fold_protection(events)[1]
    assert (mid.status, mid.generation, mid.client_order_id, mid.replaces, mid.placed_at) == (
        p.REQUESTED, 2, "sp1-2", "sp1-1", NOW + timedelta(seconds=1))
    events += [
        ev(5, p.PROTECTION_MOVED, {"client_order_id": "sp1-2", "generation": 2, "order_id": 78, "stop_price": "59800"}, 61),
        ev(6, p.PROTECTION_TRIGGERED, {"client_order_id": "sp1-2", "exchange_status": "FILLED"}, 90),
    ]
    final = p.fold_protection(events)[1]
    assert (final.status, final.generation, final.client_order_id, final.stop_price, final.exchange_order_id,
            final.replaced_at, final.replaces, final.last_version) == (
        p.TRIGGERED, 2, "sp1-2", D("59800"), 78, NOW + timedelta(seconds=61), "", 6)


def test_fold_refuses_a_placed_without_a_request_and_starts_unprotected():
    with pytest.raises(ValueError):
        p.apply_protection(None, ev(1, p.PROTECTION_PLACED, {"order_id": 1}))
    first = p.apply_protection(None, ev(1, p.UNPROTECTED, {"reason": "BELOW_MIN_NOTIONAL"}))
    assert (first.status, first.reason) == (p.UNPROTECTED_STATUS, "BELOW_MIN_NOTIONAL")
