"""``python manage.py monitor_stops``: one monitor pass (the CronJob), or ``--loop``.

Prints one JSON line per decision with ``--json`` (a readable line otherwise) and a summary
line. Exit 0 when the pass ran (even if closes failed: those are events), 1 when it could
not run (database or exchange unreachable, rate-limit ban, bad configuration).
"""

from __future__ import annotations

import sys
import time

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.dbhealth import engine_timeouts, fresh_connection
from stopmonitor.logs import emit_json, json_only_stdout
from stopmonitor.loop import Loop
from stopmonitor.stream.command import run as run_stream
from stopmonitor.preflight import before_monitor


class Command(BaseCommand):
    help = "Run one stop-monitor pass (or --loop): reconcile, read best bid/ask, close crossed stops."
    # start-up budget: the system checks import the URLconf (DRF, drf-spectacular, admin) that a
    # pass never uses; `manage.py check` and `doctor` run them instead
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--loop", action="store_true", help="run passes until SIGTERM (Deployment mode)")
        parser.add_argument("--interval", type=float, default=60.0, help="seconds between pass starts in --loop")
        parser.add_argument("--dry-run", action="store_true", help="evaluate and print; append and place nothing")
        parser.add_argument("--json", action="store_true",
                            help="one JSON line per decision and a summary line (the default outside development)")
        parser.add_argument("--venue", choices=["binance", "binance-testnet", "paper", "replay"],
                            help="override EXCHANGE_VENUE (replay/paper refused in production)")
        parser.add_argument("--max-passes", type=int, default=0, help="stop --loop after N passes (0 = no limit)")
        parser.add_argument("--metrics-port", type=int, default=0,
                            help="with --loop: serve Prometheus /metrics on this port (0 = off)")
        parser.add_argument("--stream", action="store_true",
                            help="stream mode: react to every best bid/ask change and to pushed fills (Deployment)")
        parser.add_argument("--no-user-stream", action="store_true",
                            help="with --stream: no user data stream (fills are then read by REST only)")
        parser.add_argument("--no-pass-lock", action="store_true",
                            help="skip the pass-level advisory lock (row locks still guarantee one close; for tests)")

    def handle(self, *args, **opts):
        before_monitor(opts["venue"], self.stderr)  # "run migrate" / bad keys / other venues: one line (stopmonitor/preflight.py)
        if opts["stream"]:
            return run_stream(self, opts)
        from django.conf import settings

        from stopmonitor.exchange.factory import build_exchange

        _validate(opts, settings.ENVIRONMENT)
        source = "loop" if opts["loop"] else "cron"
        # outside development (LOG_FORMAT=json) every line is JSON: decisions go through the decision
        # logger (with its level and time), the summary is printed; --json prints decisions itself
        json_logs = getattr(settings, "LOG_FORMAT", "text") == "json"
        printer = Printer(self.stdout, as_json=opts["json"] or json_logs, log_decisions=json_logs and not opts["json"])
        if printer.as_json:
            json_only_stdout()  # text log lines go to stderr: stdout stays JSON lines (issue #12 item 15)
        engine_timeouts()  # bounded lock and statement waits on the engine's connection (item 12)
        try:
            exchange = build_exchange(opts["venue"])
        except Exception as exc:  # bad configuration: one line, non-zero
            raise CommandError(f"cannot build the {opts['venue'] or settings.EXCHANGE_VENUE} exchange: {exc}") from None
        loop = Loop(opts["loop"], opts["max_passes"])
        if opts["loop"] and opts["metrics_port"]:
            from stopmonitor.metrics import serve

            serve(opts["metrics_port"])
        for _ in loop:
            started = time.monotonic()
            self.one_pass(exchange, source, opts, printer)
            self.advance_replay(exchange, opts)
            if not loop.last:
                loop.wait(opts["interval"] - (time.monotonic() - started))
        sys.stdout.flush()

    def one_pass(self, exchange, source: str, opts: dict, printer: "Printer") -> None:
        """One pass, its summary printed. A pass that cannot run is one line and exit 1 (CronJob),
        or an error line and the next pass (``--loop``)."""
        from django.db import DatabaseError

        from stopmonitor.engine.decisions import EngineUnavailable
        from stopmonitor.engine.monitor import run_pass

        fresh_connection()  # a terminated session is dropped before the next pass (item 10)
        try:
            # each decision is written once: printed here, or logged as a JSON line by run_pass
            summary = run_pass(exchange, source=source, dry_run=opts["dry_run"], emit=printer.decision,
                               log_decisions=printer.log_decisions, use_lock=not opts["no_pass_lock"])
        except EngineUnavailable as exc:
            if not opts["loop"]:
                raise CommandError(f"pass could not run: {exc}") from None
            emit_json(self.stdout, {"type": "error", "error": str(exc)[:500]})
        except DatabaseError as exc:
            if not opts["loop"]:
                raise CommandError(f"pass could not run: database error: {type(exc).__name__}: {exc}"
                                   f"{MIGRATE_HINT if _missing_table(exc) else ''}") from None
            emit_json(self.stdout, {"type": "error", "error": f"database: {type(exc).__name__}"})
        else:
            printer.summary(summary)

    def advance_replay(self, exchange, opts: dict) -> None:
        """Replay: the next pass sees the next observation."""
        advance = getattr(exchange, "advance", None)
        if callable(advance) and not opts["dry_run"] and not advance():
            self.stderr.write("replay: the recording has ended; passes keep seeing its last prices "
                              "(clear the cache key stopmonitor:replay:cursor to start over)")


def _validate(opts: dict, environment: str) -> None:
    """The options' bounds and combinations; raises :class:`CommandError` (one line, exit 1)."""
    if opts["interval"] <= 0:
        raise CommandError("--interval must be a positive number of seconds")
    if opts["max_passes"] < 0:
        raise CommandError("--max-passes must be 0 (no limit) or a positive number")
    if not 0 <= opts["metrics_port"] <= 65535:
        raise CommandError("--metrics-port must be between 1 and 65535 (0 = off)")
    if not opts["loop"] and (opts["metrics_port"] or opts["max_passes"]):
        raise CommandError("--metrics-port and --max-passes only apply with --loop")
    if opts["venue"] in ("paper", "replay") and environment == "production":
        raise CommandError(f"--venue {opts['venue']} is not allowed in production")


class Printer:
    """Where decisions and summaries go: JSON lines (``as_json``), readable lines, or nothing for
    decisions when the decision logger already writes them (``log_decisions``)."""

    def __init__(self, out, *, as_json: bool, log_decisions: bool):
        self.out, self.as_json, self.log_decisions = out, as_json, log_decisions

    def decision(self, d) -> None:
        if self.log_decisions:
            return  # the decision logger writes its JSON line
        if self.as_json:
            emit_json(self.out, d.as_dict())
        else:
            self.out.write(f"{d.action:<18} op={d.operation_id} {d.symbol or ''} {d.reason or ''} {d.detail}".rstrip())

    def summary(self, s) -> None:
        if self.as_json:
            emit_json(self.out, s.as_dict())
            return
        self.out.write(
            f"{'dry-run pass (nothing written or sent)' if s.dry_run else 'pass'}: watched={s.watched} symbols={s.symbols} "
            f"triggered={s.triggered} executed={s.executed} partial={s.partially_executed} failed={s.failed} "
            f"unknown={s.unknown} blocked={s.blocked} reconciled={s.reconciled} venue={s.venue} {s.duration_s:.3f}s"
        )


MIGRATE_HINT = " (has `python manage.py migrate` run on this database?)"


def _missing_table(exc: Exception) -> bool:
    """The schema is not there: SQLite's "no such table", PostgreSQL's undefined_table (42P01)."""
    cause = exc.__cause__
    return "no such table" in str(exc) or getattr(cause, "sqlstate", None) == "42P01"
