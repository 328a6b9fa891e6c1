"""``python manage.py restore_drill``: restore the latest base backup (or a point in time) and prove it.

Restores with barman-cloud into a scratch cluster under ``--work-dir`` (PostgreSQL binaries of the
source's major version from ``--pg-bin``), then checks migrations, ``verify_events``,
``rebuild_projections --verify`` and, with ``--compare-with`` (the source database URL), that the
restored events are the source's up to the restored last sequence and none older than the target
is missing (:mod:`stopmonitor.drill`). The scratch cluster is stopped and removed at the end.

Bucket credentials come from the environment as for barman-cloud (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; Backblaze B2 also needs
``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and ``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required``).

Output: one line per check (``ok``/``FAIL`` name: detail), then a summary; ``--json``: one JSON
document. ``--metrics-file`` writes a Prometheus textfile (``stopmonitor_restore_drill_success`` …).
Exit status: 0 every check passed; 1 a check failed (the restore included); 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Restore the latest base backup (or --target-time) into a scratch cluster and verify it; exit 1 on any failure."

    def add_arguments(self, parser):
        env = os.environ.get
        parser.add_argument("--source-url", default=env("BACKUP_DESTINATION"),
                            help="barman-cloud destination, s3://bucket/prefix (env BACKUP_DESTINATION)")
        parser.add_argument("--server-name", default=env("BACKUP_SERVER_NAME", "stopmonitor"),
                            help="barman server name (env BACKUP_SERVER_NAME; default stopmonitor)")
        parser.add_argument("--endpoint-url", default=env("BACKUP_ENDPOINT_URL"),
                            help="S3-compatible endpoint (env BACKUP_ENDPOINT_URL), e.g. Backblaze B2's")
        parser.add_argument("--target-time", default=None,
                            help="recover to this time (e.g. '2026-12-02 12:00:00+00'); default: the end of the WAL")
        parser.add_argument("--database", default=env("RESTORE_DRILL_DATABASE", "stopmonitor"),
                            help="database of the restored cluster to check (env RESTORE_DRILL_DATABASE)")
        parser.add_argument("--db-user", default=env("RESTORE_DRILL_DB_USER", "postgres"),
                            help="role of the restored cluster to check as: its bootstrap superuser")
        parser.add_argument("--work-dir", default=env("RESTORE_DRILL_WORK_DIR", "/tmp/restore-drill"),
                            help="scratch folder (removed at the end): needs room for the whole database")
        parser.add_argument("--pg-bin", default=env("PG_BIN", "/usr/lib/postgresql/15/bin"),
                            help="PostgreSQL server binaries of the source's major version")
        parser.add_argument("--barman-bin", default=env("BARMAN_BIN"),
                            help="folder of barman-cloud-* (default: beside this Python, then PATH)")
        parser.add_argument("--compare-with", default=env("RESTORE_DRILL_SOURCE_URL"),
                            help="the source database URL: compare counts and chain hashes with it")
        parser.add_argument("--commit-slack", type=float, default=5.0,
                            help="seconds between an event's created_at and its commit tolerated at the target")
        parser.add_argument("--metrics-file", default=env("RESTORE_DRILL_METRICS_FILE"),
                            help="write a Prometheus textfile here (env RESTORE_DRILL_METRICS_FILE)")
        parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for each step (default 1800)")
        parser.add_argument("--keep", action="store_true", help="keep the scratch cluster's folder (stopped)")
        parser.add_argument("--json", action="store_true", help="one JSON document on stdout")

    def handle(self, *args, **opts):
        from stopmonitor import drill

        config = _drill_config(opts)
        report = drill.run(config)
        if opts["metrics_file"]:
            drill.write_metrics(Path(opts["metrics_file"]), report, config, time.time())
        if opts["json"]:
            self.stdout.write(json.dumps(report.as_dict()))
        else:
            self._write_checks(report)
        if not report.ok:
            sys.stdout.flush()
            sys.exit(1)

    def _write_checks(self, report) -> None:
        """One ``ok``/``FAIL`` line per check, then the verdict naming the failed checks."""
        for c in report.checks:
            self.stdout.write(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        failed = [c.name for c in report.checks if not c.ok]
        self.stdout.write("restore drill passed" if report.ok else f"restore drill FAILED: {', '.join(failed)}")


def _drill_config(opts: dict):
    """The :class:`stopmonitor.drill.Config` of the options; :class:`CommandError` (exit 2) without
    an ``s3://`` source or without ``pg_ctl`` in ``--pg-bin``."""
    from stopmonitor import drill

    if not opts["source_url"] or not opts["source_url"].startswith("s3://"):
        raise CommandError("--source-url s3://bucket/prefix is required (or BACKUP_DESTINATION)", returncode=2)
    config = drill.Config(
        source_url=opts["source_url"], server_name=opts["server_name"], work_dir=Path(opts["work_dir"]),
        database=opts["database"], endpoint_url=opts["endpoint_url"], target_time=opts["target_time"],
        pg_bin=Path(opts["pg_bin"]), barman_bin=Path(opts["barman_bin"]) if opts["barman_bin"] else None,
        db_user=opts["db_user"], compare_url=opts["compare_with"], commit_slack_s=opts["commit_slack"],
        keep=opts["keep"], timeout_s=opts["timeout"])
    if not (config.pg_bin / "pg_ctl").exists():
        raise CommandError(f"no pg_ctl in {config.pg_bin} (--pg-bin)", returncode=2)
    return config
