"""Benchmark: the protection audit of one pass for 10k operations over 100 symbols, against a
per-operation baseline (one ``GET /api/v3/order`` per protected operation), measured in one run.

Usage: ``python bench/bench_protection.py`` (no database: the audit is the pure
:func:`stopmonitor.protection.audit`; the request and weight counts are those
``stopmonitor/engine/protection.py`` sends, from Binance's "Current open orders" (weight 6 per
symbol, 80 for every symbol), "Query order" (4), "New order"/"cancelReplace" (1)). Prints, per
scenario, requests and request weight per pass with protection on and the audit's CPU time,
plus what protection costs in order count. Figures only: nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stopmonitor import protection as p  # noqa: E402
from stopmonitor.exchange.base import OrderResult  # noqa: E402

OPS = int(os.environ.get("BENCH_OPS", "10000"))
SYMBOLS = 100
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
WEIGHT_OPEN_ALL, WEIGHT_OPEN_ONE, WEIGHT_QUERY, WEIGHT_ORDER = 80, 6, 4, 1
LIMIT_WEIGHT_PER_MINUTE = 6000  # Binance spot REQUEST_WEIGHT per IP


def world(moved_share: float, fired_share: float):
    expected, orders = {}, []
    for op in range(1, OPS + 1):
        cid = p.protection_client_id(op, 1)
        state = p.ProtectionState(op, p.PLACED, 1, cid, p.STOP_LOSS, "SELL", D("0.1"), D("9000"), None, op, "", "",
                                  NOW - timedelta(hours=1), NOW - timedelta(hours=1), None, NOW - timedelta(hours=1), 3)
        expected[op] = state
        if op % int(1 / fired_share if fired_share else OPS + 1) != 0:
            orders.append(OrderResult(f"S{op % SYMBOLS:03d}USDT", "SELL", "NEW", op, cid, D("0.1"), D("0"), D("0"), (),
                                      NOW, "STOP_LOSS", D("9000"), None, -1))
    moved = int(OPS * moved_share)
    return expected, orders, moved


def main() -> None:
    print(f"protection audit: {OPS} protected operations over {SYMBOLS} symbols, one account")
    print(f"{'scenario':<34}{'requests':>10}{'weight':>8}{'baseline req':>14}{'baseline w':>12}{'ratio w':>9}"
          f"{'audit ms':>10}")
    for name, moved_share, fired_share in (("steady (nothing moved or fired)", 0, 0),
                                           ("1 % of stops moved (trailing)", 0.01, 0),
                                           ("0.1 % fired while monitor down", 0, 0.001)):
        expected, orders, moved = world(moved_share, fired_share)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            actions = p.audit(expected, orders, NOW, timedelta(seconds=60))
            times.append((time.perf_counter() - started) * 1000)
        resolves = sum(1 for a in actions if a.action == p.RESOLVE)
        open_orders_weight = min(WEIGHT_OPEN_ALL, WEIGHT_OPEN_ONE * SYMBOLS)
        # one openOrders; per fired stop one query; per move one cancelReplace; filters+tickers once when moving
        requests = 1 + resolves + moved + (2 if moved else 0)
        weight = open_orders_weight + WEIGHT_QUERY * resolves + WEIGHT_ORDER * moved + (2 if moved else 0)
        base_requests = OPS + moved
        base_weight = WEIGHT_QUERY * OPS + WEIGHT_ORDER * moved
        print(f"{name:<34}{requests:>10}{weight:>8}{base_requests:>14}{base_weight:>12}"
              f"{base_weight / weight:>8.0f}x{statistics.median(times):>10.1f}")
    print(f"(a one-minute pass may spend {LIMIT_WEIGHT_PER_MINUTE} weight per IP: the per-operation baseline needs "
          f"{WEIGHT_QUERY * OPS / LIMIT_WEIGHT_PER_MINUTE:.1f} minutes of the whole budget per pass)")
    print(f"order count: arming {OPS} operations places {OPS} orders once (an OCO counts 2), a move 1 "
          f"(cancelReplace), an amend 0. The recorded exchangeInfo caps each symbol at MAX_NUM_ORDERS 200 and "
          f"MAX_NUM_ALGO_ORDERS 5 per account (a STOP_LOSS is an algo order): {OPS // SYMBOLS} stops per symbol "
          f"on one account is {OPS // SYMBOLS // 5}x over; one stop per (account, symbol) for the sum of its "
          f"positions, or an account per tenant (#20), is needed at that scale")


if __name__ == "__main__":
    main()
