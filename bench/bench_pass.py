"""Benchmark: one monitor pass with nothing to trigger, against a naive per-operation baseline.

Usage: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python bench/bench_pass.py``
(``make bench``). Creates and migrates its own database ``stopmonitor_bench`` next to the one
named by DATABASE_URL, fills N ACTIVE operations over 100 symbols, and prints for N in 1k,
10k, 100k: exchange requests, SQL queries and wall time of ``run_pass`` versus a naive pass
(one ticker request and the queries per operation) measured in the same run, and their ratio.
Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = [int(x) for x in os.environ.get("BENCH_SIZES", "1000,10000,100000").split(",")]
SYMBOLS = 100
NAIVE_SAMPLE = 2000  # the naive pass is timed on this many operations and scaled linearly


def _bench_db_url() -> str:
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    parsed = urlparse(url)
    if not parsed.scheme.startswith("postgres"):
        raise SystemExit("bench: DATABASE_URL must point at PostgreSQL")
    import psycopg

    admin = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS stopmonitor_bench")
        conn.execute("CREATE DATABASE stopmonitor_bench")
    return urlunparse(parsed._replace(path="/stopmonitor_bench"))


def main() -> None:
    os.environ["DATABASE_URL"] = _bench_db_url()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, reset_queries
    from django.test.utils import CaptureQueriesContext

    from api.models import Client, Operation, Symbol
    from stopmonitor.events import stream_head
    from stopmonitor.exchange.paper import PaperExchange
    from stopmonitor.rules import evaluate_trigger
    from stopmonitor.engine.context import EngineSettings
    from stopmonitor.engine.monitor import run_pass

    call_command("migrate", verbosity=0)
    now = datetime.now(timezone.utc)
    tenant = Client.objects.create(name="bench")
    symbols = [Symbol.objects.create(symbol=f"S{i:03d}USDT", base_asset=f"S{i:03d}", quote_asset="USDT",
                                     tick_size=Decimal("0.01"), step_size=Decimal("0.001"), min_qty=Decimal("0.001"),
                                     min_notional=Decimal("5")) for i in range(SYMBOLS)]
    exchange = PaperExchange(now=now)
    for s in symbols:
        exchange.set_quote(s.symbol, "100.00", "100.01", at=now)
    engine = EngineSettings()

    print(f"{'operations':>10} | {'pass req':>8} {'queries':>7} {'time s':>8} | {'naive req':>9} {'queries':>8} {'time s':>8} | {'speed-up':>8}")
    have = 0
    for n in SIZES:
        batch = [Operation(client=tenant, symbol=symbols[i % SYMBOLS], side="BUY" if i % 2 else "SELL",
                           status="ACTIVE", quantity=Decimal("1"), entry_price=Decimal("100"),
                           stop_price=Decimal("90") if i % 2 else Decimal("110"),
                           target_price=Decimal("120") if i % 2 else Decimal("80"))
                 for i in range(have, n)]
        Operation.objects.bulk_create(batch, batch_size=5000)
        have = n
        with connection.cursor() as cur:
            cur.execute("ANALYZE api_operation")
        # the engine's pass (best of 5, after a warm-up)
        run_pass(exchange, now=now, engine=engine)
        times = []
        for _ in range(5):
            exchange.calls.clear()
            with CaptureQueriesContext(connection) as ctx:
                t = time.perf_counter()
                summary = run_pass(exchange, now=now, engine=engine)
                times.append(time.perf_counter() - t)
            requests = len(exchange.calls)
            queries = len(ctx.captured_queries)
        assert summary.triggered == 0 and summary.watched == n
        engine_time = min(times)
        # the naive baseline: per operation, read it, ask for its ticker, read its stream head
        sample = min(n, NAIVE_SAMPLE)
        ids = list(Operation.objects.filter(status="ACTIVE").order_by("id").values_list("id", flat=True)[:sample])
        exchange.calls.clear()
        with CaptureQueriesContext(connection) as ctx:
            t = time.perf_counter()
            for op_id in ids:
                op = Operation.objects.select_related("symbol").get(pk=op_id)
                quote = exchange.book_tickers([op.symbol.symbol])[op.symbol.symbol]
                stream_head(op.pk)
                evaluate_trigger(op.side, op.stop_price, op.target_price, quote.bid, quote.ask)
            naive_sample_time = time.perf_counter() - t
        scale = n / sample
        naive_time = naive_sample_time * scale
        naive_requests = int(len(exchange.calls) * scale)
        naive_queries = int(len(ctx.captured_queries) * scale)
        print(f"{n:>10} | {requests:>8} {queries:>7} {engine_time:>8.4f} | {naive_requests:>9} {naive_queries:>8} "
              f"{naive_time:>8.3f} | {naive_time / engine_time:>7.0f}x"
              + ("" if sample == n else f"   (naive timed on {sample} ops, scaled)"))
        reset_queries()
    print(f"median of the last engine timings: {statistics.median(times):.4f}s; "
          "exchange requests are in-process paper calls (network latency would widen the gap)")


def process_startup(runs: int = 5) -> None:
    """Whole-process time of `monitor_stops` with nothing to do, against Django's own set-up and
    Django + python-binance imports measured in the same run (medians of ``runs``)."""
    import subprocess

    env = {**os.environ, "EXCHANGE_VENUE": "binance-testnet", "BINANCE_API_KEY": "k" * 16,
           "BINANCE_API_SECRET": "s" * 16, "DJANGO_SETTINGS_MODULE": "config.settings", "LOG_LEVEL": "WARNING"}
    commands = {
        "python -c 'django.setup()'": [sys.executable, "-c", "import django; django.setup()"],
        "django.setup() + import binance.client": [sys.executable, "-c",
                                                    "import django; django.setup(); import binance.client"],
        "manage.py monitor_stops (empty database)": [sys.executable, "manage.py", "monitor_stops", "--json"],
    }
    empty = {**env, "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/stopmonitor_bench_empty"}
    import psycopg

    admin = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS stopmonitor_bench_empty")
        conn.execute("CREATE DATABASE stopmonitor_bench_empty")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=empty, check=True)
    print("\nwhole process, median of", runs, "runs:")
    baseline = None
    for label, argv in commands.items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run(argv, cwd=ROOT, env=empty, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        baseline = baseline or median
        print(f"  {label:<45} {median:6.3f} s  ({median / baseline:.2f}x django.setup)")
    print(f"  load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
    process_startup()
