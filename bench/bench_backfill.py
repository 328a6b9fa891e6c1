"""Benchmark ``backfill_stop_price`` on PostgreSQL: rows/s and peak RSS for N legacy operations.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
        .venv/bin/python bench/bench_backfill.py --rows 100000 1000000 [--batch-size 1000 5000]

For each size and each batch size: creates a scratch database ``bench_backfill``, migrates it, inserts N legacy
operations (half long, half short, stop and target percentages, no absolute levels) with one
``INSERT … SELECT generate_series``, runs the command as a child process and prints the wall
time, operations/s, events written and the child's peak RSS (``wait4``), then a
``rebuild_projections --verify`` over the result, and the load average (the machine may be
shared). Drops the database at the end.
"""

from __future__ import annotations

import argparse
import os

import psycopg
from scratch import ScratchDB

DB = "bench_backfill"
SCRATCH = ScratchDB(DB)


def seed(rows: int) -> None:
    with psycopg.connect(SCRATCH.url, autocommit=True) as conn:
        client = conn.execute("INSERT INTO api_client (name, created_at) VALUES ('bench', now()) RETURNING id").fetchone()[0]
        symbol = conn.execute(
            "INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
            "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now()) RETURNING id").fetchone()[0]
        conn.execute(
            "INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, entry_price, stop_loss_percent, "
            "stop_gain_percent, created_at, updated_at, closed_quantity, stop_check_count) "
            "SELECT %s, %s, CASE WHEN g %% 2 = 0 THEN 'BUY' ELSE 'SELL' END, 'ACTIVE', 0.5, 20000 + g * 0.37, "
            "1.5 + (g %% 7) * 0.25, 2 + (g %% 5) * 0.5, now(), now(), 0, 0 FROM generate_series(1, %s) AS g",
            [client, symbol, rows])
        conn.execute("VACUUM ANALYZE api_operation")


def counts() -> tuple[int, int]:
    with psycopg.connect(SCRATCH.url) as conn:
        done = conn.execute("SELECT count(*) FROM api_operation WHERE stop_price IS NOT NULL").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM api_stopmonitorevent").fetchone()[0]
    return done, events


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs; {load()} at start", flush=True)
    print(f"{'rows':>9} {'batch':>6} {'seconds':>8} {'ops/s':>7} {'events':>8} {'peak RSS MB':>11} "
          f"{'verify s':>8} {'verify RSS':>10}  status")
    try:
        for rows in args.rows:
            for batch_size in args.batch_size:
                SCRATCH.recreate()
                code, _, _, _ = SCRATCH.run("migrate", "-v0")
                assert code == 0, "migrate failed"
                seed(rows)
                code, seconds, rss, _ = SCRATCH.run("backfill_stop_price", "--batch-size", str(batch_size),
                                               "--progress-interval", "3600")
                done, events = counts()
                vcode, vseconds, vrss, _ = SCRATCH.run("rebuild_projections", "--verify")
                print(f"{rows:>9} {batch_size:>6} {seconds:>8.1f} {done / seconds:>7.0f} {events:>8} {rss:>11.0f} "
                      f"{vseconds:>8.1f} {vrss:>10.0f}  backfill exit {code}, updated {done}, verify exit {vcode}; "
                      f"{load()}", flush=True)
    finally:
        SCRATCH.drop()


if __name__ == "__main__":
    main()
