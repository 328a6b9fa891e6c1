"""``rebuild_projections --verify`` and payload values with more than 8 decimals (issue #12 item 16):
the fold rounds them once, as the DecimalField(20, 8) column does, so a consistent projection
verifies clean."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from django.db import transaction

from stopmonitor.events import append_events
from stopmonitor.execution import EXECUTED, EXECUTION_SUBMITTED, STOP_TRIGGERED, NewEvent
from stopmonitor.projections import verify

from .conftest import NOW

pytestmark = pytest.mark.django_db(transaction=True)
TOKEN = "sm1-S1-0a1b2c3d"


def test_nine_decimal_payload_values_verify_clean(open_op):
    from api.models import StopMonitorExecution

    op = open_op("BTCUSDT", "BUY", "0.5")
    trig = {"trigger": "STOP_LOSS", "level": "9200", "observed_price": "9199.5", "quantity": "0.5", "close_side": "SELL",
            "attempt": 1}
    done = {"order_id": 7, "client_order_id": TOKEN, "exchange_status": "FILLED", "requested_qty": "0.5",
            "executed_qty": "0.5", "avg_price": "9199.123456785", "commission": "4.599750001234",
            "commission_asset": "USDT", "slippage_pct": "0.0095"}
    with transaction.atomic():
        append_events(op, _version(op), [NewEvent(STOP_TRIGGERED, trig, TOKEN),
                                                          NewEvent(EXECUTION_SUBMITTED, {"quantity": "0.5"}, TOKEN),
                                                          NewEvent(EXECUTED, done, TOKEN)],
                      source="cron", venue="paper", now=NOW)

    row = StopMonitorExecution.objects.get(pk=TOKEN)
    assert (row.avg_fill_price, row.commission) == (D("9199.12345679"), D("4.59975000"))
    assert verify(op.pk) == []


def _version(op) -> int:
    from stopmonitor.events import stream_head

    return stream_head(op.pk)[0]
