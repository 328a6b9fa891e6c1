"""Tenant isolation: two tenants × every endpoint and method; staff see all; anonymous see nothing.

Another tenant's object answers exactly like a missing one (404, same body): never 403, never
data, and nothing changes (no event, no order).
"""

from __future__ import annotations

import pytest

from api.models import CircuitBreakerState, Operation, StopMonitorEvent, TenantConfig
from tests.api.conftest import NOT_FOUND, error

V1 = "/api/v1"


@pytest.fixture
def world(alice, bob, open_op, paper):
    """Each tenant has an ACTIVE operation and a CLOSED one with an execution."""
    out = {}
    for who in (alice, bob):
        active = open_op(who.tenant)
        closed = open_op(who.tenant)
        r = who.api.post(f"{V1}/operations/{closed.pk}/close/")
        assert r.status_code == 200
        out[who.user.username] = {
            "active": active.pk,
            "closed": closed.pk,
            "token": r.json()["operation"]["latest_execution"]["execution_token"],
            "tenant": who.tenant.pk,
        }
    TenantConfig.objects.update_or_create(client=alice.tenant, defaults={"kill_switch": False})
    CircuitBreakerState.objects.update_or_create(symbol="BTCUSDT", defaults={"state": "OPEN", "failure_count": 3})
    paper.calls.clear()
    return out


# Every object-addressed endpoint and method. ``{active}``, ``{closed}``, ``{token}``,
# ``{tenant}`` are the victim's.
OBJECT_ENDPOINTS = [
    pytest.param("get", "/operations/{active}/", None, id="GET-operation"),
    pytest.param("patch", "/operations/{active}/", {"stop_price": "9100"}, id="PATCH-operation"),
    pytest.param("post", "/operations/{active}/close/", None, id="POST-close"),
    pytest.param("get", "/operations/{active}/events/", None, id="GET-operation-events"),
    pytest.param("get", "/operations/{closed}/", None, id="GET-closed-operation"),
    pytest.param("get", "/executions/{token}/", None, id="GET-execution"),
    pytest.param("get", "/risk/config/?client={tenant}", None, id="GET-risk-config-of-tenant"),
    pytest.param("patch", "/risk/config/?client={tenant}", {"kill_switch": True, "kill_switch_reason": "x"},
                 id="PATCH-risk-config-of-tenant"),
]


def _call(actor, method, path, data):
    fn = getattr(actor.api, method)
    return fn(V1 + path, data, format="json") if data is not None else fn(V1 + path)


def _snapshot():
    return (
        list(StopMonitorEvent.objects.order_by("sequence").values_list("sequence", flat=True)),
        list(Operation.objects.order_by("id").values_list("id", "status", "stop_price", "target_price")),
        list(TenantConfig.objects.order_by("id").values_list("client_id", "kill_switch", "updated_by")),
    )


@pytest.mark.parametrize("method, template, data", OBJECT_ENDPOINTS)
@pytest.mark.parametrize("intruder, victim", [("bob", "alice"), ("alice", "bob")])
def test_another_tenants_object_is_not_found_and_unchanged(request, world, paper, intruder, victim, method,
                                                            template, data):
    actor = request.getfixturevalue(intruder)
    before = _snapshot()
    r = _call(actor, method, template.format(**world[victim]), data)
    assert (r.status_code, r.json()) == (404, NOT_FOUND)
    assert _snapshot() == before
    assert paper.calls == []
    # and exactly the answer for an object that does not exist at all
    missing = {"active": 10**9, "closed": 10**9 + 1, "token": "sm0-M1-00000000", "tenant": 10**9}
    r2 = _call(actor, method, template.format(**missing), data)
    assert (r2.status_code, r2.json()) == (r.status_code, r.json())


@pytest.mark.parametrize("method, template, data", OBJECT_ENDPOINTS)
@pytest.mark.parametrize("owner", ["alice", "bob"])
def test_owner_reaches_its_own_objects(request, world, owner, method, template, data):
    actor = request.getfixturevalue(owner)
    r = _call(actor, method, template.format(**world[owner]), data)
    if template.endswith("/close/"):  # reached and run: the world's BTCUSDT breaker is open, so it is held
        assert (r.status_code, r.json()["outcome"], r.json()["error"]["code"]) == (409, "blocked", "not_closed")
    else:
        assert r.status_code == 200, r.json()


@pytest.mark.parametrize("method, template, data", OBJECT_ENDPOINTS)
@pytest.mark.parametrize("owner", ["alice", "bob"])
def test_staff_reach_every_tenant(world, staff, owner, method, template, data):
    r = _call(staff, method, template.format(**world[owner]), data)
    if template.endswith("/close/"):
        assert (r.status_code, r.json()["outcome"], r.json()["error"]["code"]) == (409, "blocked", "not_closed")
    else:
        assert r.status_code == 200, r.json()


LISTS = [
    pytest.param("/operations/", "id", {"active", "closed"}, id="operations"),
    pytest.param("/operations/?status=CLOSED", "id", {"closed"}, id="operations-filtered"),
    pytest.param("/executions/", "execution_token", {"token"}, id="executions"),
    pytest.param("/events/", "operation", {"active", "closed"}, id="event-feed"),
]


@pytest.mark.parametrize("path, key, own", LISTS)
def test_lists_hold_only_the_callers_tenant(world, alice, bob, staff, path, key, own):
    def seen(actor):
        return {row[key] for row in actor.api.get(V1 + path).json()["results"]}

    assert seen(alice) == {world["alice"][k] for k in own}
    assert seen(bob) == {world["bob"][k] for k in own}
    assert seen(staff) == {world[w][k] for w in ("alice", "bob") for k in own}


def test_filter_by_another_tenants_operation_is_empty(world, bob):
    r = bob.api.get(f"{V1}/executions/?operation={world['alice']['closed']}")
    assert r.json()["results"] == []


def test_event_feed_sequences_skip_other_tenants(world, alice):
    mine = alice.api.get(f"{V1}/events/").json()["results"]
    assert {e["tenant"] for e in mine} == {world["alice"]["tenant"]}
    assert [e["sequence"] for e in mine] == sorted(e["sequence"] for e in mine)


def test_create_lands_in_the_callers_tenant(world, bob):
    r = bob.api.post(f"{V1}/operations/", {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5",
                                          "entry_price": "9300", "stop_price": "9200"}, format="json")
    assert r.status_code == 201
    assert r.json()["client"] == world["bob"]["tenant"]


def test_risk_config_defaults_to_the_callers_tenant(world, alice, bob):
    assert alice.api.get(f"{V1}/risk/config/").json()["client"] == world["alice"]["tenant"]
    assert bob.api.get(f"{V1}/risk/config/").json()["client"] == world["bob"]["tenant"]
    r = bob.api.patch(f"{V1}/risk/config/", {"max_executions_per_minute": 5}, format="json")
    assert r.status_code == 200
    assert TenantConfig.objects.get(client_id=world["alice"]["tenant"]).max_executions_per_minute == 30


def test_shared_read_only_resources_are_the_same_for_every_tenant(world, alice, bob):
    for path in ("/symbols/", "/risk/circuit-breakers/", "/symbols/BTCUSDT/"):
        assert alice.api.get(V1 + path).json() == bob.api.get(V1 + path).json()


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_only_staff_reset_a_circuit_breaker(request, world, who):
    actor = request.getfixturevalue(who)
    r = actor.api.post(f"{V1}/risk/circuit-breakers/BTCUSDT/reset/")
    assert (r.status_code, r.json()) == (403, error("permission_denied", "Only staff users may do this."))
    assert CircuitBreakerState.objects.get(symbol="BTCUSDT").state == "OPEN"


def test_user_without_tenant_sees_nothing(world, nobody):
    for path in ("/operations/", "/executions/", "/events/"):
        assert nobody.api.get(V1 + path).json()["results"] == []
    for path in ("/operations/{active}/", "/executions/{token}/", "/operations/{active}/events/"):
        r = nobody.api.get(V1 + path.format(**world["alice"]))
        assert (r.status_code, r.json()) == (404, NOT_FOUND)
    r = nobody.api.get(f"{V1}/risk/config/")
    assert (r.status_code, r.json()) == (403, error("no_tenant", "This user belongs to no tenant."))


EVERY_ENDPOINT = [
    ("get", "/operations/"), ("post", "/operations/"), ("get", "/operations/1/"), ("patch", "/operations/1/"),
    ("post", "/operations/1/close/"), ("get", "/operations/1/events/"), ("get", "/events/"),
    ("get", "/executions/"), ("get", "/executions/x/"), ("get", "/risk/config/"), ("patch", "/risk/config/"),
    ("get", "/risk/circuit-breakers/"), ("post", "/risk/circuit-breakers/BTCUSDT/reset/"), ("get", "/symbols/"),
    ("get", "/symbols/BTCUSDT/"),
]


@pytest.mark.parametrize("method, path", EVERY_ENDPOINT, ids=[f"{m.upper()}-{p}" for m, p in EVERY_ENDPOINT])
def test_anonymous_and_bad_tokens_are_401(db, anon, method, path):
    r = getattr(anon, method)(V1 + path, {}, format="json")
    assert (r.status_code, r.json()) == (
        401, error("not_authenticated", "Authentication credentials were not provided."))
    assert r["WWW-Authenticate"] == "Bearer"
    anon.credentials(HTTP_AUTHORIZATION="Bearer 0000000000000000000000000000000000000000")
    r = getattr(anon, method)(V1 + path, {}, format="json")
    assert (r.status_code, r.json()) == (401, error("authentication_failed", "Invalid token."))


def test_a_deactivated_users_token_is_401(alice):
    alice.user.is_active = False
    alice.user.save(update_fields=["is_active"])
    r = alice.api.get(V1 + "/operations/")
    assert (r.status_code, r.json()) == (401, error("authentication_failed", "User inactive or deleted."))


def test_the_token_query_brings_the_users_tenant(alice, bob, nobody, staff, django_assert_num_queries):
    """The bearer-token authentication annotates the tenant id that scoping reads (one query, not two)."""
    from api.auth import BearerTokenAuthentication
    from api.permissions import tenant_id_of

    for actor, tenant_id in ((alice, alice.tenant.pk), (bob, bob.tenant.pk), (nobody, None), (staff, None)):
        with django_assert_num_queries(1):
            user, _ = BearerTokenAuthentication().authenticate_credentials(actor.token.key)
            assert tenant_id_of(user) == tenant_id
        assert user == actor.user
