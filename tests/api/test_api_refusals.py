"""Input the API must refuse with 400 and the field's reason, changing nothing (issue 5's list)."""

from __future__ import annotations

import json

import pytest

from api.models import Operation, StopMonitorEvent
from tests.api.conftest import error, invalid

URL = "/api/v1/operations/"
VALID = {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300", "stop_price": "9200",
         "target_price": "9500"}

REQUIRED = "This field is required."
NUMBER = "A valid number is required."
POSITIVE = "Must be greater than 0."
NOT_A_STRING = 'Must be a decimal string such as "0.5" (not a JSON number).'
PATTERN = "Must be ASCII digits with an optional '.' and at most 8 decimals, e.g. \"9300.5\"."


def body(**changes):
    data = {**VALID, **changes}
    return {k: v for k, v in data.items() if v is not ...}


@pytest.mark.parametrize(
    "data, fields",
    [
        # levels on the wrong side (stopmonitor.operations.check_levels)
        pytest.param(body(stop_price="9300"), {"stop_price": ["a long's stop must be below the entry price 9300"]},
                     id="long-stop-at-entry"),
        pytest.param(body(stop_price="9400", target_price=...),
                     {"stop_price": ["a long's stop must be below the entry price 9300"]}, id="long-stop-above"),
        pytest.param(body(target_price="9300"),
                     {"target_price": ["a long's target must be above the entry price 9300"]},
                     id="long-target-at-entry"),
        pytest.param(body(side="SELL", stop_price="9300", target_price="9000"),
                     {"stop_price": ["a short's stop must be above the entry price 9300"]},
                     id="short-stop-at-entry"),
        pytest.param(body(side="SELL", stop_price="9400", target_price="9500"),
                     {"target_price": ["a short's target must be below the entry price 9300"]},
                     id="short-target-above"),
        # zero, negative, non-numeric, NaN/Infinity, over-precise
        pytest.param(body(quantity="0"), {"quantity": [POSITIVE]}, id="quantity-zero"),
        pytest.param(body(quantity="-0.5"), {"quantity": [POSITIVE]}, id="quantity-negative"),
        pytest.param(body(quantity="-0"), {"quantity": [POSITIVE]}, id="quantity-minus-zero"),
        pytest.param(body(entry_price=0), {"entry_price": [NOT_A_STRING]}, id="entry-zero-number"),
        pytest.param(body(entry_price=9300), {"entry_price": [NOT_A_STRING]}, id="entry-json-integer"),
        pytest.param(body(quantity=0.5), {"quantity": [NOT_A_STRING]}, id="quantity-json-float"),
        # what Python's Decimal takes but the published pattern does not (issue 16: "1e5" opened 100,000 units)
        pytest.param(body(quantity="1e5"), {"quantity": [PATTERN]}, id="quantity-exponent"),
        pytest.param(body(quantity="5E-1"), {"quantity": [PATTERN]}, id="quantity-exponent-small"),
        pytest.param(body(quantity="1_000"), {"quantity": [PATTERN]}, id="quantity-underscore"),
        pytest.param(body(quantity="\u0661"), {"quantity": [PATTERN]}, id="quantity-arabic-indic-digit"),
        pytest.param(body(entry_price="\uff19\uff13\uff10\uff10"), {"entry_price": [PATTERN]},
                     id="entry-full-width-digits"),
        pytest.param(body(quantity="+0.5"), {"quantity": [PATTERN]}, id="quantity-plus-sign"),
        pytest.param(body(quantity=" 0.5"), {"quantity": [PATTERN]}, id="quantity-leading-space"),
        pytest.param(body(quantity="0.5\n"), {"quantity": [PATTERN]}, id="quantity-trailing-newline"),
        pytest.param(body(quantity=".5"), {"quantity": [PATTERN]}, id="quantity-no-whole-digit"),
        pytest.param(body(quantity="5."), {"quantity": [PATTERN]}, id="quantity-trailing-dot"),
        pytest.param(body(stop_price="-1"), {"stop_price": [POSITIVE]}, id="stop-negative"),
        pytest.param(body(target_price="0"), {"target_price": [POSITIVE]}, id="target-zero"),
        pytest.param(body(entry_price="abc"), {"entry_price": [NUMBER]}, id="entry-non-numeric"),
        pytest.param(body(quantity=""), {"quantity": [NUMBER]}, id="quantity-empty-string"),
        pytest.param(body(quantity=True), {"quantity": [NOT_A_STRING]}, id="quantity-boolean"),
        pytest.param(body(quantity=["1"]), {"quantity": [NOT_A_STRING]}, id="quantity-list"),
        pytest.param(body(stop_price="NaN"), {"stop_price": [NUMBER]}, id="stop-nan"),
        pytest.param(body(stop_price="Infinity"), {"stop_price": [NUMBER]}, id="stop-infinity"),
        pytest.param(body(quantity="-Infinity"), {"quantity": [NUMBER]}, id="quantity-minus-infinity"),
        pytest.param(body(quantity="0.123456789"),
                     {"quantity": ["Ensure that there are no more than 8 decimal places."]}, id="nine-decimals"),
        pytest.param(body(entry_price="1234567890123.12345678"),
                     {"entry_price": ["Ensure that there are no more than 20 digits in total."]}, id="21-digits"),
        pytest.param(body(entry_price="1234567890123"),
                     {"entry_price": ["Ensure that there are no more than 12 digits before the decimal point."]},
                     id="13-whole-digits"),
        pytest.param(body(quantity="1e-9"),
                     {"quantity": ["Ensure that there are no more than 8 decimal places."]}, id="exponent-too-small"),
        # exchange filters of the symbol (BTCUSDT: minQty 0.00001, minNotional 5)
        pytest.param(body(quantity="0.000001"), {"quantity": ["Below the symbol's minQty 0.00001."]},
                     id="below-min-qty"),
        pytest.param(body(quantity="0.0001"),
                     {"quantity": ["Notional 0.93 is below the symbol's minNotional 5."]}, id="below-min-notional"),
        pytest.param(body(quantity="0.012345"),
                     {"quantity": ["0.012345 is not a multiple of the symbol's stepSize 0.00001."]},
                     id="off-step-size"),
        # symbol and side
        pytest.param(body(symbol="DOGEUSDT"), {"symbol": ["Unknown or inactive symbol 'DOGEUSDT'."]},
                     id="unknown-symbol"),
        pytest.param(body(symbol="XRPUSDT", entry_price="0.5", stop_price="0.4", target_price=..., quantity="100"),
                     {"symbol": ["Unknown or inactive symbol 'XRPUSDT'."]}, id="inactive-symbol"),
        pytest.param(body(symbol="btcusdt"), {"symbol": ["Unknown or inactive symbol 'btcusdt'."]},
                     id="lowercase-symbol"),
        pytest.param(body(side="LONG"), {"side": ['"LONG" is not a valid choice.']}, id="side-long"),
        pytest.param(body(side="buy"), {"side": ['"buy" is not a valid choice.']}, id="side-lowercase"),
        # shape
        pytest.param(body(stop_loss_percent="2"), {"stop_loss_percent": ["Unknown field."]}, id="unknown-field"),
        pytest.param(body(client=2, status="CLOSED"), {"client": ["Unknown field."], "status": ["Unknown field."]},
                     id="unknown-fields-client-status"),
        pytest.param(body(side="LONG", status="CLOSED"),
                     {"side": ['"LONG" is not a valid choice.'], "status": ["Unknown field."]},
                     id="unknown-field-with-invalid-field"),
        pytest.param(body(stop_price=...), {"stop_price": [REQUIRED]}, id="stop-missing"),
        pytest.param(body(stop_price=None), {"stop_price": ["This field may not be null."]}, id="stop-null"),
        pytest.param({}, {k: [REQUIRED] for k in ("symbol", "side", "quantity", "entry_price", "stop_price")},
                     id="empty-object"),
        pytest.param([VALID], {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]},
                     id="list-body"),
        pytest.param("BTCUSDT", {"non_field_errors": ["Invalid data. Expected a dictionary, but got str."]},
                     id="string-body"),
    ],
)
def test_create_refusals_answer_400_with_the_field_and_change_nothing(alice, symbols, data, fields):
    r = alice.api.post(URL, data, format="json")
    assert (r.status_code, r.json()) == (400, invalid(**fields))
    assert not Operation.objects.exists() and not StopMonitorEvent.objects.exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        pytest.param('{"symbol": "BTCUSDT",', "JSON parse error - Expecting property name enclosed in double quotes: "
                     "line 1 column 22 (char 21)", id="truncated"),
        pytest.param("symbol=BTCUSDT&side=BUY", "JSON parse error - Expecting value: line 1 column 1 (char 0)",
                     id="form-text-as-json"),
        pytest.param('{"symbol": "BTCUSDT", "side": "BUY", "quantity": NaN}',
                     "JSON parse error - Out of range float values are not JSON compliant: 'NaN'", id="bare-nan"),
        pytest.param('{"quantity": Infinity}',
                     "JSON parse error - Out of range float values are not JSON compliant: 'Infinity'",
                     id="bare-infinity"),
    ],
)
def test_body_that_is_not_json_is_400(alice, symbols, raw, message):
    r = alice.api.post(URL, raw, content_type="application/json")
    assert (r.status_code, r.json()) == (400, error("parse_error", message))
    assert not Operation.objects.exists()


def test_number_overflowing_to_infinity_is_refused(alice, symbols):
    raw = json.dumps(VALID).replace('"0.5"', "1e400")
    r = alice.api.post(URL, raw, content_type="application/json")
    assert (r.status_code, r.json()) == (400, invalid(quantity=[NOT_A_STRING]))
    assert not Operation.objects.exists()


def test_form_encoded_body_is_refused_as_unsupported_media_type(alice, symbols):
    r = alice.api.post(URL, VALID)  # multipart
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert not Operation.objects.exists()


@pytest.mark.parametrize(
    "data, fields",
    [
        pytest.param({"stop_price": "NaN"}, {"stop_price": [NUMBER]}, id="nan"),
        pytest.param({"stop_price": "9100.000000001"},
                     {"stop_price": ["Ensure that there are no more than 8 decimal places."]}, id="over-precise"),
        pytest.param({"target_price": "-5"}, {"target_price": [POSITIVE]}, id="negative-target"),
        pytest.param({"quantity": "1"}, {"quantity": ["Unknown field."]}, id="quantity-not-movable"),
        pytest.param({"stop_price": "9350"}, {"stop_price": ["a long's stop must be below the entry price 9300"]},
                     id="stop-above-entry"),
    ],
)
def test_patch_refusals_change_nothing(alice, open_op, data, fields):
    op = open_op(alice.tenant)
    before = list(StopMonitorEvent.objects.values_list("sequence", flat=True))
    r = alice.api.patch(f"{URL}{op.pk}/", data, format="json")
    assert (r.status_code, r.json()) == (400, invalid(**fields))
    assert list(StopMonitorEvent.objects.values_list("sequence", flat=True)) == before
    assert Operation.objects.filter(pk=op.pk, stop_price="9200", target_price=None, quantity="0.5").exists()


def test_patch_body_not_json(alice, open_op):
    op = open_op(alice.tenant)
    r = alice.api.patch(f"{URL}{op.pk}/", "stop_price=9100", content_type="application/json")
    assert (r.status_code, r.json()) == (
        400, error("parse_error", "JSON parse error - Expecting value: line 1 column 1 (char 0)"))
