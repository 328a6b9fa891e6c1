"""get_order answers NEW (not final) on every pass. Nothing is recorded (fine: not final), but
every pass counts it as ``reconciled`` in its summary / MonitorPass row (the decision
"reconciled" is emitted before record_outcome says NOT_FINAL), and the operation stays CLOSING
for ever: it cannot be moved (StateConflict) or closed manually (NOT_ACTIVE) and no event or
guard says it is stuck."""

from __future__ import annotations

from datetime import timedelta

import pytest

from stopmonitor.exchange.paper import Scripted

from .conftest import NOW
from .helpers import refresh, run, types

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_not_final_order_is_not_counted_as_reconciled(paper, open_op):
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("timeout_after"))
    run(paper)
    token = refresh(op).stop_execution_token
    paper.with_status(token, status="NEW")
    counts = []
    for minute in (1, 2, 3):
        summary, _ = run(paper, at=NOW + timedelta(minutes=minute))
        counts.append((summary.reconciled, summary.unknown))
    assert refresh(op).status == "CLOSING" and types(op)[-1] == "EXECUTION_SUBMITTED"
    assert all(r == 0 for r, _ in counts), f"(reconciled, unknown) per pass: {counts}; nothing was reconciled"
