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
records the fill from the exchange and sends nothing. The BTCUSDT take-profit, the short and the
trailing long are closed by the monitor itself, its cancelReplace cancelling the protection first;
the ADAUSDT long's stop has already triggered on the exchange when the monitor's close comes (the
close is refused, nothing sent, and the exchange's fill recorded), and the ADAUSDT short is closed
by its OCO's take-profit leg on the exchange.
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


def _event_requested(p: dict) -> str:
    limit = " limit " + p["limit_price"] if p.get("limit_price") else ""
    return f"{p['kind']} {p['side']} {p['quantity']} stop {p['stop_price']}{limit} client order id {p['client_order_id']}"


def _event_stop_moved(p: dict) -> str:
    return f"{p['from']} -> {p['to']}" + (f" at observed {p['observed']}" if "observed" in p else "")


# the event log's details column, by event type (payload -> text); other types print nothing
EVENT_DETAILS = {
    "STOP_TRIGGERED": lambda p: f"{p['trigger']} level {p['level']} observed {p['observed_price']} qty {p['quantity']}",
    "EXECUTED": lambda p: f"filled {p['executed_qty']} at {p['avg_price']} slippage {p['slippage_pct']}% "
                          f"fee {p['commission']} {p['commission_asset']}",
    "BLOCKED": lambda p: f"{p['reason']}: {p['detail']}",
    "EXECUTION_SUBMITTED": lambda p: f"client order id {p['client_order_id']} {p['side']} {p['quantity']}",
    "STOP_MOVED": _event_stop_moved,
    "TRAILING_SET": lambda p: ", ".join(f"{k} {v}" for k, v in p.items() if v is not None),
    "PROTECTION_REQUESTED": _event_requested,
    "PROTECTION_PLACED": lambda p: f"resting on the exchange, order {p['order_id']}",
    "PROTECTION_CANCELLED": lambda p: f"{p['client_order_id']} cancelled ({p['reason']})",
    "PROTECTION_TRIGGERED": lambda p: f"{p['client_order_id']} fired on the exchange: {p['exchange_status']} "
                                      f"{p['executed_qty']}",
    "UNPROTECTED": lambda p: f"{p['reason']}: {p.get('detail', '')}",
    "FAILED": lambda p: f"{p.get('reason')}: {p.get('message', '')}",
}


def _monitor_down(spec: str) -> range:
    """``FROM-TO`` (observation numbers, both included) as a range; ``''`` is none."""
    if not spec:
        return range(0)
    try:
        first, last = spec.split("-")
        return range(int(first), int(last) + 1)
    except (TypeError, ValueError):
        raise CommandError("--monitor-down must be FROM-TO (observation numbers) or ''") from None


def _demo_tenant(exchange):
    """A new tenant with protection on (buffer 10 bps) and the replay's symbols (created when
    missing), in one transaction: ``(tenant, {symbol: Symbol})``. A database without the schema
    is a one-line CommandError."""
    from django.db import transaction
    from django.db.utils import OperationalError, ProgrammingError

    from api.models import Client, Symbol, TenantConfig

    try:
        with transaction.atomic():
            tenant = Client.objects.create(name=f"replay-demo-{time.time_ns()}")
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
    return tenant, symbols


def _open_demo_operations(exchange, tenant, symbols) -> list:
    """:data:`DEMO_OPERATIONS` opened at the first observation's bid, with :data:`DEMO_TRAILING`."""
    from stopmonitor.operations import open_operation
    from stopmonitor.trailing import TrailingSettings

    ops = []
    for i, (symbol, side, qty, stop, target) in enumerate(DEMO_OPERATIONS):
        entry = exchange.quotes[symbol].bid
        trail = TrailingSettings(**{k: D(v) for k, v in DEMO_TRAILING.get(i, {}).items()})
        ops.append(open_operation(tenant, symbols[symbol], side, D(qty), entry, D(stop),
                                  D(target) if target else None, source="manual", venue=exchange.venue,
                                  now=exchange.clock(), trailing_settings=trail))
    return ops


class DecisionPrinter:
    """Prints each decision of a pass with the recorded candle time of its symbol; nothing with
    ``quiet``, and never the ``skipped`` / ``protection_move_deferred`` ones."""

    def __init__(self, out, exchange, ops, quiet: bool):
        self.out, self.exchange, self.quiet = out, exchange, quiet
        self.symbol_of = {op.pk: op.symbol.symbol for op in ops}  # protection decisions name only the operation

    def __call__(self, d) -> None:
        if self.quiet or d.action in ("skipped", "protection_move_deferred"):
            return
        symbol = d.symbol or self.symbol_of.get(d.operation_id)
        market = self.exchange.market_time(symbol).strftime("%Y-%m-%d %H:%M") if symbol else "--"
        self.out.write(f"  [{market} UTC] {d.action:<12} op {d.operation_id} {symbol or ''} {d.reason or ''} {d.detail}")


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
        from stopmonitor.exchange.replay import ReplayExchange

        if opts["max_steps"] < 0:
            raise CommandError("--max-steps must be 0 or positive")
        down = _monitor_down(opts["monitor_down"])
        exchange = ReplayExchange()
        tenant, symbols = _demo_tenant(exchange)
        ops = _open_demo_operations(exchange, tenant, symbols)
        self.stdout.write(f"replay: {exchange.length} observations of {', '.join(exchange.paths)} played side by side "
                          f"(BTCUSDT 2018-04-28, ADAUSDT 2020-04-24; times below are the recorded candles'); "
                          f"tenant {tenant.name}; {len(ops)} operations; venue paper: simulated fills, no real orders")
        emit = DecisionPrinter(self.stdout, exchange, ops, opts["quiet"])
        started = time.monotonic()
        steps, passes = self._play(exchange, down, opts["max_steps"], emit)
        elapsed = time.monotonic() - started
        self._write_event_log(ops)
        closed = self._write_operations(tenant)
        self.stdout.write(f"\n{steps} observations, {passes} passes (none while the monitor was down) in {elapsed:.1f}s; "
                          f"{closed} of {len(ops)} operations closed; venue paper "
                          "(simulated fills on recorded Binance prices)")

    def _play(self, exchange, down: range, max_steps: int, emit) -> tuple[int, int]:
        """One ``run_pass`` per observation except those in ``down`` (announced where it starts and
        ends), until the recording ends or after ``max_steps`` (0: no limit); returns the
        observations played and the passes run."""
        import logging

        from django.conf import settings
        from django.test.utils import override_settings

        from stopmonitor.engine.context import EngineSettings
        from stopmonitor.engine.monitor import run_pass

        engine = EngineSettings.from_settings()
        logging.getLogger("stopmonitor.engine").setLevel(logging.WARNING)  # the decisions are printed
        # the demo plays hours of candles in seconds: the protection's churn limit, counted in real
        # seconds (PROTECTION_MOVE_INTERVAL_SECONDS), would hold every move after the first
        demo_settings = override_settings(STOPMONITOR={**settings.STOPMONITOR, "PROTECTION_MOVE_INTERVAL_SECONDS": 0})
        demo_settings.enable()
        steps = passes = 0
        while True:
            if steps in down:
                self._announce_down(exchange, down, steps)
            else:
                run_pass(exchange, source="loop", emit=emit, engine=engine, use_lock=False, log_decisions=False)
                passes += 1
            steps += 1
            if (max_steps and steps >= max_steps) or not exchange.advance():
                break
        demo_settings.disable()
        return steps, passes

    def _announce_down(self, exchange, down: range, step: int) -> None:
        """The monitor goes down at ``down.start`` and is up again at its last observation."""
        if step == down.start:
            self.stdout.write(f"  [{exchange.market_time('BTCUSDT'):%Y-%m-%d %H:%M} UTC] monitor DOWN for "
                              f"{len(down)} observations: no pass runs; only the exchange-held stops protect")
        elif step == down.stop - 1:
            self.stdout.write(f"  [{exchange.market_time('BTCUSDT'):%Y-%m-%d %H:%M} UTC] monitor UP again")

    def _write_event_log(self, ops) -> None:
        """Each operation's events in version order, one line each (:data:`EVENT_DETAILS`)."""
        from api.models import StopMonitorEvent

        self.stdout.write("\nEvent log (version, type, source, venue, details):")
        for op in ops:
            self.stdout.write(f"operation {op.pk}: {op.side} {ds(op.quantity)} {op.symbol.symbol} "
                              f"stop {ds(op.stop_price)} target {ds(op.target_price) or '-'}")
            for e in StopMonitorEvent.objects.filter(operation=op).order_by("version"):
                detail = EVENT_DETAILS.get(e.event_type, lambda p: "")(e.payload)
                self.stdout.write(f"  v{e.version} {e.event_type:<20} {e.source:<7} {e.venue:<6} {detail}")

    def _write_operations(self, tenant) -> int:
        """The tenant's operations, in id order; returns how many are CLOSED."""
        from api.models import Operation

        self.stdout.write("\nOperations:")
        for op in Operation.objects.filter(client=tenant).order_by("pk"):
            self.stdout.write(f"  op {op.pk} {op.symbol.symbol} {op.side:<4} {op.status:<7} closed "
                              f"{ds(op.closed_quantity)} of {ds(op.quantity)}")
        return Operation.objects.filter(client=tenant, status="CLOSED").count()
