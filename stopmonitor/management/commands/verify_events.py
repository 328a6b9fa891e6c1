"""``python manage.py verify_events``: recompute the event chains; name the first broken link.

Reads every event (or one ``--operation``'s) in stream order, recomputes each stream's hash chain
(:mod:`stopmonitor.chain`) and checks its versions are 1, 2, 3, …, then checks every event names
the one committed before it (a removed event is found even across sequence gaps left by
rolled-back appends). Writes nothing; an edit made by a superuser with the triggers disabled is
found like any other. ``--heads FILE`` writes each stream's last (version, hash) as JSON, for
comparing a restored copy with its source.

Output: one line per broken link (the first of each stream), then a summary; ``--json``: JSON lines.
Exit status: 0 every chain verifies; 1 something is broken (the first broken link is the first
line); 2 on error (one line).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from django.core.management.base import BaseCommand, CommandError


def _require_operation(operation_id: int | None) -> None:
    if operation_id is None:
        return
    from api.models import Operation

    if not Operation.objects.filter(pk=operation_id).exists():
        raise CommandError(f"operation {operation_id} does not exist", returncode=2)


def _write_heads(path: str, heads: dict) -> None:
    """``{operation_id: [version, hash hex]}`` as JSON to ``path``, written whole (a temporary file
    beside it, then renamed). An unwritable path, or an existing file that is not such a heads file
    (run as root, ``--heads /etc/passwd`` replaced the system's user list), is one line, exit 2."""
    if os.path.exists(path) and not _is_heads_file(path):
        raise CommandError(f"--heads {path}: exists and is not a heads file written by verify_events: "
                           "not overwritten", returncode=2)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump({str(k): list(v) for k, v in heads.items()}, fh)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandError(f"--heads {path}: {exc.strerror or exc}", returncode=2) from None


def _is_heads_file(path: str) -> bool:
    """Whether ``path`` holds what :func:`_write_heads` writes (a JSON object of [version, hash] pairs)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(isinstance(v, list) and len(v) == 2 for v in data.values())


def _broken_line(b, as_json: bool) -> str:
    if as_json:
        return json.dumps({"type": "broken", "kind": b.kind, "sequence": b.sequence, "operation_id": b.operation_id,
                           "version": b.version, "detail": b.detail})
    return "BROKEN " + b.line()


def _summary_line(report, seconds: float, as_json: bool) -> str:
    """The last line: counts, and the first broken link when there is one."""
    if as_json:
        return json.dumps({"type": "summary", "events": report.events, "streams": report.streams,
                           "broken": len(report.broken), "duration_s": seconds})
    if report.broken:
        first = report.broken[0]
        return (f"event store does NOT verify: {len(report.broken)} broken link(s) in {report.events} "
                f"events; first: sequence {first.sequence} (operation {first.operation_id} version "
                f"{first.version})")
    return (f"event store verifies: {report.events} events in {report.streams} streams, chains "
            f"and versions intact ({seconds:.3f}s)")


class Command(BaseCommand):
    help = "Recompute the event store's hash chains and versions; exit 1 naming the first broken link."

    def add_arguments(self, parser):
        parser.add_argument("--operation", type=int, default=None, help="only this operation's stream")
        parser.add_argument("--json", action="store_true", help="JSON lines (one per broken link, then a summary)")
        parser.add_argument("--heads", default=None, help="write {operation_id: [version, hash hex]} to this file")
        parser.add_argument("--limit", type=int, default=100, help="print at most this many broken links (default 100)")

    def handle(self, *args, **opts):
        from django.db import DatabaseError

        from stopmonitor.integrity import verify_store
        from stopmonitor.preflight import require_migrated

        require_migrated(returncode=2)  # one line, exit 2 (1 is a broken link), never a traceback
        _require_operation(opts["operation"])
        started = time.monotonic()
        try:
            report = verify_store(operation_id=opts["operation"], keep_heads=bool(opts["heads"]))
        except DatabaseError as exc:
            raise CommandError(f"database error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                               returncode=2) from None
        seconds = round(time.monotonic() - started, 3)
        if opts["heads"]:
            _write_heads(opts["heads"], report.heads)
        for b in report.broken[:opts["limit"]]:
            self.stdout.write(_broken_line(b, opts["json"]))
        self.stdout.write(_summary_line(report, seconds, opts["json"]))
        if report.broken:
            sys.stdout.flush()
            sys.exit(1)
