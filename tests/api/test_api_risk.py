"""/risk/config/, /risk/circuit-breakers/, /symbols/, and per-user throttling."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from api.models import CircuitBreakerState, TenantConfig
from tests.api.conftest import NOT_FOUND, error, invalid, iso

CONFIG = "/api/v1/risk/config/"
BREAKERS = "/api/v1/risk/circuit-breakers/"
SYMBOLS = "/api/v1/symbols/"


def config_body(cfg, **overrides):
    cfg.refresh_from_db()
    body = {"client": cfg.client_id, "kill_switch": cfg.kill_switch, "kill_switch_reason": cfg.kill_switch_reason,
            "kill_switch_at": iso(cfg.kill_switch_at), "kill_switch_by": cfg.kill_switch_by,
            "max_slippage_pct": "1.0000", "slippage_action": "warn", "max_executions_per_minute": 30,
            "max_executions_per_hour": 600, "protection_enabled": None, "protection_buffer_bps": 50,
            "updated_at": iso(cfg.updated_at), "updated_by": cfg.updated_by}
    body.update(overrides)
    return body


# --------------------------------------------------------------------------------------
# risk config
# --------------------------------------------------------------------------------------


def test_get_defaults_without_writing(alice):
    r = alice.api.get(CONFIG)
    assert (r.status_code, r.json()) == (200, {
        "client": alice.tenant.pk, "kill_switch": False, "kill_switch_reason": "", "kill_switch_at": None,
        "kill_switch_by": "", "max_slippage_pct": "1.0000", "slippage_action": "warn",
        "max_executions_per_minute": 30, "max_executions_per_hour": 600, "protection_enabled": None,
        "protection_buffer_bps": 50, "updated_at": None, "updated_by": ""})
    assert not TenantConfig.objects.exists()


def test_kill_switch_on_records_who_when_and_why(alice, caplog):
    before = datetime.now(timezone.utc)
    with caplog.at_level(logging.INFO, logger="api.audit"):
        r = alice.api.patch(CONFIG, {"kill_switch": True, "kill_switch_reason": " exchange incident "}, format="json")
    assert r.status_code == 200, r.json()
    cfg = TenantConfig.objects.get(client=alice.tenant)
    assert (cfg.kill_switch, cfg.kill_switch_reason, cfg.kill_switch_by, cfg.updated_by) == (
        True, "exchange incident", "alice", "alice")
    assert cfg.kill_switch_at >= before and cfg.updated_at >= before
    assert r.json() == config_body(cfg)
    [record] = [rec for rec in caplog.records if rec.name == "api.audit"]
    assert (record.getMessage(), record.tenant_id, record.actor, record.changes, record.kill_switch_reason) == (
        "risk config changed", alice.tenant.pk, "alice", {"kill_switch": ["False", "True"]}, "exchange incident")


def test_kill_switch_off_also_needs_a_reason_and_is_recorded(alice, bob):
    TenantConfig.objects.create(client=alice.tenant, kill_switch=True, kill_switch_reason="incident",
                                kill_switch_by="ops")
    r = alice.api.patch(CONFIG, {"kill_switch": False}, format="json")
    assert (r.status_code, r.json()) == (400, invalid(kill_switch_reason=["Required when kill_switch is given."]))
    r = alice.api.patch(CONFIG, {"kill_switch": False, "kill_switch_reason": "resolved"}, format="json")
    assert r.status_code == 200
    assert (r.json()["kill_switch"], r.json()["kill_switch_reason"], r.json()["kill_switch_by"]) == (
        False, "resolved", "alice")


def test_limits_change_and_updated_by_is_recorded(alice):
    r = alice.api.patch(CONFIG, {"max_slippage_pct": "0.5", "slippage_action": "block",
                                 "max_executions_per_minute": 5, "max_executions_per_hour": 50}, format="json")
    assert r.status_code == 200
    cfg = TenantConfig.objects.get(client=alice.tenant)
    assert r.json() == config_body(cfg, max_slippage_pct="0.5000", slippage_action="block",
                                   max_executions_per_minute=5, max_executions_per_hour=50)
    assert (cfg.updated_by, cfg.kill_switch_by, cfg.kill_switch_at) == ("alice", "", None)


@pytest.mark.parametrize(
    "data, fields",
    [
        pytest.param({"kill_switch": True}, {"kill_switch_reason": ["Required when kill_switch is given."]},
                     id="kill-switch-without-reason"),
        pytest.param({"kill_switch": True, "kill_switch_reason": "   "},
                     {"kill_switch_reason": ["This field may not be blank."]}, id="blank-reason"),
        pytest.param({"kill_switch_reason": "why"},
                     {"kill_switch_reason": ["Only allowed together with kill_switch."]}, id="reason-alone"),
        pytest.param({"kill_switch": "yes", "kill_switch_reason": "x"}, {"kill_switch": ["Must be a valid boolean."]},
                     id="kill-switch-string"),
        pytest.param({"kill_switch": 1, "kill_switch_reason": "x"}, {"kill_switch": ["Must be a valid boolean."]},
                     id="kill-switch-number"),
        pytest.param({"kill_switch": True, "kill_switch_reason": "x" * 301},
                     {"kill_switch_reason": ["Ensure this field has no more than 300 characters."]}, id="long-reason"),
        pytest.param({"max_slippage_pct": "0"}, {"max_slippage_pct": ["Must be greater than 0."]}, id="slippage-zero"),
        pytest.param({"max_slippage_pct": "NaN"}, {"max_slippage_pct": ["A valid number is required."]},
                     id="slippage-nan"),
        pytest.param({"max_slippage_pct": "101"},
                     {"max_slippage_pct": ["Ensure this value is less than or equal to 100."]}, id="slippage-over-100"),
        pytest.param({"max_slippage_pct": "0.12345"},
                     {"max_slippage_pct": ["Ensure that there are no more than 4 decimal places."]},
                     id="slippage-over-precise"),
        pytest.param({"slippage_action": "ignore"}, {"slippage_action": ['"ignore" is not a valid choice.']},
                     id="slippage-action"),
        pytest.param({"max_executions_per_minute": 0},
                     {"max_executions_per_minute": ["Ensure this value is greater than or equal to 1."]},
                     id="per-minute-zero"),
        pytest.param({"max_executions_per_hour": "10"}, {"max_executions_per_hour": ["A valid integer is required."]},
                     id="per-hour-string"),
        pytest.param({"max_executions_per_hour": 2**31},
                     {"max_executions_per_hour": ["Ensure this value is less than or equal to 2147483647."]},
                     id="per-hour-overflow"),
        pytest.param({}, {"non_field_errors": ["Give at least one field to change."]}, id="empty"),
        pytest.param({"kill_switch_by": "mallory"}, {"kill_switch_by": ["Unknown field."]}, id="unknown-field"),
    ],
)
def test_config_refusals_change_nothing(alice, data, fields):
    cfg = TenantConfig.objects.create(client=alice.tenant)
    before = config_body(cfg)
    r = alice.api.patch(CONFIG, data, format="json")
    assert (r.status_code, r.json()) == (400, invalid(**fields))
    assert config_body(cfg) == before


def test_config_body_not_json(alice):
    r = alice.api.patch(CONFIG, "kill_switch=true", content_type="application/json")
    assert (r.status_code, r.json()) == (
        400, error("parse_error", "JSON parse error - Expecting value: line 1 column 1 (char 0)"))
    assert not TenantConfig.objects.exists()


def test_staff_address_a_tenant_with_the_client_parameter(staff, alice):
    r = staff.api.get(CONFIG)
    assert (r.status_code, r.json()) == (400, invalid(client=["Required for a staff user without a tenant."]))
    r = staff.api.patch(f"{CONFIG}?client={alice.tenant.pk}",
                        {"kill_switch": True, "kill_switch_reason": "ops drill"}, format="json")
    assert r.status_code == 200
    assert (r.json()["client"], r.json()["kill_switch_by"]) == (alice.tenant.pk, "ops")
    for bad, answer in (("abc", (400, invalid(client=["A valid integer is required."]))),
                        ("0", (404, NOT_FOUND)), ("99999999999999999999", (404, NOT_FOUND)),
                        ("424242", (404, NOT_FOUND))):
        r = staff.api.get(f"{CONFIG}?client={bad}")
        assert (r.status_code, r.json()) == answer, bad


def test_kill_switch_set_through_the_api_blocks_the_next_close(alice, open_op, paper):
    op = open_op(alice.tenant)
    alice.api.patch(CONFIG, {"kill_switch": True, "kill_switch_reason": "halt"}, format="json")
    r = alice.api.post(f"/api/v1/operations/{op.pk}/close/")
    assert (r.json()["outcome"], r.json()["decisions"][0]["reason"]) == ("blocked", "KILL_SWITCH")
    assert paper.order_requests == []


# --------------------------------------------------------------------------------------
# circuit breakers
# --------------------------------------------------------------------------------------

OPENED = datetime(2026, 3, 2, 11, 58, tzinfo=timezone.utc)
RETRY = datetime(2026, 3, 2, 12, 3, tzinfo=timezone.utc)


@pytest.fixture
def breakers(db):
    eth = CircuitBreakerState.objects.create(symbol="ETHUSDT")
    btc = CircuitBreakerState.objects.create(symbol="BTCUSDT", state="OPEN", failure_count=3, opened_at=OPENED,
                                             retry_at=RETRY, last_error="-2010: insufficient balance")
    return btc, eth


def test_breakers_list_exact(alice, staff, breakers):
    """The rows are shared by every tenant: the text of the last refused close (one tenant's order: side,
    quantity, client order id with its operation id) is for staff only (issue 16)."""
    btc, eth = breakers
    CircuitBreakerState.objects.filter(symbol="BTCUSDT").update(
        last_error="-2010: Account has insufficient balance for requested action. SELL 0.5 BTCUSDT sm17-S1-x")
    btc.refresh_from_db()
    rows = [
        {"symbol": "BTCUSDT", "state": "OPEN", "failure_count": 3, "opened_at": iso(OPENED), "retry_at": iso(RETRY),
         "last_error": "", "updated_at": iso(btc.updated_at)},
        {"symbol": "ETHUSDT", "state": "CLOSED", "failure_count": 0, "opened_at": None, "retry_at": None,
         "last_error": "", "updated_at": iso(eth.updated_at)},
    ]
    r = alice.api.get(BREAKERS)
    assert (r.status_code, r.json()) == (200, rows)
    assert b"sm17" not in r.content and b"SELL" not in r.content
    rows[0]["last_error"] = "-2010: Account has insufficient balance for requested action. SELL 0.5 BTCUSDT sm17-S1-x"
    r = staff.api.get(BREAKERS)
    assert (r.status_code, r.json()) == (200, rows)


def test_staff_reset_closes_the_breaker_and_is_logged(staff, breakers, caplog):
    with caplog.at_level(logging.INFO, logger="api.audit"):
        r = staff.api.post(f"{BREAKERS}BTCUSDT/reset/")
    btc = CircuitBreakerState.objects.get(symbol="BTCUSDT")
    assert (r.status_code, r.json()) == (200, {
        "symbol": "BTCUSDT", "state": "CLOSED", "failure_count": 0, "opened_at": None, "retry_at": None,
        "last_error": "", "updated_at": iso(btc.updated_at)})
    [record] = [rec for rec in caplog.records if rec.name == "api.audit"]
    assert (record.getMessage(), record.symbol, record.actor, record.from_state) == (
        "circuit breaker reset", "BTCUSDT", "ops", "OPEN")


def test_reset_of_unknown_breaker_is_not_found(staff, breakers):
    r = staff.api.post(f"{BREAKERS}DOGEUSDT/reset/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)


def test_reset_by_a_trader_is_forbidden(alice, breakers):
    r = alice.api.post(f"{BREAKERS}BTCUSDT/reset/")
    assert (r.status_code, r.json()) == (403, error("permission_denied", "Only staff users may do this."))
    assert CircuitBreakerState.objects.get(symbol="BTCUSDT").state == "OPEN"


def test_breakers_are_read_only_collections(alice, staff, breakers):
    r = staff.api.post(BREAKERS, {"symbol": "ADAUSDT"}, format="json")
    assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "POST" not allowed.'))
    r = staff.api.get(f"{BREAKERS}BTCUSDT/reset/")
    assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "GET" not allowed.'))


# --------------------------------------------------------------------------------------
# symbols
# --------------------------------------------------------------------------------------


def test_symbols_list_and_retrieve(alice, symbols):
    r = alice.api.get(SYMBOLS)
    assert r.status_code == 200
    assert [s["symbol"] for s in r.json()] == ["ADAUSDT", "BTCUSDT", "ETHUSDT", "XRPUSDT"]
    btc = symbols["BTCUSDT"]
    btc.refresh_from_db()
    r = alice.api.get(f"{SYMBOLS}BTCUSDT/")
    assert (r.status_code, r.json()) == (200, {
        "symbol": "BTCUSDT", "base_asset": "BTC", "quote_asset": "USDT", "tick_size": "0.01000000",
        "step_size": "0.00001000", "min_qty": "0.00001000", "min_notional": "5.00000000", "is_active": True,
        "updated_at": iso(btc.updated_at)})


def test_symbols_are_read_only(alice, staff, symbols):
    r = alice.api.get(f"{SYMBOLS}NOPE/")
    assert (r.status_code, r.json()) == (404, NOT_FOUND)
    for client in (alice, staff):
        r = client.api.post(SYMBOLS, {"symbol": "DOGEUSDT"}, format="json")
        assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "POST" not allowed.'))
        r = client.api.patch(f"{SYMBOLS}BTCUSDT/", {"is_active": False}, format="json")
        assert (r.status_code, r.json()) == (405, error("method_not_allowed", 'Method "PATCH" not allowed.'))


# --------------------------------------------------------------------------------------
# throttling
# --------------------------------------------------------------------------------------


def test_throttling_is_per_user(alice, bob, monkeypatch):
    from rest_framework.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "3/minute"})
    for _ in range(3):
        assert alice.api.get(SYMBOLS).status_code == 200
    r = alice.api.get(SYMBOLS)
    assert r.status_code == 429
    assert r.json() == error("throttled", "Request was throttled. Expected available in 60 seconds.")
    assert r["Retry-After"] == "60"
    assert bob.api.get(SYMBOLS).status_code == 200  # another user has their own budget


# --------------------------------------------------------------------------------------
# exchange-held protection settings
# --------------------------------------------------------------------------------------


def test_protection_settings_are_set_and_recorded(alice):
    r = alice.api.patch(CONFIG, {"protection_enabled": False, "protection_buffer_bps": 120}, format="json")
    assert r.status_code == 200, r.json()
    cfg = TenantConfig.objects.get(client=alice.tenant)
    assert (cfg.protection_enabled, cfg.protection_buffer_bps, cfg.updated_by) == (False, 120, "alice")
    assert r.json() == config_body(cfg, protection_enabled=False, protection_buffer_bps=120)
    r = alice.api.patch(CONFIG, {"protection_enabled": None}, format="json")  # back to the venue's default
    assert (r.status_code, r.json()["protection_enabled"]) == (200, None)


@pytest.mark.parametrize("body, field", [
    pytest.param({"protection_buffer_bps": -1}, "protection_buffer_bps", id="negative-buffer"),
    pytest.param({"protection_buffer_bps": 2001}, "protection_buffer_bps", id="buffer-above-20pct"),
    pytest.param({"protection_buffer_bps": "50"}, "protection_buffer_bps", id="buffer-as-string"),
    pytest.param({"protection_enabled": "yes"}, "protection_enabled", id="enabled-not-a-boolean"),
])
def test_bad_protection_settings_are_refused_and_change_nothing(alice, body, field):
    r = alice.api.patch(CONFIG, body, format="json")
    assert r.status_code == 400
    assert field in r.json()["error"]["fields"]
    assert not TenantConfig.objects.exists()
