"""``/metrics``: the monitor's counters after a scripted pass, the last-pass gauge read from the
database when another process ran the pass, and the ``--loop --metrics-port`` server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D
from pathlib import Path

import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from stopmonitor.exchange.paper import Scripted

from .conftest import NOW

ROOT = Path(__file__).resolve().parents[2]


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}``."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client, host: str = "testserver") -> dict:
    response = client.get("/metrics", HTTP_HOST=host)
    assert response.status_code == 200
    return parse(response.content.decode())


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.django_db(transaction=True)
def test_counters_after_a_scripted_pass(client, paper, open_op):
    from stopmonitor.engine.monitor import run_pass

    before = scrape(client)
    open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")  # executes
    open_op("BTCUSDT", "BUY", "0.4", entry="9300", stop="9250")  # rejected -1013
    open_op("BTCUSDT", "BUY", "0.0005", entry="9300", stop="9200")  # BELOW_MIN_NOTIONAL
    open_op("ETHUSDT", "SELL", "2", entry="2000", stop="2100", target="1900")  # take-profit, partial fill
    open_op("ADAUSDT", "BUY", "100", entry="1", stop="0.9")  # no quote: MISSING_PRICE
    paper.set_quote("BTCUSDT", "9150", "9150.01", at=NOW - timedelta(seconds=3))
    paper.set_quote("ETHUSDT", "1899.00", "1899.90")
    paper.push(Scripted("fill"))
    paper.push(Scripted("reject", code=-1013))
    paper.push(Scripted("expire", fill_qty=D("1")))
    summary = run_pass(paper, source="cron")
    after = scrape(client)

    assert (summary.watched, summary.triggered, summary.executed, summary.partially_executed, summary.failed,
            summary.blocked) == (5, 3, 1, 1, 1, 2)
    assert delta(before, after, "stopmonitor_passes_total", source="cron", outcome="completed") == 1
    assert delta(before, after, "stopmonitor_pass_duration_seconds_count", source="cron") == 1
    assert value(after, "stopmonitor_operations_watched") == 5
    assert delta(before, after, "stopmonitor_triggers_total", trigger="STOP_LOSS") == 2
    assert delta(before, after, "stopmonitor_triggers_total", trigger="TAKE_PROFIT") == 1
    assert delta(before, after, "stopmonitor_executions_total", status="executed") == 1
    assert delta(before, after, "stopmonitor_executions_total", status="partially_executed") == 1
    assert delta(before, after, "stopmonitor_executions_total", status="failed") == 1
    assert delta(before, after, "stopmonitor_blocked_total", reason="BELOW_MIN_NOTIONAL") == 1
    assert delta(before, after, "stopmonitor_blocked_total", reason="MISSING_PRICE") == 1
    assert delta(before, after, "stopmonitor_exchange_requests_total", venue="paper", endpoint="book_tickers") == 1
    assert delta(before, after, "stopmonitor_exchange_requests_total", venue="paper",
                 endpoint="place_market_order") == 3
    assert delta(before, after, "stopmonitor_exchange_errors_total", venue="paper", endpoint="place_market_order",
                 code="-1013") == 1
    assert value(after, "stopmonitor_quote_age_seconds", symbol="BTCUSDT") == 3.0
    assert value(after, "stopmonitor_quote_age_seconds", symbol="ETHUSDT") == 0.0

    # from the database: the pass just recorded, and the outbox it filled
    from api.models import MonitorPass, Outbox

    row = MonitorPass.objects.get()
    assert (row.source, row.venue, row.completed, row.watched, row.triggered, row.executed, row.failed,
            row.blocked) == ("cron", "paper", True, 5, 3, 1, 1, 2)
    assert value(after, "stopmonitor_last_completed_pass_timestamp_seconds") == pytest.approx(
        row.finished_at.timestamp())
    assert value(after, "stopmonitor_last_pass_operations_watched") == 5
    assert value(after, "stopmonitor_last_pass_triggered") == 3
    assert value(after, "stopmonitor_outbox_backlog") == Outbox.objects.count() > 0
    oldest_age = (datetime.now(timezone.utc) - NOW).total_seconds()  # events carry the paper clock's time
    assert value(after, "stopmonitor_outbox_oldest_unpublished_age_seconds") == pytest.approx(oldest_age, abs=5)
    assert value(after, "stopmonitor_metrics_database_up") == 1
    # django-prometheus is wired too
    assert any(name.startswith("django_http_requests") for name, _ in after)


@pytest.mark.django_db(transaction=True)
def test_a_pass_that_could_not_run_is_recorded_but_is_not_the_last_completed(client, paper, open_op):
    from api.models import MonitorPass
    from stopmonitor.exchange.base import RateLimited
    from stopmonitor.engine.decisions import EngineUnavailable
    from stopmonitor.engine.monitor import run_pass

    run_pass(paper)  # nothing watched: completes
    completed = MonitorPass.objects.get()
    open_op()

    def banned(symbols):
        raise RateLimited("banned until later", NOW + timedelta(minutes=5), code=-1003, banned=True)

    paper.book_tickers = banned
    before = scrape(client)
    with pytest.raises(EngineUnavailable):
        run_pass(paper)
    after = scrape(client)
    failed = MonitorPass.objects.get(completed=False)
    assert "banned" in failed.error
    assert delta(before, after, "stopmonitor_passes_total", source="cron", outcome="error") == 1
    assert delta(before, after, "stopmonitor_exchange_errors_total", venue="paper", endpoint="book_tickers",
                 code="-1003") == 1
    assert value(after, "stopmonitor_last_completed_pass_timestamp_seconds") == pytest.approx(
        completed.finished_at.timestamp())


def child_env(**extra) -> dict:
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE"))}
    env.update(DATABASE_URL=f"postgres://{s['USER']}@{s['HOST']}:{s['PORT']}/{s['NAME']}",
               ENVIRONMENT="development", LOG_LEVEL="WARNING", **extra)
    return env


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the child process needs the shared test database")
def test_last_pass_gauge_comes_from_the_database_when_another_process_ran_it(client):
    from stopmonitor import metrics

    local_before = metrics.LAST_PASS_LOCAL._value.get()
    assert value(scrape(client), "stopmonitor_last_completed_pass_timestamp_seconds") == 0  # no pass yet
    started = time.time()
    out = subprocess.run([sys.executable, "manage.py", "monitor_stops", "--venue", "paper", "--json"], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # a web pod that never ran a pass (any Host: Prometheus scrapes the pod IP)
    samples = scrape(client, host="10.244.1.17:8000")
    assert started <= value(samples, "stopmonitor_last_completed_pass_timestamp_seconds") <= time.time()
    assert metrics.LAST_PASS_LOCAL._value.get() == local_before  # not this process's pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the child process needs the shared test database")
def test_loop_serves_metrics_on_its_own_port():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "manage.py", "monitor_stops", "--loop", "--interval", "0.3", "--venue",
                             "paper", "--metrics-port", str(port)], cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, samples = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    samples = parse(r.read().decode())
            except OSError:
                samples = {}
            if value(samples, "stopmonitor_passes_total", source="loop", outcome="completed") >= 2:
                break
            time.sleep(0.2)
        assert value(samples, "stopmonitor_passes_total", source="loop", outcome="completed") >= 2
        assert value(samples, "stopmonitor_process_last_completed_pass_timestamp_seconds") > 0
        assert value(samples, "stopmonitor_last_completed_pass_timestamp_seconds") > 0  # database gauges too
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stderr.close()


@pytest.mark.django_db
def test_every_sixtieth_pass_row_prunes_the_rows_older_than_thirty_days():
    from api.models import MonitorPass
    from stopmonitor.metrics import PRUNE_EVERY, record_pass
    from stopmonitor.engine.decisions import PassSummary

    def summary(at):
        return PassSummary(source="cron", venue="paper", started_at=at, dry_run=False)

    old = NOW - timedelta(days=30, seconds=1)
    kept = NOW - timedelta(days=29, hours=23)
    record_pass(summary(old), finished_at=old)
    record_pass(summary(kept), finished_at=kept)
    last = MonitorPass.objects.latest("pk").pk
    for i in range(PRUNE_EVERY - 1 - last % PRUNE_EVERY):  # up to the row before a multiple of 60: no pruning
        record_pass(summary(NOW), finished_at=NOW)
    assert MonitorPass.objects.filter(finished_at=old).count() == 1
    record_pass(summary(NOW), finished_at=NOW)  # this row's id is a multiple of 60
    assert MonitorPass.objects.latest("pk").pk % PRUNE_EVERY == 0
    assert MonitorPass.objects.filter(finished_at=old).count() == 0
    assert MonitorPass.objects.filter(finished_at=kept).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO"])
def test_metrics_are_not_served_through_the_public_proxy(client, header):
    """The Ingress (Traefik) adds X-Forwarded-*: from the internet /metrics is a 404; Prometheus
    scraping the pod IP (no such header) gets it, whatever the Host."""
    value = {"HTTP_X_FORWARDED_PROTO": "https"}.get(header, "203.0.113.7")
    forwarded = client.get("/metrics", HTTP_HOST="api.staging.example", **{header: value})
    assert (forwarded.status_code, forwarded.content) == (404, b"not found")
    scraped = client.get("/metrics", HTTP_HOST="10.42.0.17:8000")
    assert scraped.status_code == 200 and b"stopmonitor_" in scraped.content
    assert client.post("/metrics", HTTP_HOST="10.42.0.17:8000").status_code == 405
