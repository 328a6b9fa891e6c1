"""_already_blocked dedupes on "same reason as the stream's last event". Passes that find nothing
append nothing, so the last BLOCKED stays last forever: a NEW blocked trigger days later, with a
different cause (another kill-switch incident), produces no event at all (invariant 6: "each
blocked trigger appends one event saying which guard held it and why")."""

from __future__ import annotations

from datetime import timedelta

import pytest

from stopmonitor import guardrails as g

from .conftest import NOW
from .helpers import run, stream, types

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_second_kill_switch_incident_is_recorded(paper, open_op, tenant):
    from api.models import TenantConfig

    cfg = TenantConfig.objects.create(client=tenant, kill_switch=True, kill_switch_reason="incident 7")
    op = open_op()
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    run(paper)                                           # blocked: incident 7
    cfg.kill_switch = False
    cfg.save()
    paper.set_quote("BTCUSDT", "9400", "9400.01")        # price recovers: nothing to do, nothing appended
    run(paper, at=NOW + timedelta(hours=1))
    cfg.kill_switch, cfg.kill_switch_reason = True, "incident 8"
    cfg.save()
    paper.set_quote("BTCUSDT", "9100", "9100.01")        # two days later the stop is crossed again
    summary, decisions = run(paper, at=NOW + timedelta(days=2))
    details = [p.get("detail") for t, p in stream(op) if t == "BLOCKED"]
    assert "kill switch on: incident 8" + g.PROTECTION_STAYS in details, (
        f"events {types(op)}, blocked details {details}, decisions {[(d.action, d.detail) for d in decisions]}")
