"""Operations remember their venue (migration 0026); a monitor on another venue leaves them alone (issue 18, point 8)."""

from __future__ import annotations

import io
import time
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from api.models import Client, Operation, Symbol
from stopmonitor.keys import KeysVerdict, remember
from stopmonitor.preflight import before_monitor
from stopmonitor.engine.store import load_watched

pytestmark = pytest.mark.django_db


def _operation(**extra) -> Operation:
    client, _ = Client.objects.get_or_create(name="venue-tenant")
    symbol, _ = Symbol.objects.get_or_create(symbol="BTCUSDT", defaults={"base_asset": "BTC", "quote_asset": "USDT"})
    return Operation.objects.create(client=client, symbol=symbol, side="BUY", status="ACTIVE",
                                    quantity=Decimal("0.01"), stop_price=Decimal("9000"), **extra)


def test_a_new_operation_remembers_the_deployments_venue():
    with override_settings(EXCHANGE_VENUE="binance-testnet"):
        testnet = _operation()
    with override_settings(EXCHANGE_VENUE="replay"):
        replay = _operation()
    assert (testnet.venue, replay.venue) == ("binance-testnet", "paper")  # replay fills on paper


def test_a_monitor_on_another_venue_leaves_them_alone_and_says_so():
    with override_settings(EXCHANGE_VENUE="binance-testnet"):
        testnet = _operation()
    legacy = _operation(venue=None)  # written around the ORM: watched by any venue, as before 0026
    assert {w.operation_id for w in load_watched("paper")} == {legacy.id}
    assert {w.operation_id for w in load_watched("binance-testnet")} == {testnet.id, legacy.id}
    out = io.StringIO()
    before_monitor("replay", out)
    assert out.getvalue() == (
        "monitor on venue paper: leaving alone 1 ACTIVE operations of other venues (1 on binance-testnet); "
        "run a monitor with EXCHANGE_VENUE set to theirs to watch them"
    )
    quiet = io.StringIO()
    remember("binance-testnet", KeysVerdict("accepted", None, "signed read accepted", time.time()))
    before_monitor("binance-testnet", quiet)
    assert quiet.getvalue() == ""


@override_settings(EXCHANGE_VENUE="binance-testnet", BINANCE_API_KEY="", BINANCE_API_SECRET="", BINANCE_PRIVATE_KEY="")
def test_a_binance_monitor_without_keys_stops_at_its_start_with_one_line():
    """CI's fresh machine has no keys: python-binance asserted inside the signed read (an
    AssertionError, not an ExchangeError) and the start gate died with a traceback."""
    _operation()
    with pytest.raises(CommandError) as caught:
        before_monitor("binance-testnet", io.StringIO())
    assert str(caught.value).startswith(
        "binance-testnet: no API key/secret is configured for this venue; set BINANCE_API_KEY and BINANCE_API_SECRET")


@override_settings(ENVIRONMENT="production")
def test_the_demo_refuses_outside_development():
    with pytest.raises(CommandError, match="runs only with ENVIRONMENT=development"):
        call_command("replay_demo", "--quiet")
    assert not Operation.objects.exists()
