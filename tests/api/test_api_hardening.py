"""Issue 16 in process: idempotent writes, hostile input answered in the envelope, lock and deadline bounds,
the truthful 503, secrets out of reprs and the error page."""

from __future__ import annotations

import json
import threading
from decimal import Decimal as D

import pytest
from django.db import connection

from api.models import IdempotencyKey, Operation, StopMonitorEvent
from tests.api.conftest import error

URL = "/api/v1/operations/"
BODY = {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300", "stop_price": "9200"}


def post(actor, body=BODY, key=None, path=URL):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return actor.api.post(path, body, format="json", **headers)


# --------------------------------------------------------------------------------------
# Idempotency-Key
# --------------------------------------------------------------------------------------


def test_a_retried_create_with_its_key_replays_the_first_answer_and_opens_nothing_more(alice, symbols):
    first = post(alice, key="k-1")
    assert first.status_code == 201, first.json()
    again = post(alice, key="k-1")
    assert (again.status_code, again.json(), again["Location"]) == (201, first.json(), first["Location"])
    assert again["Idempotent-Replayed"] == "true" and not first.has_header("Idempotent-Replayed")
    assert Operation.objects.count() == 1
    assert list(StopMonitorEvent.objects.values_list("event_type", flat=True)) == ["STOP_SET"]
    row = IdempotencyKey.objects.get()
    assert (row.key, row.state, row.status_code, row.method, row.path) == ("k-1", "done", 201, "POST", URL)
    # the same body under another key is another request; without a key every POST opens one
    assert post(alice, key="k-2").status_code == 201
    assert post(alice).status_code == 201
    assert Operation.objects.count() == 3


def test_the_same_key_with_another_body_is_422_and_changes_nothing(alice, symbols):
    assert post(alice, key="k-1").status_code == 201
    r = post(alice, {**BODY, "quantity": "0.6"}, key="k-1")
    assert (r.status_code, r.json()) == (422, error(
        "idempotency_key_reused",
        "This Idempotency-Key was used for a different request; use a new key for a new request."))
    assert Operation.objects.count() == 1


def test_keys_are_per_user(alice, bob, symbols):
    assert post(alice, key="shared").status_code == 201
    r = post(bob, key="shared")
    assert r.status_code == 201 and not r.has_header("Idempotent-Replayed")
    assert sorted(Operation.objects.values_list("client__name", flat=True)) == ["acme", "globex"]


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "caf\u00e9", "a\tb"])
def test_an_invalid_key_is_400_naming_the_header(alice, symbols, key):
    r = post(alice, key=key)
    assert r.status_code == 400
    assert r.json()["error"]["fields"] == {"Idempotency-Key": ["1 to 255 visible ASCII characters."]}
    assert not Operation.objects.exists()


def test_a_refused_create_stores_no_key_and_its_corrected_retry_is_422(alice, symbols):
    """Nothing of a 400 is kept: the same key with the same (bad) body is refused again, not replayed."""
    bad = {**BODY, "stop_price": "9400"}
    assert post(alice, bad, key="k").status_code == 400
    assert post(alice, bad, key="k").status_code == 400
    assert not IdempotencyKey.objects.exists()
    assert post(alice, key="k").status_code == 201


def test_patch_with_a_key_moves_the_stop_once(alice, open_op):
    op = open_op(alice.tenant)
    path = f"{URL}{op.pk}/"
    first = alice.api.patch(path, {"stop_price": "9150"}, format="json", HTTP_IDEMPOTENCY_KEY="p-1")
    assert first.status_code == 200, first.json()
    again = alice.api.patch(path, {"stop_price": "9150"}, format="json", HTTP_IDEMPOTENCY_KEY="p-1")
    assert (again.status_code, again.json()) == (200, first.json())
    assert list(StopMonitorEvent.objects.filter(operation=op).values_list("event_type", flat=True)) == [
        "STOP_SET", "STOP_MOVED"]
    assert alice.api.patch(path, {"stop_price": "9100"}, format="json",
                           HTTP_IDEMPOTENCY_KEY="p-1").status_code == 422


def test_close_with_a_key_replays_its_answer_instead_of_409(alice, open_op, paper):
    op = open_op(alice.tenant)
    path = f"{URL}{op.pk}/close/"
    first = alice.api.post(path, {}, format="json", HTTP_IDEMPOTENCY_KEY="c-1")
    assert first.status_code == 200, first.json()
    assert first.json()["outcome"] == "executed"
    again = alice.api.post(path, {}, format="json", HTTP_IDEMPOTENCY_KEY="c-1")
    assert (again.status_code, again.json(), again["Idempotent-Replayed"]) == (200, first.json(), "true")
    assert len(paper.orders) == 1
    # without the key, a second close is refused: the operation is closed
    assert alice.api.post(path, {}, format="json").status_code == 409


@pytest.mark.django_db(transaction=True)
def test_racing_creates_with_one_key_open_one_operation_and_answer_the_same(symbols, tenants):
    """Two requests with one key at the same moment: the second waits on the key's unique index for the
    first's commit and replays its answer (without a key both would open a position)."""
    from django.db import close_old_connections
    from rest_framework.test import APIClient

    from tests.api.conftest import _actor

    alice = _actor("alice", tenants[0])
    results, barrier = [], threading.Barrier(4)

    def client():
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {alice.token.key}")
        barrier.wait()
        try:
            r = api.post(URL, BODY, format="json", HTTP_IDEMPOTENCY_KEY="race")
            results.append((r.status_code, r.json()["id"] if r.status_code == 201 else r.json()))
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Operation.objects.count() == 1
    assert results == [(201, Operation.objects.get().pk)] * 4


# --------------------------------------------------------------------------------------
# hostile input: always the envelope, never HTML
# --------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400_parse_error(alice, symbols):
    for raw in ("[" * 30000 + "]" * 30000, '{"a":' * 40 + "1" + "}" * 40):
        r = alice.api.post(URL, raw, content_type="application/json")
        assert r.status_code == 400, r.content[:200]
        assert r["Content-Type"] == "application/json"
        assert r.json()["error"]["code"] == "parse_error"
        assert "nested deeper than 32 levels" in r.json()["error"]["message"]
    assert not Operation.objects.exists()


@pytest.mark.parametrize("raw", [b'{"symbol": "BTC\\u0000USDT"}', b'{"symbol": "BTCUSDT"}\x00', b'{"a\\u0000": 1}'])
def test_a_nul_in_the_body_is_400(alice, symbols, raw):
    r = alice.api.post(URL, raw, content_type="application/json")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "parse_error")


@pytest.mark.parametrize("path", ["/api/v1/operations/%00/", "/api/v1/symbols/BTC%00USDT/", "/api/v1/operations/?symbol=%00",
                                  "/api/v1/executions/a%00b/", "/nothing%00here"])
def test_a_nul_in_the_path_or_query_is_400(alice, path):
    r = alice.api.get(path)
    assert (r.status_code, r["Content-Type"]) == (400, "application/json")
    assert r.json() == error("bad_request", "The path or the query string holds a NUL character.")


def test_other_control_characters_in_the_path_are_a_plain_404(alice):
    r = alice.api.get("/api/v1/symbols/A%0D%0AB/")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


def test_a_body_over_64_kib_is_413_before_it_is_read(alice, symbols):
    r = alice.api.post(URL, json.dumps({"symbol": "x" * 70000}), content_type="application/json")
    assert (r.status_code, r.json()) == (413, error("body_too_large", "The body is 70014 bytes; at most 65536 are accepted."))
    assert alice.api.post(URL, json.dumps({**BODY, "pad": "x" * 60000}), content_type="application/json").status_code == 400


@pytest.mark.parametrize("path", ["/api/v1/operations/", "/api/v1/executions/", "/api/v1/events/",
                                  "/api/v1/operations/{id}/events/"])
@pytest.mark.parametrize("limit", ["abc", "0", "-1", "1.5", "1e2", "", "+5", " 5", "\u0665", "9999"])
def test_an_invalid_limit_is_400_on_every_list(alice, open_op, path, limit):
    op = open_op(alice.tenant)
    r = alice.api.get(path.format(id=op.pk), {"limit": limit})
    assert r.status_code == 400, (path, limit, r.json())
    assert list(r.json()["error"]["fields"]) == ["limit"]


@pytest.mark.parametrize("query", ["status=", "side=", "status=active"])
def test_an_empty_or_unknown_choice_filter_is_400(alice, query):
    r = alice.api.get(f"{URL}?{query}")
    assert r.status_code == 400 and list(r.json()["error"]["fields"]) == [query.split("=")[0]]


@pytest.mark.parametrize("query", ["operation=0", "operation=-1", "operation=1_0", "operation=%2B5", "status="])
def test_execution_filters_refuse_what_the_schema_forbids(alice, query):
    assert alice.api.get(f"/api/v1/executions/?{query}").status_code == 400


@pytest.mark.parametrize("client", ["", "1_0", "+1", " 1", "\u0661", "abc"])
def test_a_wrong_typed_client_is_400(alice, client):
    r = alice.api.get("/api/v1/risk/config/", {"client": client})
    assert (r.status_code, r.json()["error"]["fields"]) == (400, {"client": ["A valid integer is required."]})


@pytest.mark.parametrize("param", ["token", "access_token", "api_key", "key", "auth"])
def test_a_token_in_the_query_string_is_refused(alice, param):
    r = alice.api.get(f"{URL}?{param}={alice.token.key}")
    assert (r.status_code, r.json()) == (401, error(
        "token_in_query", "Send the token in the Authorization header (Authorization: Bearer <token>), never in the URL."))


def test_unknown_urls_and_bad_hosts_answer_json(alice, anon):
    r = anon.get("/no/such/page/")
    assert (r.status_code, r["Content-Type"], r.json()) == (404, "application/json", error("not_found", "Not found."))
    r = anon.get("/api/v1/operations/", HTTP_HOST="evil.example")
    assert (r.status_code, r["Content-Type"]) == (400, "application/json")


@pytest.mark.parametrize("path", ["/no/such/page/", "/api/v1/nope"])
def test_an_unknown_url_is_json_in_development_too(anon, settings, path):
    """With DEBUG (the development default) Django answered an unknown URL with its HTML debug page
    before any handler404 (a new user's report)."""
    settings.DEBUG = True
    r = anon.get(path, HTTP_ACCEPT="application/json")
    assert (r.status_code, r["Content-Type"], r.json()) == (404, "application/json", error("not_found", "Not found."))


def test_an_empty_patch_body_is_400_and_the_schema_says_so(alice, open_op, anon):
    import yaml

    op = open_op(alice.tenant)
    r = alice.api.patch(f"{URL}{op.pk}/", {}, format="json")
    assert r.status_code == 400
    schema = yaml.safe_load(anon.get("/api/schema/").content)
    assert schema["components"]["schemas"]["PatchedOperationUpdate"]["minProperties"] == 1
    post_op = schema["paths"]["/api/v1/operations/"]["post"]
    assert [p["name"] for p in post_op["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]
    assert "422" in post_op["responses"]


# --------------------------------------------------------------------------------------
# lock timeout, deadline, what a 503 says was saved
# --------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("verb", ["patch", "close"])
def test_patch_or_close_of_a_row_locked_elsewhere_is_409_within_the_lock_timeout(symbols, tenants, paper, verb):
    """The web workers' connections start with lock_timeout (docker/gunicorn.conf.py): set here on the
    test connection as the worker's options would."""
    import time

    import psycopg
    from rest_framework.test import APIClient

    from stopmonitor.operations import open_operation
    from tests.api.conftest import _actor

    alice = _actor("alice", tenants[0])
    op = open_operation(tenants[0], symbols["BTCUSDT"], "BUY", D("0.5"), D("9300"), D("9200"), venue="paper")
    settings = connection.settings_dict
    holder = psycopg.connect(dbname=settings["NAME"], user=settings["USER"], host=settings["HOST"],
                             port=settings["PORT"] or 5432)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM api_operation WHERE id = %s FOR UPDATE", [op.pk])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = 300")
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {alice.token.key}")
        started = time.monotonic()
        if verb == "patch":
            r = api.patch(f"{URL}{op.pk}/", {"stop_price": "9100"}, format="json")
        else:
            r = api.post(f"{URL}{op.pk}/close/", {}, format="json", HTTP_IDEMPOTENCY_KEY="close-locked")
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert (r.status_code, r.json()["error"]["code"], r["Retry-After"]) == (409, "locked", "1")
    assert elapsed < 10  # 0.3 s of lock_timeout; without it the request waits as long as the lock is held
    op.refresh_from_db()
    assert (op.status, op.stop_price) == ("ACTIVE", D("9200"))
    assert paper.orders == {} and not IdempotencyKey.objects.exists()  # the close's key was released


@pytest.mark.django_db(transaction=True)
def test_a_request_past_its_deadline_is_not_executed(symbols, tenants, settings, monkeypatch):
    from api import middleware
    from tests.api.conftest import _actor

    alice = _actor("alice", tenants[0])
    settings.API_REQUEST_DEADLINE_SECONDS = 5
    clock = iter([1000.0, 1010.0])  # arrival, then the connection is taken 10 s later
    monkeypatch.setattr(middleware, "_clock", lambda: next(clock, 1010.0))
    connection.close()  # the request's first query takes a connection: connection_created
    r = post(alice)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.json()["error"]["message"].startswith("The request waited 10.0 s for the service (deadline 5 s)")
    assert r["Retry-After"] == "1"
    assert not Operation.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("when", ["before-the-writes", "session-killed-after-the-writes"])
def test_a_503_after_a_dead_session_says_truthfully_that_nothing_was_saved(symbols, tenants, monkeypatch, when):
    """Issue 16: a create whose session was terminated answered "nothing of it was saved" although its
    operation was committed (the answer was read after the COMMIT). Now the operation, its events and the
    answer commit together: a session that dies before the COMMIT leaves nothing, and the 503 says
    ``committed: no``; one that dies during the COMMIT says ``unknown`` (WriteTracker, below)."""
    from django.db import OperationalError

    from api import views
    from tests.api.conftest import _actor

    alice = _actor("alice", tenants[0])
    if when == "before-the-writes":
        def fail(*args, **kwargs):
            raise OperationalError("terminating connection due to administrator command")

        monkeypatch.setattr(views, "open_operation", fail)
    else:
        def killed(self, pk, *args, **kwargs):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        monkeypatch.setattr(views.OperationViewSet, "_detail", killed)
    r = post(alice, key="k")
    assert r.status_code == 503
    assert (r.json()["error"]["code"], r.json()["error"]["committed"]) == ("database_unavailable", "no")
    connection.close()
    assert not Operation.objects.exists() and not IdempotencyKey.objects.exists()
    monkeypatch.undo()
    retried = post(alice, key="k")
    assert retried.status_code == 201 and Operation.objects.count() == 1


def test_the_write_tracker_tells_committed_from_unknown():
    from api.middleware import WriteTracker

    class Conn:
        in_atomic_block = False
        callbacks: list = []

        def on_commit(self, fn):
            self.callbacks.append(fn)

    conn, tracker = Conn(), WriteTracker()
    run = lambda sql: tracker(lambda *a: None, sql, None, False, {"connection": conn})  # noqa: E731
    run("SELECT 1")
    assert tracker.state == "no"
    conn.in_atomic_block = True
    run("SAVEPOINT s1")
    run('INSERT INTO "api_operation" VALUES (1)')
    assert tracker.state == "unknown"  # written, COMMIT not confirmed yet
    conn.callbacks[0]()
    assert tracker.state == "yes"
    tracker = WriteTracker()
    conn.in_atomic_block = False
    run("UPDATE x SET y = 1")  # autocommit
    assert tracker.state == "yes"


# --------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------


def test_secret_settings_print_as_stars_but_work_as_values():
    from django.conf import settings

    from config.secrets import Secret

    value = Secret("s3cr3t-value")
    assert (repr(value), str(value), value + "!", f"{value}") == ("'***'", "s3cr3t-value", "s3cr3t-value!", "s3cr3t-value")
    assert repr({"k": value}) == "{'k': '***'}"
    assert repr(settings.SECRET_KEY) == "'***'"
    assert not hasattr(settings, "CONFIG")


def test_the_debug_page_hides_every_configured_secret(settings, rf):
    import sys

    from django.views.debug import ExceptionReporter

    settings.DEBUG = True
    secrets = [f"{name}-{n}" for name, n in (("django-key", 123), ("binance-key", 456), ("binance-secret", 789),
                                             ("db-pass", 0), ("redis-pass", 111), ("rabbit-pass", 222))]
    settings.SECRET_KEY, settings.BINANCE_API_KEY, settings.BINANCE_API_SECRET = secrets[:3]
    settings.DATABASES = {**settings.DATABASES, "default": {**settings.DATABASES["default"], "PASSWORD": secrets[3]}}
    settings.REDIS_URL = f"redis://:{secrets[4]}@r:6379/0"
    settings.RABBITMQ_URL = f"amqp://u:{secrets[5]}@h//"
    # under runserver, META is the whole environment: DATABASE_URL (not a name Django hides) included
    request = rf.get("/api/v1/operations/", DATABASE_URL=f"postgres://u:{secrets[3]}@h/db", BROKER=settings.RABBITMQ_URL)
    try:
        local_copy = str(settings.BINANCE_API_SECRET)  # noqa: F841 - a frame variable on the page
        raise RuntimeError("boom")
    except RuntimeError:
        html = ExceptionReporter(request, *sys.exc_info()).get_traceback_html()
    assert "boom" in html and "RuntimeError" in html
    for secret in secrets:
        assert secret not in html, secret


def test_celery_report_prints_no_secret():
    """``celery -A config report`` printed all six configured secrets (issue 16)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    secrets = {"SECRET_KEY": "sekrit-key-1234567890", "BINANCE_API_KEY": "binkey-abcdefgh",
               "BINANCE_API_SECRET": "binsecret-abcdefgh",
               # the exchange accounts' Fernet key (issue 20): it decrypts every tenant's secret
               "ACCOUNT_ENCRYPTION_KEYS": "Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE="}
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **secrets,
           "DATABASE_URL": "postgres://u:dbpass-xyz123@127.0.0.1:5432/x",
           "REDIS_URL": "redis://:redispass-xyz@127.0.0.1:6379/0",
           "RABBITMQ_URL": "amqp://guest:rabbitpass-xyz@127.0.0.1:5672//"}
    result = subprocess.run([str(Path(sys.executable).with_name("celery")), "-A", "config", "report"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BINANCE_API_KEY" in result.stdout and "REDIS_URL" in result.stdout
    for value in [*secrets.values(), "dbpass-xyz123", "redispass-xyz", "rabbitpass-xyz"]:
        assert value not in result.stdout + result.stderr, value
