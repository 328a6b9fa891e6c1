"""Issue #20: each tenant trades on its own Binance account — through the real adapter against the
fake Binance, which checks every signed request's key and signature and keeps balances per key."""

from __future__ import annotations

import logging
from decimal import Decimal as D

import pytest

from stopmonitor.engine.accounts import AccountClients
from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.monitor import run_pass
from stopmonitor.exchange.binance import BinanceExchange, MemoryState

from .exchange.fake_binance import API_KEY, API_SECRET, FakeBinance

pytestmark = pytest.mark.django_db(transaction=True)
ENGINE = EngineSettings(reconcile_after_seconds=30)
ORDER = "/api/v3/order"
KEY_A, SECRET_A = "acme-key-AAAAAAAAAAAAAAAA1111", "acme-secret-DO-NOT-LEAK-aaaa1111"
KEY_B, SECRET_B = "globex-key-BBBBBBBBBBBBBBBB2222", "globex-secret-DO-NOT-LEAK-bbbb2222"


@pytest.fixture
def fake(settings):
    with FakeBinance() as f:
        f.add_account(KEY_A, SECRET_A, {"BTC": "0.003", "USDT": "0"})
        f.add_account(KEY_B, SECRET_B, {"BTC": "0.001", "USDT": "0"})
        settings.BINANCE_API_URL = f.url
        settings.EXCHANGE_VENUE = "binance-testnet"
        yield f


@pytest.fixture
def default(fake):
    return BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=2, state=MemoryState())


@pytest.fixture
def world(fake, symbols):
    """acme on account A (0.003 BTC), globex on account B (0.001 BTC); each opens a 0.002 BTC long
    whose stop (61000) is above the fake's bid (60741.67): both trigger."""
    from api.models import Client
    from stopmonitor.accounts import create_account
    from stopmonitor.operations import open_operation

    from api.models import TenantConfig

    acme, globex = Client.objects.create(name="acme"), Client.objects.create(name="globex")
    for tenant in (acme, globex):  # the monitor's own close per account (a test below turns protection on)
        TenantConfig.objects.create(client=tenant, protection_enabled=False)
    a = create_account(acme, label="main", venue="binance-testnet", key_type="HMAC", api_key=KEY_A, secret=SECRET_A)
    b = create_account(globex, label="main", venue="binance-testnet", key_type="HMAC", api_key=KEY_B, secret=SECRET_B)
    btc = symbols["BTCUSDT"]
    op_a = open_operation(acme, btc, "BUY", D("0.002"), D("62000"), D("61000"), account=a)
    op_b = open_operation(globex, btc, "BUY", D("0.002"), D("62000"), D("61000"), account=b)
    fake.requests.clear()  # the credential checks at creation
    return {"a": a, "b": b, "op_a": op_a, "op_b": op_b}


def submitted_id(op) -> str:
    """The client order id of the operation's EXECUTION_SUBMITTED (looked up by type)."""
    return next(p for t, p in events(op) if t == "EXECUTION_SUBMITTED")["client_order_id"]


def events(op):
    from api.models import StopMonitorEvent

    return [(e.event_type, e.payload) for e in StopMonitorEvent.objects.filter(operation=op).order_by("version")]


def orders_by_key(fake):
    return {r.api_key: (r.form["newClientOrderId"], r.form["quantity"], r.signature_valid)
            for r in fake.calls("POST", ORDER)}


def test_each_close_is_signed_with_its_own_accounts_key_and_spends_only_its_balance(fake, default, world):
    summary = run_pass(default, engine=ENGINE)
    assert (summary.triggered, summary.executed) == (2, 2)
    tokens = {k: submitted_id(world[k]) for k in ("op_a", "op_b")}
    # A sells its whole position from its own 0.003 BTC; B has 0.001 BTC and sells that, never A's coins
    assert orders_by_key(fake) == {KEY_A: (tokens["op_a"], "0.002", True), KEY_B: (tokens["op_b"], "0.001", True)}
    assert fake.balances[KEY_A]["BTC"] == D("0.001") and fake.balances[KEY_B]["BTC"] == D("0")
    # market data stays shared: bulk quote requests on the default client only (the pass's, and the
    # protection step's when it arms a stop), never one per account
    tickers = fake.calls("GET", "/api/v3/ticker/bookTicker")
    assert 1 <= len(tickers) <= 2 and {(t.query["symbols"], t.api_key) for t in tickers} == {('["BTCUSDT"]', API_KEY)}
    # balances per account: one signed read per account, each with its own key, none with the default key
    assert sorted(r.api_key for r in fake.calls("GET", "/api/v3/account")) == sorted([KEY_A, KEY_B])
    assert [t for t, _ in events(world["op_a"])][-2:] == ["EXECUTED", "OPERATION_CLOSED"]
    assert [t for t, _ in events(world["op_b"])][-1] == "EXECUTED"  # its order filled; the position did not
    world["op_b"].refresh_from_db()
    assert (world["op_b"].status, world["op_b"].closed_quantity) == ("ACTIVE", D("0.001"))


def test_an_ed25519_account_signs_its_close_with_its_own_private_key(fake, default, world, symbols, settings):
    """Before, the factory passed the tenant's PEM and the deployment's BINANCE_PRIVATE_KEY both as
    ``private_key`` (a TypeError), and ``check_credentials`` called it "cannot sign with ED25519 keys"."""
    from Crypto.PublicKey import ECC

    from api.models import Client
    from stopmonitor.accounts import create_account
    from stopmonitor.operations import open_operation

    key_c = "initech-key-CCCCCCCCCCCCCCCC3333"
    private = ECC.generate(curve="Ed25519")
    fake.add_account(key_c, private.public_key(), {"BTC": "0.002", "USDT": "0"})
    settings.BINANCE_PRIVATE_KEY = None  # the deployment's own key plays no part in a tenant's signature
    initech = Client.objects.create(name="initech")
    account = create_account(initech, label="main", venue="binance-testnet", key_type="ED25519", api_key=key_c,
                             secret=private.export_key(format="PEM"))
    op_c = open_operation(initech, symbols["BTCUSDT"], "BUY", D("0.002"), D("62000"), D("61000"), account=account)
    fake.requests.clear()
    run_pass(default, engine=ENGINE)
    assert orders_by_key(fake)[key_c] == (submitted_id(op_c), "0.002", True)
    assert fake.balances[key_c]["BTC"] == D("0")


def test_a_stop_rests_on_its_operations_own_account(fake, default, world, symbols):
    """Protection per account (issue #20): before, the pass's protection step armed every stop
    with the default client, so a tenant's stop rested on the deployment's account and, when it
    fired, sold the deployment's coins while the tenant's position stayed open."""
    from api.models import TenantConfig
    from stopmonitor.operations import open_operation

    for entry in fake.exchange_info["symbols"]:  # today's Binance lists STOP_LOSS (the recording predates it)
        entry["orderTypes"] = sorted(set(entry["orderTypes"]) | {"STOP_LOSS"})
    TenantConfig.objects.filter(client=world["a"].client).update(protection_enabled=True)
    held = open_operation(world["a"].client, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("59000"),
                          account=world["a"])
    fake.requests.clear()
    run_pass(default, engine=ENGINE)
    stops = [(r.form["newClientOrderId"], r.api_key, r.form["type"]) for r in fake.calls("POST", ORDER)
             if r.form.get("type") == "STOP_LOSS"]
    # acme's two operations (op_a, whose 61000 stop is crossed, and the new one) rest on account A only
    assert sorted(stops) == sorted([(f"sp{world['op_a'].pk}-1", KEY_A, "STOP_LOSS"), (f"sp{held.pk}-1", KEY_A, "STOP_LOSS")])
    assert {r.api_key for r in fake.calls("GET", "/api/v3/openOrders")} == {KEY_A}
    assert [t for t, _ in events(held)][-2:] == ["PROTECTION_REQUESTED", "PROTECTION_PLACED"]


def test_operations_sharing_an_account_share_its_balance_whatever_their_tenant(fake, default, world, symbols):
    from api.models import Client
    from stopmonitor.operations import open_operation

    # a third tenant's position on acme's account A (0.003 BTC): A's two positions ask 0.002 + 0.002
    initech = Client.objects.create(name="initech")
    op_c = open_operation(initech, symbols["BTCUSDT"], "BUY", D("0.002"), D("62000"), D("61000"), account=world["a"])
    run_pass(default, engine=ENGINE)
    sold_on_a = sorted(r.form["quantity"] for r in fake.calls("POST", ORDER) if r.api_key == KEY_A)
    assert sold_on_a == ["0.001", "0.002"]  # never more than A holds (0.003)
    assert fake.balances[KEY_A]["BTC"] == D("0")
    assert {t for t, _ in events(op_c)} & {"EXECUTED", "PARTIALLY_EXECUTED"}


def test_a_refused_key_holds_only_its_own_account_and_is_recorded_once(fake, default, world):
    fake.revoke(KEY_B)  # B's key revoked at Binance: -2015 on every signed request
    summary = run_pass(default, engine=ENGINE)
    assert summary.executed == 1 and orders_by_key(fake).keys() == {KEY_A}
    blocked = events(world["op_b"])[-1]
    assert blocked[0] == "BLOCKED" and blocked[1]["reason"] == "ACCOUNT_UNAVAILABLE"
    assert blocked[1]["key"] == str(world["b"].pk) and "-2015" in blocked[1]["detail"]
    before = len(events(world["op_b"]))
    run_pass(default, engine=ENGINE)
    assert len(events(world["op_b"])) == before  # once, not every pass
    world["op_b"].refresh_from_db()
    assert world["op_b"].status == "ACTIVE"


def test_a_disabled_account_blocks_its_operations_once_and_sends_nothing(fake, default, world):
    from stopmonitor.accounts import set_enabled

    set_enabled(world["b"], False, "key rotated by the tenant")
    run_pass(default, engine=ENGINE)
    run_pass(default, engine=ENGINE)
    assert orders_by_key(fake).keys() == {KEY_A}
    blocks = [p for t, p in events(world["op_b"]) if t == "BLOCKED"]
    assert len(blocks) == 1 and blocks[0]["reason"] == "ACCOUNT_DISABLED"
    assert "key rotated by the tenant" in blocks[0]["detail"]
    assert not [r for r in fake.requests if r.api_key == KEY_B]  # not even a balance read


def test_the_manual_close_goes_to_the_operations_account(fake, default, world):
    from stopmonitor.engine.close import close_operation

    decisions = close_operation(world["op_b"].pk, default, source="api")
    assert decisions[-1].action == "executed"
    assert orders_by_key(fake) == {KEY_B: (decisions[-1].execution_token, "0.001", True)}


def test_reconcile_asks_the_operations_account(fake, default, world):
    from datetime import datetime, timedelta, timezone

    fake.delays[("POST", ORDER)] = 3.0  # both orders time out (the fake fills them late)
    slow = BinanceExchange(API_KEY, API_SECRET, testnet=True, api_url=fake.url, timeout=0.5, state=MemoryState())
    clients = AccountClients(slow, build=lambda pk, venue: BinanceExchange(
        *({world["a"].pk: (KEY_A, SECRET_A), world["b"].pk: (KEY_B, SECRET_B)}[pk]), testnet=True,
        api_url=fake.url, timeout=0.5, state=MemoryState()))
    assert run_pass(slow, engine=ENGINE, clients=clients).unknown == 2
    fake.delays.clear()
    import time

    time.sleep(3.0)
    run_pass(default, engine=ENGINE, now=datetime.now(timezone.utc) + timedelta(seconds=31))
    gets = {r.api_key: r.query["origClientOrderId"] for r in fake.calls("GET", ORDER)}
    assert gets == {KEY_A: submitted_id(world["op_a"]), KEY_B: submitted_id(world["op_b"])}
    assert len(fake.calls("POST", ORDER)) == 2  # found by their own accounts: no second order


def test_secrets_appear_in_no_output(fake, default, world, caplog):
    from api.models import ExchangeAccount, StopMonitorEvent
    from stopmonitor.engine import store

    caplog.set_level(logging.DEBUG)
    fake.revoke(KEY_B)
    run_pass(default, engine=ENGINE)
    texts = [caplog.text, repr(world["a"]), str(world["a"]), repr(store.account_credentials(world["a"].pk)),
             repr(AccountClients(default).for_account(world["a"].pk))]
    texts += [str(p) for p in StopMonitorEvent.objects.values_list("payload", flat=True)]
    texts += [str(row) for row in ExchangeAccount.objects.values_list("secret_encrypted", flat=True)]
    for secret in (SECRET_A, SECRET_B, KEY_A, KEY_B):
        assert not [t for t in texts if secret in t], secret


def test_a_decrypted_account_secret_is_masked_in_logs_and_on_the_debug_page(fake, world, rf, caplog):
    """Issue 20, point 2: once a process decrypted an account's secret, a log line or a debug page
    frame that carries it (or the key id) shows ``***`` (config/secrets.py, register_secret)."""
    import sys

    from django.views.debug import ExceptionReporter

    from stopmonitor.engine import store

    creds = store.account_credentials(world["a"].pk)
    assert creds.secret == SECRET_A  # the engine has the plaintext it signs with
    from stopmonitor.logs import redact

    assert redact(f"signing with {creds.api_key} and {creds.secret}") == "signing with *** and ***"
    try:
        # locals whose names Django's filter does not hide (it hides *KEY*, *SECRET*, ...)
        plain = f"{creds.secret}"  # noqa: F841
        ident = str(creds.api_key)  # noqa: F841
        raise RuntimeError(f"boom while signing for {creds.label}")
    except RuntimeError:
        html = ExceptionReporter(rf.get("/api/v1/operations/"), *sys.exc_info()).get_traceback_html()
    assert "boom while signing for main" in html
    assert SECRET_A not in html and KEY_A not in html


def test_a_tenants_position_on_another_account_is_not_reserved_from_this_accounts_balance(fake, default, world, symbols):
    """acme's op_a (0.002 on account A, which holds 0.003 BTC) triggers; acme also holds 0.002 on a
    second account A2 (not triggered). The reservation was by tenant, not account: A's close kept
    A2's position back from A's balance and sold 0.001 instead of 0.002."""
    from stopmonitor.accounts import create_account
    from stopmonitor.operations import open_operation

    key_a2, secret_a2 = "acme-key2-CCCCCCCCCCCCCCCC3333", "acme-secret2-DO-NOT-LEAK-cccc3333"
    fake.add_account(key_a2, secret_a2, {"BTC": "0.002", "USDT": "0"})
    acme = world["a"].client
    a2 = create_account(acme, label="second", venue="binance-testnet", key_type="HMAC", api_key=key_a2, secret=secret_a2)
    open_operation(acme, symbols["BTCUSDT"], "BUY", D("0.002"), D("62000"), D("59000"), account=a2)
    fake.requests.clear()
    run_pass(default, engine=ENGINE)
    assert [r.form["quantity"] for r in fake.calls("POST", ORDER) if r.api_key == KEY_A] == ["0.002"]
    assert fake.balances[key_a2]["BTC"] == D("0.002")


def test_one_accounts_missing_keys_hold_only_its_own_operations(fake, default, world):
    """An account client with no secret raised KeysMissing (an OrderRejected) out of the protection
    step and the balances read, so the whole pass ended and globex (account B) was not closed."""
    from api.models import TenantConfig

    for entry in fake.exchange_info["symbols"]:
        entry["orderTypes"] = sorted(set(entry["orderTypes"]) | {"STOP_LOSS"})
    TenantConfig.objects.filter(client=world["a"].client).update(protection_enabled=True)
    keys = {world["a"].pk: (KEY_A, None), world["b"].pk: (KEY_B, SECRET_B)}
    clients = AccountClients(default, build=lambda pk, venue: BinanceExchange(
        *keys[pk], testnet=True, api_url=fake.url, timeout=2, state=MemoryState()))
    run_pass(default, engine=ENGINE, clients=clients)
    assert [r.form["quantity"] for r in fake.calls("POST", ORDER) if r.api_key == KEY_B] == ["0.001"]
    blocked = events(world["op_a"])[-1]
    assert blocked[0] == "BLOCKED" and blocked[1]["reason"] == "ACCOUNT_UNAVAILABLE"
    assert "no API secret or private key" in blocked[1]["detail"]

