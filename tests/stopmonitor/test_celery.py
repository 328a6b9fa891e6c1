"""Celery: the app and its beat schedule; two real workers (RabbitMQ broker, Redis results) and a
CronJob-style ``monitor_stops`` racing on the same triggered operations against the fake Binance;
the relay task publishing what they appended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal as D
from pathlib import Path

import pytest
from django.db import connection

from .exchange.fake_binance import API_KEY, API_SECRET, FakeBinance
from .test_outbox import BROKER_URL, BoundQueue, _reachable

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
DJANGO_SECRET = "celery-test-django-secret-6f1d2c3b4a59"
N_OPS = 6


def test_app_schedule_and_tasks():
    from config.celery import app

    schedule = app.conf.beat_schedule
    assert schedule["monitor-pass"]["task"] == "stopmonitor.tasks.run_monitor_pass"
    assert schedule["monitor-pass"]["schedule"] == 60.0
    assert schedule["outbox-relay"]["task"] == "stopmonitor.tasks.publish_outbox"
    assert schedule["outbox-relay"]["schedule"] == 5.0
    app.loader.import_default_modules()
    assert {"stopmonitor.tasks.run_monitor_pass", "stopmonitor.tasks.publish_outbox"} <= set(app.tasks)
    assert app.conf.task_acks_late is True and app.conf.worker_prefetch_multiplier == 1


def test_django_start_up_does_not_import_celery():
    code = ("import sys, django; django.setup(); "
            "import stopmonitor.management.commands.monitor_stops, config.urls; "
            "print('celery' in sys.modules)")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "ENVIRONMENT": "development"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_broker_and_backend_under_both_spellings(monkeypatch):
    from config.env import resolve

    for names in (("RABBITMQ_URL", "REDIS_URL"), ("RBS_RABBITMQ_URL", "RBS_REDIS_URL")):
        env = {names[0]: "amqp://u:p@mq:5672//", names[1]: "redis://cache:6379/0"}
        cfg = resolve(lambda n: env.get(n, ""))
        assert (cfg.rabbitmq_url, cfg.redis_url) == ("amqp://u:p@mq:5672//", "redis://cache:6379/0")


# ------------------------------------------------------------------------------ real workers


def _redis_up() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


race = pytest.mark.skipif(
    connection.vendor != "postgresql" or not _reachable(BROKER_URL) or not _redis_up(),
    reason="needs PostgreSQL, RabbitMQ and Redis on loopback",
)


def child_env(fake: FakeBinance, tmp_path) -> dict:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "CELERY"))}
    env.update(
        DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
        DJANGO_SETTINGS_MODULE="config.settings",
        ENVIRONMENT="development",
        SECRET_KEY=DJANGO_SECRET,
        EXCHANGE_VENUE="binance-testnet",
        BINANCE_API_KEY=API_KEY,
        BINANCE_API_SECRET=API_SECRET,
        BINANCE_API_URL=fake.url,
        RABBITMQ_URL=BROKER_URL,
        REDIS_URL=REDIS_URL,
        CACHE_DIR=str(tmp_path / "cache"),
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
    )
    return env


class Workers:
    """``n`` real ``celery -A config worker`` processes consuming one queue of this test run."""

    def __init__(self, env: dict, n: int, tmp_path) -> None:
        self.queue = f"stopmonitor-test-{uuid.uuid4().hex[:10]}"
        self.names = [f"w{i}-{self.queue}@localhost" for i in range(n)]
        self.logs = [tmp_path / f"worker{i}.log" for i in range(n)]
        self.procs = []
        for name, log in zip(self.names, self.logs):
            with open(log, "w") as fh:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", self.queue, "-n", name,
                     "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "--loglevel", "INFO"],
                    cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
        from celery import Celery

        self.client = Celery("stopmonitor-test-client", broker=BROKER_URL, backend=REDIS_URL)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, log in zip(self.procs, self.logs):
                assert p.poll() is None, log.read_text()[-3000:]
            replies = self.client.control.ping(destination=self.names, timeout=1.0)
            if len({name for r in replies for name in r}) == len(self.names):
                return
        raise AssertionError("workers not ready: " + " | ".join(log.read_text()[-1500:] for log in self.logs))

    def send(self, task: str, **kwargs):
        return self.client.send_task(task, kwargs=kwargs, queue=self.queue)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        try:
            with self.client.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.queue)
        finally:
            self.client.close()

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs)


@pytest.fixture
def armed(tenant, symbols):
    """N long BTCUSDT operations whose stop (61000) is above the fake's recorded bid (60741.67)."""
    from stopmonitor.operations import open_operation

    now = datetime.now(timezone.utc)
    return [open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.001"), D("62000"), D("61000"), now=now)
            for _ in range(N_OPS)]


@race
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("on_binance_testnet", "without_protection")  # the workers' venue; the close path under test
def test_two_workers_and_a_cronjob_pass_place_one_order_per_operation(armed, tmp_path):
    from api.models import MonitorPass, Outbox, StopMonitorEvent

    queue = BoundQueue()
    with FakeBinance() as fake:
        fake.script("GET", "/api/v3/account",
                    body={"balances": [{"asset": "BTC", "free": "1.00000000", "locked": "0"}]}, times=None)
        fake.delays[("GET", "/api/v3/ticker/bookTicker")] = 1.5  # every pass reads the quote, then they race
        fake.delays[("POST", "/api/v3/order")] = 0.3
        env = child_env(fake, tmp_path)
        workers = Workers(env, 2, tmp_path)
        cron = None
        try:
            workers.wait_ready()
            cron = subprocess.Popen([sys.executable, "manage.py", "monitor_stops", "--json"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            results = [workers.send("stopmonitor.tasks.run_monitor_pass", use_lock=False) for _ in range(2)]
            summaries = [r.get(timeout=90) for r in results]
            cron_out, cron_err = cron.communicate(timeout=90)
            assert cron.returncode == 0, cron_err
            summaries.append(json.loads(cron_out.strip().splitlines()[-1]))
            relay = workers.send("stopmonitor.tasks.publish_outbox").get(timeout=60)
        finally:
            if cron is not None and cron.poll() is None:
                os.killpg(cron.pid, signal.SIGKILL)
                cron.wait(timeout=10)
            workers.stop()
        orders = fake.calls("POST", "/api/v3/order")
    try:
        ids = [r.form["newClientOrderId"] for r in orders]
        assert len(ids) == N_OPS and len(set(ids)) == N_OPS
        for op in armed:
            op.refresh_from_db()
            assert op.status == "CLOSED"
            assert StopMonitorEvent.objects.filter(operation=op, event_type="STOP_TRIGGERED").count() == 1
            assert StopMonitorEvent.objects.filter(operation=op, event_type="EXECUTED").count() == 1
        assert sum(s["executed"] for s in summaries) == N_OPS
        assert {s["source"] for s in summaries} == {"loop", "cron"}
        assert MonitorPass.objects.count() == 3  # each pass, in whichever process, recorded its summary

        # the relay task published everything the three passes appended
        events = StopMonitorEvent.objects.count()
        assert relay["published"] == Outbox.objects.filter(published_at__isnull=False).count() == events
        received = [json.loads(m.body) for m in queue.take(events)]
        assert sorted(b["sequence"] for b in received) == sorted(
            StopMonitorEvent.objects.values_list("sequence", flat=True))
        # worker logs: JSON decision lines, and never a secret
        text = workers.output()
        decisions = [json.loads(line) for line in text.splitlines()
                     if line.startswith("{") and '"stopmonitor.decisions"' in line]
        assert any(d["action"] == "executed" and d["source"] == "loop" for d in decisions)
        for secret in (API_SECRET, API_KEY, DJANGO_SECRET):
            assert secret not in text and secret not in cron_out and secret not in cron_err
    finally:
        queue.close()
