"""``python manage.py events``: read the event store — one operation's stream, or the global feed.

``--operation ID`` prints that operation's stream in version order; otherwise the global feed
after ``--after SEQ`` in sequence order (``--limit N``, default 100). A table by default, or
one JSON object per line with ``--json`` — what an operator reads when a user asks "why was my
position closed?". Times are UTC. Exit 0, or 2 on error (unknown operation, database).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.execution import EventType, Source
from stopmonitor.preflight import require_migrated

CHUNK = 2000


def event_record(e) -> dict:
    """One ``StopMonitorEvent`` as a JSON-ready dict (payload as stored: Decimals are strings)."""
    return {
        "sequence": e.sequence,
        "operation_id": e.operation_id,
        "version": e.version,
        "event_type": e.event_type,
        "created_at": e.created_at.isoformat(),
        "tenant_id": e.tenant_id,
        "symbol": e.symbol,
        "execution_token": e.execution_token,
        "source": e.source,
        "venue": e.venue,
        "payload": e.payload,
        "event_id": str(e.event_id),
    }


#: the widest event type (PROTECTION_REQUESTED) and source (break_even) fit their columns
TYPE_WIDTH = max(len(t) for t in EventType)
SOURCE_WIDTH = max(len(s) for s in Source)
TABLE_HEADER = (f"{'SEQ':>8} {'OP':>7} {'V':>3} {'TIME (UTC)':<19} {'TYPE':<{TYPE_WIDTH}} {'SOURCE':<{SOURCE_WIDTH}} "
                f"{'VENUE':<15} {'TOKEN':<22} PAYLOAD")


def table_line(e) -> str:
    """One ``StopMonitorEvent`` as a row under :data:`TABLE_HEADER` (payload keys sorted)."""
    payload = json.dumps(e.payload, separators=(",", ":"), sort_keys=True)
    return (f"{e.sequence:>8} {e.operation_id:>7} {e.version:>3} {e.created_at:%Y-%m-%d %H:%M:%S} "
            f"{e.event_type:<{TYPE_WIDTH}} {e.source:<{SOURCE_WIDTH}} {e.venue:<15} {e.execution_token or '-':<22} {payload}")


def _validate(opts: dict) -> None:
    """The options' combinations; raises :class:`CommandError` (exit 2)."""
    if opts["operation"] is not None and opts["after"]:
        raise CommandError("--after reads the global feed: give --operation or --after, not both", returncode=2)
    if opts["limit"] is not None and opts["limit"] <= 0:
        raise CommandError("--limit must be a positive integer", returncode=2)
    if opts["after"] < 0:  # as the API's ?after= (400): sequences start at 1
        raise CommandError("--after must be 0 or a positive sequence", returncode=2)


def _selected_events(opts: dict):
    """The events to print: one operation's stream in version order (CommandError, exit 2, when the
    operation does not exist), or the global feed after ``--after`` in sequence order (100 by default)."""
    from api.models import Operation, StopMonitorEvent

    limit = opts["limit"]
    if opts["operation"] is not None:
        if not Operation.objects.filter(pk=opts["operation"]).exists():
            raise CommandError(f"operation {opts['operation']} does not exist", returncode=2)
        qs = StopMonitorEvent.objects.filter(operation_id=opts["operation"]).order_by("version")
    else:
        qs = StopMonitorEvent.objects.filter(sequence__gt=opts["after"]).order_by("sequence")
        limit = limit or 100
    return qs[:limit] if limit is not None else qs


class Command(BaseCommand):
    help = "Print one operation's event stream (--operation) or the global feed after a sequence (--after)."

    def add_arguments(self, parser):
        parser.add_argument("--operation", type=int, default=None, help="print this operation's stream")
        parser.add_argument("--after", type=int, default=0, help="global feed: events with sequence > SEQ")
        parser.add_argument("--limit", type=int, default=None,
                            help="at most N events (default: the whole stream; 100 for the feed)")
        parser.add_argument("--json", action="store_true", help="one JSON object per event")

    def handle(self, *args, **opts):
        require_migrated()  # one line "run migrate" and exit 1, never a traceback (stopmonitor/preflight.py)
        from django.db import DatabaseError

        _validate(opts)
        try:
            count = self._write_events(_selected_events(opts), opts["json"])
        except DatabaseError as exc:
            raise CommandError(f"database error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                               returncode=2) from None
        if not opts["json"] and count == 0:
            self.stdout.write("(no events)")

    def _write_events(self, qs, as_json: bool) -> int:
        """Streams ``qs`` (chunks of :data:`CHUNK`) as JSON lines or table rows; returns how many."""
        count = 0
        if not as_json:
            self.stdout.write(TABLE_HEADER)
        for e in qs.iterator(chunk_size=CHUNK):
            count += 1
            if as_json:
                self.stdout.write(json.dumps(event_record(e), separators=(",", ":"), sort_keys=False))
            else:
                self.stdout.write(table_line(e))
        return count
