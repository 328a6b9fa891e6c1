"""Backups and the restore drill for real (issue 17): our own PostgreSQL cluster (initdb in a temporary
folder, WAL archived by ``barman-cloud-wal-archive``) and a local S3-compatible server (moto's); events,
a base backup, more events, a point-in-time restore between them that the drill passes, and an
event edited as superuser that makes the drill fail and name it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy.support import BIN, free_port, listening

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
BUCKET, SERVER = "stopmonitor-backups", "test"
DESTINATION = f"s3://{BUCKET}/pg"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       # what Backblaze B2 needs with current boto3; harmless elsewhere
       "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason=f"no PostgreSQL server binaries in {PG_BIN}")]
ROOT_USER = os.geteuid() == 0


def as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if ROOT_USER else argv


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def barman_bin(tmp: Path) -> Path:
    """Where the server finds barman-cloud-wal-archive/-restore. As root the server runs as ``postgres``,
    which cannot read this virtualenv's interpreter: small wrappers run the same barman package with
    the system Python of the same minor version."""
    if not ROOT_USER:
        return BIN
    import barman

    site = Path(barman.__file__).resolve().parents[1]
    folder = tmp / "barman-bin"
    folder.mkdir()
    for name, module in (("barman-cloud-wal-archive", "cloud_walarchive"), ("barman-cloud-wal-restore", "cloud_walrestore"),
                         ("barman-cloud-restore", "cloud_restore")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec env PYTHONPATH="{site}" /usr/bin/python3 -m barman.clients.{module} "$@"\n')
        script.chmod(0o755)
    return folder


class Cluster:
    """A PostgreSQL cluster of the test's own, archiving its WAL to the bucket."""

    def __init__(self, tmp: Path, endpoint: str, tools: Path):
        self.pgdata, self.port = tmp / "source", free_port()
        self.log = tmp / "source.log"
        self.env = {**os.environ, **AWS}
        run(as_server_user([str(PG_BIN / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--no-sync"]), env=self.env)
        archive = (f"{tools}/barman-cloud-wal-archive --cloud-provider aws-s3 --endpoint-url {endpoint} "
                   f"{DESTINATION} {SERVER} %p")
        with open(self.pgdata / "postgresql.conf", "a") as fh:
            fh.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{tmp}'\n"
                     f"wal_level = replica\narchive_mode = on\narchive_command = '{archive}'\narchive_timeout = 60\n"
                     "fsync = off\nshared_buffers = 32MB\nmax_connections = 40\n")
        self.url_admin = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/stopmonitor"

    def start(self):
        run(as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "120",
                            "start"]), env=self.env, timeout=150)

    def stop(self):
        subprocess.run(as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "-w",
                                       "-t", "60", "stop"]), capture_output=True, timeout=90)

    def sql(self, statement: str, params=(), url: str | None = None):
        import psycopg

        with psycopg.connect(url or self.url, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    def archive_everything(self):
        """Switch to a new WAL segment and wait until the finished one is in the bucket."""
        segment = self.sql("SELECT pg_walfile_name(pg_switch_wal())", url=self.url_admin)[0][0]
        wait_for(lambda: (self.sql("SELECT last_archived_wal FROM pg_stat_archiver", url=self.url_admin)[0][0] or "")
                 >= segment, 120, f"WAL segment {segment} archived")


def run(argv, env=None, timeout=300, cwd=None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, (argv[:6], done.stdout[-1500:], done.stderr[-1500:])
    return done.stdout


def manage(url: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **AWS, "DATABASE_URL": url, "DEBUG": "false", "ENVIRONMENT": "development"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_operations(cluster: Cluster, n: int) -> int:
    """``n`` legacy operations, then the backfill (the one writer) appends their STOP_SET events; returns events."""
    client, symbol = cluster.sql("SELECT (SELECT id FROM api_client), (SELECT id FROM api_symbol)")[0]
    cluster.sql("INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, entry_price, stop_loss_percent, "
                "created_at, updated_at, closed_quantity, stop_check_count) SELECT %s, %s, 'BUY', 'ACTIVE', 0.5, "
                "20000 + g, 1.5, now(), now(), 0, 0 FROM generate_series(1, %s) g", (client, symbol, n))
    done = manage(cluster.url, "backfill_stop_price", "--json")
    assert done.returncode == 0, done.stderr[-1500:]
    return json.loads(done.stdout.splitlines()[-1])["updated"]


def drill(tmp: Path, tools: Path, endpoint: str, cluster: Cluster, *extra: str) -> tuple[int, dict, str]:
    metrics = tmp / "drill.prom"
    done = manage(cluster.url, "restore_drill", "--source-url", DESTINATION, "--server-name", SERVER,
                  "--endpoint-url", endpoint, "--database", "stopmonitor", "--work-dir", str(tmp / "drill"),
                  "--pg-bin", str(PG_BIN), "--barman-bin", str(tools), "--compare-with", cluster.url,
                  "--metrics-file", str(metrics), "--timeout", "600", "--json", *extra, timeout=1200)
    assert not (tmp / "drill").exists(), "the drill leaves no scratch cluster behind"
    return done.returncode, json.loads(done.stdout), metrics.read_text()


@pytest.fixture
def world():
    """moto's S3 server with an empty bucket, and a started cluster archiving to it (migrated database)."""
    yield from make_world()


def make_world():
    """The generator behind :func:`world` (``bench/bench_restore.py`` uses it too): yields
    ``(folder, barman tools folder, S3 endpoint, Cluster)``, removes everything when resumed."""
    import tempfile

    import boto3

    # a folder the server's OS user can reach (pytest's own tmp is private to root)
    tmp_path = Path(tempfile.mkdtemp(prefix="sm-backup-"))
    os.chmod(tmp_path, 0o777)
    port = free_port()
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = None
    try:
        wait_for(lambda: listening(port), 60, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items() if k.startswith("AWS_")
                                                      and k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        tools = barman_bin(tmp_path)
        cluster = Cluster(tmp_path, endpoint, tools)
        cluster.start()
        cluster.sql("CREATE DATABASE stopmonitor", url=cluster.url_admin)
        done = manage(cluster.url, "migrate", "--noinput", "-v", "0")
        assert done.returncode == 0, done.stderr[-1500:]
        cluster.sql("INSERT INTO api_client (name, created_at) VALUES ('acme', now())")
        cluster.sql("INSERT INTO api_symbol (symbol, base_asset, quote_asset, tick_size, is_active, updated_at) "
                    "VALUES ('BTCUSDT', 'BTC', 'USDT', 0.01, true, now())")
        yield tmp_path, tools, endpoint, cluster
    finally:
        if cluster is not None:
            cluster.stop()
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=30)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_point_in_time_restore_passes_the_drill_and_a_superuser_edit_fails_it(world):
    tmp, tools, endpoint, cluster = world
    before_backup = write_operations(cluster, 40)
    run([str(BIN / "barman-cloud-backup"), "--cloud-provider", "aws-s3", "--endpoint-url", endpoint,
         "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", DESTINATION, SERVER],
        env={**os.environ, **AWS}, timeout=600)
    after_backup = write_operations(cluster, 30)
    target = cluster.sql("SELECT clock_timestamp()::text")[0][0]  # after B committed, before C began
    time.sleep(2.5)
    later = write_operations(cluster, 20)
    cluster.archive_everything()
    events_at_target = cluster.sql("SELECT count(*) FROM api_stopmonitorevent WHERE created_at <= %s", (target,))[0][0]
    assert (before_backup, after_backup, later, events_at_target) == (40, 30, 20, 70)

    code, report, metrics = drill(tmp, tools, endpoint, cluster, "--target-time", target, "--commit-slack", "1")
    assert code == 0, [c for c in report["checks"] if not c["ok"]] or report
    assert {c["name"]: c["ok"] for c in report["checks"]} == {
        "restore": True, "migrations": True, "event_chains": True, "projections": True, "source": True}
    # what is there: every event up to the target (A and B), in the source's order and with its hashes;
    # what is not: none of C
    assert report["events"] == 70
    first_of_c = cluster.sql("SELECT min(sequence) FROM api_stopmonitorevent WHERE created_at > %s", (target,))[0][0]
    assert report["last_sequence"] < first_of_c
    assert cluster.sql("SELECT count(*) FROM api_stopmonitorevent WHERE sequence <= %s",
                       (report["last_sequence"],))[0][0] == 70
    assert f'stopmonitor_restore_drill_success{{server="{SERVER}"}} 1' in metrics

    # a superuser edits an event written before the base backup; the latest restore replays the edit
    edited = cluster.sql("SELECT sequence, operation_id, version FROM api_stopmonitorevent ORDER BY sequence "
                         "OFFSET 5 LIMIT 1")[0]
    cluster.sql("BEGIN; ALTER TABLE api_stopmonitorevent DISABLE TRIGGER api_stopmonitorevent_append_only; "
                "UPDATE api_stopmonitorevent SET payload = jsonb_set(payload, '{stop_price}', '\"1\"') "
                f"WHERE sequence = {edited[0]}; "
                "ALTER TABLE api_stopmonitorevent ENABLE TRIGGER api_stopmonitorevent_append_only; COMMIT")
    cluster.archive_everything()
    code, report, metrics = drill(tmp, tools, endpoint, cluster)
    assert code == 1
    checks = {c["name"]: c for c in report["checks"]}
    assert [name for name, c in checks.items() if not c["ok"]] == ["event_chains"]
    assert checks["event_chains"]["detail"].startswith(
        f"1 broken; first: hash at event sequence {edited[0]} (operation {edited[1]} version {edited[2]})")
    assert report["events"] == 90
    assert f'stopmonitor_restore_drill_success{{server="{SERVER}"}} 0' in metrics
    assert f'stopmonitor_restore_drill_check{{server="{SERVER}",check="event_chains"}} 0' in metrics


def test_daily_pg_dump_goes_off_site_and_restores(world):
    """docker/postgres/pg-dump-offsite.sh against our cluster and bucket: one .dump object that
    pg_restore reads back into a new database with the same events."""
    import boto3

    tmp, _, endpoint, cluster = world
    write_operations(cluster, 15)
    env = {**os.environ, **AWS, "PATH": f"{BIN}:{PG_BIN}:/usr/bin:/bin", "PGHOST": "127.0.0.1",
           "PGPORT": str(cluster.port), "PGUSER": "postgres", "PGDATABASE": "stopmonitor", "TMPDIR": str(tmp),
           "DUMP_DESTINATION": f"s3://{BUCKET}/dumps", "BACKUP_ENDPOINT_URL": endpoint}
    out = run(["sh", str(ROOT / "docker" / "postgres" / "pg-dump-offsite.sh")], env=env)
    line = json.loads(out.strip().splitlines()[-1])
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    (obj,) = s3.list_objects_v2(Bucket=BUCKET, Prefix="dumps/")["Contents"]
    assert line["dump"] == f"s3://{BUCKET}/{obj['Key']}" and line["bytes"] == obj["Size"] > 0
    dump = tmp / "back.dump"
    s3.download_file(BUCKET, obj["Key"], str(dump))
    cluster.sql("CREATE DATABASE restored", url=cluster.url_admin)
    run([str(PG_BIN / "pg_restore"), "--no-owner", "-d", cluster.url.replace("/stopmonitor", "/restored"), str(dump)])
    count = "SELECT count(*), sha256(string_agg(chain_hash, ''::bytea ORDER BY sequence)) FROM api_stopmonitorevent"
    assert cluster.sql(count, url=cluster.url.replace("/stopmonitor", "/restored")) == cluster.sql(count)
