"""Notional at the stop, not at the entry (issue #12 item 6): a position the stop could never close
is refused at opening — API and admin — with the field and the figures, and nothing is written."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from api.models import Operation, StopMonitorEvent
from tests.api.conftest import invalid

URL = "/api/v1/operations/"


def body(quantity, entry="9600", stop="9000"):
    return {"symbol": "BTCUSDT", "side": "BUY", "quantity": quantity, "entry_price": entry, "stop_price": stop}


@pytest.mark.parametrize("quantity, message", [
    pytest.param("0.00053", "quantity 0.00053 × stop_price 9000 = 4.77 is below minNotional 5 + 5% margin = 5.25: "
                            "the stop could never close it", id="issue-5.09-at-entry-4.77-at-stop"),
    pytest.param("0.00058", "quantity 0.00058 × stop_price 9000 = 5.22 is below minNotional 5 + 5% margin = 5.25: "
                            "the stop could never close it", id="inside-the-margin"),
])
def test_a_position_the_stop_cannot_close_is_400(alice, symbols, quantity, message):
    r = alice.api.post(URL, body(quantity), format="json")

    assert (r.status_code, r.json()) == (400, invalid(quantity=[message]))
    assert not Operation.objects.exists() and not StopMonitorEvent.objects.exists()


def test_a_position_clear_of_the_margin_at_the_stop_is_accepted(alice, symbols):
    r = alice.api.post(URL, body("0.00059"), format="json")  # 5.31 at the stop
    assert r.status_code == 201, r.json()


def test_the_last_market_lot_size_chunk_must_clear_it_too(alice, symbols):
    symbols["BTCUSDT"].market_max_qty = D("0.01")
    symbols["BTCUSDT"].save()

    r = alice.api.post(URL, body("0.01001"), format="json")  # chunks 0.01 + 0.00001

    assert r.status_code == 400
    assert r.json()["error"]["fields"]["quantity"] == [
        "the last MARKET_LOT_SIZE chunk of quantity 0.01001: 0.00001 × stop_price 9000 = 0.09 is below minNotional 5 "
        "+ 5% margin = 5.25: the stop could never close it"]


def test_the_margin_is_a_setting(alice, symbols, settings):
    settings.STOPMONITOR = {**settings.STOPMONITOR, "NOTIONAL_MARGIN_PCT": D("0")}
    assert alice.api.post(URL, body("0.00056"), format="json").status_code == 201  # 5.04 >= 5


def test_the_admin_form_refuses_it_too(symbols, tenants):
    from api.admin import OperationAdminForm

    form = OperationAdminForm(data={"client": tenants[0].pk, "symbol": symbols["BTCUSDT"].pk, "side": "BUY",
                                    "quantity": "0.00053", "entry_price": "9600", "stop_price": "9000",
                                    "status": "ACTIVE", "closed_quantity": "0", "stop_check_count": 0})
    form.is_valid()

    assert form.errors["quantity"] == ["quantity 0.00053 × stop_price 9000 = 4.77 is below minNotional 5 + 5% margin "
                                       "= 5.25: the stop could never close it"]
