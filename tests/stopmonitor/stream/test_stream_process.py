"""`manage.py monitor_stops --stream` as a real process against the fake Binance REST server and the
fake WebSocket servers (market streams + WebSocket API), PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from decimal import Decimal as D
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from django.db import connection

from tests.deploy.support import free_port
from tests.stopmonitor.exchange.fake_binance import API_KEY, API_SECRET, FakeBinance

from .fake_ws import FakeBinanceWs, execution_reports

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="claims across processes need PostgreSQL"),
    # the stream runs on binance-testnet: the operations opened here are that venue's, and the
    # monitor's own close path is under test (no resting stop on the fake)
    pytest.mark.usefixtures("on_binance_testnet", "without_protection"),
]
ACCOUNT = {"balances": [{"asset": "BTC", "free": "1.00000000", "locked": "0.00000000"},
                        {"asset": "ETH", "free": "1.00000000", "locked": "0.00000000"},
                        {"asset": "USDT", "free": "100000.00000000", "locked": "0.00000000"}]}


class LinkedFake(FakeBinance):
    """The fake REST server whose orders are pushed as executionReports on the fake WebSocket API."""

    def __init__(self, ws: FakeBinanceWs) -> None:
        super().__init__()
        self.ws = ws
        self.push_reports = True
        self.order_seen_at: list[float] = []
        self.placed: list[dict] = []  # the answers to accepted orders (what Binance would have sent back)

    def _default(self, rec):
        # every order of the default key goes through the fake's account model (fake_binance.Account):
        # seen when it arrives, pushed as executionReports once it filled
        is_order = (rec.method, rec.path) == ("POST", "/api/v3/order")
        if is_order:
            self.order_seen_at.append(time.monotonic())
        status, body = super()._default(rec)
        if is_order and status == 200:
            self.placed.append(body)
            if self.push_reports:
                for event in execution_reports(body):
                    self.ws.report(event)
        return status, body

    def set_rest_quote(self, symbol: str, bid: str, ask: str) -> None:
        self.quotes[symbol] = {"symbol": symbol, "bidPrice": bid, "bidQty": "1.00000000", "askPrice": ask,
                               "askQty": "1.00000000"}


@pytest.fixture
def servers():
    key = Ed25519PrivateKey.generate()
    with FakeBinanceWs(public_key=key.public_key(), ticker=0.2) as ws, LinkedFake(ws) as rest:
        rest.script("GET", "/api/v3/account", body=ACCOUNT, times=None)
        rest.set_rest_quote("BTCUSDT", "65000.00", "65000.01")  # nothing crossed until the stream says so
        ws.last["BTCUSDT"] = {"u": 1, "s": "BTCUSDT", "b": "65000.00", "B": "1", "a": "65000.01", "A": "1"}
        rest.private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        yield rest, ws


@pytest.fixture
def long_btc(tenant, symbols):
    """A long BTCUSDT operation of 0.001 with its stop at 61000 (not crossed at 65000)."""
    from stopmonitor.operations import open_operation

    return open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"),
                          now=datetime.now(timezone.utc))


def start_stream(rest: LinkedFake, ws: FakeBinanceWs, tmp_path, **extra) -> subprocess.Popen:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "STREAM"))}
    env.update(
        DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
        ENVIRONMENT="development", EXCHANGE_VENUE="binance-testnet", LOG_LEVEL="WARNING", LOG_FORMAT="json",
        BINANCE_API_KEY=API_KEY, BINANCE_API_SECRET=API_SECRET, BINANCE_API_URL=rest.url,
        BINANCE_PRIVATE_KEY=rest.private_pem, BINANCE_STREAM_URL=ws.stream_url, BINANCE_WS_API_URL=ws.api_url,
        CACHE_DIR=str(tmp_path / "cache"), STREAM_PROGRESS_FILE=str(tmp_path / "progress"),
        STREAM_WATCHED_POLL_SECONDS="0.5", STREAM_SILENCE_SECONDS="1", STREAM_HOLD_DOWN_SECONDS="3",
        STREAM_FALLBACK_INTERVAL_SECONDS="0.5",
    )
    env.update({k: str(v) for k, v in extra.items()})
    args = [sys.executable, "manage.py", "monitor_stops", "--stream"]
    if "METRICS_PORT" in extra:
        args += ["--metrics-port", str(extra["METRICS_PORT"])]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ready(rest, ws, proc):
    """Subscribed to BTCUSDT, user data stream on, and the start pass done. On a timeout the
    failure carries what the process said (it is stopped first)."""
    try:
        wait(lambda: proc.poll() is None and "BTCUSDT" in ws.subscribed() and ws.user
             and rest.calls("GET", "/api/v3/ticker/bookTicker"), what="the stream to be ready")
    except AssertionError:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=30)
        state = (f"exit {proc.returncode}; subscribed {ws.subscribed()}; user stream {bool(ws.user)}; "
                 f"bookTicker calls {len(rest.calls('GET', '/api/v3/ticker/bookTicker'))}")
        raise AssertionError(f"the stream was not ready in 15 s ({state})\n{err[-3000:]}\n{out[-2000:]}") from None


def events(op):
    from api.models import StopMonitorEvent

    return list(StopMonitorEvent.objects.filter(operation=op).order_by("version")
                .values_list("event_type", "source"))


def test_a_crossing_quote_closes_within_the_same_second(servers, long_btc, tmp_path):
    rest, ws = servers
    proc = start_stream(rest, ws, tmp_path)
    try:
        ready(rest, ws, proc)
        assert rest.calls("POST", "/api/v3/order") == []
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")
        sent_at = time.monotonic()
        assert ws.quote("BTCUSDT", "60900.00", "60900.01") == 1
        wait(lambda: rest.order_seen_at, timeout=5, what="the close order")
        reaction = rest.order_seen_at[0] - sent_at
        long_btc.refresh_from_db()
        wait(lambda: (long_btc.refresh_from_db(), long_btc.status)[1] == "CLOSED", what="CLOSED")
    finally:
        stop(proc)
    assert reaction < 1.0, f"quote to order took {reaction:.3f}s"
    [order] = rest.calls("POST", "/api/v3/order")
    assert (order.form["symbol"], order.form["side"], order.form["type"], order.form["quantity"]) == (
        "BTCUSDT", "SELL", "MARKET", "0.001")
    assert order.form["newClientOrderId"].startswith(f"sm{long_btc.pk}-S1-")
    assert events(long_btc) == [("STOP_SET", "api"), ("STOP_TRIGGERED", "stream"), ("EXECUTION_SUBMITTED", "stream"),
                                ("EXECUTED", "stream"), ("OPERATION_CLOSED", "stream")]
    assert (tmp_path / "progress").exists()


def test_a_mute_feed_falls_back_to_rest_polling(servers, long_btc, tmp_path):
    rest, ws = servers
    port = free_port()
    proc = start_stream(rest, ws, tmp_path, METRICS_PORT=port)
    try:
        ready(rest, ws, proc)
        ws.mute()  # connected and silent: the successor's failure
        polls_before = len(rest.calls("GET", "/api/v3/ticker/bookTicker"))

        def gauge():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            found = re.search(r"^stopmonitor_stream_symbols_in_fallback (\S+)$", text, re.M)
            return float(found.group(1)) if found else None

        wait(lambda: gauge() == 1.0, timeout=10, what="BTCUSDT in fallback")
        wait(lambda: len(rest.calls("GET", "/api/v3/ticker/bookTicker")) >= polls_before + 2, what="REST polls")
        assert rest.calls("POST", "/api/v3/order") == []
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")  # only REST sees the crossing
        wait(lambda: (long_btc.refresh_from_db(), long_btc.status)[1] == "CLOSED", what="CLOSED by the fallback")
    finally:
        stop(proc)
    assert len(rest.calls("POST", "/api/v3/order")) == 1
    assert [e for e, _ in events(long_btc)] == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED",
                                                "OPERATION_CLOSED"]


def test_a_disconnect_in_the_middle_of_a_close_is_reconciled_once(servers, long_btc, tmp_path):
    """The order's answer times out (unknown) and the user data stream drops before its reports
    come: after the reconnect the REST reconcile records the fill once; late duplicate reports
    change nothing and no second order is sent."""
    from api.models import StopMonitorEvent

    rest, ws = servers
    rest.push_reports = False  # the reports are lost with the connection
    rest.delays[("POST", "/api/v3/order")] = 2.5  # answer after the client's 1 s timeout; the order exists
    proc = start_stream(rest, ws, tmp_path, BINANCE_TIMEOUT_SECONDS=1, BINANCE_RECV_WINDOW_MS=2000,
                        RECONCILE_AFTER_SECONDS=3)
    try:
        ready(rest, ws, proc)
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")
        ws.quote("BTCUSDT", "60900.00", "60900.01")
        wait(lambda: rest.order_seen_at, timeout=5, what="the close order")
        ws.drop_user_streams()  # mid-close
        connects = ws.user_connects
        wait(lambda: ws.user_connects > connects and ws.user, what="the user data stream to come back")
        wait(lambda: (long_btc.refresh_from_db(), long_btc.status)[1] == "CLOSED", timeout=20, what="reconciled")
        [order] = rest.placed
        for _ in range(2):  # the lost reports turn up late, twice
            for event in execution_reports(order):
                ws.report(event)
        time.sleep(1.0)
    finally:
        stop(proc)
    assert len(rest.calls("POST", "/api/v3/order")) == 1
    assert [e for e, _ in events(long_btc)] == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "RECONCILED",
                                                "EXECUTED", "OPERATION_CLOSED"]
    executed = StopMonitorEvent.objects.get(operation=long_btc, event_type="EXECUTED")
    assert executed.payload["executed_qty"] == "0.001"


def test_a_pushed_fill_resolves_the_unknown_close_at_once_from_its_trades(servers, long_btc, tmp_path):
    """The order's answer times out; its executionReports (out of order and twice) arrive on the
    user data stream: EXECUTED is recorded from the pushed trades long before any reconcile."""
    from api.models import StopMonitorEvent

    rest, ws = servers
    rest.push_reports = False
    rest.delays[("POST", "/api/v3/order")] = 1.5
    proc = start_stream(rest, ws, tmp_path, BINANCE_TIMEOUT_SECONDS=1, RECONCILE_AFTER_SECONDS=600,
                        NOT_FOUND_WINDOW_SECONDS=600)
    try:
        ready(rest, ws, proc)
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")
        ws.quote("BTCUSDT", "60900.00", "60900.01")
        wait(lambda: rest.placed, timeout=5, what="the order at the exchange")
        order = dict(rest.placed[0])
        order["fills"] = [  # two trades, so out-of-order delivery matters
            {"price": "60900.00", "qty": "0.00040000", "commission": "0.02436", "commissionAsset": "USDT", "tradeId": 7},
            {"price": "60899.00", "qty": "0.00060000", "commission": "0.0365394", "commissionAsset": "USDT",
             "tradeId": 8}]
        new, first, last = execution_reports(order)
        wait(lambda: StopMonitorEvent.objects.filter(operation=long_btc, event_type="EXECUTION_SUBMITTED").exists(),
             what="EXECUTION_SUBMITTED")
        time.sleep(1.2)  # past the client's 1 s timeout: the close is unknown, the execution SUBMITTED
        pushed_at = time.monotonic()
        for event in (last, new, last, first, first):
            ws.report(event)
        wait(lambda: (long_btc.refresh_from_db(), long_btc.status)[1] == "CLOSED", timeout=5, what="CLOSED by the push")
        resolved_in = time.monotonic() - pushed_at
    finally:
        stop(proc)
    assert resolved_in < 1.0
    assert len(rest.calls("POST", "/api/v3/order")) == 1
    assert [e for e, _ in events(long_btc)] == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED",
                                                "OPERATION_CLOSED"]
    executed = StopMonitorEvent.objects.get(operation=long_btc, event_type="EXECUTED")
    assert executed.source == "stream"
    assert (executed.payload["executed_qty"], executed.payload["commission"], executed.payload["commission_asset"]) == (
        "0.001", "0.0608994", "USDT")
    assert [f["price"] for f in executed.payload["fills"]] == ["60900", "60899"]
    assert ws.api_requests[0]["method"] == "userDataStream.subscribe.signature"  # verified against the Ed25519 key


def test_server_shutdown_and_a_dropped_connection_roll_over_and_still_close(servers, long_btc, tmp_path):
    rest, ws = servers
    proc = start_stream(rest, ws, tmp_path)
    try:
        ready(rest, ws, proc)
        connects = ws.market_connects
        ws.server_shutdown(close_after=0.5)
        wait(lambda: ws.market_connects > connects and "BTCUSDT" in ws.subscribed(), what="a new market connection")
        ws.disconnect()
        wait(lambda: ws.market_connects > connects + 1 and "BTCUSDT" in ws.subscribed(), what="reconnected")
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")
        ws.quote("BTCUSDT", "60900.00", "60900.01")
        wait(lambda: (long_btc.refresh_from_db(), long_btc.status)[1] == "CLOSED", what="CLOSED")
    finally:
        stop(proc)
    assert len(rest.calls("POST", "/api/v3/order")) == 1


def test_connections_roll_over_before_their_age_limit_and_the_watched_set_is_followed(servers, long_btc, tenant,
                                                                                      symbols, tmp_path):
    """With a 2 s connection age the stream replaces its connection (make before break) again and
    again; an operation opened meanwhile on ETHUSDT is subscribed, one cancelled is unsubscribed."""
    from api.models import Operation
    from stopmonitor.operations import open_operation

    rest, ws = servers
    rest.set_rest_quote("ETHUSDT", "3000.00", "3000.01")
    ws.last["ETHUSDT"] = {"u": 1, "s": "ETHUSDT", "b": "3000.00", "B": "1", "a": "3000.01", "A": "1"}
    proc = start_stream(rest, ws, tmp_path, STREAM_MAX_CONNECTION_AGE_SECONDS=2)
    try:
        ready(rest, ws, proc)
        first = ws.market_connects
        wait(lambda: ws.market_connects >= first + 2, timeout=10, what="two rollovers")
        eth = open_operation(tenant, symbols["ETHUSDT"], "BUY", D("0.01"), D("3100"), D("2900"),
                             now=datetime.now(timezone.utc))
        wait(lambda: "ETHUSDT" in ws.subscribed(), what="ETHUSDT subscribed")
        Operation.objects.filter(pk=long_btc.pk).update(status="CANCELLED")
        wait(lambda: "BTCUSDT" not in ws.subscribed(), what="BTCUSDT dropped")
        rest.set_rest_quote("ETHUSDT", "2899.00", "2899.01")
        ws.quote("ETHUSDT", "2899.00", "2899.01")
        wait(lambda: (eth.refresh_from_db(), eth.status)[1] == "CLOSED", what="ETHUSDT CLOSED")
    finally:
        stop(proc)
    assert [r.form["symbol"] for r in rest.calls("POST", "/api/v3/order")] == ["ETHUSDT"]
    assert [e for e, _ in events(eth)] == ["STOP_SET", "STOP_TRIGGERED", "EXECUTION_SUBMITTED", "EXECUTED",
                                           "OPERATION_CLOSED"]
    assert not [e for e, _ in events(long_btc) if e == "BLOCKED"]  # no MISSING_PRICE at any rollover


def test_the_user_data_stream_subscribes_every_enabled_account_with_its_own_key(servers, long_btc, tenant, tmp_path):
    """Issue #20: fills of a tenant's own Binance account are pushed too. The stream subscribes the
    default account and then each enabled account on the same WebSocket API connection, each
    signed with its own key (HMAC and Ed25519); a disabled account and one whose key Binance
    refuses are left out without costing the others."""
    from stopmonitor.accounts import create_account

    rest, ws = servers
    ed_key = Ed25519PrivateKey.generate()
    ws.keys = {"acct-hmac-KEY-1111": "acct-hmac-SECRET-1111", "acct-ed-KEY-2222": ed_key.public_key()}
    create_account(tenant, label="hmac", venue="binance-testnet", key_type="HMAC", api_key="acct-hmac-KEY-1111",
                   secret="acct-hmac-SECRET-1111", check=False)
    create_account(tenant, label="ed", venue="binance-testnet", key_type="ED25519", api_key="acct-ed-KEY-2222",
                   secret=ed_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode(), check=False)
    create_account(tenant, label="refused", venue="binance-testnet", key_type="HMAC", api_key="acct-unknown-KEY-3333",
                   secret="wrong-secret", check=False)
    off = create_account(tenant, label="off", venue="binance-testnet", key_type="HMAC", api_key="acct-off-KEY-4444",
                         secret="acct-off-SECRET-4444", check=False)
    off.enabled = False
    off.save(update_fields=["enabled"])
    ws.keys["acct-unknown-KEY-3333"] = "another-secret"  # Binance refuses this signature (-1022)
    proc = start_stream(rest, ws, tmp_path)
    ready(rest, ws, proc)
    wait(lambda: len(ws.subscribed_keys) >= 3, what="the accounts' subscriptions")
    time.sleep(0.5)
    out, err = stop(proc)
    assert ws.subscribed_keys == [API_KEY, "acct-hmac-KEY-1111", "acct-ed-KEY-2222"]
    subscribes = [r for r in ws.api_requests if r.get("method") == "userDataStream.subscribe.signature"]
    assert [r["params"]["apiKey"] for r in subscribes] == [API_KEY, "acct-hmac-KEY-1111", "acct-ed-KEY-2222",
                                                           "acct-unknown-KEY-3333"]
    refused = [json.loads(line) for line in out.splitlines() if "refused an account" in line]
    assert [(r["message"], r["code"]) for r in refused] == [("user data stream refused an account", -1022)]
    assert "acct-hmac-SECRET-1111" not in out + err and "wrong-secret" not in out + err


def test_stream_refuses_a_venue_without_websockets_in_one_line(tmp_path):
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "STREAM"))}
    env.update(DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}", ENVIRONMENT="development",
               EXCHANGE_VENUE="replay", CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "manage.py", "monitor_stops", "--stream"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "CommandError: --stream needs a Binance venue (binance or binance-testnet), not replay"


def test_the_stream_and_a_cronjob_pass_racing_place_one_order_per_operation(servers, tenant, symbols, tmp_path):
    """Invariant 1 across processes: the stream and the CronJob see the same crossing at once."""
    from api.models import StopMonitorEvent
    from stopmonitor.operations import open_operation

    rest, ws = servers
    ops = [open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"),
                          now=datetime.now(timezone.utc)) for _ in range(4)]
    rest.delays[("POST", "/api/v3/order")] = 0.3  # keep both closers inside the close window
    proc = start_stream(rest, ws, tmp_path)
    try:
        ready(rest, ws, proc)
        s = connection.settings_dict
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "STREAM"))}
        env.update(DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
                   ENVIRONMENT="development", EXCHANGE_VENUE="binance-testnet", LOG_LEVEL="WARNING", LOG_FORMAT="json",
                   BINANCE_API_KEY=API_KEY, BINANCE_API_SECRET=API_SECRET, BINANCE_API_URL=rest.url,
                   CACHE_DIR=str(tmp_path / "cache"))
        rest.set_rest_quote("BTCUSDT", "60900.00", "60900.01")
        cron = subprocess.Popen([sys.executable, "manage.py", "monitor_stops", "--json", "--no-pass-lock"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the CronJob pod starting up meanwhile
        ws.quote("BTCUSDT", "60900.00", "60900.01")
        _, err = cron.communicate(timeout=120)
        assert cron.returncode == 0, err
        wait(lambda: all((op.refresh_from_db(), op.status)[1] == "CLOSED" for op in ops), what="all CLOSED")
    finally:
        stop(proc)
    ids = [r.form["newClientOrderId"] for r in rest.calls("POST", "/api/v3/order")]
    assert len(ids) == len(set(ids)) == len(ops)
    for op in ops:
        assert StopMonitorEvent.objects.filter(operation=op, event_type="STOP_TRIGGERED").count() == 1
        assert StopMonitorEvent.objects.filter(operation=op, event_type="EXECUTED").count() == 1
