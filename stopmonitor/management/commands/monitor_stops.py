"""``python manage.py monitor_stops``: one monitor pass (the CronJob), or ``--loop``.

Prints one JSON line per decision with ``--json`` (a readable line otherwise) and a summary
line. Exit 0 when the pass ran (even if closes failed: those are events), 1 when it could
not run (database or exchange unreachable, rate-limit ban, bad configuration).
"""

from __future__ import annotations

import signal
import sys
import time

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.logs import emit_json


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
        parser.add_argument("--no-pass-lock", action="store_true",
                            help="skip the pass-level advisory lock (row locks still guarantee one close; for tests)")

    def handle(self, *args, **opts):
        from django.conf import settings
        from django.db import DatabaseError

        from stopmonitor.exchange.factory import build_exchange
        from stopmonitor.services import PassError, run_pass

        if opts["interval"] <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        if opts["max_passes"] < 0:
            raise CommandError("--max-passes must be 0 (no limit) or a positive number")
        if not 0 <= opts["metrics_port"] <= 65535:
            raise CommandError("--metrics-port must be between 1 and 65535 (0 = off)")
        if not opts["loop"] and (opts["metrics_port"] or opts["max_passes"]):
            raise CommandError("--metrics-port and --max-passes only apply with --loop")
        venue = opts["venue"]
        if venue in ("paper", "replay") and settings.ENVIRONMENT == "production":
            raise CommandError(f"--venue {venue} is not allowed in production")
        source = "loop" if opts["loop"] else "cron"
        # outside development (LOG_FORMAT=json) every line is JSON: decisions go through the decision
        # logger (with its level and time), the summary is printed; --json prints decisions itself
        json_logs = getattr(settings, "LOG_FORMAT", "text") == "json"
        as_json = opts["json"] or json_logs
        log_decisions = json_logs and not opts["json"]
        out = self.stdout

        def emit(decision):
            if log_decisions:
                return  # the decision logger writes its JSON line
            if as_json:
                emit_json(out, decision.as_dict())
            else:
                d = decision
                out.write(f"{d.action:<18} op={d.operation_id} {d.symbol or ''} {d.reason or ''} {d.detail}".rstrip())

        try:
            exchange = build_exchange(venue)
        except Exception as exc:  # bad configuration: one line, non-zero
            raise CommandError(f"cannot build the {venue or settings.EXCHANGE_VENUE} exchange: {exc}") from None

        stop = {"now": False}

        def _term(signum, frame):
            stop["now"] = True

        if opts["loop"]:
            signal.signal(signal.SIGTERM, _term)
            signal.signal(signal.SIGINT, _term)
            if opts["metrics_port"]:
                from stopmonitor.metrics import serve

                serve(opts["metrics_port"])
        passes = 0
        while True:
            started = time.monotonic()
            try:
                # each decision is written once: printed here, or logged as a JSON line by run_pass
                summary = run_pass(exchange, source=source, dry_run=opts["dry_run"], emit=emit, log_decisions=log_decisions,
                                   use_lock=not opts["no_pass_lock"])
            except PassError as exc:
                if not opts["loop"]:
                    raise CommandError(f"pass could not run: {exc}") from None
                emit_json(out, {"type": "error", "error": str(exc)[:500]})
            except DatabaseError as exc:
                if not opts["loop"]:
                    raise CommandError(f"pass could not run: database error: {type(exc).__name__}: {exc}"
                                       f"{MIGRATE_HINT if _missing_table(exc) else ''}") from None
                emit_json(out, {"type": "error", "error": f"database: {type(exc).__name__}"})
            else:
                if as_json:
                    emit_json(out, summary.as_dict())
                else:
                    s = summary
                    out.write(
                        f"{'dry-run pass (nothing written or sent)' if s.dry_run else 'pass'}: watched={s.watched} symbols={s.symbols} triggered={s.triggered} executed={s.executed} "
                        f"partial={s.partially_executed} failed={s.failed} unknown={s.unknown} blocked={s.blocked} "
                        f"reconciled={s.reconciled} venue={s.venue} {s.duration_s:.3f}s"
                    )
            passes += 1
            advance = getattr(exchange, "advance", None)
            if callable(advance) and not opts["dry_run"]:  # replay: the next pass sees the next observation
                if not advance():
                    self.stderr.write("replay: the recording has ended; passes keep seeing its last prices "
                                      "(clear the cache key stopmonitor:replay:cursor to start over)")
            if not opts["loop"] or stop["now"] or (opts["max_passes"] and passes >= opts["max_passes"]):
                break
            while not stop["now"] and time.monotonic() - started < opts["interval"]:
                time.sleep(min(0.2, opts["interval"]))
            if stop["now"]:
                break
        sys.stdout.flush()


MIGRATE_HINT = " (has `python manage.py migrate` run on this database?)"


def _missing_table(exc: Exception) -> bool:
    """The schema is not there: SQLite's "no such table", PostgreSQL's undefined_table (42P01)."""
    cause = exc.__cause__
    return "no such table" in str(exc) or getattr(cause, "sqlstate", None) == "42P01"
