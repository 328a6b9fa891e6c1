"""The ``restore_drill`` command around :func:`stopmonitor.drill.run` (stubbed: no cluster, no
bucket): its argument refusals (exit 2), the Config it builds from the options, the lines or the
JSON document it prints, the metrics file, and exit 1 when a check failed."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from stopmonitor import drill


@pytest.fixture
def pg_bin(tmp_path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "pg_ctl").touch()
    return folder


@pytest.fixture
def ran(monkeypatch):
    """Stub drill.run: records the Config, returns the report set in ``ran["report"]``."""
    seen: dict = {"report": drill.Report(ok=True, checks=[drill.Check("restore", True, "restored in 1.0 s")])}

    def run(config):
        seen["config"] = config
        return seen["report"]

    monkeypatch.setattr(drill, "run", run)
    return seen


@pytest.mark.parametrize("source", [None, "gs://bucket/prefix"])
def test_a_missing_or_non_s3_source_is_exit_2(source, monkeypatch):
    monkeypatch.delenv("BACKUP_DESTINATION", raising=False)
    args = ["--source-url", source] if source else []
    with pytest.raises(CommandError) as caught:
        call_command("restore_drill", *args)
    assert (str(caught.value), caught.value.returncode) == (
        "--source-url s3://bucket/prefix is required (or BACKUP_DESTINATION)", 2)


def test_no_pg_ctl_is_exit_2(tmp_path, ran):
    with pytest.raises(CommandError) as caught:
        call_command("restore_drill", "--source-url", "s3://b/p", "--pg-bin", str(tmp_path))
    assert (str(caught.value), caught.value.returncode) == (f"no pg_ctl in {tmp_path} (--pg-bin)", 2)
    assert "config" not in ran


def test_the_options_become_the_config_and_a_passed_drill_prints_each_check(pg_bin, tmp_path, ran):
    out = StringIO()
    call_command("restore_drill", "--source-url", "s3://b/p", "--server-name", "staging", "--pg-bin", str(pg_bin),
                 "--work-dir", str(tmp_path / "w"), "--database", "db", "--db-user", "u", "--endpoint-url", "https://e",
                 "--target-time", "2026-12-02 12:00:00+00", "--barman-bin", str(tmp_path), "--compare-with",
                 "postgres://src", "--commit-slack", "2.5", "--timeout", "60", "--keep", stdout=out)
    assert ran["config"] == drill.Config(
        source_url="s3://b/p", server_name="staging", work_dir=tmp_path / "w", database="db",
        endpoint_url="https://e", target_time="2026-12-02 12:00:00+00", pg_bin=pg_bin, barman_bin=tmp_path,
        db_user="u", compare_url="postgres://src", commit_slack_s=2.5, keep=True, timeout_s=60.0)
    assert out.getvalue() == "ok   restore: restored in 1.0 s\nrestore drill passed\n"


def test_without_barman_bin_the_config_has_none(pg_bin, ran, monkeypatch):
    monkeypatch.delenv("BARMAN_BIN", raising=False)
    call_command("restore_drill", "--source-url", "s3://b/p", "--pg-bin", str(pg_bin), stdout=StringIO())
    assert ran["config"].barman_bin is None


def test_a_failed_check_names_it_writes_the_metrics_and_exits_1(pg_bin, tmp_path, ran):
    ran["report"] = drill.Report(ok=False, checks=[drill.Check("restore", True, "restored"),
                                                   drill.Check("event_chains", False, "2 broken"),
                                                   drill.Check("projections", False, "3 differences")])
    out, metrics = StringIO(), tmp_path / "drill.prom"
    with pytest.raises(SystemExit) as exited:
        call_command("restore_drill", "--source-url", "s3://b/p", "--server-name", "staging", "--pg-bin", str(pg_bin),
                     "--metrics-file", str(metrics), stdout=out)
    assert exited.value.code == 1
    assert out.getvalue().splitlines() == ["ok   restore: restored", "FAIL event_chains: 2 broken",
                                           "FAIL projections: 3 differences",
                                           "restore drill FAILED: event_chains, projections"]
    assert 'stopmonitor_restore_drill_success{server="staging"} 0\n' in metrics.read_text()


def test_json_is_the_report_document(pg_bin, ran):
    out = StringIO()
    call_command("restore_drill", "--source-url", "s3://b/p", "--pg-bin", str(pg_bin), "--json", stdout=out)
    assert json.loads(out.getvalue()) == ran["report"].as_dict()
