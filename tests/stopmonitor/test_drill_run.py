"""drill.run's sequence of checks with the scratch server and the manage.py commands faked: which
checks, in which order, with which details; a failed restore, a timeout, a source check that raises."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from stopmonitor import drill


class FakeScratch:
    def __init__(self, config, fail_restore=False):
        self.pgdata = Path(config.work_dir)
        self.fail_restore = fail_restore
        self.calls = []

    def restore(self):
        self.calls.append("restore")
        if self.fail_restore:
            raise drill.DrillError("barman-cloud-restore: no backup")

    def start(self):
        self.calls.append("start")

    def url(self):
        return "postgres://scratch/db"

    def stop(self):
        self.calls.append("stop")


def _done(args, code=0, stdout="", stderr=""):
    return subprocess.CompletedProcess(args, code, stdout, stderr)


@pytest.fixture
def world(tmp_path, monkeypatch):
    (tmp_path / "PG_VERSION").write_text("15\n")
    config = drill.Config(source_url="s3://b/p", server_name="s", work_dir=tmp_path, database="db",
                          compare_url="postgres://source/db", timeout_s=7.0)
    state = {"scratch": None, "answers": {}, "manage": []}

    def scratch(cfg):
        state["scratch"] = FakeScratch(cfg, state.get("fail_restore", False))
        return state["scratch"]

    def manage(url, *args, timeout):
        state["manage"].append((url, args, timeout))
        answer = state["answers"].get(args[0], _done(args))
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(drill, "Scratch", scratch)
    monkeypatch.setattr(drill, "_manage", manage)
    monkeypatch.setattr(drill, "check_against_source", lambda *args: drill.Check("source", True, "same"))
    return config, state, monkeypatch


def test_every_check_in_order_and_the_scratch_server_stopped(world):
    config, state, _ = world
    summary = json.dumps({"type": "summary", "events": 12, "streams": 3, "broken": 0})
    state["answers"]["verify_events"] = _done([], 0, summary + "\n")
    state["answers"]["rebuild_projections"] = _done([], 0, "projection verified: 4 rows\n")
    report = drill.run(config)
    assert [(c.name, c.ok) for c in report.checks] == [("restore", True), ("migrations", True),
                                                        ("event_chains", True), ("projections", True),
                                                        ("source", True)]
    assert report.checks[0].detail.endswith("to the end of the WAL")
    assert report.checks[1].detail == "all applied"
    assert report.checks[2].detail == "12 events in 3 streams verify"
    assert report.checks[3].detail == "projection verified: 4 rows"
    assert report.ok and report.events == 12 and report.backup_bytes == 3
    assert [args for _, args, _ in state["manage"]] == [("migrate", "--check", "--noinput"),
                                                         ("verify_events", "--json"),
                                                         ("rebuild_projections", "--verify")]
    assert {(url, timeout) for url, _, timeout in state["manage"]} == {("postgres://scratch/db", 7.0)}
    assert state["scratch"].calls == ["restore", "start", "stop"]


def test_a_broken_chain_names_its_first_break(world):
    config, state, _ = world
    broken = json.dumps({"type": "broken", "kind": "hash", "sequence": 5, "operation_id": 2, "version": 3,
                         "detail": "changed"})
    summary = json.dumps({"type": "summary", "events": 9, "streams": 2, "broken": 1})
    state["answers"]["verify_events"] = _done([], 1, f"{broken}\n{summary}\n")
    state["answers"]["migrate"] = _done([], 1, "", "  unapplied   migration\nmore\n")
    report = drill.run(config)
    checks = {c.name: c for c in report.checks}
    assert checks["migrations"].detail == "unapplied migration" and not checks["migrations"].ok
    assert checks["event_chains"].detail == ("1 broken; first: hash at event sequence 5 (operation 2 version 3): "
                                             "changed")
    assert not report.ok


def test_a_failed_restore_is_the_only_check(world):
    config, state, _ = world
    state["fail_restore"] = True
    report = drill.run(config)
    assert [(c.name, c.ok, c.detail) for c in report.checks] == [("restore", False, "barman-cloud-restore: no backup")]
    assert not report.ok and state["manage"] == [] and state["scratch"].calls == ["restore", "stop"]


def test_a_command_that_does_not_answer_ends_the_drill(world):
    config, state, _ = world
    state["answers"]["verify_events"] = subprocess.TimeoutExpired(["python", "manage.py", "verify_events"], 7)
    report = drill.run(config)
    assert [(c.name, c.ok) for c in report.checks] == [("restore", True), ("migrations", True), ("timeout", False)]
    assert report.checks[-1].detail == "verify_events: no answer"
    assert state["scratch"].calls[-1] == "stop" and report.verify_s == 0.0


def test_a_source_check_that_cannot_run_fails(world):
    config, state, monkeypatch = world

    def unreachable(*args):
        raise OSError("connection\n  refused")

    monkeypatch.setattr(drill, "check_against_source", unreachable)
    report = drill.run(config)
    assert (report.checks[-1].name, report.checks[-1].ok, report.checks[-1].detail) == \
        ("source", False, "OSError: connection refused")
