"""Reconcile re-places an order that is still in flight. EXECUTION_SUBMITTED is stamped with
the caller's ``now``, captured *before* the close's exchange reads (close_operation: quote,
filters, balances; run_pass: the pass start, before every earlier close of the pass), and
reconcile_submitted treats anything SUBMITTED with updated_at older than 30 s as abandoned.
Nothing tells it that a placer is still alive. Here the API's close (now=T) is still waiting
for Binance's answer when the cron pass runs at T+31 s: get_order says -2013 (the request has not
reached the matching engine yet), the pass re-places with the same newClientOrderId, then the
original request lands. Binance only refuses a duplicate newClientOrderId among OPEN orders,
and a filled MARKET order is not open, so both fill: the position is sold twice (invariant 1)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from stopmonitor.engine.close import close_operation

from .conftest import NOW
from .helpers import ENGINE, in_thread, refresh, run, types

pytestmark = pytest.mark.django_db(transaction=True)


def test_pass_does_not_replace_an_order_still_in_flight(paper, open_op):
    op = open_op(stop="9000")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    in_flight, land = threading.Event(), threading.Event()
    real_place = paper.place_market_order

    def slow_place(request):
        if threading.current_thread().name == "api":
            in_flight.set()
            land.wait(10)  # the HTTP request is on its way
        return real_place(request)

    paper.place_market_order = slow_place
    errors, results = {}, {}
    t = in_thread("api", lambda: close_operation(op.pk, paper, now=NOW, engine=ENGINE), errors, results)
    assert in_flight.wait(10)
    try:
        run(paper, at=NOW + timedelta(seconds=31))  # the cron pass (takes the pass lock; the API does not)
    finally:
        land.set()
        t.join(10)
    assert errors == {}
    sells = [r for r in paper.order_requests]
    assert len(sells) == 1, (
        f"{len(sells)} SELL orders reached the exchange for one position: {sells}; stream {types(op)}; "
        f"operation {refresh(op).status} closed_quantity {refresh(op).closed_quantity}")
