"""Admin (events and executions read-only, filters, close-now action) and the sync_symbols command."""

from __future__ import annotations

from decimal import Decimal as D
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from api.models import Operation, StopMonitorEvent, StopMonitorExecution, Symbol
from stopmonitor.exchange.base import ExchangeUnavailable
from stopmonitor.exchange.paper import PaperExchange, bundled_filters
from tests.api.conftest import NOW


@pytest.fixture
def admin_client(db, client):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_superuser("root", "root@example.com", None)
    client.force_login(user)
    return client


@pytest.fixture
def history(alice, open_op, paper):
    op = open_op(alice.tenant)
    assert alice.api.post(f"/api/v1/operations/{op.pk}/close/").status_code == 200
    return op


# --------------------------------------------------------------------------------------
# admin
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["stopmonitorevent", "stopmonitorexecution"])
def test_events_and_executions_are_read_only(admin_client, history, model):
    base = f"/admin/api/{model}/"
    assert admin_client.get(base).status_code == 200
    assert admin_client.get(f"{base}add/").status_code == 403
    pk = (StopMonitorEvent.objects.first().pk if model == "stopmonitorevent"
          else StopMonitorExecution.objects.first().pk)
    page = admin_client.get(f"{base}{pk}/change/")
    assert page.status_code == 200 and b'type="submit" value="Save"' not in page.content
    assert admin_client.post(f"{base}{pk}/change/", {}).status_code == 403
    assert admin_client.get(f"{base}{pk}/delete/").status_code == 403
    count = (StopMonitorEvent if model == "stopmonitorevent" else StopMonitorExecution).objects.count()
    admin_client.post(base, {"action": "delete_selected", "_selected_action": [pk]})
    assert (StopMonitorEvent if model == "stopmonitorevent" else StopMonitorExecution).objects.count() == count


@pytest.mark.parametrize(
    "model, query",
    [
        pytest.param("stopmonitorevent", "tenant__id__exact={tenant}&symbol=BTCUSDT&event_type=EXECUTED&source=api",
                     id="events"),
        pytest.param("stopmonitorexecution", "tenant__id__exact={tenant}&symbol=BTCUSDT&status=EXECUTED&source=api",
                     id="executions"),
    ],
)
def test_admin_filters_by_tenant_symbol_type_source(admin_client, history, alice, model, query):
    r = admin_client.get(f"/admin/api/{model}/?{query.format(tenant=alice.tenant.pk)}")
    assert r.status_code == 200
    assert r.context["cl"].result_count == 1
    filters = {spec.title for spec in r.context["cl"].filter_specs}
    assert {"tenant", "symbol", "source"} <= filters


def test_operations_tenants_and_symbols_are_editable(admin_client, history):
    for model in ("operation", "client", "symbol"):
        assert admin_client.get(f"/admin/api/{model}/add/").status_code == 200
    symbol = Symbol.objects.get(symbol="BTCUSDT")
    assert admin_client.get(f"/admin/api/symbol/{symbol.pk}/change/").status_code == 200


def test_admin_close_now_goes_through_the_engine(admin_client, alice, open_op, paper):
    op = open_op(alice.tenant)
    r = admin_client.post("/admin/api/operation/", {"action": "close_now", "_selected_action": [op.pk]})
    assert r.status_code == 302
    op.refresh_from_db()
    assert op.status == "CLOSED" and len(paper.order_requests) == 1
    assert StopMonitorEvent.objects.get(operation=op, event_type="STOP_TRIGGERED").source == "manual"


# --------------------------------------------------------------------------------------
# sync_symbols
# --------------------------------------------------------------------------------------


@pytest.fixture
def exchange(monkeypatch):
    filters = bundled_filters()
    from dataclasses import replace

    filters["BTCUSDT"] = replace(filters["BTCUSDT"], min_notional=D("10"))
    filters["ETHUSDT"] = replace(filters["ETHUSDT"], status="BREAK")
    paper = PaperExchange(filters=filters, now=NOW)
    monkeypatch.setattr("stopmonitor.exchange.factory.build_exchange", lambda venue=None: paper)
    return paper


def run(*args):
    out = StringIO()
    call_command("sync_symbols", *args, stdout=out)
    return out.getvalue().splitlines()


def test_sync_every_known_symbol(db, exchange):
    f = bundled_filters()["BTCUSDT"]
    Symbol.objects.create(symbol="BTCUSDT", base_asset="BTC", quote_asset="USDT", tick_size=f.tick_size,
                          step_size=f.step_size, min_qty=f.min_qty, min_notional=D("5"))
    Symbol.objects.create(symbol="ETHUSDT", base_asset="ETH", quote_asset="USDT")
    Symbol.objects.create(symbol="XRPUSDT", base_asset="XRP", quote_asset="USDT")
    assert run() == [
        "BTCUSDT: updated (TRADING)",
        "ETHUSDT: updated (BREAK)",
        "XRPUSDT: not listed by paper; marked inactive",
        "synced 3 symbols from paper: 0 created, 2 updated, 1 deactivated, 0 not listed",
    ]
    assert exchange.calls == [("symbol_filters", ("BTCUSDT", "ETHUSDT", "XRPUSDT"))]
    rows = {s.symbol: s for s in Symbol.objects.all()}
    assert (rows["BTCUSDT"].min_notional, rows["BTCUSDT"].is_active) == (D("10"), True)
    assert (rows["ETHUSDT"].step_size, rows["ETHUSDT"].is_active) == (D("0.0001"), False)
    assert rows["XRPUSDT"].is_active is False
    assert run("BTCUSDT") == ["BTCUSDT: unchanged",
                              "synced 1 symbols from paper: 0 created, 0 updated, 0 deactivated, 0 not listed"]


def test_sync_named_symbols_creates_listed_ones_only(db, exchange):
    assert run("adausdt", "DOGEUSDT") == [
        "ADAUSDT: created (TRADING)",
        "DOGEUSDT: not listed by paper; not created",
        "synced 2 symbols from paper: 1 created, 0 updated, 0 deactivated, 1 not listed",
    ]
    ada = Symbol.objects.get()
    assert (ada.symbol, ada.base_asset, ada.tick_size, ada.step_size, ada.min_qty, ada.min_notional, ada.is_active) == (
        "ADAUSDT", "ADA", D("0.0001"), D("0.1"), D("0.1"), D("5"), True)


def test_sync_on_binance_refusing_an_unknown_symbol_syncs_the_listed_ones(db, monkeypatch):
    """Binance refuses the whole exchangeInfo list for one unknown symbol (-1121): the adapter
    asks symbol by symbol, the command syncs what is listed and reports the rest."""
    from stopmonitor.exchange.binance import BinanceExchange, MemoryState
    from tests.stopmonitor.exchange.fake_binance import API_KEY, API_SECRET, FakeBinance

    with FakeBinance() as fake:
        binance = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=2, state=MemoryState())
        monkeypatch.setattr("stopmonitor.exchange.factory.build_exchange", lambda venue=None: binance)
        lines = run("ADAUSDT", "DOGEUSDT")
        asked = [(r.method, r.path, r.query) for r in fake.requests]
        binance.close()

    assert asked == [
        ("GET", "/api/v3/exchangeInfo", {"symbols": '["ADAUSDT","DOGEUSDT"]'}),
        ("GET", "/api/v3/exchangeInfo", {"symbols": '["ADAUSDT"]'}),
        ("GET", "/api/v3/exchangeInfo", {"symbols": '["DOGEUSDT"]'}),
    ]
    assert lines == [
        "ADAUSDT: created (TRADING)",
        "DOGEUSDT: not listed by binance-testnet; not created",
        "synced 2 symbols from binance-testnet: 1 created, 0 updated, 0 deactivated, 1 not listed",
    ]
    assert list(Symbol.objects.values_list("symbol", flat=True)) == ["ADAUSDT"]


def test_sync_fails_with_nothing_changed_when_exchange_info_is_unavailable(db, exchange, monkeypatch):
    def down(symbols):
        raise ExchangeUnavailable("exchangeInfo: HTTP 503")

    monkeypatch.setattr(exchange, "symbol_filters", down)
    with pytest.raises(CommandError, match="exchangeInfo unavailable for 1 symbols: exchangeInfo: HTTP 503"):
        run("ADAUSDT")
    assert not Symbol.objects.exists()


def test_sync_without_symbols_is_an_error(db, exchange):
    with pytest.raises(CommandError, match="no symbols to sync"):
        run()


def test_api_lists_synced_filters(db, exchange, alice):
    run("BTCUSDT")
    body = alice.api.get("/api/v1/symbols/BTCUSDT/").json()
    assert (body["min_notional"], body["tick_size"], body["is_active"]) == ("10.00000000", "0.01000000", True)
    assert Operation.objects.count() == 0


def test_admin_add_opens_through_the_engine_with_events(admin_client, alice, symbols):
    form = {"client": alice.tenant.pk, "symbol": symbols["BTCUSDT"].pk, "side": "BUY", "quantity": "0.5",
            "entry_price": "9300", "stop_price": "9200", "target_price": ""}
    r = admin_client.post("/admin/api/operation/add/", {**form, "stop_price": "9400"})
    assert r.status_code == 200 and not Operation.objects.exists()
    assert "a long&#x27;s stop must be below the entry price" in r.content.decode()
    # a stop off BTCUSDT's tickSize 0.01 is a form error, not an HTTP 500 (issue #11)
    r = admin_client.post("/admin/api/operation/add/", {**form, "stop_price": "9199.995"})
    assert r.status_code == 200 and not Operation.objects.exists()
    assert "stop_price 9199.995 is not a multiple of the symbol&#x27;s tickSize 0.01" in r.content.decode()
    r = admin_client.post("/admin/api/operation/add/", form)
    assert r.status_code == 302
    op = Operation.objects.get()
    assert (op.status, op.stop_price) == ("ACTIVE", D("9200"))
    assert list(StopMonitorEvent.objects.filter(operation=op).values_list("event_type", "source")) == [
        ("STOP_SET", "manual")]


def test_the_admins_kill_switch_goes_through_the_apis_service_and_is_audited(admin_client, alice, caplog):
    """Issue 11 item 4: the admin wrote TenantConfig itself (no audit line); now it calls
    stopmonitor.risk.update_risk_config like the API: who, when and the audit line with the change."""
    from api.models import TenantConfig

    cfg = TenantConfig.objects.create(client=alice.tenant)
    form = {"client": alice.tenant.pk, "kill_switch": "on", "kill_switch_reason": "exchange incident",
            "max_slippage_pct": "1.0", "slippage_action": "warn", "max_executions_per_minute": "30",
            "max_executions_per_hour": "600", "protection_enabled": "unknown", "protection_buffer_bps": "50"}
    with caplog.at_level("INFO", logger="api.audit"):
        r = admin_client.post(f"/admin/api/tenantconfig/{cfg.pk}/change/", form)
    assert r.status_code == 302, [l for l in r.content.decode().splitlines() if "errorlist" in l or "error" in l.lower()][:10]
    cfg.refresh_from_db()
    assert (cfg.kill_switch, cfg.kill_switch_reason, cfg.kill_switch_by, cfg.updated_by) == (
        True, "exchange incident", "root", "root")
    assert cfg.kill_switch_at is not None and TenantConfig.objects.count() == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "risk config changed"]
    assert (line.actor, line.changes, line.kill_switch_reason) == ("root", {"kill_switch": ["False", "True"]},
                                                                   "exchange incident")
