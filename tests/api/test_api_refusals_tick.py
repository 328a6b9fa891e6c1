"""Levels off the symbol's tickSize are refused with 400 and change nothing (new-user finding:
a BTCUSDT stop of 9150.123456 was accepted although BTCUSDT ticks in 0.01)."""

import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


@pytest.fixture
def client_with_tenant():
    from io import StringIO

    from django.core.management import call_command

    from api.models import Symbol

    Symbol.objects.create(symbol="BTCUSDT", base_asset="BTC", quote_asset="USDT", tick_size="0.01",
                          step_size="0.00001", min_qty="0.00001", min_notional="5")
    out = StringIO()
    call_command("create_api_user", "alice", "--tenant", "desk-1", stdout=out)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip().splitlines()[-1]}")
    return api


def test_stop_off_tick_is_refused_on_create_and_move(client_with_tenant):
    from api.models import Operation

    body = {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.01", "entry_price": "9300", "stop_price": "9150.123"}
    response = client_with_tenant.post("/api/v1/operations/", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == {
        "stop_price": ["stop_price 9150.123 is not a multiple of the symbol's tickSize 0.01"]}
    assert Operation.objects.count() == 0
    created = client_with_tenant.post("/api/v1/operations/", {**body, "stop_price": "9150.12"}, format="json")
    assert created.status_code == 201
    op_id = created.json()["id"]
    moved = client_with_tenant.patch(f"/api/v1/operations/{op_id}/", {"stop_price": "9160.005"}, format="json")
    assert moved.status_code == 400 and list(moved.json()["error"]["fields"]) == ["stop_price"]
    assert str(Operation.objects.get().stop_price) == "9150.12000000"
