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
import time

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.preflight import require_migrated


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class Command(BaseCommand):
    help = "Rebuild the execution projection from the event store (or --verify it without writing)."

    def add_arguments(self, parser):
        parser.add_argument("--operation", type=int, default=None, help="only this operation's executions")
        parser.add_argument("--verify", action="store_true",
                            help="compare the stored projection with the events; write nothing; exit 1 on differences")
        parser.add_argument("--json", action="store_true", help="JSON lines (one per difference, then a summary)")

    def handle(self, *args, **opts):
        require_migrated(returncode=2)  # one line, exit 2 (1 is a finding here), never a traceback
        import sys

        from django.db import DatabaseError

        from api.models import Operation
        from stopmonitor.projections import rebuild, rebuild_protection, verify, verify_protection

        operation_id = opts["operation"]
        as_json = opts["json"]
        started = time.monotonic()
        try:
            if operation_id is not None and not Operation.objects.filter(pk=operation_id).exists():
                raise CommandError(f"operation {operation_id} does not exist", returncode=2)
            if opts["verify"]:
                diffs = verify(operation_id) + verify_protection(operation_id)
            else:
                rows = rebuild(operation_id)
                protections = rebuild_protection(operation_id)
        except DatabaseError as exc:
            raise CommandError(f"database error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                               returncode=2) from None
        except ValueError as exc:  # the fold refused an event sequence (e.g. an event before STOP_TRIGGERED)
            raise CommandError(f"cannot fold the events: {exc}", returncode=2) from None
        duration = round(time.monotonic() - started, 3)
        scope = f"operation {operation_id}" if operation_id is not None else "all operations"
        if not opts["verify"]:
            if as_json:
                self.stdout.write(json.dumps({"type": "summary", "action": "rebuild", "operation": operation_id,
                                              "executions": rows, "protections": protections,
                                              "duration_s": duration}))
            else:
                self.stdout.write(f"rebuilt {rows} execution rows and {protections} protection rows from the events "
                                  f"({scope}) in {duration:.3f}s")
            return
        for d in diffs:
            if as_json:
                self.stdout.write(json.dumps({"type": "difference", "execution_token": d.execution_token,
                                              "field": d.field, "stored": _jsonable(d.stored),
                                              "rebuilt": _jsonable(d.rebuilt)}))
            else:
                self.stdout.write(f"DIFF {d.execution_token} {d.field}: stored={json.dumps(_jsonable(d.stored))} "
                                  f"rebuilt={json.dumps(_jsonable(d.rebuilt))}")
        if as_json:
            self.stdout.write(json.dumps({"type": "summary", "action": "verify", "operation": operation_id,
                                          "differences": len(diffs), "duration_s": duration}))
        elif diffs:
            self.stdout.write(f"projection differs from the events: {len(diffs)} difference(s) ({scope}); "
                              f"run rebuild_projections to repair")
        else:
            self.stdout.write(f"projection matches the events ({scope}) in {duration:.3f}s")
        if diffs:
            sys.stdout.flush()
            sys.exit(1)
