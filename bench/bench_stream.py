"""Benchmark: quote-to-order-request latency of ``monitor_stops --stream`` against ``--loop --interval 1``
and the every-minute CronJob, measured in one run on loopback.

Usage: ``DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres python bench/bench_stream.py``
(``make bench-stream``). Creates and migrates its own database ``stopmonitor_bench_stream``,
fills 10k ACTIVE long operations over 200 symbols (50 per symbol, stops 0.10 apart, so one
crossing quote crosses exactly one operation), starts the fake Binance REST server and the
fake WebSocket server of the tests in this process, and then:

1. **stream**: ``monitor_stops --stream`` as a real process pinned to one core (``taskset``),
   fed 2,000 bookTicker quotes per second round-robin over the 200 symbols, one of them a
   crossing each second; latency = the crossing quote sent → its ``POST /api/v3/order``
   received. Also the process's CPU time per quote (``/proc/<pid>/stat``) and the mean lag
   (event time → decision, from its ``/metrics``) over the first and the last third of the
   run: equal means it keeps up, growing means a backlog.
2. **loop**: ``monitor_stops --loop --interval 1`` on the same data; a crossing is written
   into the fake REST quotes at a random moment; latency = that moment → the order.
3. **cron**: ``monitor_stops`` (one CronJob pass) started right after a crossing; its latency is
   the process's start → order plus the schedule's wait (a uniform 0–60 s, 30 s on average).

Figures only: nothing here asserts a time. BENCH_SECONDS (default 30) sets the stream phase.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scratch import ScratchDB, admin_url  # noqa: E402
SYMBOLS = 200
PER_SYMBOL = 50
RATE = int(os.environ.get("BENCH_RATE", "2000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "30"))
DB = "stopmonitor_bench_stream"


SCRATCH = ScratchDB(DB)  # bench/scratch.py: created on the server of DATABASE_URL, dropped at the end


def symbol(i: int) -> str:
    return f"S{i:03d}USDT"


def stop_level(j: int) -> Decimal:
    return Decimal("90.00") - Decimal("0.10") * j


def crossing_bid(c: int) -> str:
    """The c-th crossing: symbol c % 200, the highest stop not yet crossed there, 0.05 below it."""
    return str(stop_level(c // SYMBOLS) - Decimal("0.05"))


def seed() -> None:
    from api.models import Client, Operation, Symbol, TenantConfig

    tenant = Client.objects.create(name="bench")
    # the monitor's own close path is measured: no exchange-held protection (on by default on Binance)
    TenantConfig.objects.create(client=tenant, max_executions_per_minute=100000, max_executions_per_hour=1000000,
                                protection_enabled=False)
    rows = [Symbol.objects.create(symbol=symbol(i), base_asset=symbol(i)[:-4], quote_asset="USDT",
                                  tick_size=Decimal("0.01"), step_size=Decimal("0.001"), min_qty=Decimal("0.001"),
                                  min_notional=Decimal("5")) for i in range(SYMBOLS)]
    Operation.objects.bulk_create([
        Operation(client=tenant, symbol=rows[i], side="BUY", status="ACTIVE", quantity=Decimal("1"),
                  entry_price=Decimal("100"), stop_price=stop_level(j), target_price=Decimal("1000"),
                  venue="binance-testnet")  # the stream's venue (migration 0026): others are left alone
        for i in range(SYMBOLS) for j in range(PER_SYMBOL)], batch_size=5000)


def fakes():
    from tests.stopmonitor.exchange.fake_binance import FakeBinance
    from tests.stopmonitor.stream.fake_ws import FakeBinanceWs

    class BenchFake(FakeBinance):
        def __init__(self):
            super().__init__()
            template = next(s for s in self.exchange_info["symbols"] if s["symbol"] == "BTCUSDT")
            self.exchange_info = {"symbols": []}
            for i in range(SYMBOLS):
                entry = json.loads(json.dumps(template))
                entry.update(symbol=symbol(i), baseAsset=symbol(i)[:-4], quoteAsset="USDT")
                for f in entry["filters"]:
                    if f["filterType"] in ("LOT_SIZE", "MARKET_LOT_SIZE"):
                        f.update(stepSize="0.00100000", minQty="0.00100000", maxQty="100000.00000000")
                    if f["filterType"] == "PRICE_FILTER":
                        f.update(tickSize="0.01000000", minPrice="0.01000000")
                self.exchange_info["symbols"].append(entry)
                self.set_quote(symbol(i), "100.00")
            self.order_times: list[tuple[float, str]] = []
            self.account_times: list[float] = []  # signed GET /api/v3/account (the close's balances read)

        def set_quote(self, name, bid):
            ask = str(Decimal(bid) + Decimal("0.01"))
            self.quotes[name] = {"symbol": name, "bidPrice": bid, "bidQty": "5.0", "askPrice": ask, "askQty": "5.0"}

        def _take_script(self, method, path):
            if (method, path) == ("GET", "/api/v3/account"):  # scripted below: its answer never reaches _default
                self.account_times.append(time.monotonic())
            return super()._take_script(method, path)

        def _default(self, rec):
            # every MARKET order goes through the fake's account model: seen when it arrives
            if (rec.method, rec.path) == ("POST", "/api/v3/order"):
                self.order_times.append((time.monotonic(), rec.params.get("symbol", "")))
            return super()._default(rec)

    rest = BenchFake().start()
    rest.script("GET", "/api/v3/account", times=None, body={"balances": [
        {"asset": symbol(i)[:-4], "free": "1000.00000000", "locked": "0"} for i in range(SYMBOLS)]})
    ws = FakeBinanceWs(ticker=None).start()
    return rest, ws


def child_env(rest, ws, tmp: Path) -> dict:
    from tests.stopmonitor.exchange.fake_binance import API_KEY, API_SECRET

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RBS_", "BINANCE", "EXCHANGE", "STREAM"))}
    env.update(ENVIRONMENT="development", EXCHANGE_VENUE="binance-testnet", LOG_LEVEL="WARNING", LOG_FORMAT="json",
               BINANCE_API_KEY=API_KEY, BINANCE_API_SECRET=API_SECRET, BINANCE_API_URL=rest.url,
               BINANCE_STREAM_URL=ws.stream_url, CACHE_DIR=str(tmp / "cache"),
               STREAM_PROGRESS_FILE=str(tmp / "progress"), STREAM_SILENCE_SECONDS="5")
    return env


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lag_stats(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = re.search(r'^stopmonitor_stream_decision_lag_seconds_sum\{kind="quote"\} (\S+)$', text, re.M)
    count = re.search(r'^stopmonitor_stream_decision_lag_seconds_count\{kind="quote"\} (\S+)$', text, re.M)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def stream_phase(rest, ws, env) -> dict:
    from tests.deploy.support import free_port

    port = free_port()
    cmd = ["taskset", "-c", "0", sys.executable, "manage.py", "monitor_stops", "--stream", "--no-user-stream",
           "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(ws.subscribed()) < SYMBOLS or not rest.calls("GET", "/api/v3/ticker/bookTicker"):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"stream did not subscribe: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")
            time.sleep(0.1)
        time.sleep(1.0)  # the start pass is done
        sent: dict[str, list[float]] = {}
        thirds = []
        delivered = [0]

        async def load():
            loop = asyncio.get_running_loop()
            start = loop.time()
            n = 0
            crossings = 0
            batch = max(1, RATE // 200)  # quotes per 5 ms tick
            while loop.time() - start < SECONDS:
                for _ in range(batch):
                    i = n % SYMBOLS
                    n += 1
                    bid = f"{100 + random.random() * 0.5:.2f}"
                    data = {"u": n, "s": symbol(i), "b": bid, "B": "5.0", "a": f"{float(bid) + 0.01:.2f}", "A": "5.0",
                            "E": int(time.time() * 1000)}
                    await ws._push(symbol(i), data)
                if n // RATE > crossings:  # one crossing per second of quotes
                    c = crossings
                    crossings += 1
                    name = symbol(c % SYMBOLS)
                    rest.set_quote(name, crossing_bid(c))
                    sent.setdefault(name, []).append(time.monotonic())
                    data = {"u": n, "s": name, "b": crossing_bid(c), "B": "5.0",
                            "a": str(Decimal(crossing_bid(c)) + Decimal("0.01")), "A": "5.0", "E": int(time.time() * 1000)}
                    await ws._push(name, data)
                    n += 1
                delivered[0] = n
                target = start + n / RATE
                await asyncio.sleep(max(0.0, target - loop.time()))
            return n, crossings

        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        future = asyncio.run_coroutine_threadsafe(load(), ws._loop)
        for k in range(3):  # the lag over each third of the run
            before = lag_stats(port)
            time.sleep(SECONDS / 3)
            after = lag_stats(port)
            thirds.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
        quotes, crossings = future.result(timeout=SECONDS + 30)
        wall, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        time.sleep(2.0)  # the last crossing's order
        latencies, before_account = [], []
        for name, sends in sent.items():
            orders = [t for t, s in rest.order_times if s == name]
            latencies += [(s, o - s) for s, o in zip(sends, orders)]
            for s, o in zip(sends, orders):  # the balances read this close made: the last one before its order
                reads = [a for a in rest.account_times if s <= a <= o]
                if reads:
                    before_account.append(reads[-1] - s)
        sent_at = [t for t, _ in sorted(latencies)]  # monotonic send times, in order
        latencies = [x for _, x in sorted(latencies)]
        return {"quotes": quotes, "crossings": crossings, "orders": len(rest.order_times), "latencies": latencies,
                "sent_at": sent_at,
                "wall": wall, "cpu": cpu, "lag_thirds": thirds, "before_account": before_account}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def loop_phase(rest, env, first_crossing: int, n: int = 8) -> list[float]:
    proc = subprocess.Popen([sys.executable, "manage.py", "monitor_stops", "--loop", "--interval", "1", "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latencies = []
    try:
        time.sleep(4.0)  # started and through its first passes
        for c in range(first_crossing, first_crossing + n):
            time.sleep(random.random())
            name = symbol(c % SYMBOLS)
            seen = len(rest.order_times)
            t = time.monotonic()
            rest.set_quote(name, crossing_bid(c))
            deadline = t + 30
            while len(rest.order_times) == seen and time.monotonic() < deadline:
                time.sleep(0.005)
            if len(rest.order_times) > seen:
                latencies.append(rest.order_times[seen][0] - t)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return latencies


def cron_phase(rest, env, first_crossing: int, n: int = 3) -> list[float]:
    latencies = []
    for c in range(first_crossing, first_crossing + n):
        name = symbol(c % SYMBOLS)
        seen = len(rest.order_times)
        rest.set_quote(name, crossing_bid(c))
        t = time.monotonic()
        subprocess.run([sys.executable, "manage.py", "monitor_stops", "--json"], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        if len(rest.order_times) > seen:
            latencies.append(rest.order_times[seen][0] - t)
    return latencies


def hot_path(n: int = 20000) -> float:
    """CPU microseconds per bookTicker message in the event loop's own code (parse, watchdog,
    pre-check), without the socket and the websockets framing."""
    from stopmonitor.stream.engine_port import Watched
    from stopmonitor.stream.runner import StreamConfig, StreamMonitor

    class Venue:
        venue = "binance-testnet"

    monitor = StreamMonitor(lambda: Venue(), StreamConfig(stream_url="ws://unused"))
    monitor.book.replace([Watched(i * PER_SYMBOL + j, symbol(i), "BUY", stop_level(j), Decimal("1000"))
                          for i in range(SYMBOLS) for j in range(PER_SYMBOL)])
    monitor.watchdog.watch(monitor.book.symbols, time.monotonic())
    messages = [json.dumps({"stream": f"{symbol(i % SYMBOLS).lower()}@bookTicker", "data": {
        "u": i, "s": symbol(i % SYMBOLS), "b": "100.12", "B": "5.0", "a": "100.13", "A": "5.0",
        "E": int(time.time() * 1000)}}) for i in range(n)]
    started = time.process_time()
    for raw in messages:
        monitor._on_market_message(raw, time.monotonic())
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    import tempfile

    if not admin_url().startswith("postgres"):
        raise SystemExit("bench: DATABASE_URL must point at PostgreSQL")
    SCRATCH.recreate()
    admin = admin_url()
    os.environ["DATABASE_URL"] = SCRATCH.url  # this process (Django) and the child monitors
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    seed()
    rest, ws = fakes()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    env = child_env(rest, ws, tmp)
    load = os.getloadavg()[0]
    hot = hot_path()
    try:
        s = stream_phase(rest, ws, env)
        loop = loop_phase(rest, env, s["crossings"])
        cron = cron_phase(rest, env, s["crossings"] + len(loop) + 2)
    finally:
        ws.stop()
        rest.stop()
        from django.db import connections

        connections.close_all()
        os.environ["DATABASE_URL"] = admin  # ScratchDB drops through the server's admin database
        SCRATCH.drop()
    ms = [x * 1000 for x in s["latencies"]]
    if os.environ.get("BENCH_VERBOSE"):
        print("latencies (monotonic send time: ms):", " ".join(f"{t:.2f}:{x:.0f}" for t, x in zip(s["sent_at"], ms)))
    print(f"bench_stream: {SYMBOLS} symbols, {SYMBOLS * PER_SYMBOL} ACTIVE operations, {RATE} quotes/s for "
          f"{SECONDS} s, load average {load:.2f} at start ({os.cpu_count()} cores)")
    print(f"stream  : {s['quotes']} quotes ({s['quotes'] / s['wall']:.0f}/s), {s['crossings']} crossings, "
          f"{len(ms)} orders matched; quote -> order p50 {pct(ms, .5):.1f} ms, p99 {pct(ms, .99):.1f} ms, "
          f"max {max(ms, default=float('nan')):.1f} ms")
    split = [x * 1000 for x in s["before_account"]]
    print(f"stream  : of which quote -> its balances read (GET /api/v3/account) p50 {pct(split, .5):.1f} ms, "
          f"p99 {pct(split, .99):.1f} ms ({len(split)} closes); the rest is the answer, both transactions and the POST")
    print(f"stream  : CPU {s['cpu']:.2f} s over {s['wall']:.1f} s on one core ({100 * s['cpu'] / s['wall']:.0f} %), "
          f"{1e6 * s['cpu'] / max(1, s['quotes']):.0f} us per quote; mean lag per third "
          + ", ".join(f"{1000 * x:.2f} ms" for x in s["lag_thirds"]))
    print(f"stream  : of which the event loop's own code (parse, watchdog, pre-check) {hot:.1f} us per quote")
    print(f"loop 1 s: {len(loop)} crossings; change -> order mean {1000 * statistics.mean(loop):.0f} ms, "
          f"max {1000 * max(loop):.0f} ms" if loop else "loop 1 s: no order seen")
    if cron:
        run = statistics.mean(cron)
        print(f"cron    : process start -> order {1000 * run:.0f} ms mean ({len(cron)} runs) + schedule wait "
              f"0-60 s (mean 30 s): {30 + run:.1f} s mean, {60 + max(cron):.1f} s worst")
    if ms and loop and cron:
        p50 = pct(ms, .5) / 1000
        print(f"ratio   : loop/stream {statistics.mean(loop) / p50:.0f}x, cron/stream {(30 + statistics.mean(cron)) / p50:.0f}x "
              f"(means against the stream's p50)")


if __name__ == "__main__":
    main()
