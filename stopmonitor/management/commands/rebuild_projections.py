"""``python manage.py rebuild_projections``: replay the event store into the execution projection.

Folds the events in sequence order (streamed, so memory holds one state per execution, not the
events) with the same ``apply`` the live append uses (invariant 8), and replaces the
``StopMonitorExecution`` rows — all of them, or one operation's with ``--operation``.
``--verify`` compares the stored rows with the fold and writes nothing.

Exit status: 0 rebuilt, or verified equal; 1 when ``--verify`` found differences (each one is
printed: execution token, field, stored value, rebuilt value); 2 on error (one line).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.preflight import require_migrated


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _scope(operation_id: int | None) -> str:
    return f"operation {operation_id}" if operation_id is not None else "all operations"


@contextmanager
def _one_line_errors():
    """A database error, or the fold refusing an event sequence (``ValueError``, e.g. an event
    before STOP_TRIGGERED), as one line: :class:`CommandError`, exit 2."""
    from django.db import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        raise CommandError(f"database error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                           returncode=2) from None
    except ValueError as exc:
        raise CommandError(f"cannot fold the events: {exc}", returncode=2) from None


def _require_operation(operation_id: int | None) -> None:
    from api.models import Operation

    if operation_id is not None and not Operation.objects.filter(pk=operation_id).exists():
        raise CommandError(f"operation {operation_id} does not exist", returncode=2)


def _difference_line(d, as_json: bool) -> str:
    """One stored-vs-rebuilt difference (execution token, field, both values)."""
    if as_json:
        return json.dumps({"type": "difference", "execution_token": d.execution_token, "field": d.field,
                           "stored": _jsonable(d.stored), "rebuilt": _jsonable(d.rebuilt)})
    return (f"DIFF {d.execution_token} {d.field}: stored={json.dumps(_jsonable(d.stored))} "
            f"rebuilt={json.dumps(_jsonable(d.rebuilt))}")


class Command(BaseCommand):
    help = "Rebuild the execution projection from the event store (or --verify it without writing)."

    def add_arguments(self, parser):
        parser.add_argument("--operation", type=int, default=None, help="only this operation's executions")
        parser.add_argument("--verify", action="store_true",
                            help="compare the stored projection with the events; write nothing; exit 1 on differences")
        parser.add_argument("--json", action="store_true", help="JSON lines (one per difference, then a summary)")

    def handle(self, *args, **opts):
        require_migrated(returncode=2)  # one line, exit 2 (1 is a finding here), never a traceback
        if opts["verify"]:
            self._verify(opts["operation"], opts["json"])
        else:
            self._rebuild(opts["operation"], opts["json"])

    def _rebuild(self, operation_id: int | None, as_json: bool) -> None:
        """Replace the execution and protection rows with the fold of the events; one summary line."""
        from stopmonitor.projections import rebuild, rebuild_protection

        started = time.monotonic()
        with _one_line_errors():
            _require_operation(operation_id)
            rows = rebuild(operation_id)
            protections = rebuild_protection(operation_id)
        duration = round(time.monotonic() - started, 3)
        if as_json:
            self.stdout.write(json.dumps({"type": "summary", "action": "rebuild", "operation": operation_id,
                                          "executions": rows, "protections": protections, "duration_s": duration}))
        else:
            self.stdout.write(f"rebuilt {rows} execution rows and {protections} protection rows from the events "
                              f"({_scope(operation_id)}) in {duration:.3f}s")

    def _verify(self, operation_id: int | None, as_json: bool) -> None:
        """Compare the stored rows with the fold, write nothing: one line per difference, then a
        summary; exit 1 when any differs."""
        from stopmonitor.projections import verify, verify_protection

        started = time.monotonic()
        with _one_line_errors():
            _require_operation(operation_id)
            diffs = verify(operation_id) + verify_protection(operation_id)
        duration = round(time.monotonic() - started, 3)
        for d in diffs:
            self.stdout.write(_difference_line(d, as_json))
        if as_json:
            self.stdout.write(json.dumps({"type": "summary", "action": "verify", "operation": operation_id,
                                          "differences": len(diffs), "duration_s": duration}))
        elif diffs:
            self.stdout.write(f"projection differs from the events: {len(diffs)} difference(s) ({_scope(operation_id)}); "
                              f"run rebuild_projections to repair")
        else:
            self.stdout.write(f"projection matches the events ({_scope(operation_id)}) in {duration:.3f}s")
        if diffs:
            sys.stdout.flush()
            sys.exit(1)
