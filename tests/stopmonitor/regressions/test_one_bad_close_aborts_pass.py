"""One operation's close raising an unexpected exception aborts the whole pass: the operations
after it in the pass are not evaluated/closed, and run_pass raises something that is not
EngineUnavailable (no MonitorPass row). Concrete trigger: the exchange's FULL answer has fills whose
commission assets join to more than 12 characters ("1MBABYDOGE,BNB": BNB ran out mid-order),
and StopMonitorExecution.commission_asset is varchar(12) -> DataError in record_outcome, AFTER
the order filled. reconcile_submitted only catches ConcurrencyConflict, so the same execution
then crashes every following pass *before* any trigger is evaluated (invariant 7 runs
reconcile first): on a venue whose get_order returns fills (paper) it is a permanent poison pill."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import Fill
from stopmonitor.exchange.paper import PaperExchange

from .conftest import NOW
from .helpers import refresh, run

pytestmark = pytest.mark.django_db(transaction=True)


class MixedCommissionPaper(PaperExchange):
    """The first order's fills are charged in two assets whose names join to 14 characters."""

    bad_done = False

    def place_market_order(self, request):
        result = super().place_market_order(request)
        if self.bad_done:
            return result
        self.bad_done = True
        half = result.executed_qty / 2
        price = result.fills[0].price
        fills = (Fill(price, half, D("0.001"), "BNB"), Fill(price, result.executed_qty - half, D("5"), "1MBABYDOGE"))
        result = replace(result, fills=fills)
        self.orders[request.client_order_id] = result
        return result


def test_one_operation_failing_does_not_leave_the_others_unprotected(open_op):
    paper = MixedCommissionPaper(now=NOW)
    first = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    second = open_op("ETHUSDT", "BUY", "1", entry="2000", stop="1900")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.set_quote("ETHUSDT", "1850", "1850.01")

    try:
        run(paper)
    except Exception as exc:  # noqa: BLE001
        crashed = exc
    else:
        crashed = None
    statuses = {op.symbol.symbol: refresh(op).status for op in (first, second)}
    assert crashed is None, f"pass crashed with {type(crashed).__name__}: {crashed}; statuses {statuses}"
    assert "ACTIVE" not in statuses.values(), statuses


def test_a_poisoned_execution_does_not_stop_every_later_pass(open_op):
    paper = MixedCommissionPaper(now=NOW)
    first = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    run(paper)  # first pass: the BTCUSDT fill is recorded (commission assets kept whole in the payload)
    late = open_op("ETHUSDT", "BUY", "1", entry="2000", stop="1900")  # a new, crossed position
    paper.set_quote("ETHUSDT", "1850", "1850.01")
    for minute in (1, 2, 3):
        run(paper, at=NOW + timedelta(minutes=minute))  # must never raise for one operation's sake
    assert refresh(late).status == "CLOSED", (
        f"ETHUSDT stop crossed for 3 passes but never closed; BTCUSDT op is {refresh(first).status}")
