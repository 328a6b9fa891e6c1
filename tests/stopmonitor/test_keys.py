"""stopmonitor/keys.py: the signed-read verdict on the venue's keys (issue 18, point 7)."""

from __future__ import annotations

import json
import time

import pytest

from stopmonitor.exchange.base import ClockSkew, ExchangeUnavailable, RateLimited
from stopmonitor.keys import FRESH_SECONDS, KeysVerdict, keys_verdict, last_verdict, read_keys, readiness_value


class Account:
    """A port with only the signed read: answers from ``outcomes`` in turn (an exception or a dict)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.reads = 0

    def free_balances(self):
        self.reads += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture(autouse=True)
def clean_cache():
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.mark.parametrize("error,status,code", [
    (ExchangeUnavailable("GET /api/v3/account: HTTP 401 code -2015: Invalid API-key", -2015), "refused", -2015),
    (ExchangeUnavailable("GET /api/v3/account: HTTP 401 code -2014: API-key format invalid.", -2014), "refused", -2014),
    (ExchangeUnavailable("GET /api/v3/account: HTTP 400 code -1022: Signature", -1022), "refused", -1022),
    (ExchangeUnavailable("GET /api/v3/account: ConnectTimeout"), "unknown", None),
    (ExchangeUnavailable("GET /api/v3/account: HTTP 503 code -1001", -1001), "unknown", -1001),
    (ClockSkew("-1021"), "unknown", -1021),
    (RateLimited("429", retry_after=None, code=-1003), "unknown", -1003),
])
def test_only_the_key_refusals_are_a_refusal(error, status, code):
    verdict = read_keys(Account(error), clock=lambda: 1000.0)
    assert (verdict.status, verdict.code, verdict.checked_at) == (status, code, 1000.0)
    assert verdict.gauge == (0 if status == "refused" else -1)


def test_an_accepted_read():
    verdict = read_keys(Account({"BTC": 1}), clock=lambda: 5.0)
    assert verdict == KeysVerdict("accepted", None, "signed read accepted", 5.0)
    assert (verdict.summary(), verdict.gauge) == ("ok", 1)


def test_an_accepted_verdict_is_reused_while_fresh_a_refused_one_is_read_again():
    from stopmonitor.metrics import EXCHANGE_KEYS

    now = [1000.0]
    account = Account({"BTC": 1})
    for _ in range(3):
        assert keys_verdict("binance-testnet", lambda: account, clock=lambda: now[0]).status == "accepted"
    assert account.reads == 1
    now[0] += FRESH_SECONDS  # stale: read again
    keys_verdict("binance-testnet", lambda: account, clock=lambda: now[0])
    assert account.reads == 2
    assert EXCHANGE_KEYS.labels("binance-testnet")._value.get() == 1

    refused = Account(ExchangeUnavailable("401 -2015", -2015))
    for _ in range(2):
        now[0] += FRESH_SECONDS
        assert keys_verdict("binance", lambda: refused, clock=lambda: now[0]).status == "refused"
    assert keys_verdict("binance", lambda: refused, clock=lambda: now[0]).detail == (
        "code -2015 (invalid API-key, IP, or permissions for action)")
    assert refused.reads == 3  # every start asks again: a fixed key is seen at once
    assert EXCHANGE_KEYS.labels("binance")._value.get() == 0


def test_an_adapter_that_cannot_be_built_is_unknown_not_an_error():
    def broken():
        raise ValueError("no keys configured")

    verdict = keys_verdict("binance", broken)
    assert verdict.status == "unknown" and "ValueError" in verdict.detail


def test_readiness_never_waits_and_refreshes_in_the_background():
    release = []

    class Slow(Account):
        def free_balances(self):
            while not release:
                time.sleep(0.01)
            return super().free_balances()

    slow = Slow(ExchangeUnavailable("401 -2015", -2015))
    started = time.monotonic()
    assert readiness_value("binance-testnet", lambda: slow) == "unchecked"
    assert readiness_value("binance-testnet", lambda: slow) == "unchecked"  # one refresh at a time
    assert time.monotonic() - started < 0.5  # the request did not wait for the read
    release.append(True)
    deadline = time.monotonic() + 5
    while last_verdict("binance-testnet") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slow.reads == 1
    assert readiness_value("binance-testnet", lambda: slow) == (
        "refused: code -2015 (invalid API-key, IP, or permissions for action)")


@pytest.mark.django_db
def test_readiness_reports_refused_keys_as_degraded(settings, rf):
    from django.http import HttpResponse

    from api.health import HealthProbeMiddleware
    from stopmonitor.keys import remember

    settings.EXCHANGE_VENUE = "binance-testnet"
    remember("binance-testnet", KeysVerdict("refused", -2015, "code -2015 (invalid API-key, IP, or permissions for action)",
                                            time.time()))
    response = HealthProbeMiddleware(lambda r: HttpResponse())(rf.get("/health/ready"))
    body = json.loads(response.content)
    assert response.status_code == 200, body  # reads still work: degraded, not out of the Service
    assert body["checks"]["exchange_keys"] == "refused: code -2015 (invalid API-key, IP, or permissions for action)"
    assert "exchange_keys" in body["degraded"] and body["status"] == "degraded"
