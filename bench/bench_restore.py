"""Backups and the restore drill, measured: base backup size and time, WAL shipping delay, restore + verify.

    .venv/bin/python bench/bench_restore.py --operations 100000

Starts moto's S3 server and a PostgreSQL cluster of its own (initdb in a temporary folder, WAL
archived with barman-cloud-wal-archive; the harness of tests/deploy/test_backup_restore.py),
writes ``--operations`` legacy operations and backfills them (2 events each, through the one
writer), takes a base backup (barman-cloud-backup, gzip), writes 1000 more operations, measures how
long a finished WAL segment takes to reach the bucket (the recovery point beyond archive_timeout),
then runs ``manage.py restore_drill`` to the end of the WAL and prints its restore and check times
(the recovery time), the bucket's size, and the load average. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.deploy import test_backup_restore as harness  # noqa: E402


def bucket_bytes(endpoint: str, prefix: str) -> int:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    return sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=harness.BUCKET, Prefix=prefix)
               for o in page.get("Contents", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=100000)
    args = parser.parse_args()
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"# {os.cpu_count()} CPUs; load average {load()} at start", flush=True)
    world = harness.make_world()
    tmp, tools, endpoint, cluster = next(world)
    try:
        started = time.monotonic()
        harness.write_operations(cluster, args.operations)
        events, db_bytes = cluster.sql("SELECT (SELECT count(*) FROM api_stopmonitorevent), "
                                       "pg_database_size('stopmonitor')")[0]
        print(f"wrote {events} events in {time.monotonic() - started:.1f}s; database {db_bytes / 2**20:.0f} MB",
              flush=True)
        started = time.monotonic()
        harness.run([str(harness.BIN / "barman-cloud-backup"), "--cloud-provider", "aws-s3", "--endpoint-url", endpoint,
                     "--gzip", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", harness.DESTINATION,
                     harness.SERVER], env={**os.environ, **harness.AWS}, timeout=7200)
        base_s = time.monotonic() - started
        base = bucket_bytes(endpoint, "pg/test/base/")
        print(f"base backup {base_s:.1f}s, {base / 2**20:.1f} MB in the bucket (gzip)", flush=True)
        harness.write_operations(cluster, 1000)
        started = time.monotonic()
        cluster.archive_everything()
        print(f"WAL segment switched and archived in {time.monotonic() - started:.1f}s "
              f"(recovery point = archive_timeout 60 s + this)", flush=True)
        print(f"WAL in the bucket: {bucket_bytes(endpoint, 'pg/test/wals/') / 2**20:.1f} MB", flush=True)
        started = time.monotonic()
        code, report, _ = harness.drill(tmp, tools, endpoint, cluster)
        print(f"restore drill exit {code} in {time.monotonic() - started:.1f}s: restore {report['restore_s']}s, "
              f"checks {report['verify_s']}s, {report['events']} events, restored data folder "
              f"{(report['backup_bytes'] or 0) / 2**20:.0f} MB; " + json.dumps(
                  {c['name']: c['ok'] for c in report['checks']}), flush=True)
        print(f"# load average {load()} at the end")
    finally:
        try:
            next(world)
        except StopIteration:
            pass


if __name__ == "__main__":
    main()
