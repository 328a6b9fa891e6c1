"""/api/v1/operations/: create, list (filters, cursor pages), retrieve, PATCH levels, close, stream."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from api.models import Operation, StopMonitorEvent
from stopmonitor.exchange.base import RateLimited
from stopmonitor.exchange.paper import Scripted
from tests.api.conftest import NOT_FOUND, NOW, error, invalid, iso

URL = "/api/v1/operations/"


def events_of(op_id):
    return list(StopMonitorEvent.objects.filter(operation_id=op_id).order_by("version")
                .values_list("event_type", "source", "venue", "payload"))


def op_body(op, **overrides):
    """The expected list/detail body of ``op`` (values written out by each test via overrides)."""
    op.refresh_from_db()
    body = {
        "id": op.pk, "client": op.client_id, "symbol": "BTCUSDT", "side": "BUY", "status": "ACTIVE",
        "quantity": "0.50000000", "closed_quantity": "0.00000000", "remaining_quantity": "0.50000000",
        "entry_price": "9300.00000000", "stop_price": "9200.00000000", "target_price": None,
        "trail_distance": None, "trail_distance_percent": None, "trail_activation_price": None, "trail_step": None,
        "break_even_price": None, "break_even_fee_percent": None, "stop_execution_token": None, "created_at": iso(op.created_at), "updated_at": iso(op.updated_at),
        "account": op.account_id,
    }
    body.update(overrides)
    return body


# --------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------


def test_create_opens_an_active_operation_with_stop_and_target_events(alice, symbols):
    r = alice.api.post(URL, {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300",
                             "stop_price": "9200", "target_price": "9500.5"}, format="json")
    assert r.status_code == 201, r.json()
    op = Operation.objects.get()
    assert r["Location"] == f"{URL}{op.pk}/"
    assert r.json() == op_body(op, target_price="9500.50000000", latest_execution=None, protection=None)
    assert op.client == alice.tenant
    assert events_of(op.pk) == [
        ("STOP_SET", "api", "paper", {"stop_price": "9200", "entry_price": "9300"}),
        ("TARGET_SET", "api", "paper", {"target_price": "9500.5", "entry_price": "9300"}),
    ]


def test_create_refuses_json_numbers_and_accepts_a_short(alice, symbols):
    """Money is a decimal string (a JSON number is a float to most clients): numbers are 400 naming each field."""
    r = alice.api.post(URL, {"symbol": "ETHUSDT", "side": "SELL", "quantity": 0.25, "entry_price": 2000,
                             "stop_price": 2100, "target_price": 1800}, format="json")
    assert r.status_code == 400
    assert r.json()["error"]["fields"] == {name: ['Must be a decimal string such as "0.5" (not a JSON number).']
                                           for name in ("quantity", "entry_price", "stop_price", "target_price")}
    assert not Operation.objects.exists()
    r = alice.api.post(URL, {"symbol": "ETHUSDT", "side": "SELL", "quantity": "0.25", "entry_price": "2000",
                             "stop_price": "2100", "target_price": "1800"}, format="json")
    assert r.status_code == 201, r.json()
    body = r.json()
    assert (body["symbol"], body["side"], body["quantity"], body["stop_price"], body["target_price"]) == (
        "ETHUSDT", "SELL", "0.25000000", "2100.00000000", "1800.00000000")


def test_create_by_a_user_without_tenant_is_forbidden(nobody, symbols):
    r = nobody.api.post(URL, {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300",
                              "stop_price": "9200"}, format="json")
    assert (r.status_code, r.json()) == (403, error("no_tenant", "This user belongs to no tenant."))
    assert not Operation.objects.exists()


# --------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------


def test_list_newest_first_with_exact_body(alice, open_op):
    a = open_op(alice.tenant)
    b = open_op(alice.tenant, "ETHUSDT", "SELL", "1", entry="2000", stop="2100", target="1900")
    r = alice.api.get(URL)
    assert r.status_code == 200
    assert r.json() == {
        "next": None,
        "previous": None,
        "results": [
            op_body(b, symbol="ETHUSDT", side="SELL", quantity="1.00000000", remaining_quantity="1.00000000",
                    entry_price="2000.00000000", stop_price="2100.00000000", target_price="1900.00000000"),
            op_body(a),
        ],
    }


@pytest.mark.parametrize(
    "query, expected",
    [
        pytest.param("status=ACTIVE", ["eth-short", "btc-long"], id="status-active"),
        pytest.param("status=CLOSED", ["btc-closed"], id="status-closed"),
        pytest.param("symbol=ETHUSDT", ["eth-short"], id="symbol"),
        pytest.param("side=BUY", ["btc-closed", "btc-long"], id="side-buy"),
        pytest.param("side=SELL&symbol=BTCUSDT", [], id="side-and-symbol"),
        pytest.param("symbol=NOPE", [], id="unknown-symbol-empty"),
    ],
)
def test_list_filters(alice, open_op, paper, query, expected):
    names = {}
    names[open_op(alice.tenant).pk] = "btc-long"
    names[open_op(alice.tenant, "ETHUSDT", "SELL", "1", entry="2000", stop="2100").pk] = "eth-short"
    closed = open_op(alice.tenant)
    names[closed.pk] = "btc-closed"
    assert alice.api.post(f"{URL}{closed.pk}/close/").status_code == 200
    r = alice.api.get(f"{URL}?{query}")
    assert r.status_code == 200
    assert [names[o["id"]] for o in r.json()["results"]] == expected


@pytest.mark.parametrize(
    "query, fields",
    [
        pytest.param("status=OPEN", {"status": ["Select a valid choice. OPEN is not one of the available choices."]},
                     id="bad-status"),
        pytest.param("side=LONG", {"side": ["Select a valid choice. LONG is not one of the available choices."]},
                     id="bad-side"),
    ],
)
def test_list_refuses_bad_filters(alice, query, fields):
    r = alice.api.get(f"{URL}?{query}")
    assert (r.status_code, r.json()) == (400, invalid(**fields))


def test_the_filterset_runs_only_when_the_query_has_more_than_pagination(alice, open_op, monkeypatch):
    """api.filters.FilterBackend skips django-filter for ``?cursor=&limit=`` only (nothing to filter)."""
    from api.filters import OperationFilter

    built = []
    original = OperationFilter.__init__

    def spy(self, *args, **kwargs):
        built.append(kwargs["data"].dict())
        original(self, *args, **kwargs)

    monkeypatch.setattr(OperationFilter, "__init__", spy)
    open_op(alice.tenant)
    first = alice.api.get(f"{URL}?limit=1")
    assert first.status_code == 200 and len(first.json()["results"]) == 1
    assert alice.api.get(URL).status_code == 200
    assert built == []
    assert alice.api.get(f"{URL}?limit=1&status=CLOSED").json()["results"] == []
    assert alice.api.get(f"{URL}?side=LONG").status_code == 400
    assert alice.api.get(f"{URL}?unknown=1").status_code == 200  # not a filter: django-filter ignores it too
    assert built == [{"limit": "1", "status": "CLOSED"}, {"side": "LONG"}, {"unknown": "1"}]


def test_list_cursor_pages_are_stable_while_operations_are_added(alice, open_op):
    ids = [open_op(alice.tenant).pk for _ in range(5)]
    r = alice.api.get(f"{URL}?limit=2")
    first = r.json()
    assert [o["id"] for o in first["results"]] == ids[::-1][:2]
    assert first["previous"] is None and first["next"]
    open_op(alice.tenant)  # a new one arrives between pages: it is not on the next page
    second = alice.api.get(first["next"]).json()
    assert [o["id"] for o in second["results"]] == ids[::-1][2:4]
    third = alice.api.get(second["next"]).json()
    assert [o["id"] for o in third["results"]] == ids[::-1][4:]
    assert third["next"] is None


def test_list_with_invalid_cursor_is_not_found(alice):
    r = alice.api.get(f"{URL}?cursor=garbage")
    assert (r.status_code, r.json()) == (404, error("not_found", "Invalid cursor"))


def test_list_rows_render_exactly_as_the_operation_serializer(alice, open_op):
    """The list renders ``.values()`` rows by hand (OperationSerializer.represent_values); every field
    of every kind of row must equal what the ModelSerializer makes of the instance."""
    from api.serializers import OperationSerializer

    open_op(alice.tenant)  # no target, nothing closed
    open_op(alice.tenant, "ETHUSDT", "SELL", "1.23456789", entry="2000.01", stop="2100.99", target="1900.5")
    partly = open_op(alice.tenant, "ADAUSDT", "BUY", "40", entry="0.35", stop="0.3412", target="0.4")
    Operation.objects.filter(pk=partly.pk).update(closed_quantity=D("12.5"), status="CLOSING",
                                                  stop_execution_token="sm1-S1-0123456789abcdef")
    # the columns' extremes; closed beyond the quantity (remaining stays 0); no levels at all
    Operation.objects.create(client=alice.tenant, symbol=partly.symbol, side="BUY", status="CLOSED",
                             quantity=D("0.00001"), closed_quantity=D("0.00002"),
                             entry_price=D("999999999999.99999999"), stop_price=D("0.00000001"))
    Operation.objects.create(client=alice.tenant, symbol=partly.symbol, side="SELL", quantity=D("3"))
    queryset = Operation.objects.filter(client=alice.tenant).order_by("-id")
    expected = OperationSerializer(queryset.select_related("symbol"), many=True).data
    got = OperationSerializer.represent_values(queryset.values(*OperationSerializer.VALUES))
    assert len(got) == 5
    assert [list(row) for row in got] == [OperationSerializer.Meta.fields] * 5
    assert got == [dict(row) for row in expected]
    assert alice.api.get(URL).json()["results"] == got


def test_list_query_count_does_not_grow_with_rows(alice, open_op, django_assert_max_num_queries):
    for _ in range(30):
        open_op(alice.tenant)
    # the token with its user and tenant id (one query), the page
    with django_assert_max_num_queries(2):
        r = alice.api.get(URL)
    assert len(r.json()["results"]) == 30


# --------------------------------------------------------------------------------------
# retrieve
# --------------------------------------------------------------------------------------


def test_retrieve_without_execution(alice, open_op):
    op = open_op(alice.tenant)
    r = alice.api.get(f"{URL}{op.pk}/")
    assert (r.status_code, r.json()) == (200, op_body(op, latest_execution=None, protection=None))


def test_retrieve_with_latest_execution(alice, open_op, paper):
    op = open_op(alice.tenant)
    paper.push(Scripted("reject", code=-1013))
    rejected = alice.api.post(f"{URL}{op.pk}/close/")
    assert (rejected.status_code, rejected.json()["outcome"], rejected.json()["error"]["code"]) == (
        502, "failed", "not_closed")
    assert rejected.json()["operation"]["status"] == "ACTIVE"
    executed = alice.api.post(f"{URL}{op.pk}/close/")
    assert (executed.status_code, executed.json()["outcome"], "error" in executed.json()) == (200, "executed", False)
    r = alice.api.get(f"{URL}{op.pk}/")
    assert r.status_code == 200
    latest = r.json()["latest_execution"]
    assert r.json() == op_body(op, status="CLOSED", closed_quantity="0.50000000", remaining_quantity="0.00000000",
                               stop_execution_token=latest["execution_token"], latest_execution=latest, protection=None)
    assert latest == {
        "execution_token": latest["execution_token"], "operation": op.pk, "tenant": alice.tenant.pk,
        "symbol": "BTCUSDT", "attempt": 2, "trigger": "MANUAL", "status": "EXECUTED", "side": "SELL",
        "trigger_price": "9200.00000000", "observed_price": "9100.00000000", "requested_quantity": "0.50000000",
        "executed_quantity": "0.50000000", "avg_fill_price": "9100.00000000", "commission": "4.55000000",
        "commission_asset": "USDT", "slippage_pct": "1.08700000",
        "exchange_order_id": paper.orders[latest["execution_token"]].exchange_order_id,
        "exchange_status": "FILLED", "error_code": None, "error_message": "", "source": "api", "venue": "paper",
        "last_version": 7, "created_at": iso(NOW), "updated_at": iso(NOW), "submitted_at": iso(NOW),
    }
    assert latest["execution_token"].startswith(f"sm{op.pk}-M2-")


def test_retrieve_missing_is_not_found(alice):
    r = alice.api.get(f"{URL}999999/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)
    r = alice.api.get(f"{URL}abc/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)


# --------------------------------------------------------------------------------------
# PATCH: move the stop or the target
# --------------------------------------------------------------------------------------


def test_patch_moves_stop_and_sets_target_with_events(alice, open_op):
    op = open_op(alice.tenant)
    r = alice.api.patch(f"{URL}{op.pk}/", {"stop_price": "9250", "target_price": "9600"}, format="json")
    assert r.status_code == 200, r.json()
    assert r.json() == op_body(op, stop_price="9250.00000000", target_price="9600.00000000", latest_execution=None, protection=None)
    assert events_of(op.pk)[1:] == [
        ("STOP_MOVED", "api", "paper", {"from": "9200", "to": "9250", "actor": "alice"}),
        ("TARGET_SET", "api", "paper", {"target_price": "9600", "previous": None, "actor": "alice"}),
    ]


def test_patch_same_level_appends_nothing(alice, open_op):
    op = open_op(alice.tenant)
    r = alice.api.patch(f"{URL}{op.pk}/", {"stop_price": "9200.0"}, format="json")
    assert r.status_code == 200
    assert len(events_of(op.pk)) == 1


@pytest.mark.parametrize("status", ["CLOSING", "CLOSED", "CANCELLED"])
def test_patch_refused_with_409_unless_active(alice, open_op, status):
    op = open_op(alice.tenant)
    Operation.objects.filter(pk=op.pk).update(status=status)
    r = alice.api.patch(f"{URL}{op.pk}/", {"stop_price": "9100"}, format="json")
    assert (r.status_code, r.json()) == (
        409, error("conflict", f"operation {op.pk} is {status}: its levels cannot change"))
    op.refresh_from_db()
    assert op.stop_price == D("9200") and len(events_of(op.pk)) == 1


@pytest.mark.parametrize(
    "body, fields",
    [
        pytest.param({"stop_price": "9300"}, {"stop_price": ["a long's stop must be below the entry price 9300"]},
                     id="stop-at-entry"),
        pytest.param({"target_price": "9000"}, {"target_price": ["a long's target must be above the entry price 9300"]},
                     id="target-below-entry"),
        pytest.param({}, {"non_field_errors": ["Give stop_price, target_price or a trailing setting."]}, id="empty"),
        pytest.param({"stop_price": "9100", "status": "CLOSED"}, {"status": ["Unknown field."]}, id="unknown-field"),
        pytest.param({"stop_price": None}, {"stop_price": ["This field may not be null."]}, id="null"),
        pytest.param({"stop_price": "0"}, {"stop_price": ["Must be greater than 0."]}, id="zero"),
    ],
)
def test_patch_refusals_change_nothing(alice, open_op, body, fields):
    op = open_op(alice.tenant)
    r = alice.api.patch(f"{URL}{op.pk}/", body, format="json")
    assert (r.status_code, r.json()) == (400, invalid(**fields))
    op.refresh_from_db()
    assert (op.stop_price, op.target_price) == (D("9200"), None) and len(events_of(op.pk)) == 1


def test_put_and_delete_are_not_allowed(alice, open_op):
    op = open_op(alice.tenant)
    r = alice.api.put(f"{URL}{op.pk}/", {"stop_price": "9100"}, format="json")
    assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "PUT" not allowed.'))
    r = alice.api.delete(f"{URL}{op.pk}/")
    assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "DELETE" not allowed.'))


# --------------------------------------------------------------------------------------
# close now
# --------------------------------------------------------------------------------------


def test_close_executes_through_the_engine_once(alice, open_op, paper):
    op = open_op(alice.tenant)
    r = alice.api.post(f"{URL}{op.pk}/close/")
    assert r.status_code == 200, r.json()
    body = r.json()
    token = body["decisions"][0]["execution_token"]
    assert body["outcome"] == "executed"
    assert body["decisions"] == [
        {"action": "triggered", "execution_token": token, "event_type": "STOP_TRIGGERED", "reason": "MANUAL",
         "detail": "level 9200 observed 9100 qty 0.5"},
        {"action": "submitted", "execution_token": token, "event_type": "EXECUTION_SUBMITTED", "reason": None,
         "detail": f"MARKET SELL 0.5 client order id {token}"},
        {"action": "executed", "execution_token": token, "event_type": "EXECUTED", "reason": None,
         "detail": "executed 0.5 at 9100"},
    ]
    assert body["operation"]["status"] == "CLOSED"
    assert body["operation"]["latest_execution"]["status"] == "EXECUTED"
    assert [req.client_order_id for req in paper.order_requests] == [token]
    assert [e[0] for e in events_of(op.pk)] == [
        "STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED", "OPERATION_CLOSED"]
    assert {e[1] for e in events_of(op.pk)[1:]} == {"api"}

    again = alice.api.post(f"{URL}{op.pk}/close/")
    assert (again.status_code, again.json()) == (
        409, error("conflict", f"operation {op.pk} is CLOSED: it cannot be closed now"))
    assert len(paper.order_requests) == 1


def test_close_while_closing_is_409_and_places_nothing(alice, open_op, paper):
    op = open_op(alice.tenant)
    Operation.objects.filter(pk=op.pk).update(status="CLOSING")
    r = alice.api.post(f"{URL}{op.pk}/close/", {}, format="json")
    assert (r.status_code, r.json()) == (
        409, error("conflict", f"operation {op.pk} is CLOSING: it cannot be closed now"))
    assert paper.calls == []


def test_close_blocked_by_kill_switch_reports_the_guard(alice, open_op, paper):
    from api.models import TenantConfig

    TenantConfig.objects.create(client=alice.tenant, kill_switch=True, kill_switch_reason="incident 42")
    op = open_op(alice.tenant)
    r = alice.api.post(f"{URL}{op.pk}/close/")
    assert r.status_code == 409
    assert r.json()["error"] == {"code": "not_closed", "fields": {},
                                 "message": f"operation {op.pk} was not closed (blocked: KILL_SWITCH: "
                                            f"kill switch on: incident 42 (exchange-held protection, if any, stays resting))"}
    assert r.json()["outcome"] == "blocked"
    assert r.json()["decisions"] == [{"action": "blocked", "execution_token": None, "event_type": "BLOCKED",
                                      "reason": "KILL_SWITCH", "detail": "kill switch on: incident 42 (exchange-held protection, if any, stays resting)"}]
    assert r.json()["operation"]["status"] == "ACTIVE"
    assert paper.order_requests == []


def test_close_with_unknown_outcome_leaves_it_closing(alice, open_op, paper):
    op = open_op(alice.tenant)
    paper.push(Scripted("timeout_after"))
    r = alice.api.post(f"{URL}{op.pk}/close/")
    assert r.status_code == 202
    assert "error" not in r.json()
    assert r.json()["outcome"] == "unknown"
    assert r.json()["operation"]["status"] == "CLOSING"
    assert r.json()["operation"]["latest_execution"]["status"] == "SUBMITTED"


def test_close_when_quotes_cannot_be_read_is_503_and_changes_nothing(alice, open_op, paper, monkeypatch):
    op = open_op(alice.tenant)

    def limited(symbols):
        raise RateLimited("BTCUSDT: rate limited", NOW, code=-1003)

    monkeypatch.setattr(paper, "book_tickers", limited)
    r = alice.api.post(f"{URL}{op.pk}/close/")
    assert (r.status_code, r.json()) == (
        503, error("exchange_unavailable", "cannot close BTCUSDT now: BTCUSDT: rate limited"))
    assert len(events_of(op.pk)) == 1 and paper.order_requests == []


def test_close_refuses_a_body_with_fields(alice, open_op, paper):
    op = open_op(alice.tenant)
    r = alice.api.post(f"{URL}{op.pk}/close/", {"force": True}, format="json")
    assert (r.status_code, r.json()) == (400, invalid(force=["Unknown field."]))
    assert paper.calls == []


def test_close_missing_is_not_found(alice, paper):
    r = alice.api.post(f"{URL}424242/close/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)


# --------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------


def test_stream_in_version_order(alice, open_op):
    op = open_op(alice.tenant)
    alice.api.patch(f"{URL}{op.pk}/", {"stop_price": "9210"}, format="json")
    alice.api.patch(f"{URL}{op.pk}/", {"stop_price": "9220"}, format="json")
    r = alice.api.get(f"{URL}{op.pk}/events/")
    assert r.status_code == 200
    rows = list(StopMonitorEvent.objects.filter(operation_id=op.pk).order_by("version"))
    assert r.json() == {
        "next": None,
        "previous": None,
        "results": [
            {"sequence": e.sequence, "event_id": str(e.event_id), "operation": op.pk, "version": e.version,
             "event_type": e.event_type, "tenant": alice.tenant.pk, "symbol": "BTCUSDT", "execution_token": None,
             "source": e.source, "venue": "paper", "payload": e.payload, "created_at": iso(e.created_at)}
            for e in rows
        ],
    }
    assert [e["version"] for e in r.json()["results"]] == [1, 2, 3]
    assert [e["payload"].get("to") for e in r.json()["results"]] == [None, "9210", "9220"]


def test_stream_pages(alice, open_op):
    op = open_op(alice.tenant)
    for level in range(9201, 9206):
        alice.api.patch(f"{URL}{op.pk}/", {"stop_price": str(level)}, format="json")
    first = alice.api.get(f"{URL}{op.pk}/events/?limit=4").json()
    second = alice.api.get(first["next"]).json()
    assert [e["version"] for e in first["results"]] == [1, 2, 3, 4]
    assert [e["version"] for e in second["results"]] == [5, 6]


def test_stream_of_missing_operation_is_not_found(alice):
    r = alice.api.get(f"{URL}31337/events/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)
