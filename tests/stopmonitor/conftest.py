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
    equals the stored projection (invariant 8)."""
    yield
    if "db" not in request.fixturenames and "transactional_db" not in request.fixturenames and not request.node.get_closest_marker("django_db"):
        return
    from stopmonitor.projections import verify

    assert verify() == []
