"""A real ``monitor_stops`` process arms protection on the fake Binance; the monitor is stopped,
the price crosses, the exchange-held stop closes the position; a monitor started again records it
from the exchange (``source=exchange``) and sends nothing (protection.md P4)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

import pytest
from django.db import connection

from .exchange.fake_binance import FakeBinance
from .test_race_processes import child_env, start

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="real processes share PostgreSQL"),
    # the child monitors trade on binance-testnet: the operation is that venue's (migration 0026; the
    # protection step, like the pass, leaves another venue's operations alone)
    pytest.mark.usefixtures("on_binance_testnet"),
]


def test_exchange_held_stop_closes_while_the_monitor_is_down_and_the_restarted_monitor_sends_nothing(
        tenant, symbols, tmp_path):
    from api.models import StopMonitorEvent
    from stopmonitor.operations import open_operation

    op = open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("60000"),
                        now=datetime.now(timezone.utc))  # protection: the venue's default (on for Binance)
    with FakeBinance() as fake:
        for entry in fake.exchange_info["symbols"]:  # today's Binance lists STOP_LOSS (the recording predates it)
            entry["orderTypes"] = sorted(set(entry["orderTypes"]) | {"STOP_LOSS"})
        fake.set_wallet(BTC="0.001", USDT="0")
        fake.set_last_price("BTCUSDT", "60741.67")
        env = child_env(fake, tmp_path)

        first = start(env)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        (stop,) = [r for r in fake.calls("POST", "/api/v3/order")]
        assert (stop.form["type"], stop.form["stopPrice"], stop.form["quantity"], stop.form["newClientOrderId"]) == (
            "STOP_LOSS", "59700", "0.001", f"sp{op.pk}-1")
        assert fake.wallet["BTC"] == {"free": D("0"), "locked": D("0.001")}

        # the monitor is down: the market falls through both stops; the exchange's stop sells
        fake.quotes["BTCUSDT"] = {**fake.quotes["BTCUSDT"], "bidPrice": "58990.00000000", "askPrice": "58990.01000000"}
        fake.set_last_price("BTCUSDT", "59000")
        assert fake.orders[f"sp{op.pk}-1"]["status"] == "FILLED"
        before = len(fake.requests)

        second = start(env)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        sent = [(r.method, r.path) for r in fake.requests[before:]
                if r.method != "GET" and r.path not in ("/api/v3/time",)]
    assert sent == []  # no market order, no cancelReplace: the restarted monitor only read
    op.refresh_from_db()
    assert (op.status, op.closed_quantity) == ("CLOSED", D("0.001"))
    tail = list(StopMonitorEvent.objects.filter(operation=op).order_by("version")
                .values_list("event_type", "source"))[-4:]
    assert tail == [("PROTECTION_TRIGGERED", "exchange"), ("STOP_TRIGGERED", "exchange"), ("EXECUTED", "exchange"),
                    ("OPERATION_CLOSED", "exchange")]
    executed = StopMonitorEvent.objects.get(operation=op, event_type="EXECUTED").payload
    assert (executed["executed_qty"], executed["avg_price"]) == ("0.001", "59000")
