"""``python manage.py setup_roles``: create and grant the owner and runtime database roles (idempotent).

Applies :mod:`stopmonitor.roles` on the database of ``DATABASE_URL``: once as a role with
CREATEROLE (the cluster's bootstrap user) with ``--create`` to make the roles (passwords from the
environment variables named by ``--owner-password-env`` / ``--runtime-password-env``) and hand
the schema's objects to the owner; then, after every ``migrate``, as the owner (the migrate Job) to
re-grant the runtime role exactly the policy. ``--check`` only reports (exit 1 when the runtime
role could do more than the policy allows).

Exit status: 0 applied (or the check passed); 1 the check found a problem; 2 on error (one line).
"""

from __future__ import annotations

import os

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create/grant the owner (migrations) and runtime (processes) database roles; idempotent."

    def add_arguments(self, parser):
        parser.add_argument("--owner", default=os.environ.get("DATABASE_OWNER_ROLE", "stopmonitor_owner"),
                            help="owner role name (env DATABASE_OWNER_ROLE; default stopmonitor_owner)")
        parser.add_argument("--runtime", default=os.environ.get("DATABASE_RUNTIME_ROLE", "stopmonitor_runtime"),
                            help="runtime role name (env DATABASE_RUNTIME_ROLE; default stopmonitor_runtime)")
        parser.add_argument("--create", action="store_true",
                            help="create the roles, set passwords, hand the schema's objects to the owner "
                                 "(needs CREATEROLE; the cluster's bootstrap user)")
        parser.add_argument("--owner-password-env", default="DATABASE_OWNER_PASSWORD",
                            help="environment variable holding the owner's password (with --create)")
        parser.add_argument("--runtime-password-env", default="DATABASE_RUNTIME_PASSWORD",
                            help="environment variable holding the runtime role's password (with --create)")
        parser.add_argument("--check", action="store_true",
                            help="write nothing: report what the connected role (run it as the runtime role) "
                                 "may do beyond the policy")
        parser.add_argument("--quiet", action="store_true", help="print only the summary line")

    def handle(self, *args, **opts):
        from django.db import DatabaseError, connection, transaction

        from stopmonitor import roles

        if connection.vendor != "postgresql":
            raise CommandError(f"setup_roles needs PostgreSQL (this database is {connection.vendor})", returncode=2)
        try:
            if opts["check"]:
                with connection.cursor() as cursor:
                    findings = roles.runtime_findings(cursor)
                for line in findings:
                    self.stdout.write(f"WARN {line}")
                if findings:
                    raise CommandError(f"{len(findings)} finding(s): the role may do more than the policy allows",
                                       returncode=1)
                self.stdout.write("least privilege holds for the connected role")
                return
            with transaction.atomic(), connection.cursor() as cursor:
                steps = roles.setup(cursor, owner=opts["owner"], runtime=opts["runtime"], create=opts["create"],
                                    owner_password=os.environ.get(opts["owner_password_env"]) or None,
                                    runtime_password=os.environ.get(opts["runtime_password_env"]) or None)
        except ValueError as exc:
            raise CommandError(str(exc), returncode=2) from None
        except DatabaseError as exc:
            raise CommandError(f"database error: {' '.join(str(exc).split())[:300]}", returncode=2) from None
        if not opts["quiet"]:
            for step in steps:
                self.stdout.write(step.sql)
        self.stdout.write(f"roles applied: owner {opts['owner']}, runtime {opts['runtime']} ({len(steps)} statements)")
