"""A symbol whose filters give stepSize 0 (floor_to_step: "unchanged when step is 0/None") and
minNotional 0, and a short closed by a BUY limited by the free quote balance: the close
quantity is quote_free / ask with 28 significant digits. It goes unrounded into the
STOP_TRIGGERED payload, while the projection column (numeric(20,8)) is rounded by PostgreSQL
HALF-UP, and the order is sent with the *rounded* requested_quantity read back from the row:
- the projection differs from the fold of the events (invariant 8) while TRIGGERED;
- the order spends more quote than is free (1000.0000000255 USDT of 1000) - invariant 5 says floor."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal as D

import pytest

from stopmonitor.engine import close
from stopmonitor.exchange.paper import PaperExchange, bundled_filters

from .conftest import NOW
from .helpers import Crash, run, stream

pytestmark = pytest.mark.django_db(transaction=True)


def zero_step_paper():
    filters = bundled_filters()
    filters["ETHUSDT"] = replace(filters["ETHUSDT"], step_size=D("0"), min_qty=D("0"), min_notional=D("0"),
                                 market_step_size=None, market_min_qty=None, market_max_qty=None)
    return PaperExchange(filters=filters, balances={"USDT": D("1000"), "ETH": D("0")}, now=NOW)


def open_short(open_op):
    return open_op("ETHUSDT", "SELL", "500", entry="6", stop="6.9")


def test_projection_matches_events_after_trigger(open_op, monkeypatch):
    from stopmonitor.projections import verify

    paper = zero_step_paper()
    op = open_short(open_op)
    paper.set_quote("ETHUSDT", "6.94", "6.95")

    def die(*a, **k):
        raise Crash()

    monkeypatch.setattr(close, "submit_and_place", die)
    with pytest.raises(Crash):
        run(paper)
    monkeypatch.undo()
    trig = next(p for t, p in stream(op) if t == "STOP_TRIGGERED")
    assert trig["quantity"] == "143.88489208"  # floored to 8 decimals, never 28 digits
    assert verify() == []


def test_buy_close_never_spends_more_quote_than_is_free(open_op):
    paper = zero_step_paper()
    op = open_short(open_op)
    paper.set_quote("ETHUSDT", "6.94", "6.95")
    run(paper)
    request = paper.order_requests[0]
    trig = next(p for t, p in stream(op) if t == "STOP_TRIGGERED")
    assert request.quantity * D("6.95") <= D("1000"), (
        f"order {request.quantity} x 6.95 = {request.quantity * D('6.95')} USDT; STOP_TRIGGERED said {trig['quantity']}")
