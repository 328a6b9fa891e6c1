"""The outbox relay against the real RabbitMQ on loopback: body, order per operation, several relays,
a relay killed between publish and mark, a broker that is down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal as D
from pathlib import Path

import pytest
from django.db import connection

from stopmonitor.exchange.paper import Scripted

from .conftest import NOW

ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BODY_KEYS = {"event_id", "sequence", "version", "event_type", "operation_id", "tenant_id", "symbol",
             "execution_token", "source", "venue", "created_at", "payload"}


def _reachable(url: str) -> bool:
    from kombu.utils.url import url_to_parts

    parts = url_to_parts(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=1):
            return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SKIP LOCKED and row locks need PostgreSQL"),
    pytest.mark.skipif(not _reachable(BROKER_URL), reason="RabbitMQ not reachable on loopback"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BoundQueue:
    """A queue of this test run bound to ``stop_events`` with ``stop.#``; deleted afterwards."""

    def __init__(self, url: str = BROKER_URL) -> None:
        from kombu import Connection, Exchange, Queue

        self.conn = Connection(url)
        self.name = f"test.stop_events.{uuid.uuid4().hex[:12]}"
        exchange = Exchange("stop_events", type="topic", durable=True)
        self.queue = Queue(self.name, exchange=exchange, routing_key="stop.#", durable=False, auto_delete=False)
        self.bound = self.queue(self.conn.channel())
        self.bound.declare()

    def take(self, n: int, timeout: float = 10.0) -> list:
        """At least ``n`` messages (all that arrive until the queue is quiet after ``n``), in queue order."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.bound.get(no_ack=True)
            if message is None:
                if len(got) >= n:
                    break
                time.sleep(0.05)
                continue
            got.append(message)
        return got

    def close(self) -> None:
        try:
            self.bound.delete()
        finally:
            self.conn.release()


@pytest.fixture
def bound_queue():
    q = BoundQueue()
    yield q
    q.close()


def relay(url: str = BROKER_URL, **kw):
    from stopmonitor.outbox import Publisher

    return Publisher(url, **kw)


def bodies(messages) -> list[dict]:
    return [json.loads(m.body) for m in messages]


def scripted_pass(paper, open_op, n_ops: int = 3):
    """``n_ops`` operations: the first closes in one fill, the second partially, the rest block
    (below min notional). Returns (operations, summary)."""
    from stopmonitor.engine.monitor import run_pass

    ops = [open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")]
    if n_ops > 1:
        ops.append(open_op("BTCUSDT", "BUY", "0.4", entry="9300", stop="9250"))
    for _ in range(max(n_ops - 2, 0)):
        ops.append(open_op("BTCUSDT", "BUY", "0.0005", entry="9300", stop="9200"))
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    paper.push(Scripted("fill"))
    paper.push(Scripted("expire", fill_qty=D("0.1")))
    return ops, run_pass(paper, now=NOW)


def all_events():
    from api.models import StopMonitorEvent

    return list(StopMonitorEvent.objects.order_by("sequence"))


def assert_stream_order(received: list[dict]) -> None:
    """Per operation, versions arrive in increasing order."""
    last: dict[int, int] = {}
    for b in received:
        assert b["version"] > last.get(b["operation_id"], 0), (b["operation_id"], b["version"], last)
        last[b["operation_id"]] = b["version"]


def test_pass_events_arrive_in_order_with_the_documented_body(paper, open_op, bound_queue):
    from api.models import Outbox
    from stopmonitor.outbox import publish_batch

    ops, _ = scripted_pass(paper, open_op)
    events = all_events()
    assert len(events) >= 8 and Outbox.objects.filter(published_at__isnull=True).count() == len(events)

    publisher = relay()
    try:
        result = publish_batch(publisher)
    finally:
        publisher.close()
    assert (result.claimed, result.published, result.failed) == (len(events), len(events), 0)
    messages = bound_queue.take(len(events))
    received = bodies(messages)
    assert [b["sequence"] for b in received] == [e.sequence for e in events]  # one relay: global order
    assert_stream_order(received)
    by_id = {str(e.event_id): e for e in events}
    for message, body in zip(messages, received):
        e = by_id[body["event_id"]]
        assert set(body) == BODY_KEYS
        assert (body["sequence"], body["version"], body["event_type"], body["operation_id"], body["tenant_id"],
                body["symbol"], body["execution_token"], body["source"], body["venue"], body["payload"]) == (
            e.sequence, e.version, e.event_type, e.operation_id, e.tenant_id, e.symbol, e.execution_token,
            e.source, e.venue, e.payload)
        assert body["created_at"] == NOW.isoformat()
        assert message.delivery_info["routing_key"] == f"stop.{e.event_type}.{e.tenant_id}.{e.symbol}"
        assert message.delivery_info["exchange"] == "stop_events"
        assert message.properties["delivery_mode"] == 2
        assert message.properties["message_id"] == body["event_id"]
        assert message.content_type == "application/json"
    executed = next(b for b in received if b["event_type"] == "EXECUTED")
    assert executed["payload"]["executed_qty"] in ("0.5", "0.4")  # Decimals travel as strings
    assert Outbox.objects.filter(published_at__isnull=True).count() == 0
    # nothing left: the next batch claims nothing and publishes nothing again
    publisher = relay()
    try:
        assert publish_batch(publisher).claimed == 0
    finally:
        publisher.close()
    assert bound_queue.take(0, timeout=0.5) == []


def test_several_relays_at_once_keep_order_per_operation(paper, open_op, bound_queue):
    from api.models import Outbox
    from stopmonitor.outbox import drain

    for _ in range(4):  # 4 passes x 3 operations: many streams with several events each
        scripted_pass(paper, open_op)
        paper.set_quote("BTCUSDT", "9300", "9300.01")
    events = all_events()
    due = sorted(Outbox.objects.filter(published_at__isnull=True).values_list("event_id", flat=True))
    assert set(due) >= {e.sequence for e in events}
    errors: list[BaseException] = []
    published: list[int] = []

    def worker():
        publisher = relay()
        try:
            for _ in range(50):
                r = drain(publisher, batch_size=3, max_batches=1)
                published.extend(r.sequences)
                if r.claimed == 0 and not Outbox.objects.filter(published_at__isnull=True).exists():
                    break
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            publisher.close()
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(published) == due  # each row marked by exactly one relay
    mine = {e.sequence for e in events}
    received = [b for b in bodies(bound_queue.take(len(due))) if b["sequence"] in mine]
    assert sorted(b["sequence"] for b in received) == sorted(mine)
    assert_stream_order(received)


KILLED_RELAY = r"""
import os, sys, time
import django
django.setup()
from stopmonitor.outbox import Publisher, publish_batch

def hang(rows):
    print("PUBLISHED", len(rows), flush=True)
    time.sleep(120)  # the test kills us here: after the confirms, before the mark

publish_batch(Publisher(os.environ["RABBITMQ_URL"]), after_publish=hang)
"""


def child_env(**extra) -> dict:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    env.update(DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
               ENVIRONMENT="development", DJANGO_SETTINGS_MODULE="config.settings", LOG_LEVEL="WARNING",
               RABBITMQ_URL=BROKER_URL, **extra)
    return env


def test_relay_killed_between_publish_and_mark_loses_nothing(paper, open_op, bound_queue):
    from api.models import Outbox

    scripted_pass(paper, open_op)
    events = all_events()
    ids = {str(e.event_id) for e in events}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RELAY], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"PUBLISHED {len(events)}", proc.stderr.read() if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    first = bodies(bound_queue.take(len(events)))
    assert {b["event_id"] for b in first} == ids  # the broker has them all ...
    # ... but the mark died with the relay: every row is still unpublished (its transaction rolled back)
    deadline = time.monotonic() + 10
    while Outbox.objects.filter(published_at__isnull=True).count() != len(events) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Outbox.objects.filter(published_at__isnull=True).count() == len(events)

    # restart: the real command, one batch
    done = subprocess.run([sys.executable, "manage.py", "publish_outbox"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["published"] == len(events)
    second = bodies(bound_queue.take(len(events)))
    assert {b["event_id"] for b in second} == ids  # at least once: all again, none lost
    assert_stream_order(second)
    assert Outbox.objects.filter(published_at__isnull=True).count() == 0


def test_broker_down_backlog_grows_with_errors_then_drains(paper, open_op, bound_queue):
    from api.models import Outbox
    from stopmonitor.outbox import backlog, backoff_seconds, publish_batch

    scripted_pass(paper, open_op, n_ops=2)
    first_count = Outbox.objects.count()
    down = relay(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1)
    result = publish_batch(down, now=NOW)
    down.close()
    assert (result.published, result.failed) == (0, first_count) and result.error
    rows = list(Outbox.objects.all())
    assert all(r.attempts == 1 and r.last_error and r.published_at is None for r in rows)
    assert all(r.next_attempt_at == NOW + timedelta(seconds=backoff_seconds(1)) for r in rows)

    # still down: not retried before the back-off, then retried with a longer one
    assert publish_batch(relay(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1),
                         now=NOW).claimed == 0
    later = NOW + timedelta(seconds=backoff_seconds(1))
    publish_batch(relay(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1), now=later)
    assert {r.attempts for r in Outbox.objects.all()} == {2}
    assert backoff_seconds(2) > backoff_seconds(1) and backoff_seconds(30) == 300

    # more events while the broker is away: the backlog grows
    from stopmonitor.engine.monitor import run_pass

    open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    paper.push(Scripted("fill"))
    run_pass(paper, now=NOW)
    count, age = backlog(now=NOW + timedelta(seconds=90))
    assert count > first_count and age == 90.0

    # the broker is back: everything drains, in order per operation, errors kept as history
    from stopmonitor.outbox import drain

    publisher = relay()
    try:
        total = drain(publisher, now=NOW + timedelta(minutes=10))
    finally:
        publisher.close()
    assert (total.published, total.failed) == (count, 0)
    assert backlog()[0] == 0
    received = bodies(bound_queue.take(count))
    assert len(received) == count
    assert_stream_order(received)


def test_a_failed_head_holds_back_the_rest_of_its_stream_only(paper, open_op, bound_queue):
    from api.models import Outbox
    from stopmonitor.outbox import publish_batch

    ops, _ = scripted_pass(paper, open_op, n_ops=2)
    held, free = ops
    head = Outbox.objects.filter(operation_id_ref=held.pk).order_by("event_id").first()
    Outbox.objects.filter(pk=head.pk).update(attempts=3, next_attempt_at=NOW + timedelta(minutes=5))
    publisher = relay()
    try:
        publish_batch(publisher, now=NOW)
    finally:
        publisher.close()
    assert not Outbox.objects.filter(operation_id_ref=held.pk, published_at__isnull=False).exists()
    assert not Outbox.objects.filter(operation_id_ref=free.pk, published_at__isnull=True).exists()
    received = bodies(bound_queue.take(1))
    assert {b["operation_id"] for b in received} == {free.pk}


def test_command_without_a_broker_url_says_so(settings):
    from django.core.management import CommandError, call_command

    settings.RABBITMQ_URL = None
    with pytest.raises(CommandError, match="RABBITMQ_URL"):
        call_command("publish_outbox")
