"""The restore drill's guards and its metric file, without a cluster (the real drill:
tests/deploy/test_backup_restore.py)."""

from __future__ import annotations

from pathlib import Path

from stopmonitor import drill


def test_a_non_empty_folder_that_is_not_a_drill_is_never_removed(tmp_path):
    keep = tmp_path / "important"
    keep.mkdir()
    (keep / "file.txt").write_text("mine")
    config = drill.Config(source_url="s3://b/p", server_name="s", work_dir=keep, database="d")
    report = drill.run(config)
    assert not report.ok
    assert [(c.name, c.ok) for c in report.checks] == [("restore", False)]
    assert "is not empty and not a previous drill's" in report.checks[0].detail
    assert (keep / "file.txt").read_text() == "mine"


def test_metrics_file_says_failed_and_which_check(tmp_path):
    report = drill.Report(ok=False, checks=[drill.Check("restore", True, ""), drill.Check("event_chains", False, "x")],
                          restore_s=12.5, verify_s=3.0, events=90)
    config = drill.Config(source_url="s3://b/p", server_name="staging", work_dir=Path("/nonexistent"), database="d")
    path = tmp_path / "m" / "drill.prom"
    drill.write_metrics(path, report, config, now=1_800_000_000)
    text = path.read_text()
    assert 'stopmonitor_restore_drill_success{server="staging"} 0\n' in text
    assert 'stopmonitor_restore_drill_check{server="staging",check="event_chains"} 0\n' in text
    assert 'stopmonitor_restore_drill_check{server="staging",check="restore"} 1\n' in text
    assert 'stopmonitor_restore_drill_events{server="staging"} 90\n' in text
    assert "last_success" not in text  # only a passing drill moves the last-success time
