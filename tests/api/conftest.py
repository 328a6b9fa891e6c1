"""API fixtures: two tenants with a user and a token each, a staff user, a user without a tenant,
symbols with the real Binance filters, and a paper exchange injected as the API's exchange."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.paper import PaperExchange, bundled_filters

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def _isolated_cache(settings):
    """A private in-memory cache per test: throttle counters never leak between tests or runs."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": f"api-tests-{id(settings)}"}}
    settings.EXCHANGE_VENUE = "paper"
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def symbols(db):
    """BTCUSDT, ETHUSDT, ADAUSDT with the filters of the bundled exchangeInfo, and an inactive XRPUSDT."""
    from api.models import Symbol

    rows = {}
    for name, f in sorted(bundled_filters().items()):
        rows[name] = Symbol.objects.create(symbol=name, base_asset=f.base_asset, quote_asset=f.quote_asset,
                                           tick_size=f.tick_size, step_size=f.step_size, min_qty=f.min_qty,
                                           min_notional=f.min_notional)
    rows["XRPUSDT"] = Symbol.objects.create(symbol="XRPUSDT", base_asset="XRP", quote_asset="USDT",
                                            tick_size=D("0.0001"), step_size=D("0.1"), min_qty=D("0.1"),
                                            min_notional=D("5"), is_active=False)
    return rows


class Actor:
    """A user, their token and an authenticated APIClient."""

    def __init__(self, user, token, client, tenant):
        self.user, self.token, self.api, self.tenant = user, token, client, tenant


def _actor(username, tenant=None, staff=False):
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    user = get_user_model().objects.create_user(username, is_staff=staff)
    if tenant is not None:
        tenant.users.add(user)
    token = Token.objects.create(user=user)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token.key}")
    return Actor(user, token, api, tenant)


@pytest.fixture
def tenants(db):
    from api.models import Client

    return Client.objects.create(name="acme"), Client.objects.create(name="globex")


@pytest.fixture
def alice(tenants):
    """A trader of tenant ``acme``."""
    return _actor("alice", tenants[0])


@pytest.fixture
def bob(tenants):
    """A trader of tenant ``globex``."""
    return _actor("bob", tenants[1])


@pytest.fixture
def staff(db):
    """An operator: staff, no tenant (sees every tenant)."""
    return _actor("ops", staff=True)


@pytest.fixture
def nobody(db):
    """An authenticated user who belongs to no tenant."""
    return _actor("nobody")


@pytest.fixture
def anon():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def paper(monkeypatch):
    """The API's exchange: a paper book on a fixed clock with BTCUSDT at 9100/9101."""
    exchange = PaperExchange(now=NOW)
    exchange.set_quote("BTCUSDT", "9100", "9101")
    exchange.set_quote("ETHUSDT", "2000", "2000.1")
    monkeypatch.setattr("api.views.get_exchange", lambda: exchange)
    return exchange


@pytest.fixture
def open_op(symbols):
    """Factory: ``open_op(tenant, "BTCUSDT", "BUY", "0.5", entry="9300", stop="9200", target=None)``."""
    from stopmonitor.operations import open_operation

    def make(tenant, symbol="BTCUSDT", side="BUY", qty="0.5", entry="9300", stop="9200", target=None):
        return open_operation(tenant, symbols[symbol], side, D(qty), D(entry) if entry else None,
                              D(stop) if stop else None, D(target) if target else None, venue="paper", now=NOW)

    return make


def iso(dt) -> str | None:
    """A datetime as the API renders it (ISO 8601, UTC as ``Z``)."""
    from rest_framework.fields import DateTimeField

    return DateTimeField().to_representation(dt) if dt is not None else None


def error(code: str, message: str, fields: dict | None = None) -> dict:
    """The API's error envelope (api.errors)."""
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def invalid(**fields) -> dict:
    """The 400 envelope with each field's reasons."""
    return error("invalid", "The request has invalid fields.", fields)


NOT_FOUND = error("not_found", "Not found.")
