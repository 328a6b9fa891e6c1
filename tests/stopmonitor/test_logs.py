"""Logs: one JSON line per engine decision with its fields, and no secret in any line of a full
scripted run (monitor pass against the fake Binance, outbox relay) at DEBUG level."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal as D
from pathlib import Path

import pytest
from django.db import connection

from .exchange.fake_binance import FakeBinance
from .test_outbox import BROKER_URL, BoundQueue, _reachable

ROOT = Path(__file__).resolve().parents[2]
KNOWN_KEY = "known-binance-key-Zq8Jm2Lp5Xc7Vb4N"
KNOWN_SECRET = "known-binance-secret-Hk3Rt9Wy6Ud1Fg0S"
KNOWN_DJANGO = "known-django-secret-Pa7Ls2Dk9Fj4Gh1Q"
DECISION_FIELDS = {"action", "tenant_id", "operation_id", "symbol", "execution_token", "event_type", "reason", "source"}


def json_handler(stream) -> logging.Handler:
    """A handler built exactly as ``settings.LOGGING`` builds the stdout one (JSON, redacted)."""
    from django.conf import settings
    from pythonjsonlogger.json import JsonFormatter

    from stopmonitor.logs import RedactSecretsFilter

    spec = dict(settings.LOGGING["formatters"]["json"])
    spec.pop("()")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(**spec))
    handler.addFilter(RedactSecretsFilter())
    return handler


def test_a_decision_is_one_json_line_with_its_fields():
    from stopmonitor.metrics import decision_log, observe_decision
    from stopmonitor.engine.decisions import Decision

    stream = io.StringIO()
    handler = json_handler(stream)
    decision_log.addHandler(handler)
    try:
        observe_decision(Decision("triggered", 7, 3, "BTCUSDT", "sm7-S1-abc", "STOP_TRIGGERED", "STOP_LOSS",
                                  "level 9200 observed 9150", source="cron"))
    finally:
        decision_log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert {k: line[k] for k in DECISION_FIELDS} == {
        "action": "triggered", "tenant_id": 3, "operation_id": 7, "symbol": "BTCUSDT",
        "execution_token": "sm7-S1-abc", "event_type": "STOP_TRIGGERED", "reason": "STOP_LOSS", "source": "cron"}
    assert (line["logger"], line["level"], line["type"]) == ("stopmonitor.decisions", "INFO", "decision")
    assert "time" in line


def test_the_filter_redacts_configured_secrets_in_messages_and_extras(settings):
    settings.BINANCE_API_SECRET = KNOWN_SECRET
    stream = io.StringIO()
    log = logging.getLogger("test.redaction")
    handler = json_handler(stream)
    log.addHandler(handler)
    try:
        log.warning("signed with %s", KNOWN_SECRET, extra={"detail": f"echo {KNOWN_SECRET}"})
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert KNOWN_SECRET not in text and json.loads(text)["detail"] == "echo ***"


def child_env(fake: FakeBinance, tmp_path) -> dict:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    env.update(
        DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
        ENVIRONMENT="development",
        SECRET_KEY=KNOWN_DJANGO,
        EXCHANGE_VENUE="binance-testnet",
        BINANCE_API_KEY=KNOWN_KEY,
        BINANCE_API_SECRET=KNOWN_SECRET,
        BINANCE_API_URL=fake.url,
        RABBITMQ_URL=BROKER_URL,
        CACHE_DIR=str(tmp_path / "cache"),
        LOG_LEVEL="DEBUG",
        LOG_FORMAT="json",
    )
    return env


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql" or not _reachable(BROKER_URL),
                    reason="needs PostgreSQL and RabbitMQ on loopback")
def test_no_secret_in_any_log_line_of_a_full_scripted_run(tenant, symbols, tmp_path):
    from api.models import Operation
    from stopmonitor.operations import open_operation

    now = datetime.now(timezone.utc)
    for _ in range(3):
        open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"), now=now)
    Operation.objects.update(venue="binance-testnet")  # opened on the venue the child processes watch (0026)
    queue = BoundQueue()
    outputs: list[str] = []
    try:
        with FakeBinance(secret=KNOWN_SECRET) as fake:
            fake.script("GET", "/api/v3/account",
                        body={"balances": [{"asset": "BTC", "free": "1.00000000", "locked": "0"}]}, times=None)
            # a rejection whose message echoes the key, then an unknown outcome, then a fill
            fake.script_error("POST", "/api/v3/order", 400, -1013,
                              f"Filter failure: NOTIONAL. key={KNOWN_KEY}")
            fake.script("POST", "/api/v3/order", status=503, body="<html>Service Unavailable</html>")
            env = child_env(fake, tmp_path)
            # the CronJob's command line (decisions logged), then --json (decisions printed), then the relay
            for argv in (["monitor_stops"], ["monitor_stops", "--json"], ["publish_outbox"]):
                done = subprocess.run([sys.executable, "manage.py", *argv], cwd=ROOT, env=env, capture_output=True,
                                      text=True, timeout=90)
                assert done.returncode == 0, done.stderr[-3000:]
                outputs += [done.stdout, done.stderr]
            assert all(r.signature_valid for r in fake.calls() if r.signature_valid is not None)
            assert any(r.headers.get("X-MBX-APIKEY") == KNOWN_KEY for r in fake.calls())  # the key was in use
        assert queue.take(1)  # the relay published
    finally:
        queue.close()

    text = "\n".join(outputs)
    for secret in (KNOWN_KEY, KNOWN_SECRET, KNOWN_DJANGO):
        assert secret not in text

    def json_lines(out: str) -> list[dict]:
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    cron_logged = [x for x in json_lines(outputs[0]) if x.get("logger") == "stopmonitor.decisions"]
    assert {x["action"] for x in cron_logged} >= {"triggered", "submitted", "failed", "unknown", "executed"}
    for line in cron_logged:  # one JSON log line per decision, with its fields
        assert DECISION_FIELDS <= set(line)
        assert line["source"] == "cron" and line["type"] == "decision"
        if line["action"] in ("triggered", "submitted", "failed", "executed"):
            assert all(line[k] is not None for k in ("tenant_id", "operation_id", "symbol", "execution_token",
                                                     "event_type"))
    # --json: the printed line is the decision's JSON line; it is not logged a second time
    second = json_lines(outputs[2])
    printed = [x for x in second if x.get("type") == "decision" and "logger" not in x]
    assert printed and not [x for x in second if x.get("logger") == "stopmonitor.decisions"]
    assert {"triggered", "executed"} <= {x["action"] for x in printed}  # the rejected one, retried
