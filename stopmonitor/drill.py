"""The restore drill: restore a base backup (the latest, or to a point in time) into a scratch cluster, then prove it.

Steps (:func:`run`): ``barman-cloud-restore`` the base backup barman picks for the target
(``auto``) into ``work_dir/pgdata``; configure the copy as a private scratch server (Unix socket in
``work_dir`` only, ``pg_hba`` trust for that socket, **archiving off** so it never writes into the
bucket, ``restore_command`` = ``barman-cloud-wal-restore``, the recovery target, promote at the
end); start it with ``pg_ctl`` and wait until recovery is done; run the checks; stop it and remove
``work_dir`` (unless ``keep``). The checks, each a child ``manage.py`` against the restored database
(so they are the very commands an operator runs):

- ``migrations``: ``migrate --check`` (every migration of this code is applied);
- ``event_chains``: ``verify_events`` (chains, versions, global links; names the first broken link);
- ``projections``: ``rebuild_projections --verify``;
- ``source``: with a source database, the restored events are exactly the source's events up to the
  restored last sequence (same count and same chain hashes, compared by digest), and no source event
  created before ``target − commit_slack`` is missing (what a point-in-time restore promised).

Everything external is a child process whose exit status decides; a check that cannot run fails.
The result is a :class:`Report` (JSON-ready) and, with ``metrics_file``, a Prometheus textfile.
"""

from __future__ import annotations

from urllib.parse import quote

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    """Where the backups are and how to run the scratch server (see the ``restore_drill`` command)."""

    source_url: str  # s3://bucket/prefix of barman-cloud
    server_name: str
    work_dir: Path
    database: str
    endpoint_url: str | None = None
    target_time: str | None = None  # PostgreSQL timestamp with time zone; None: the end of the archived WAL
    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    barman_bin: Path | None = None  # folder of the barman-cloud-* scripts; None: beside sys.executable, then PATH
    db_user: str = "postgres"  # a role of the restored cluster to check as (its bootstrap superuser)
    compare_url: str | None = None  # the source database (libpq URL), for the counts and hashes
    commit_slack_s: float = 5.0
    run_as: str | None = None  # OS user for the server when the drill runs as root (PostgreSQL refuses root)
    keep: bool = False
    timeout_s: float = 1800.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    ok: bool = False
    checks: list = field(default_factory=list)
    restore_s: float = 0.0
    verify_s: float = 0.0
    events: int | None = None
    last_sequence: int | None = None
    backup_bytes: int | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "checks": [asdict(c) for c in self.checks]}


class DrillError(Exception):
    """The restore itself failed (one line: which step, its last output)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(config: Config, name: str) -> str:
    if config.barman_bin is not None:
        return str(config.barman_bin / name)
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _as_server_user(config: Config, argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", config.run_as or "postgres", "--", *argv]
    return argv


def _run(argv: list[str], *, step: str, timeout: float, env: dict | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise DrillError(f"{step}: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise DrillError(f"{step}: {exc}") from None
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).split())[-400:]
        raise DrillError(f"{step}: exit {done.returncode}: {tail}")
    return done.stdout


def _cloud_args(config: Config) -> list[str]:
    args = ["--cloud-provider", "aws-s3"]
    if config.endpoint_url:
        args += ["--endpoint-url", config.endpoint_url]
    return args


class Scratch:
    """The restored copy: ``pgdata`` under ``work_dir``, a server on a Unix socket there."""

    def __init__(self, config: Config):
        self.config = config
        self.pgdata = config.work_dir / "pgdata"
        self.socket_dir = config.work_dir / "socket"
        self.log = config.work_dir / "server.log"
        self.port = _free_port()
        self.started = False
        self.created = False  # work_dir is ours to remove

    def url(self) -> str:
        # the socket directory as a %-encoded host: libpq and dj-database-url read it, and so does
        # config.env's check (a URL without a host is refused there)
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{quote(self.config.db_user, safe='')}@{host}:{self.port}/{self.config.database}"

    def restore(self) -> None:
        c = self.config
        if c.work_dir.exists():
            if any(c.work_dir.iterdir()) and not (c.work_dir / "pgdata").exists():
                raise DrillError(f"--work-dir {c.work_dir} is not empty and not a previous drill's: refusing to "
                                 f"remove it")
            shutil.rmtree(c.work_dir)
        c.work_dir.mkdir(parents=True)
        self.created = True
        self.socket_dir.mkdir()
        target = ["--target-time", c.target_time] if c.target_time else []
        _run([_tool(c, "barman-cloud-restore"), *_cloud_args(c), *target, c.source_url, c.server_name, "auto",
              str(self.pgdata)], step="barman-cloud-restore", timeout=c.timeout_s)
        for name in ("postmaster.pid", "standby.signal"):
            (self.pgdata / name).unlink(missing_ok=True)
        restore_command = " ".join([_tool(c, "barman-cloud-wal-restore"), *_cloud_args(c), c.source_url,
                                    c.server_name, "%f", "%p"])
        settings = {
            "listen_addresses": "",  # the Unix socket in work_dir only
            "unix_socket_directories": str(self.socket_dir),
            "archive_mode": "off",  # never archive the scratch copy's WAL into the real bucket
            "archive_command": "",
            "restore_command": restore_command,
            "recovery_target_action": "promote",
            "recovery_target_timeline": "latest",
            "hot_standby": "on",
        }
        if c.target_time:
            settings["recovery_target_time"] = c.target_time
        with open(self.pgdata / "postgresql.auto.conf", "a") as fh:
            fh.write("\n# restore drill (stopmonitor.drill): a private scratch copy\n")
            for key, value in settings.items():
                fh.write(f"{key} = '{value}'\n")
        (self.pgdata / "pg_hba.conf").write_text("local all all trust\n")
        (self.pgdata / "recovery.signal").write_text("")
        os.chmod(self.pgdata, 0o700)
        if os.geteuid() == 0:
            _run(["chown", "-R", c.run_as or "postgres", str(c.work_dir)], step="chown", timeout=120)

    def start(self) -> None:
        c = self.config
        self.started = True
        _run(_as_server_user(c, [str(c.pg_bin / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log), "-w",
                                 "-t", str(int(c.timeout_s)), "-o", f"-p {self.port}", "start"]),
             step="pg_ctl start (see server.log)", timeout=c.timeout_s + 30, env=os.environ.copy())
        deadline = time.monotonic() + c.timeout_s
        import psycopg

        while True:
            try:
                with psycopg.connect(self.url().replace(f"/{c.database}?", "/postgres?"), connect_timeout=5) as conn:
                    if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                        return
            except psycopg.OperationalError:
                if not self._running():
                    raise DrillError(f"the restored server stopped during recovery: {self._log_tail()}") from None
            if time.monotonic() > deadline:
                raise DrillError(f"recovery not finished after {c.timeout_s:.0f}s: {self._log_tail()}")
            time.sleep(0.5)

    def _running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if "FATAL" in ln or "ERROR" in ln]
            return " | ".join(lines[-3:])[-500:] or "no error in server.log"
        except OSError:
            return "no server.log"

    def stop(self) -> None:
        c = self.config
        if self.started and self._running():
            subprocess.run(_as_server_user(c, [str(c.pg_bin / "pg_ctl"), "-D", str(self.pgdata), "-m", "immediate",
                                               "-w", "-t", "60", "stop"]), capture_output=True, timeout=90)
        if self.created and not c.keep:
            shutil.rmtree(c.work_dir, ignore_errors=True)


def _manage(url: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": url, "DEBUG": "false"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _first_line(done: subprocess.CompletedProcess) -> str:
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return " ".join(text[0].split())[:300] if text else f"exit {done.returncode}"


def _digest(conn, upto: int) -> tuple[int, bytes | None]:
    return conn.execute("SELECT count(*), sha256(string_agg(chain_hash, ''::bytea ORDER BY sequence)) "
                        "FROM api_stopmonitorevent WHERE sequence <= %s", [upto]).fetchone()


def check_against_source(restored_url: str, source_url: str, target_time: str | None, slack_s: float,
                         report: Report) -> Check:
    """The restored events are the source's events up to the restored last sequence (count and digest of
    their chain hashes), and no source event created before ``target − slack`` is missing."""
    import psycopg

    with psycopg.connect(restored_url) as restored, psycopg.connect(source_url) as source:
        last = restored.execute("SELECT max(sequence) FROM api_stopmonitorevent").fetchone()[0] or 0
        report.last_sequence = last
        count, digest = _digest(restored, last)
        source_count, source_digest = _digest(source, last)
        if (count, digest) != (source_count, source_digest):
            first = source.execute(
                "SELECT min(s.sequence) FROM api_stopmonitorevent s WHERE s.sequence <= %s AND s.sequence <> ALL(%s)",
                [last, [r[0] for r in restored.execute("SELECT sequence FROM api_stopmonitorevent").fetchall()]],
            ).fetchone()[0]
            return Check("source", False, f"restored {count} events up to sequence {last}, the source has "
                                          f"{source_count}" + (f"; first missing: sequence {first}" if first else
                                                               "; the chain hashes differ"))
        missing = 0
        if target_time:
            missing = source.execute(
                "SELECT count(*) FROM api_stopmonitorevent WHERE sequence > %s "
                "AND created_at <= %s::timestamptz - make_interval(secs => %s)", [last, target_time, slack_s],
            ).fetchone()[0]
        if missing:
            return Check("source", False, f"{missing} source events created before the target time "
                                          f"(−{slack_s:g}s) are not in the restored copy")
    return Check("source", True, f"{count} events, identical to the source's up to sequence {last}")


def run(config: Config) -> Report:
    """Restore, check, clean up. Never raises for a failed step: it becomes a failed check.

    Checks, in order: restore, migrations, event_chains, projections, then source (with
    ``compare_url``); a command that does not answer within ``timeout_s`` ends the drill with a
    failed ``timeout`` check. The scratch server is stopped in every case."""
    report = Report()
    scratch = Scratch(config)
    started = time.monotonic()
    try:
        if not _restore(scratch, config, report, started):
            return report
        report.backup_bytes = sum(p.stat().st_size for p in scratch.pgdata.rglob("*") if p.is_file())
        url = scratch.url()
        verify_started = time.monotonic()
        timeout = config.timeout_s
        report.checks.append(_check_migrations(url, timeout))
        report.checks.append(_check_event_chains(url, timeout, report))
        done = _manage(url, "rebuild_projections", "--verify", timeout=timeout)
        report.checks.append(Check("projections", done.returncode == 0, _first_line(done)))
        if config.compare_url:
            report.checks.append(_check_source(url, config, report))
        report.verify_s = round(time.monotonic() - verify_started, 1)
    except subprocess.TimeoutExpired as exc:
        report.checks.append(Check("timeout", False, f"{exc.cmd[2] if len(exc.cmd) > 2 else exc.cmd}: no answer"))
    finally:
        scratch.stop()
        report.ok = bool(report.checks) and all(c.ok for c in report.checks)
    return report


def _restore(scratch: Scratch, config: Config, report: Report, started: float) -> bool:
    """Restore and start the scratch server, recording the ``restore`` check and ``restore_s``
    (seconds since ``started``, a ``time.monotonic()``); False when it failed."""
    try:
        scratch.restore()
        scratch.start()
    except DrillError as exc:
        report.checks.append(Check("restore", False, str(exc)))
        return False
    report.restore_s = round(time.monotonic() - started, 1)
    report.checks.append(Check("restore", True, f"restored and recovered in {report.restore_s}s"
                               + (f" to {config.target_time}" if config.target_time else " to the end of the WAL")))
    return True


def _check_migrations(url: str, timeout: float) -> Check:
    """``migrate --check`` on the restored copy: every migration applied."""
    done = _manage(url, "migrate", "--check", "--noinput", timeout=timeout)
    return Check("migrations", done.returncode == 0, "all applied" if done.returncode == 0 else _first_line(done))


def _check_event_chains(url: str, timeout: float, report: Report) -> Check:
    """``verify_events --json`` on the restored copy; sets ``report.events`` from its summary line.
    The detail names the first broken event, or the command's first line when it failed otherwise."""
    done = _manage(url, "verify_events", "--json", timeout=timeout)
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    summary = lines[-1] if lines and lines[-1].get("type") == "summary" else {}
    report.events = summary.get("events")
    if done.returncode == 0:
        detail = f"{summary.get('events')} events in {summary.get('streams')} streams verify"
    elif lines and lines[0].get("type") == "broken":
        b = lines[0]
        detail = (f"{summary.get('broken')} broken; first: {b['kind']} at event sequence {b['sequence']} "
                  f"(operation {b['operation_id']} version {b['version']}): {b['detail']}")
    else:
        detail = _first_line(done)
    return Check("event_chains", done.returncode == 0, detail)


def _check_source(url: str, config: Config, report: Report) -> Check:
    """:func:`check_against_source`; a check that cannot run (any exception) fails with its type and message."""
    try:
        return check_against_source(url, config.compare_url, config.target_time, config.commit_slack_s, report)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run fails
        return Check("source", False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def write_metrics(path: Path, report: Report, config: Config, now: float) -> None:
    """Prometheus textfile (node-exporter textfile collector / a sidecar serving it), written atomically."""
    labels = f'server="{config.server_name}"'
    lines = [
        "# HELP stopmonitor_restore_drill_success 1 when the last restore drill passed every check, else 0.",
        "# TYPE stopmonitor_restore_drill_success gauge",
        f"stopmonitor_restore_drill_success{{{labels}}} {int(report.ok)}",
        "# HELP stopmonitor_restore_drill_check 1 per check of the last drill that passed, 0 failed.",
        "# TYPE stopmonitor_restore_drill_check gauge",
        *[f'stopmonitor_restore_drill_check{{{labels},check="{c.name}"}} {int(c.ok)}' for c in report.checks],
        "# HELP stopmonitor_restore_drill_restore_seconds Restore and recovery time of the last drill (RTO part 1).",
        "# TYPE stopmonitor_restore_drill_restore_seconds gauge",
        f"stopmonitor_restore_drill_restore_seconds{{{labels}}} {report.restore_s}",
        "# HELP stopmonitor_restore_drill_verify_seconds Checks time of the last drill (RTO part 2).",
        "# TYPE stopmonitor_restore_drill_verify_seconds gauge",
        f"stopmonitor_restore_drill_verify_seconds{{{labels}}} {report.verify_s}",
        "# HELP stopmonitor_restore_drill_events Events in the restored copy.",
        "# TYPE stopmonitor_restore_drill_events gauge",
        f"stopmonitor_restore_drill_events{{{labels}}} {report.events if report.events is not None else 'NaN'}",
        "# HELP stopmonitor_restore_drill_timestamp_seconds When the last drill finished (Unix time).",
        "# TYPE stopmonitor_restore_drill_timestamp_seconds gauge",
        f"stopmonitor_restore_drill_timestamp_seconds{{{labels}}} {now:.0f}",
    ]
    if report.ok:
        lines += ["# HELP stopmonitor_restore_drill_last_success_timestamp_seconds When a drill last passed.",
                  "# TYPE stopmonitor_restore_drill_last_success_timestamp_seconds gauge",
                  f"stopmonitor_restore_drill_last_success_timestamp_seconds{{{labels}}} {now:.0f}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
