"""Benchmark the outbox relay: how fast ``publish_outbox`` drains a backlog to RabbitMQ.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672// \\
        .venv/bin/python bench/bench_outbox.py [--operations 10000] [--batch-size 200 1000]

A backfill of N legacy operations writes 2N events and 2N outbox rows (STOP_SET and TARGET_SET):
this is the backlog the relay meets after ``backfill_stop_price`` in production. For each batch
size: creates a scratch database ``bench_outbox``, seeds N legacy operations (as
``bench_backfill.py`` does), runs the backfill, then runs ``publish_outbox --loop --max-batches K``
as a child process until every row is published (publisher confirms on, to the durable topic
exchange ``stop_events`` of the local broker) and prints rows, seconds, rows/s, the child's peak
RSS and the time one relay would need for the backlog of a 1M-operation backfill at that rate.
Figures only. Drops the database at the end.
"""

from __future__ import annotations

import argparse
import math
import os

import psycopg
from bench_backfill import load, seed
from scratch import ScratchDB

import bench_backfill

DB = "bench_outbox"


def published() -> tuple[int, int]:
    with psycopg.connect(bench_backfill.SCRATCH.url) as conn:
        return conn.execute("SELECT count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FROM api_outbox"
                            ).fetchone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[200, 1000])
    args = parser.parse_args()
    if not os.environ.get("RABBITMQ_URL"):
        raise SystemExit("bench_outbox: set RABBITMQ_URL (e.g. amqp://guest:guest@127.0.0.1:5672//)")
    bench_backfill.SCRATCH = scratch = ScratchDB(DB)  # seed() and published() use it
    print(f"# {os.cpu_count()} CPUs; {load()} at start", flush=True)
    print(f"{'rows':>8} {'batch':>6} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>11}  "
          f"{'2M rows (1M-op backfill) at this rate':>38}  status")
    try:
        for batch in args.batch_size:
            scratch.recreate()
            assert scratch.run("migrate", "-v0")[0] == 0, "migrate failed"
            seed(args.operations)
            assert scratch.run("backfill_stop_price", "--batch-size", "5000", "--progress-interval", "3600")[0] == 0
            _, rows = published()
            batches = math.ceil(rows / batch) + 1
            code, seconds, rss, _ = scratch.run("publish_outbox", "--loop", "--interval", "0.01", "--batch-size",
                                                str(batch), "--max-batches", str(batches))
            done, rows = published()
            rate = done / seconds if seconds else 0
            eta = 2_000_000 / rate / 60 if rate else float("inf")
            print(f"{rows:>8} {batch:>6} {seconds:>8.1f} {rate:>8.0f} {rss:>11.0f}  {eta:>34.1f} min  "
                  f"exit {code}, published {done} of {rows}; {load()}", flush=True)
    finally:
        scratch.drop()


if __name__ == "__main__":
    main()
