"""``python manage.py protect_operations``: arm exchange-held protection for every ACTIVE operation lacking it.

For backfilled and existing operations (../shared/design/protection.md, P1 and P5): the ACTIVE
operations with a stop whose tenant has protection on and that rest no protection (none ever, or
CANCELLED/UNPROTECTED), in id order, ``--batch`` at a time through the same protection step the
pass runs (one openOrders read per batch, then arm). Each batch commits as it goes; ``--after ID``
resumes after the last id a previous run printed. ``--dry-run`` reads and reports the actions
without placing anything. ``--json``: one JSON line per batch and a summary line.

Exit status: 0 done; 1 the exchange could not be read (the line says where to resume); 2 bad arguments.
"""

from __future__ import annotations

import json
import time

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Arm exchange-held protection for every ACTIVE operation that lacks it (batched, resumable)."

    def add_arguments(self, parser):
        parser.add_argument("--batch", type=int, default=200, help="operations per batch (default 200)")
        parser.add_argument("--after", type=int, default=0, help="resume after this operation id")
        parser.add_argument("--dry-run", action="store_true", help="report what would be done, place nothing")
        parser.add_argument("--json", action="store_true", help="JSON lines on stdout")

    def handle(self, *args, **opts):
        from django.db.models import Q

        from stopmonitor.engine.protection import ProtectionReport, protected_operations, protection_pass
        from stopmonitor.exchange.base import ClockSkew, ExchangeUnavailable, RateLimited
        from stopmonitor.exchange.factory import build_exchange

        if opts["batch"] < 1 or opts["after"] < 0:
            raise CommandError("--batch must be at least 1 and --after 0 or more", returncode=2)
        from stopmonitor.preflight import require_migrated

        require_migrated(returncode=2)  # one line, never a traceback (stopmonitor/preflight.py)
        from stopmonitor.engine.accounts import AccountClients, AccountUnavailable

        exchange = build_exchange()
        clients = AccountClients(exchange)  # each stop rests on its operation's own account (issue #20)
        started = time.monotonic()
        total = ProtectionReport()
        after, batches = opts["after"], 0
        while True:
            from api.models import Operation

            ids = list(Operation.objects.filter(status="ACTIVE", stop_price__isnull=False, pk__gt=after)
                       .filter(Q(protection__isnull=True) | Q(protection__status__in=("CANCELLED", "UNPROTECTED")))
                       .order_by("pk").values_list("pk", flat=True)[: opts["batch"]])
            if not ids:
                break
            eligible = protected_operations(exchange.venue, ids)
            wanted = [op.pk for op in eligible]
            by_account: dict = {}
            for op in eligible:
                by_account.setdefault(op.account_id, []).append(op.pk)
            report = ProtectionReport()
            try:
                for account_id, op_ids in by_account.items():
                    part = protection_pass(clients.for_account(account_id), now=exchange.clock(), source="manual",
                                           operation_ids=op_ids, dry_run=opts["dry_run"])
                    report.add(part)
            except (RateLimited, ExchangeUnavailable, ClockSkew, AccountUnavailable) as exc:
                raise CommandError(f"exchange unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                                   f"resume with --after {after}", returncode=1) from None
            batches += 1
            after = ids[-1]
            total.add(report, lines=False)
            planned = sum(1 for line in report.lines if line["action"] == "would_arm")
            line = {"type": "batch", "batch": batches, "operations": len(ids), "eligible": len(wanted),
                    "armed": report.armed, "would_arm": planned, "unprotected": report.unprotected,
                    "requests": report.requests, "last_id": after}
            self.stdout.write(json.dumps(line) if opts["json"] else
                              f"batch {batches}: {len(ids)} operations ({len(wanted)} with protection on): "
                              f"{report.armed} armed, {planned} would arm, {report.unprotected} unprotected "
                              f"(reason in their events); {report.requests} requests; resume with --after {after}")
        clients.close()
        summary = {"type": "summary", "batches": batches, "armed": total.armed, "unprotected": total.unprotected,
                   "requests": total.requests, "weight": total.weight, "dry_run": opts["dry_run"], "last_id": after,
                   "duration_s": round(time.monotonic() - started, 3)}
        self.stdout.write(json.dumps(summary) if opts["json"] else
                          f"{total.armed} armed, {total.unprotected} unprotected in {batches} batches "
                          f"({total.requests} requests, weight {total.weight}){' (dry run)' if opts['dry_run'] else ''}")
