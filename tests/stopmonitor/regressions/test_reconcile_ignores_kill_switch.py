"""Reconcile places orders with no guardrail check. A TRIGGERED execution (crash before
EXECUTION_SUBMITTED) is "submitted and placed now", and a SUBMITTED one the exchange does not
know (-2013) is re-placed, even though the tenant turned the kill switch on in between
(guardrails.kill_switch: "while on, no close is placed for the tenant"; invariant 6)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from stopmonitor.engine import close
from stopmonitor.exchange.paper import Scripted

from .conftest import NOW
from .helpers import Crash, refresh, run, types

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("left_as", ["TRIGGERED", "SUBMITTED-not-at-exchange"])
def test_no_order_is_placed_while_the_kill_switch_is_on(paper, open_op, tenant, monkeypatch, left_as):
    from api.models import StopMonitorExecution, TenantConfig

    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    if left_as == "TRIGGERED":
        def die(*a, **k):
            raise Crash()
        monkeypatch.setattr(close, "submit_and_place", die)
        with pytest.raises(Crash):
            run(paper)
        monkeypatch.undo()
    else:
        paper.push(Scripted("timeout_before"))
        run(paper)
    assert StopMonitorExecution.objects.get().status == left_as.split("-")[0]
    before = len(paper.order_requests)

    # the operator hits the kill switch (incident) before the next pass
    TenantConfig.objects.update_or_create(client=tenant, defaults={"kill_switch": True, "kill_switch_reason": "incident 7"})
    run(paper, at=NOW + timedelta(minutes=1))

    assert len(paper.order_requests) == before, (
        f"order placed with the kill switch on; stream {types(op)}, operation {refresh(op).status}")
