"""Benchmark ``rebuild_projections`` and ``rebuild_projections --verify`` on PostgreSQL: seconds and peak RSS.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/bench_rebuild.py --events 100000 1000000

For each size N: creates a scratch database ``bench_rebuild``, migrates it, and seeds N/4
closed operations with one execution each and four events per execution, all carrying the
execution token (STOP_TRIGGERED, EXECUTION_SUBMITTED, RECONCILED, EXECUTED, with the payloads
the monitor writes), inserted with ``INSERT … SELECT generate_series`` in event-type order (every
trigger first, then every submit, …) so that an execution's events are far apart in the log.
Then runs, each as a child process (wall time and the child's peak RSS from ``wait4``):
``rebuild_projections`` (the projection starts empty), ``rebuild_projections --verify``, and a
second rebuild over the existing rows. Drops the database at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parents[1]
DB = "bench_rebuild"


def admin_url() -> str:
    return os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def db_url(name: str) -> str:
    return urlunsplit(urlsplit(admin_url())._replace(path=f"/{name}"))


def recreate() -> None:
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB}"')


def drop() -> None:
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')


def run_child(*args: str) -> tuple[int, float, float, str]:
    """Run ``manage.py args`` on the bench database: (status, seconds, the child's peak RSS MB from ``wait4``, last stdout line)."""
    env = {**os.environ, "DATABASE_URL": db_url(DB), "DEBUG": "false"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = out.strip().splitlines()
    return proc.returncode, seconds, usage.ru_maxrss / 1024, lines[-1] if lines else ""


SEED_EVENTS = """
INSERT INTO api_stopmonitorevent (event_id, operation_id, version, event_type, tenant_id, symbol, execution_token,
                                  source, venue, payload, created_at)
SELECT gen_random_uuid(), o.id, k, t.event_type, o.client_id, 'BTCUSDT', 'sm' || o.id || '-S1-' || left(md5(o.id::text), 8),
       'cron', 'paper',
       CASE k
         WHEN 1 THEN jsonb_build_object('trigger', 'STOP_LOSS', 'level', '9200', 'observed_price', '9199.5',
                                        'bid', '9199.5', 'ask', '9199.51', 'quote_time', '2026-03-02T12:00:00+00:00',
                                        'close_side', 'SELL', 'quantity', '0.5', 'remaining_before', '0.5',
                                        'attempt', 1)
         WHEN 2 THEN jsonb_build_object('client_order_id', 'sm' || o.id || '-S1-' || left(md5(o.id::text), 8),
                                        'symbol', 'BTCUSDT', 'side', 'SELL', 'type', 'MARKET', 'quantity', '0.5')
         WHEN 3 THEN jsonb_build_object('found', true, 'exchange_status', 'FILLED', 'order_id', o.id)
         ELSE jsonb_build_object('order_id', o.id, 'client_order_id', 'sm' || o.id || '-S1-' || left(md5(o.id::text), 8),
                                 'exchange_status', 'FILLED', 'requested_qty', '0.5', 'executed_qty', '0.5',
                                 'avg_price', '9199.5', 'cummulative_quote_qty', '4599.75',
                                 'commission', '0.0045998', 'commission_asset', 'USDT', 'slippage_pct', '0.0054',
                                 'fills', jsonb_build_array(jsonb_build_object('price', '9199.5', 'qty', '0.5',
                                                            'commission', '0.0045998', 'commission_asset', 'USDT')))
       END,
       timestamptz '2026-03-02 12:00:00+00' + (o.id || ' seconds')::interval + (k || ' milliseconds')::interval
FROM api_operation o
CROSS JOIN LATERAL (VALUES (1, 'STOP_TRIGGERED'), (2, 'EXECUTION_SUBMITTED'), (3, 'RECONCILED'), (4, 'EXECUTED'))
     AS t(k, event_type)
ORDER BY k, o.id
"""


def seed(executions: int) -> None:
    with psycopg.connect(db_url(DB), autocommit=True) as conn:
        client = conn.execute("INSERT INTO api_client (name, created_at) VALUES ('bench', now()) RETURNING id").fetchone()[0]
        symbol = conn.execute(
            "INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
            "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now()) RETURNING id").fetchone()[0]
        conn.execute(
            "INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, entry_price, stop_price, "
            "created_at, updated_at, closed_quantity, stop_check_count) "
            "SELECT %s, %s, 'BUY', 'CLOSED', 0.5, 9300, 9200, now(), now(), 0.5, 0 FROM generate_series(1, %s)",
            [client, symbol, executions])
        conn.execute(SEED_EVENTS)
        conn.execute("VACUUM ANALYZE")


def count(sql: str) -> int:
    with psycopg.connect(db_url(DB)) as conn:
        return conn.execute(sql).fetchone()[0]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[100000, 1000000])
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs; {load()} at start", flush=True)
    print(f"{'events':>9} {'execs':>7} {'rebuild s':>9} {'RSS MB':>6} {'verify s':>8} {'RSS MB':>6} "
          f"{'rebuild2 s':>10} {'RSS MB':>6}  status", flush=True)
    try:
        for events in args.events:
            recreate()
            code, *_ = run_child("migrate", "-v0")
            assert code == 0, "migrate failed"
            seed(events // 4)
            n_events = count("SELECT count(*) FROM api_stopmonitorevent")
            rcode, rsec, rrss, _ = run_child("rebuild_projections")
            rows = count("SELECT count(*) FROM api_stopmonitorexecution")
            vcode, vsec, vrss, _ = run_child("rebuild_projections", "--verify")
            r2code, r2sec, r2rss, _ = run_child("rebuild_projections")
            print(f"{n_events:>9} {rows:>7} {rsec:>9.1f} {rrss:>6.0f} {vsec:>8.1f} {vrss:>6.0f} {r2sec:>10.1f} "
                  f"{r2rss:>6.0f}  exits rebuild {rcode} verify {vcode} rebuild {r2code}; {load()}", flush=True)
    finally:
        drop()


if __name__ == "__main__":
    main()
