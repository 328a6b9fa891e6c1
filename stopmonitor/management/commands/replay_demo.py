"""``python manage.py replay_demo``: the monitor on recorded real Binance prices, no keys.

Creates a tenant and long and short operations on BTCUSDT (2018-04-28, 1m candles) and
ADAUSDT (2020-04-24, 1m candles), then runs one monitor pass per replayed observation
(:mod:`stopmonitor.exchange.replay`: four per candle) through the same ``run_pass`` the
CronJob runs. Prints each decision as it happens, then the event log and the closed
operations. Venue ``paper``: nothing here is a real fill.

Exchange-held protection is on for the demo tenant (buffer 10 bps): each operation rests a stop
(or an OCO with its target) on the replayed book. ``--monitor-down`` (observations, default
236-300: 02:51-03:07 of 2018-04-28) skips the passes there as if the monitor were down: the first
long's stop is crossed meanwhile and the exchange-held stop closes it; the restarted monitor
records the fill from the exchange and sends nothing. The ADAUSDT long is closed by the monitor
itself, its cancelReplace cancelling the protection first.
"""

from __future__ import annotations

import time
from decimal import Decimal as D

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.preflight import require_migrated
from stopmonitor.rules import decimal_str as ds

# (symbol, side, quantity, stop, target): levels chosen to fire at known candles
DEMO_OPERATIONS = [
    ("BTCUSDT", "BUY", "0.05", "9060", "9300"),   # long: stop-loss in the 02:55 dip to 9050
    ("BTCUSDT", "BUY", "0.05", "9000", "9250"),   # long: take-profit on the 09:xx rally
    ("BTCUSDT", "SELL", "0.05", "9200", "9000"),  # short: stop-loss when the ask reaches 9200
    ("BTCUSDT", "BUY", "0.0004", "9060", None),   # 3.6 USDT: below minNotional, blocked once
    ("ADAUSDT", "BUY", "2000", "0.0420", None),   # long: stop-loss in the 19:00 drop
    ("ADAUSDT", "SELL", "2000", "0.0440", "0.0410"),  # short: take-profit at the 22:44 low
    ("ADAUSDT", "BUY", "2000", "0.0400", None),   # never crossed: still protected at the end
    ("BTCUSDT", "BUY", "0.05", "9000", None),     # trailing 60 below the bid once 9150 is reached: locks in profit
]
# trailing settings of the operations above (by index): stopmonitor.trailing.TrailingSettings fields
DEMO_TRAILING = {7: {"distance": "60", "activation_price": "9150"}}


class Command(BaseCommand):
    help = "Replay recorded real BTCUSDT/ADAUSDT prices through the monitor (SQLite, no keys, no network)."

    def add_arguments(self, parser):
        parser.add_argument("--max-steps", type=int, default=0, help="stop after N observations (0 = whole recording)")
        parser.add_argument("--quiet", action="store_true", help="print only the final log and operations")
        parser.add_argument("--monitor-down", default="236-300", metavar="FROM-TO",
                            help="observations during which no pass runs (the monitor is down); '' for none")

    def handle(self, *args, **opts):
        from django.conf import settings

        if settings.ENVIRONMENT != "development":
            raise CommandError(
                f"replay_demo creates demo tenants and ACTIVE operations: it runs only with ENVIRONMENT=development "
                f"(this is {settings.ENVIRONMENT}, database {settings.DATABASES['default'].get('NAME')})"
            )
        require_migrated()  # one line "run migrate" and exit 1, never a traceback (stopmonitor/preflight.py)
        from django.db import transaction
        from django.db.utils import OperationalError, ProgrammingError

        from api.models import Client, Operation, StopMonitorEvent, Symbol
        from stopmonitor.exchange.replay import ReplayExchange
        from stopmonitor.operations import open_operation
        from stopmonitor.trailing import TrailingSettings
        from stopmonitor.engine.context import EngineSettings
        from stopmonitor.engine.monitor import run_pass

        if opts["max_steps"] < 0:
            raise CommandError("--max-steps must be 0 or positive")
        try:
            down = range(*(lambda a, b: (int(a), int(b) + 1))(*opts["monitor_down"].split("-"))) \
                if opts["monitor_down"] else range(0)
        except (TypeError, ValueError):
            raise CommandError("--monitor-down must be FROM-TO (observation numbers) or ''") from None
        exchange = ReplayExchange()
        try:
            with transaction.atomic():
                tenant = Client.objects.create(name=f"replay-demo-{time.time_ns()}")
                from api.models import TenantConfig

                TenantConfig.objects.create(client=tenant, protection_enabled=True, protection_buffer_bps=10)
                symbols = {}
                for name, f in exchange.filters.items():
                    symbols[name], _ = Symbol.objects.get_or_create(
                        symbol=name,
                        defaults=dict(base_asset=f.base_asset, quote_asset=f.quote_asset, tick_size=f.tick_size,
                                      step_size=f.step_size, min_qty=f.min_qty, min_notional=f.min_notional),
                    )
        except (OperationalError, ProgrammingError) as exc:
            raise CommandError(f"database not ready ({exc.__class__.__name__}); run `python manage.py migrate` first") from None

        ops = []
        for i, (symbol, side, qty, stop, target) in enumerate(DEMO_OPERATIONS):
            entry = exchange.quotes[symbol].bid
            trail = TrailingSettings(**{k: D(v) for k, v in DEMO_TRAILING.get(i, {}).items()})
            ops.append(open_operation(tenant, symbols[symbol], side, D(qty), entry, D(stop),
                                      D(target) if target else None, source="manual", venue=exchange.venue,
                                      now=exchange.clock(), trailing_settings=trail))
        out = self.stdout
        out.write(f"replay: {exchange.length} observations of {', '.join(exchange.paths)} played side by side "
                  f"(BTCUSDT 2018-04-28, ADAUSDT 2020-04-24; times below are the recorded candles'); "
                  f"tenant {tenant.name}; {len(ops)} operations; venue paper: simulated fills, no real orders")
        engine = EngineSettings.from_settings()

        symbol_of = {op.pk: op.symbol.symbol for op in ops}  # protection decisions name only the operation

        def emit(d):
            if opts["quiet"] or d.action in ("skipped", "protection_move_deferred"):
                return
            symbol = d.symbol or symbol_of.get(d.operation_id)
            market = exchange.market_time(symbol).strftime("%Y-%m-%d %H:%M") if symbol else "--"
            out.write(f"  [{market} UTC] {d.action:<12} op {d.operation_id} {symbol or ''} {d.reason or ''} {d.detail}")

        import logging

        logging.getLogger("stopmonitor.engine").setLevel(logging.WARNING)  # the decisions are printed below
        started = time.monotonic()
        steps = 0
        # the demo plays hours of candles in seconds: the protection's churn limit, counted in real
        # seconds (PROTECTION_MOVE_INTERVAL_SECONDS), would hold every move after the first
        from django.test.utils import override_settings

        demo_settings = override_settings(STOPMONITOR={**settings.STOPMONITOR, "PROTECTION_MOVE_INTERVAL_SECONDS": 0})
        demo_settings.enable()
        while True:
            if steps in down:
                if steps == down.start:
                    out.write(f"  [{exchange.market_time('BTCUSDT'):%Y-%m-%d %H:%M} UTC] monitor DOWN for "
                              f"{len(down)} observations: no pass runs; only the exchange-held stops protect")
                elif steps == down.stop - 1:
                    out.write(f"  [{exchange.market_time('BTCUSDT'):%Y-%m-%d %H:%M} UTC] monitor UP again")
            else:
                run_pass(exchange, source="loop", emit=emit, engine=engine, use_lock=False, log_decisions=False)
            steps += 1
            if (opts["max_steps"] and steps >= opts["max_steps"]) or not exchange.advance():
                break
        demo_settings.disable()
        elapsed = time.monotonic() - started

        out.write("\nEvent log (version, type, source, venue, details):")
        for op in ops:
            out.write(f"operation {op.pk}: {op.side} {ds(op.quantity)} {op.symbol.symbol} "
                      f"stop {ds(op.stop_price)} target {ds(op.target_price) or '-'}")
            for e in StopMonitorEvent.objects.filter(operation=op).order_by("version"):
                p = e.payload
                detail = {
                    "STOP_TRIGGERED": lambda: f"{p['trigger']} level {p['level']} observed {p['observed_price']} qty {p['quantity']}",
                    "EXECUTED": lambda: f"filled {p['executed_qty']} at {p['avg_price']} slippage {p['slippage_pct']}% fee {p['commission']} {p['commission_asset']}",
                    "BLOCKED": lambda: f"{p['reason']}: {p['detail']}",
                    "EXECUTION_SUBMITTED": lambda: f"client order id {p['client_order_id']} {p['side']} {p['quantity']}",
                    "STOP_MOVED": lambda: f"{p['from']} -> {p['to']}" + (f" at observed {p['observed']}" if "observed" in p else ""),
                    "TRAILING_SET": lambda: ", ".join(f"{k} {v}" for k, v in p.items() if v is not None),
                    "PROTECTION_REQUESTED": lambda: f"{p['kind']} {p['side']} {p['quantity']} stop {p['stop_price']}"
                                                    f"{' limit ' + p['limit_price'] if p.get('limit_price') else ''} "
                                                    f"client order id {p['client_order_id']}",
                    "PROTECTION_PLACED": lambda: f"resting on the exchange, order {p['order_id']}",
                    "PROTECTION_CANCELLED": lambda: f"{p['client_order_id']} cancelled ({p['reason']})",
                    "PROTECTION_TRIGGERED": lambda: f"{p['client_order_id']} fired on the exchange: {p['exchange_status']} "
                                                    f"{p['executed_qty']}",
                    "UNPROTECTED": lambda: f"{p['reason']}: {p.get('detail', '')}",
                    "FAILED": lambda: f"{p.get('reason')}: {p.get('message', '')}",
                }.get(e.event_type, lambda: "")()
                out.write(f"  v{e.version} {e.event_type:<20} {e.source:<7} {e.venue:<6} {detail}")
        out.write("\nOperations:")
        for op in Operation.objects.filter(client=tenant).order_by("pk"):
            out.write(f"  op {op.pk} {op.symbol.symbol} {op.side:<4} {op.status:<7} closed {ds(op.closed_quantity)} "
                      f"of {ds(op.quantity)}")
        closed = Operation.objects.filter(client=tenant, status="CLOSED").count()
        out.write(f"\n{steps} passes in {elapsed:.1f}s; {closed} of {len(ops)} operations closed; venue paper "
                  "(simulated fills on recorded Binance prices)")
