"""The protection projection: written by the one writer in the event's transaction, equal to the
fold of the events, rebuilt and verified by ``rebuild_projections`` (invariant 8)."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal as D
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction

from api.models import StopMonitorProtection
from stopmonitor import protection as p
from stopmonitor.events import append_events, stream_head
from stopmonitor.execution import NewEvent
from stopmonitor.projections import rebuild_protection, verify_protection

from .conftest import NOW

pytestmark = pytest.mark.django_db


def test_model_fields_match_the_state():
    columns = [f.attname if f.name == "operation" else f.name for f in StopMonitorProtection._meta.concrete_fields]
    assert columns == p.protection_field_names()


def append(op, *events, seconds=0, source="cron"):
    version, _ = stream_head(op.pk)
    with transaction.atomic():
        append_events(op, version, list(events), source=source, venue="binance", now=NOW + timedelta(seconds=seconds))


def requested(gen=1, stop="9154", **extra):
    return NewEvent(p.PROTECTION_REQUESTED, {"client_order_id": f"sp1-{gen}", "generation": gen, "kind": "STOP_LOSS",
                                             "side": "SELL", "quantity": "0.5", "stop_price": stop, "limit_price": None,
                                             **extra})


def test_append_projects_arm_and_trigger(open_op):
    op = open_op()
    append(op, requested())
    row = StopMonitorProtection.objects.get(pk=op.pk)
    assert (row.status, row.generation, row.client_order_id, row.stop_price, row.quantity, row.requested_at) == (
        "REQUESTED", 1, "sp1-1", D("9154"), D("0.5"), NOW)

    append(op, NewEvent(p.PROTECTION_PLACED, {"client_order_id": "sp1-1", "order_id": 9001, "quantity": "0.5"}), seconds=1)
    append(op, NewEvent(p.PROTECTION_TRIGGERED, {"client_order_id": "sp1-1", "exchange_status": "FILLED"}), seconds=90,
           source="exchange")

    row.refresh_from_db()
    assert (row.status, row.exchange_order_id, row.placed_at, row.updated_at, row.reason) == (
        "TRIGGERED", 9001, NOW + timedelta(seconds=1), NOW + timedelta(seconds=90), "FILLED")
    assert verify_protection() == []


def test_rebuild_and_verify_find_and_repair_a_tampered_row(open_op):
    op = open_op()
    append(op, requested(), NewEvent(p.PROTECTION_PLACED, {"client_order_id": "sp1-1", "order_id": 9001}))
    StopMonitorProtection.objects.filter(pk=op.pk).update(status="CANCELLED")

    assert [(d.field, d.stored, d.rebuilt) for d in verify_protection()] == [("status", "CANCELLED", "PLACED")]
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("rebuild_projections", "--verify", "--json", stdout=out)
    assert json.loads(out.getvalue().splitlines()[0])["field"] == "status"

    assert rebuild_protection() == 1
    assert verify_protection() == []
    out = StringIO()
    call_command("rebuild_projections", "--json", stdout=out)
    assert json.loads(out.getvalue())["protections"] == 1
