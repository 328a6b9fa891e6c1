"""/events/?after=SEQ (the global feed) and /executions/ (filters, retrieve)."""

from __future__ import annotations

import pytest

from api.models import StopMonitorEvent, StopMonitorExecution
from stopmonitor.exchange.paper import Scripted
from tests.api.conftest import NOT_FOUND, error, invalid, iso

FEED = "/api/v1/events/"
EXECUTIONS = "/api/v1/executions/"


def event_body(e):
    return {"sequence": e.sequence, "event_id": str(e.event_id), "operation": e.operation_id, "version": e.version,
            "event_type": e.event_type, "tenant": e.tenant_id, "symbol": e.symbol,
            "execution_token": e.execution_token, "source": e.source, "venue": e.venue, "payload": e.payload,
            "created_at": iso(e.created_at)}


# --------------------------------------------------------------------------------------
# the global feed
# --------------------------------------------------------------------------------------


def test_feed_in_sequence_order_with_exact_body(alice, open_op):
    a = open_op(alice.tenant)
    b = open_op(alice.tenant, target="9500")
    rows = list(StopMonitorEvent.objects.order_by("sequence"))
    r = alice.api.get(FEED)
    assert r.status_code == 200
    assert r.json() == {"next": None, "last_sequence": rows[-1].sequence, "results": [event_body(e) for e in rows]}
    assert [(e["operation"], e["event_type"]) for e in r.json()["results"]] == [
        (a.pk, "STOP_SET"), (b.pk, "STOP_SET"), (b.pk, "TARGET_SET")]


def test_feed_pages_with_after_and_never_skips_new_appends(alice, open_op):
    for _ in range(3):
        open_op(alice.tenant, target="9500")  # two events each
    seqs = list(StopMonitorEvent.objects.order_by("sequence").values_list("sequence", flat=True))
    page = alice.api.get(f"{FEED}?limit=4").json()
    assert [e["sequence"] for e in page["results"]] == seqs[:4]
    assert page["last_sequence"] == seqs[3]
    assert page["next"] == f"http://testserver{FEED}?after={seqs[3]}&limit=4"
    late = open_op(alice.tenant)  # appended between two polls
    page = alice.api.get(page["next"]).json()
    assert [e["sequence"] for e in page["results"]] == seqs[4:] + [
        StopMonitorEvent.objects.get(operation=late).sequence]
    assert page["next"] is None
    empty = alice.api.get(f"{FEED}?after={page['last_sequence']}").json()
    assert empty == {"next": None, "last_sequence": page["last_sequence"], "results": []}


@pytest.mark.parametrize(
    "query, fields",
    [
        pytest.param("after=abc", {"after": ["A valid integer is required."]}, id="after-text"),
        pytest.param("after=-1", {"after": ["Must be between 0 and 9223372036854775807."]}, id="after-negative"),
        pytest.param("after=1.5", {"after": ["A valid integer is required."]}, id="after-decimal"),
        pytest.param("after=99999999999999999999", {"after": ["Must be between 0 and 9223372036854775807."]},
                     id="after-huge"),
        pytest.param("limit=0", {"limit": ["Must be between 1 and 500."]}, id="limit-zero"),
        pytest.param("limit=501", {"limit": ["Must be between 1 and 500."]}, id="limit-too-big"),
    ],
)
def test_feed_refuses_bad_parameters(alice, query, fields):
    r = alice.api.get(f"{FEED}?{query}")
    assert (r.status_code, r.json()) == (400, invalid(**fields))


def test_after_huge_message_is_exact(alice):
    # the 2**63-1 bound is the sequence column's (bigint)
    assert 2**63 - 1 == 9223372036854775807


# --------------------------------------------------------------------------------------
# executions
# --------------------------------------------------------------------------------------


@pytest.fixture
def closes(alice, open_op, paper):
    """Three operations of alice: one FAILED then EXECUTED, one SUBMITTED (outcome unknown), one untouched."""
    one = open_op(alice.tenant)
    paper.push(Scripted("reject", code=-1013))
    assert alice.api.post(f"/api/v1/operations/{one.pk}/close/").json()["outcome"] == "failed"
    assert alice.api.post(f"/api/v1/operations/{one.pk}/close/").json()["outcome"] == "executed"
    two = open_op(alice.tenant, "ETHUSDT", "SELL", "1", entry="1900", stop="2050")
    paper.push(Scripted("timeout_after"))
    assert alice.api.post(f"/api/v1/operations/{two.pk}/close/").json()["outcome"] == "unknown"
    open_op(alice.tenant)
    return one, two


def test_executions_list_newest_first(alice, closes):
    one, two = closes
    r = alice.api.get(EXECUTIONS)
    assert r.status_code == 200
    body = r.json()
    assert (body["next"], body["previous"]) == (None, None)
    # newest first; executions created at the same instant (the paper clock is fixed) by token
    rows = sorted(StopMonitorExecution.objects.all(), key=lambda e: e.execution_token)
    assert [e["execution_token"] for e in body["results"]] == [e.execution_token for e in rows]
    assert {(e["operation"], e["status"], e["attempt"]) for e in body["results"]} == {
        (one.pk, "EXECUTED", 2), (one.pk, "FAILED", 1), (two.pk, "SUBMITTED", 1)}


@pytest.mark.parametrize(
    "query, expected",
    [
        pytest.param("status=FAILED", {("one", "FAILED")}, id="failed"),
        pytest.param("status=SUBMITTED", {("two", "SUBMITTED")}, id="submitted"),
        pytest.param("operation={one}", {("one", "FAILED"), ("one", "EXECUTED")}, id="by-operation"),
        pytest.param("operation={one}&status=EXECUTED", {("one", "EXECUTED")}, id="both"),
        pytest.param("operation=999999", set(), id="unknown-operation"),
    ],
)
def test_executions_filters(alice, closes, query, expected):
    one, two = closes
    names = {one.pk: "one", two.pk: "two"}
    r = alice.api.get(f"{EXECUTIONS}?{query.format(one=one.pk)}")
    assert r.status_code == 200
    assert {(names[e["operation"]], e["status"]) for e in r.json()["results"]} == expected


@pytest.mark.parametrize(
    "query, fields",
    [
        pytest.param("status=DONE", {"status": ["Select a valid choice. DONE is not one of the available choices."]},
                     id="bad-status"),
        pytest.param("operation=abc", {"operation": ["Enter a whole number."]}, id="operation-text"),
        pytest.param("operation=1.5", {"operation": ["Enter a whole number."]}, id="operation-decimal"),
        pytest.param("operation=0", {"operation": ["Ensure this value is greater than or equal to 1."]},
                     id="operation-zero"),
    ],
)
def test_executions_refuse_bad_filters(alice, query, fields):
    r = alice.api.get(f"{EXECUTIONS}?{query}")
    assert (r.status_code, r.json()) == (400, invalid(**fields))


def test_execution_retrieve_exact_body(alice, closes):
    _, two = closes
    row = StopMonitorExecution.objects.get(operation=two)
    r = alice.api.get(f"{EXECUTIONS}{row.pk}/")
    assert r.status_code == 200
    assert r.json() == {
        "execution_token": row.pk, "operation": two.pk, "tenant": alice.tenant.pk, "symbol": "ETHUSDT",
        "attempt": 1, "trigger": "MANUAL", "status": "SUBMITTED", "side": "BUY", "trigger_price": "2050.00000000",
        "observed_price": "2000.10000000", "requested_quantity": "1.00000000", "executed_quantity": None,
        "avg_fill_price": None, "commission": None, "commission_asset": "", "slippage_pct": None,
        "exchange_order_id": None, "exchange_status": "", "error_code": None, "error_message": "", "source": "api",
        "venue": "paper", "last_version": row.last_version, "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at), "submitted_at": iso(row.submitted_at),
    }


def test_execution_missing_is_not_found(alice):
    r = alice.api.get(f"{EXECUTIONS}sm1-M1-deadbeef/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)


def test_executions_post_is_not_allowed(alice):
    r = alice.api.post(EXECUTIONS, {}, format="json")
    assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "POST" not allowed.'))
