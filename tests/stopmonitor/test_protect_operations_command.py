"""``protect_operations``: arms every ACTIVE operation lacking protection, batched, resumable, --dry-run, --json."""

from __future__ import annotations

import json
from decimal import Decimal as D
from io import StringIO

import pytest
from django.core.management import call_command

from api.models import StopMonitorProtection, TenantConfig
from stopmonitor.exchange.paper import PaperExchange

from .conftest import NOW

pytestmark = pytest.mark.django_db


@pytest.fixture
def paper(monkeypatch):
    ex = PaperExchange(now=NOW, balances={"BTC": D("10"), "USDT": D("0")})
    ex.set_quote("BTCUSDT", "9300", "9300.01")
    monkeypatch.setattr("stopmonitor.exchange.factory.build_exchange", lambda venue=None: ex)
    return ex


def command(*args):
    out = StringIO()
    call_command("protect_operations", "--json", *args, stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_dry_run_then_batches_arm_every_active_operation_once(paper, tenant, open_op):
    TenantConfig.objects.create(client=tenant, protection_enabled=True)
    ops = [open_op(qty="0.5") for _ in range(5)]

    lines = command("--dry-run", "--batch", "2")
    assert [line["would_arm"] for line in lines[:-1]] == [2, 2, 1]
    assert lines[-1]["armed"] == 0 and paper.open_orders() == []

    lines = command("--batch", "2")
    assert [(line["armed"], line["last_id"]) for line in lines[:-1]] == [(2, ops[1].pk), (2, ops[3].pk), (1, ops[4].pk)]
    assert lines[-1]["armed"] == 5
    assert sorted(o.client_order_id for o in paper.open_orders()) == sorted(f"sp{op.pk}-1" for op in ops)
    assert set(StopMonitorProtection.objects.values_list("status", flat=True)) == {"PLACED"}

    assert command()[-1]["armed"] == 0  # run again: nothing left to do, nothing placed twice
    assert len(paper.open_orders()) == 5


def test_resume_after_an_id(paper, tenant, open_op):
    TenantConfig.objects.create(client=tenant, protection_enabled=True)
    first, second = open_op(), open_op()

    lines = command("--after", str(first.pk))

    assert lines[-1]["armed"] == 1 and [o.client_order_id for o in paper.open_orders()] == [f"sp{second.pk}-1"]


def test_tenants_with_protection_off_are_left_alone(paper, tenant, open_op):
    open_op()  # paper venue, no explicit setting: protection off by default
    assert command()[-1]["armed"] == 0 and paper.calls == []


def test_the_dry_run_plans_each_arm_as_the_real_run_and_writes_nothing(paper, tenant, open_op):
    """A new user's report: the dry run said "2 would arm" for operations below the minimum order
    size, and the real run then armed none of them. It now plans each as the real run does."""
    from api.models import StopMonitorEvent

    TenantConfig.objects.create(client=tenant, protection_enabled=True)
    ok = open_op(qty="0.5")
    tiny = open_op(qty="0.0004")  # 0.0004 BTC at the 9154 stop: below BTCUSDT's minNotional 5
    events = StopMonitorEvent.objects.count()

    dry = command("--dry-run")
    assert (dry[0]["would_arm"], dry[-1]["armed"]) == (1, 0)
    assert StopMonitorEvent.objects.count() == events and paper.open_orders() == []

    real = command()
    assert real[0]["armed"] == 1
    assert [o.client_order_id for o in paper.open_orders()] == [f"sp{ok.pk}-1"]
    assert StopMonitorEvent.objects.filter(operation=tiny, event_type="UNPROTECTED").count() == 1
