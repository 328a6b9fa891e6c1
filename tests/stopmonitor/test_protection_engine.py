"""Exchange-held protection in the engine, one test per outcome of the protocol
(../shared/design/protection.md) on the paper exchange with a tracked balance."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from api.models import StopMonitorProtection, TenantConfig
from stopmonitor.exchange.base import StopOrderRequest
from stopmonitor.exchange.paper import PaperExchange, Scripted
from stopmonitor.operations import move_levels

from .conftest import NOW
from .regressions.helpers import refresh, run, stream, types

pytestmark = pytest.mark.django_db


@pytest.fixture
def paper():
    ex = PaperExchange(now=NOW, balances={"BTC": D("0.5"), "USDT": D("0")})
    ex.set_quote("BTCUSDT", "9300", "9300.01")
    return ex


@pytest.fixture
def protected(tenant, open_op):
    TenantConfig.objects.create(client=tenant, protection_enabled=True, protection_buffer_bps=50)
    return open_op()  # long 0.5 BTC, stop 9200: the resting stop sits at 9154


def sold(paper) -> D:
    return D("0.5") - paper.balances["BTC"] - paper.locked.get("BTC", D(0))


def calls(paper, name):
    return [c for c in paper.calls if c[0] == name]


def arm(paper, op):
    run(paper)
    assert types(op)[-2:] == ["PROTECTION_REQUESTED", "PROTECTION_PLACED"]
    return f"sp{op.pk}-1"


def test_the_pass_arms_the_sellable_quantity_a_buffer_beyond_the_stop(paper, protected):
    run(paper)

    op = protected
    assert types(op) == ["STOP_SET", "PROTECTION_REQUESTED", "PROTECTION_PLACED"]
    requested = stream(op)[1][1]
    assert (requested["client_order_id"], requested["stop_price"], requested["quantity"], requested["side"]) == (
        f"sp{op.pk}-1", "9154", "0.5", "SELL")
    assert calls(paper, "place_stop_order") == [("place_stop_order", ("BTCUSDT", "SELL", D("0.5"), D("9154.00"),
                                                                      f"sp{op.pk}-1"))]
    assert (paper.balances["BTC"], paper.locked["BTC"]) == (D("0"), D("0.5"))  # the resting SELL locks it
    row = StopMonitorProtection.objects.get(pk=op.pk)
    assert (row.status, row.stop_price, row.quantity) == ("PLACED", D("9154"), D("0.5"))
    # invariant 9: one quote request in the pass, shared by arming and the triggers
    assert calls(paper, "book_tickers") == [("book_tickers", ("BTCUSDT",))]

    run(paper, NOW + timedelta(seconds=60))  # resting as expected: one openOrders read, nothing placed
    assert len(calls(paper, "place_stop_order")) == 1 and len(calls(paper, "open_orders")) == 2
    assert len(calls(paper, "book_tickers")) == 2


def test_protection_off_by_default_on_paper_sends_nothing(paper, open_op):
    op = open_op()
    run(paper)
    assert types(op) == ["STOP_SET"] and calls(paper, "open_orders") == []


def test_monitor_close_is_one_cancel_replace_200(paper, protected):
    cid = arm(paper, protected)
    paper.set_quote("BTCUSDT", "9190", "9190.01")  # our stop crossed at the bid, the resting stop not

    run(paper, NOW + timedelta(seconds=60))

    op = refresh(protected)
    assert types(op)[3:] == ["STOP_TRIGGERED", "EXECUTION_SUBMITTED", "PROTECTION_CANCELLED", "EXECUTED",
                             "OPERATION_CLOSED"]
    assert stream(op)[5][1]["client_order_id"] == cid
    assert calls(paper, "place_market_order") == []
    assert [c[1][:2] for c in calls(paper, "cancel_replace")] == [("BTCUSDT", cid)]
    assert (op.status, op.closed_quantity, sold(paper)) == ("CLOSED", D("0.5"), D("0.5"))


def test_exchange_stop_fired_while_the_monitor_was_down_is_recorded_from_the_exchange(paper, protected):
    cid = arm(paper, protected)
    paper.set_last_price("BTCUSDT", "9150")  # the monitor is down: the resting stop triggers
    paper.set_quote("BTCUSDT", "9140", "9140.01")  # and fills at the next price

    summary, _ = run(paper, NOW + timedelta(minutes=5))

    op = refresh(protected)
    assert types(op)[3:] == ["PROTECTION_TRIGGERED", "STOP_TRIGGERED", "EXECUTED", "OPERATION_CLOSED"]
    events = {t: e for t, e in stream(op)}
    assert events["EXECUTED"]["executed_qty"] == "0.5" and events["EXECUTED"]["avg_price"] == "9140"
    from api.models import StopMonitorEvent

    assert set(StopMonitorEvent.objects.filter(operation=op, version__gt=3).values_list("source", flat=True)) == {
        "exchange"}
    assert calls(paper, "place_market_order") == [] and calls(paper, "cancel_replace") == []
    assert (op.status, sold(paper), summary.triggered) == ("CLOSED", D("0.5"), 0)
    assert refresh(op).executions.get(pk=cid).source == "exchange"


def test_cancel_replace_400_while_the_stop_fills_never_sends_a_market_order(paper, protected, monkeypatch):
    cid = arm(paper, protected)
    original = paper.cancel_replace

    def stop_fires_first(symbol, cancel_id, new):
        paper.triggered.add(cancel_id)
        paper._fill_triggered(cancel_id)  # filled a millisecond before our request arrives
        return original(symbol, cancel_id, new)

    monkeypatch.setattr(paper, "cancel_replace", stop_fires_first)
    paper.set_quote("BTCUSDT", "9190", "9190.01")

    run(paper, NOW + timedelta(seconds=60))

    op = refresh(protected)
    assert types(op)[3:] == ["STOP_TRIGGERED", "EXECUTION_SUBMITTED", "FAILED", "PROTECTION_TRIGGERED",
                             "STOP_TRIGGERED", "EXECUTED", "OPERATION_CLOSED"]
    failed = stream(op)[5][1]
    assert (failed["reason"], failed["placed"]) == ("PROTECTION_TRIGGERED", False)
    assert calls(paper, "place_market_order") == []
    assert (op.status, op.closed_quantity, sold(paper)) == ("CLOSED", D("0.5"), D("0.5"))
    assert refresh(op).executions.get(pk=cid).status == "EXECUTED"


def test_cancel_replace_400_while_the_stop_is_filling_waits_and_records_the_fill_next_pass(paper, protected):
    arm(paper, protected)
    paper.set_last_price("BTCUSDT", "9150")  # triggered, fills at the next observation
    paper.quotes["BTCUSDT"] = paper.quotes["BTCUSDT"].__class__("BTCUSDT", D("9190"), D("9190.01"), D("1000000"),
                                                                D("1000000"), NOW)  # book moved, no trade yet

    run(paper, NOW + timedelta(seconds=60))
    op = refresh(protected)
    assert types(op)[-3:] == ["STOP_TRIGGERED", "EXECUTION_SUBMITTED", "FAILED"]
    assert (op.status, calls(paper, "place_market_order")) == ("ACTIVE", [])

    paper.set_quote("BTCUSDT", "9145", "9145.01")  # the stop fills
    run(paper, NOW + timedelta(seconds=120))

    op = refresh(op)
    assert types(op)[-4:] == ["PROTECTION_TRIGGERED", "STOP_TRIGGERED", "EXECUTED", "OPERATION_CLOSED"]
    assert (op.status, sold(paper), calls(paper, "place_market_order")) == ("CLOSED", D("0.5"), [])


def test_cancel_replace_409_says_unprotected_and_the_next_pass_closes(paper, protected):
    arm(paper, protected)
    paper.push(Scripted("reject_new", code=-1013), call="cancel_replace")
    paper.set_quote("BTCUSDT", "9190", "9190.01")

    run(paper, NOW + timedelta(seconds=60))

    op = refresh(protected)
    assert types(op)[3:] == ["STOP_TRIGGERED", "EXECUTION_SUBMITTED", "PROTECTION_CANCELLED", "UNPROTECTED", "FAILED"]
    assert stream(op)[6][1]["reason"] == "CLOSE_REFUSED_AFTER_CANCEL"
    assert (op.status, StopMonitorProtection.objects.get(pk=op.pk).status) == ("ACTIVE", "UNPROTECTED")

    run(paper, NOW + timedelta(seconds=120))

    op = refresh(op)
    assert (op.status, sold(paper)) == ("CLOSED", D("0.5"))


def test_cancel_replace_unknown_is_resolved_by_query_and_sells_once(paper, protected):
    arm(paper, protected)
    paper.push(Scripted("timeout_after"), call="cancel_replace")
    paper.set_quote("BTCUSDT", "9190", "9190.01")

    run(paper, NOW + timedelta(seconds=60))
    op = refresh(protected)
    assert (types(op)[-1], op.status) == ("EXECUTION_SUBMITTED", "CLOSING")

    run(paper, NOW + timedelta(seconds=120))  # reconcile asks the close's id; the audit asks the protection's

    op = refresh(op)
    assert "EXECUTED" in types(op) and types(op)[-1] == "PROTECTION_CANCELLED"
    assert (op.status, sold(paper), len(calls(paper, "cancel_replace")), calls(paper, "place_market_order")) == (
        "CLOSED", D("0.5"), 1, [])
    assert StopMonitorProtection.objects.get(pk=op.pk).status == "CANCELLED"


def test_a_moved_stop_replaces_the_protection_once_per_interval(paper, protected):
    arm(paper, protected)
    move_levels(protected.pk, stop_price=D("9250"), now=NOW)

    run(paper, NOW + timedelta(seconds=60))

    op = refresh(protected)
    assert types(op)[-3:] == ["STOP_MOVED", "PROTECTION_REQUESTED", "PROTECTION_MOVED"]
    assert [o.client_order_id for o in paper.open_orders()] == [f"sp{op.pk}-2"]
    assert paper.open_orders()[0].stop_price == D("9203.75")
    move_levels(op.pk, stop_price=D("9260"), now=NOW)
    _, decisions = run(paper, NOW + timedelta(seconds=90))  # 30 s after the last replacement: wait

    assert [d.action for d in decisions if d.action.startswith("protection_move")] == ["protection_move_deferred"]
    assert len(calls(paper, "cancel_replace")) == 1
    run(paper, NOW + timedelta(seconds=121))
    assert paper.open_orders()[0].stop_price == D("9213.70") and len(calls(paper, "cancel_replace")) == 2


def test_the_audit_cancels_leftovers_and_never_touches_orders_we_did_not_place(paper, protected, open_op):
    paper.balances["BTC"] = D("2")
    paper.place_stop_order(StopOrderRequest("BTCUSDT", "SELL", D("0.1"), D("9000"), "x-someone-else-1"))
    paper.place_stop_order(StopOrderRequest("BTCUSDT", "SELL", D("0.1"), D("9000"), "sp999999-1"))  # no such op

    run(paper)

    remaining = sorted(o.client_order_id for o in paper.open_orders())
    assert remaining == sorted(["x-someone-else-1", f"sp{protected.pk}-1"])
    assert [c[1] for c in calls(paper, "cancel_order")] == [("BTCUSDT", "sp999999-1")]


def test_the_kill_switch_halts_the_close_and_leaves_the_protection_resting(paper, protected):
    cid = arm(paper, protected)
    TenantConfig.objects.filter(client=protected.client).update(kill_switch=True, kill_switch_reason="incident 9")
    paper.set_quote("BTCUSDT", "9190", "9190.01")

    run(paper, NOW + timedelta(seconds=60))

    op = refresh(protected)
    assert types(op)[-1] == "BLOCKED"
    assert stream(op)[-1][1]["detail"] == "kill switch on: incident 9 (exchange-held protection, if any, stays resting)"
    assert [o.client_order_id for o in paper.open_orders()] == [cid]


def test_two_operations_on_one_asset_never_protect_more_than_free(paper, protected, open_op):
    second = open_op(qty="0.5")  # 1 BTC of positions, 0.5 BTC on the account

    run(paper)

    assert [o.requested_qty for o in paper.open_orders()] == [D("0.5")]
    assert types(second)[-1] == "UNPROTECTED" and stream(second)[-1][1]["reason"] == "INSUFFICIENT_BALANCE"
    run(paper, NOW + timedelta(seconds=60))
    assert types(second).count("UNPROTECTED") == 1  # said once, not every pass


def test_an_oco_whose_take_profit_leg_filled_is_recorded_and_never_sold_again(paper, protected):
    move_levels(protected.pk, target_price=D("9400"), now=NOW)
    run(paper)
    assert [(o.order_type, o.price) for o in paper.open_orders()][1] == ("LIMIT_MAKER", D("9447.00"))
    paper.set_last_price("BTCUSDT", "9450")  # the take-profit leg fills while the monitor is down
    paper.set_quote("BTCUSDT", "9460", "9460.01")  # our own target is crossed too

    run(paper, NOW + timedelta(minutes=5))

    op = refresh(protected)
    assert types(op)[-4:] == ["PROTECTION_TRIGGERED", "STOP_TRIGGERED", "EXECUTED", "OPERATION_CLOSED"]
    assert stream(op)[-4][1]["client_order_id"] == f"sp{op.pk}-1t"
    assert (op.status, sold(paper), calls(paper, "place_market_order")) == ("CLOSED", D("0.5"), [])


def test_quotes_that_cannot_be_read_still_arm_the_protection_then_fail_the_pass(paper, protected, monkeypatch):
    """The monitor blind (bookTicker unreadable) is when the exchange-held stop matters most: the
    pass arms it anyway (without a last price), then fails as before; nothing triggers."""
    from stopmonitor.engine.decisions import EngineUnavailable
    from stopmonitor.exchange.base import ExchangeUnavailable

    def unreadable(symbols):
        paper.calls.append(("book_tickers", tuple(sorted(symbols))))
        raise ExchangeUnavailable("GET /api/v3/ticker/bookTicker: ReadTimeout")

    monkeypatch.setattr(paper, "book_tickers", unreadable)
    with pytest.raises(EngineUnavailable, match="best bid/ask unavailable"):
        run(paper)
    op = protected
    assert types(op) == ["STOP_SET", "PROTECTION_REQUESTED", "PROTECTION_PLACED"]
    assert [(o.client_order_id, o.stop_price) for o in paper.open_orders()] == [(f"sp{op.pk}-1", D("9154.00"))]
    assert len(calls(paper, "book_tickers")) == 2  # the pass's, then arming's own try


def test_a_long_and_a_cross_pair_short_spending_the_same_asset_are_allocated_apart(paper, protected, open_op,
                                                                                      symbols):
    """Found in review (issue #11): a long BTCUSDT (its close sells BTC) and a short ETHBTC (its
    close buys ETH with BTC) were one allocation group keyed "BTC", sized by the first one's side:
    the short's 2 ETH were limited by the BTC the long had already taken (0 left), and it was said
    UNPROTECTED INSUFFICIENT_BALANCE although a short's close is not limited by balance."""
    from dataclasses import replace

    from api.models import Symbol

    eth = paper.filters["ETHUSDT"]
    paper.filters["ETHBTC"] = replace(eth, symbol="ETHBTC", quote_asset="BTC", tick_size=D("0.00001"),
                                      min_notional=D("0.0001"))
    symbols["ETHBTC"] = Symbol.objects.create(symbol="ETHBTC", base_asset="ETH", quote_asset="BTC",
                                              tick_size=D("0.00001"), step_size=eth.step_size, min_qty=eth.min_qty,
                                              min_notional=D("0.0001"))
    paper.set_quote("ETHBTC", "0.05000", "0.05001")
    short = open_op("ETHBTC", "SELL", qty="2", entry="0.05", stop="0.055")

    run(paper)

    resting = sorted((o.symbol, o.side, o.requested_qty) for o in paper.open_orders())
    assert resting == [("BTCUSDT", "SELL", D("0.5")), ("ETHBTC", "BUY", D("2"))]
    assert types(protected)[-1] == "PROTECTION_PLACED" and types(short)[-1] == "PROTECTION_PLACED"


def test_the_arming_quote_read_counts_every_request_the_adapter_sent():
    """Binance refuses a bookTicker list for one unknown symbol (-1121) and the adapter then asks
    symbol by symbol (its Quotes say how many requests): the protection report counts them all."""
    from types import SimpleNamespace

    from stopmonitor.engine.protection import ProtectionReport, _arming_quotes
    from stopmonitor.exchange.base import Quotes

    class Exchange:
        def book_tickers(self, symbols):
            return Quotes({}, requests=1 + len(symbols))  # one refused list, then one per symbol

    arming = [SimpleNamespace(symbol=SimpleNamespace(symbol=s)) for s in ("BTCUSDT", "ETHUSDT", "OLDUSDT")]
    report = ProtectionReport()
    _arming_quotes(arming, Exchange(), {}, report)
    assert report.requests == 4


def test_a_close_refused_because_our_own_stop_has_triggered_never_counts_against_the_symbols_breaker(
        paper, protected, open_op):
    """Our exchange-held stop triggered (it fills at the next trade; until then it cannot be
    cancelled): the close's cancelReplace is refused (-2022, FAILED, looked at again). That is the
    operation's race with its own protection, not a fault of the symbol: three of them (the third
    ``make demo`` run, or three protected longs in one drop) opened the symbol's circuit breaker and
    held every close on it for the cooldown (a new user's report)."""
    from api.models import CircuitBreakerState

    ops = [protected, open_op(qty="0.5", stop="9210"), open_op(qty="0.5", stop="9220")]
    paper.balances["BTC"] = D("1.5")
    run(paper)
    assert [types(op)[-1] for op in ops] == ["PROTECTION_PLACED"] * 3
    paper.set_last_price("BTCUSDT", "9150")  # every stop triggered, each fills at the next observation
    paper.quotes["BTCUSDT"] = paper.quotes["BTCUSDT"].__class__("BTCUSDT", D("9190"), D("9190.01"), D("1000000"),
                                                                D("1000000"), NOW)

    run(paper, NOW + timedelta(seconds=60))

    assert [types(refresh(op))[-1] for op in ops] == ["FAILED"] * 3
    breaker = CircuitBreakerState.objects.filter(symbol="BTCUSDT").first()
    assert breaker is None or (breaker.state, breaker.failure_count) == ("CLOSED", 0)
