"""``python manage.py publish_outbox``: publish due outbox rows to RabbitMQ (one batch, or ``--loop``).

Prints one JSON line per batch that did something. Exit 0 when the batch ran (a broker
that is down is a failed batch: the rows keep their error and back-off, exit 1 without
``--loop``), 1 when the relay cannot run (no ``RABBITMQ_URL``).
"""

from __future__ import annotations

import signal
import time

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.logs import emit_json


class Command(BaseCommand):
    help = "Publish unpublished outbox events to the stop_events exchange (publisher confirms, at least once)."

    def add_arguments(self, parser):
        parser.add_argument("--loop", action="store_true", help="publish batches until SIGTERM")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds to sleep when nothing was due (--loop)")
        parser.add_argument("--batch-size", type=int, default=200, help="rows per batch")
        parser.add_argument("--max-batches", type=int, default=0, help="stop --loop after N batches (0 = no limit)")

    def handle(self, *args, **opts):
        from django.db import DatabaseError

        from stopmonitor.outbox import Publisher, RelayNotConfigured, broker_url_from_settings, publish_batch

        if opts["interval"] <= 0 or opts["batch_size"] <= 0:
            raise CommandError("--interval and --batch-size must be positive")
        try:
            publisher = Publisher(broker_url_from_settings())
        except RelayNotConfigured as exc:
            raise CommandError(str(exc)) from None
        stop = {"now": False}

        def _term(signum, frame):
            stop["now"] = True

        if opts["loop"]:
            signal.signal(signal.SIGTERM, _term)
            signal.signal(signal.SIGINT, _term)
        batches = 0
        try:
            while True:
                try:
                    result = publish_batch(publisher, batch_size=opts["batch_size"])
                except DatabaseError as exc:
                    if not opts["loop"]:
                        raise CommandError(f"outbox relay: database error: {type(exc).__name__}") from None
                    emit_json(self.stdout, {"type": "error", "error": f"database: {type(exc).__name__}"})
                    result = None
                batches += 1
                if result is not None and (result.claimed or result.failed):
                    emit_json(self.stdout, result.as_dict())
                if not opts["loop"]:
                    if result is not None and result.failed:
                        raise CommandError(f"outbox relay: {result.failed} rows not published: {result.error}")
                    break
                if stop["now"] or (opts["max_batches"] and batches >= opts["max_batches"]):
                    break
                if result is None or not result.claimed or result.failed:
                    deadline = time.monotonic() + opts["interval"]
                    while not stop["now"] and time.monotonic() < deadline:
                        time.sleep(min(0.1, opts["interval"]))
                if stop["now"]:
                    break
        finally:
            publisher.close()
