"""``python manage.py protect_operations``: arm exchange-held protection for every ACTIVE operation lacking it.

For backfilled and existing operations (../shared/design/protection.md, P1 and P5): the ACTIVE
operations with a stop whose tenant has protection on and that rest no protection (none ever, or
CANCELLED/UNPROTECTED), in id order, ``--batch`` at a time through the same protection step the
pass runs (one openOrders read per batch, then arm). Each batch commits as it goes; ``--after ID``
resumes after the last id a previous run printed. ``--dry-run`` reads what the real run reads and reports
the actions, each arm planned as the real run plans it (filters, balance share, last price),
without writing or placing anything. ``--json``: one JSON line per batch and a summary line.

Exit status: 0 done; 1 the exchange could not be read (the line says where to resume); 2 bad arguments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.core.management.base import BaseCommand, CommandError

if TYPE_CHECKING:
    from stopmonitor.engine.protection import ProtectionReport


@dataclass(frozen=True)
class Batch:
    """One batch's outcome: its number, candidate and eligible (protection on) operation counts,
    what the protection step did and the last id it covered."""

    number: int
    operations: int
    eligible: int
    report: ProtectionReport
    last_id: int

    @property
    def would_arm(self) -> int:
        return sum(1 for line in self.report.lines if line["action"] == "would_arm")

    def line(self, as_json: bool) -> str:
        r = self.report
        if as_json:
            return json.dumps({"type": "batch", "batch": self.number, "operations": self.operations,
                               "eligible": self.eligible, "armed": r.armed, "would_arm": self.would_arm,
                               "unprotected": r.unprotected, "requests": r.requests, "last_id": self.last_id})
        return (f"batch {self.number}: {self.operations} operations ({self.eligible} with protection on): "
                f"{r.armed} armed, {self.would_arm} would arm, {r.unprotected} unprotected "
                f"(reason in their events); {r.requests} requests; resume with --after {self.last_id}")


def _unprotected_ids(after: int, size: int) -> list[int]:
    """The next ``size`` ids after ``after`` of ACTIVE operations with a stop resting no protection
    (none ever, or CANCELLED/UNPROTECTED), in id order."""
    from django.db.models import Q

    from api.models import Operation

    return list(Operation.objects.filter(status="ACTIVE", stop_price__isnull=False, pk__gt=after)
                .filter(Q(protection__isnull=True) | Q(protection__status__in=("CANCELLED", "UNPROTECTED")))
                .order_by("pk").values_list("pk", flat=True)[:size])


def _arm(exchange, clients, ids: list[int], dry_run: bool, resume_after: int):
    """The protection step for the eligible ones of ``ids``, one call per exchange account:
    ``(eligible count, ProtectionReport)``. An exchange that cannot be read is CommandError, exit 1,
    naming ``--after resume_after``."""
    from stopmonitor.engine.accounts import AccountUnavailable
    from stopmonitor.engine.protection import ProtectionReport, protected_operations, protection_pass
    from stopmonitor.exchange.base import ClockSkew, ExchangeUnavailable, RateLimited

    eligible = protected_operations(exchange.venue, ids)
    by_account: dict = {}
    for op in eligible:
        by_account.setdefault(op.account_id, []).append(op.pk)
    report = ProtectionReport()
    try:
        for account_id, op_ids in by_account.items():
            report.add(protection_pass(clients.for_account(account_id), now=exchange.clock(), source="manual",
                                       operation_ids=op_ids, dry_run=dry_run))
    except (RateLimited, ExchangeUnavailable, ClockSkew, AccountUnavailable) as exc:
        raise CommandError(f"exchange unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                           f"resume with --after {resume_after}", returncode=1) from None
    return len(eligible), report


def _summary_line(total: ProtectionReport, batches: int, last_id: int, dry_run: bool, duration_s: float,
                  as_json: bool) -> str:
    if as_json:
        return json.dumps({"type": "summary", "batches": batches, "armed": total.armed, "unprotected": total.unprotected,
                           "requests": total.requests, "weight": total.weight, "dry_run": dry_run, "last_id": last_id,
                           "duration_s": duration_s})
    return (f"{total.armed} armed, {total.unprotected} unprotected in {batches} batches "
            f"({total.requests} requests, weight {total.weight}){' (dry run)' if dry_run else ''}")


class Command(BaseCommand):
    help = "Arm exchange-held protection for every ACTIVE operation that lacks it (batched, resumable)."

    def add_arguments(self, parser):
        parser.add_argument("--batch", type=int, default=200, help="operations per batch (default 200)")
        parser.add_argument("--after", type=int, default=0, help="resume after this operation id")
        parser.add_argument("--dry-run", action="store_true", help="report what would be done, place nothing")
        parser.add_argument("--json", action="store_true", help="JSON lines on stdout")

    def handle(self, *args, **opts):
        from stopmonitor.engine.protection import ProtectionReport
        from stopmonitor.exchange.factory import build_exchange

        if opts["batch"] < 1 or opts["after"] < 0:
            raise CommandError("--batch must be at least 1 and --after 0 or more", returncode=2)
        from stopmonitor.preflight import require_migrated

        require_migrated(returncode=2)  # one line, never a traceback (stopmonitor/preflight.py)
        from stopmonitor.engine.accounts import AccountClients

        exchange = build_exchange()
        clients = AccountClients(exchange)  # each stop rests on its operation's own account (issue #20)
        started = time.monotonic()
        total = ProtectionReport()
        after, batches = opts["after"], 0
        while ids := _unprotected_ids(after, opts["batch"]):
            eligible, report = _arm(exchange, clients, ids, opts["dry_run"], resume_after=after)
            batches += 1
            after = ids[-1]
            total.add(report, lines=False)
            self.stdout.write(Batch(batches, len(ids), eligible, report, after).line(opts["json"]))
        clients.close()
        self.stdout.write(_summary_line(total, batches, after, opts["dry_run"],
                                        round(time.monotonic() - started, 3), opts["json"]))

