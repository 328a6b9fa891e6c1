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

import psycopg
from scratch import ScratchDB

DB = "bench_rebuild"
SCRATCH = ScratchDB(DB)


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
    with psycopg.connect(SCRATCH.url, autocommit=True) as conn:
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
    with psycopg.connect(SCRATCH.url) as conn:
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
            SCRATCH.recreate()
            code, *_ = SCRATCH.run("migrate", "-v0")
            assert code == 0, "migrate failed"
            seed(events // 4)
            n_events = count("SELECT count(*) FROM api_stopmonitorevent")
            rcode, rsec, rrss, _ = SCRATCH.run("rebuild_projections")
            rows = count("SELECT count(*) FROM api_stopmonitorexecution")
            vcode, vsec, vrss, _ = SCRATCH.run("rebuild_projections", "--verify")
            r2code, r2sec, r2rss, _ = SCRATCH.run("rebuild_projections")
            print(f"{n_events:>9} {rows:>7} {rsec:>9.1f} {rrss:>6.0f} {vsec:>8.1f} {vrss:>6.0f} {r2sec:>10.1f} "
                  f"{r2rss:>6.0f}  exits rebuild {rcode} verify {vcode} rebuild {r2code}; {load()}", flush=True)
    finally:
        SCRATCH.drop()


if __name__ == "__main__":
    main()
