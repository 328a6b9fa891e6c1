"""Engine fixtures: a tenant, symbols with real Binance filters, a paper exchange on a fixed clock."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.paper import PaperExchange, bundled_filters

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def tenant(db):
    from api.models import Client

    return Client.objects.create(name="acme")


@pytest.fixture
def symbols(db):
    """BTCUSDT, ETHUSDT, ADAUSDT rows with the real filters of the bundled exchangeInfo."""
    from api.models import Symbol

    rows = {}
    for name, f in bundled_filters().items():
        rows[name] = Symbol.objects.create(symbol=name, base_asset=f.base_asset, quote_asset=f.quote_asset,
                                           tick_size=f.tick_size, step_size=f.step_size, min_qty=f.min_qty,
                                           min_notional=f.min_notional)
    return rows


@pytest.fixture
def paper():
    return PaperExchange(now=NOW)


@pytest.fixture
def open_op(tenant, symbols):
    """Factory: ``open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200", target=None)``."""
    from stopmonitor.operations import open_operation

    def make(symbol="BTCUSDT", side="BUY", qty="0.5", entry="9300", stop="9200", target=None, client=None):
        return open_operation(client or tenant, symbols[symbol], side, D(qty), D(entry) if entry else None,
                              D(stop) if stop else None, D(target) if target else None, now=NOW)

    return make


@pytest.fixture(autouse=True)
def _projection_matches_events(request):
    """After every engine test that used the database, the projection rebuilt from the events
    equals the stored projection (invariant 8) and every stream's hash chain verifies."""
    yield
    if "db" not in request.fixturenames and "transactional_db" not in request.fixturenames and not request.node.get_closest_marker("django_db"):
        return
    from stopmonitor.integrity import verify_store
    from stopmonitor.projections import verify, verify_protection

    assert verify() == []
    assert verify_protection() == []
    if "tampered" not in request.fixturenames:  # tests that edit events as a superuser ask for `tampered`
        assert verify_store().broken == []  # and every event chain verifies (issue 17)


@pytest.fixture
def tampered():
    """Marks a test that edits the event store behind the writer's back: its chains are not checked after it."""


@pytest.fixture
def without_protection(tenant):
    """The tenant's exchange-held protection off (it is on by default on Binance venues): for tests of
    the monitor's own close path (evidence, reconcile) on an adapter or fake that rests no stops."""
    from api.models import TenantConfig

    TenantConfig.objects.update_or_create(client=tenant, defaults={"protection_enabled": False})


@pytest.fixture
def on_binance_testnet(settings):
    """This deployment trades on binance-testnet: the operations a test opens remember that venue
    (migration 0026), so a pass on a binance-testnet adapter or fake watches them."""
    settings.EXCHANGE_VENUE = "binance-testnet"
