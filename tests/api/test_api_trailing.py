"""Trailing-stop and break-even settings through the API: on open, by PATCH, refused when they cannot work."""

from __future__ import annotations

import pytest

from api.models import Operation, StopMonitorEvent

URL = "/api/v1/operations/"
LONG = {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300", "stop_price": "9200"}


def invalid(response) -> dict:
    """The fields named by a 400 envelope."""
    return response.json()["error"]["fields"]


def events_of(op_id):
    return list(StopMonitorEvent.objects.filter(operation_id=op_id).order_by("version")
                .values_list("event_type", "payload"))


def test_open_with_a_trail_and_break_even_shows_them_and_records_trailing_set(alice, symbols):
    r = alice.api.post(URL, {**LONG, "trail_distance": "150.5", "trail_activation_price": "9400",
                             "break_even_price": "9350", "break_even_fee_percent": "0.2"}, format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert {k: body[k] for k in ("trail_distance", "trail_distance_percent", "trail_activation_price", "trail_step",
                                 "break_even_price", "break_even_fee_percent")} == {
        "trail_distance": "150.50000000", "trail_distance_percent": None, "trail_activation_price": "9400.00000000",
        "trail_step": None, "break_even_price": "9350.00000000", "break_even_fee_percent": "0.2000"}
    op = Operation.objects.get()
    assert events_of(op.pk)[-1] == ("TRAILING_SET", {
        "trail_distance": "150.5", "trail_distance_percent": None, "trail_activation_price": "9400",
        "trail_step": None, "break_even_price": "9350", "break_even_fee_percent": "0.2"})


@pytest.mark.parametrize(("extra", "field"), [
    pytest.param({"trail_distance": "0"}, "trail_distance", id="distance-zero"),
    pytest.param({"trail_distance": "1", "trail_distance_percent": "1"}, "trail_distance_percent", id="both"),
    pytest.param({"trail_distance": "10", "trail_activation_price": "9250"}, "trail_activation_price",
                 id="activation-below-entry-of-a-long"),
    pytest.param({"trail_distance": "10", "trail_activation_price": "9400.005"}, "trail_activation_price",
                 id="activation-off-tick"),
    pytest.param({"trail_distance": "10", "trail_step": "0.015"}, "trail_step", id="step-off-tick"),
    pytest.param({"break_even_price": "9300"}, "break_even_price", id="break-even-at-entry"),
    pytest.param({"trail_distance_percent": "100"}, "trail_distance_percent", id="percent-100"),
])
def test_open_refuses_trailing_that_cannot_work(alice, symbols, extra, field):
    r = alice.api.post(URL, {**LONG, **extra}, format="json")
    assert r.status_code == 400, r.json()
    assert field in invalid(r)
    assert not Operation.objects.exists()


def test_patch_sets_and_clears_the_trail(alice, symbols):
    op_id = alice.api.post(URL, LONG, format="json").json()["id"]
    r = alice.api.patch(f"{URL}{op_id}/", {"trail_distance_percent": "1.5"}, format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["trail_distance_percent"] == "1.5000"
    r = alice.api.patch(f"{URL}{op_id}/", {"trail_distance_percent": None}, format="json")
    assert r.status_code == 200, r.json()
    assert r.json()["trail_distance_percent"] is None
    assert [t for t, _ in events_of(op_id)] == ["STOP_SET", "TRAILING_SET", "TRAILING_SET"]
    assert events_of(op_id)[-1][1]["trail_distance_percent"] is None


def test_patch_refuses_an_activation_on_the_losing_side(alice, symbols):
    op_id = alice.api.post(URL, {**LONG, "trail_distance": "50"}, format="json").json()["id"]
    r = alice.api.patch(f"{URL}{op_id}/", {"trail_activation_price": "9100"}, format="json")
    assert r.status_code == 400 and "trail_activation_price" in invalid(r)
    assert [t for t, _ in events_of(op_id)] == ["STOP_SET", "TRAILING_SET"]


def test_the_schema_lists_the_trailing_fields(alice):
    schema = alice.api.get("/api/schema/?format=json").json()
    props = schema["components"]["schemas"]["OperationCreate"]["properties"]
    assert {"trail_distance", "trail_distance_percent", "trail_activation_price", "trail_step", "break_even_price",
            "break_even_fee_percent"} <= set(props)
