"""``python manage.py publish_outbox``: publish due outbox rows to RabbitMQ (one batch, or ``--loop``).

Prints one JSON line per batch that did something. Exit 0 when the batch ran (a broker
that is down is a failed batch: the rows keep their error and back-off, exit 1 without
``--loop``), 1 when the relay cannot run (no ``RABBITMQ_URL``).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.dbhealth import fresh_connection
from stopmonitor.logs import emit_json
from stopmonitor.loop import Loop
from stopmonitor.preflight import require_migrated


class Command(BaseCommand):
    help = "Publish unpublished outbox events to the stop_events exchange (publisher confirms, at least once)."

    def add_arguments(self, parser):
        parser.add_argument("--loop", action="store_true", help="publish batches until SIGTERM")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds to sleep when nothing was due (--loop)")
        parser.add_argument("--batch-size", type=int, default=200, help="rows per batch")
        parser.add_argument("--max-batches", type=int, default=0, help="stop --loop after N batches (0 = no limit)")

    def handle(self, *args, **opts):
        require_migrated()  # one line "run migrate" and exit 1, never a traceback (stopmonitor/preflight.py)
        from stopmonitor.outbox import Publisher, RelayNotConfigured, broker_url_from_settings

        if opts["interval"] <= 0 or opts["batch_size"] <= 0:
            raise CommandError("--interval and --batch-size must be positive")
        try:
            publisher = Publisher(broker_url_from_settings())
        except RelayNotConfigured as exc:
            raise CommandError(str(exc)) from None
        loop = Loop(opts["loop"], opts["max_batches"])
        try:
            for _ in loop:
                result = self.one_batch(publisher, opts)
                if not loop.last and (result is None or not result.claimed or result.failed):
                    loop.wait(opts["interval"])  # nothing due, or the broker failed: back off
        finally:
            publisher.close()

    def one_batch(self, publisher, opts: dict):
        """One batch, its line printed when it did something; None when the database failed
        (``--loop`` goes on). Without ``--loop`` a failure is one line and exit 1."""
        from django.db import DatabaseError

        from stopmonitor.outbox import publish_batch

        fresh_connection()  # a terminated session is dropped before the next batch (issue #12 item 10)
        try:
            result = publish_batch(publisher, batch_size=opts["batch_size"])
        except DatabaseError as exc:
            if not opts["loop"]:
                raise CommandError(f"outbox relay: database error: {type(exc).__name__}") from None
            emit_json(self.stdout, {"type": "error", "error": f"database: {type(exc).__name__}"})
            return None
        if result.claimed or result.failed:
            emit_json(self.stdout, result.as_dict())
        if not opts["loop"] and result.failed:
            raise CommandError(f"outbox relay: {result.failed} rows not published: {result.error}")
        return result
