"""Bad input or a database that cannot be read: one line and an exit code that is not a finding's
(a new user's report: tracebacks from verify_events --heads and protect_operations; exit 1, the
code of "rows skipped"/"differences", from backfill_stop_price and rebuild_projections)."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError


@pytest.mark.django_db
def test_verify_events_names_a_missing_operation_and_an_unwritable_heads_file(tmp_path):
    with pytest.raises(CommandError) as missing:
        call_command("verify_events", "--operation", "999")
    assert (str(missing.value), missing.value.returncode) == ("operation 999 does not exist", 2)
    with pytest.raises(CommandError) as heads:
        call_command("verify_events", "--heads", str(tmp_path / "no" / "such" / "dir" / "x"))
    assert (str(heads.value), heads.value.returncode) == (
        f"--heads {tmp_path / 'no' / 'such' / 'dir' / 'x'}: No such file or directory", 2)


@pytest.mark.django_db
def test_verify_events_never_overwrites_a_file_that_is_not_its_heads_file(tmp_path, open_op):
    """A new user's report: run as root, ``verify_events --heads /etc/passwd`` replaced the system's
    user list. A file that is not a heads file is left as it was; a heads file is rewritten whole."""
    op = open_op()
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CommandError) as refused:
        call_command("verify_events", "--heads", str(other))
    assert (str(refused.value), refused.value.returncode) == (
        f"--heads {other}: exists and is not a heads file written by verify_events: not overwritten", 2)
    assert other.read_text() == "root:x:0:0:root:/root:/bin/bash\n"

    heads = tmp_path / "heads.json"
    call_command("verify_events", "--heads", str(heads))
    first = json.loads(heads.read_text())
    assert list(first) == [str(op.pk)] and first[str(op.pk)][0] == 1
    call_command("verify_events", "--heads", str(heads))  # its own file: rewritten
    assert json.loads(heads.read_text()) == first and sorted(p.name for p in tmp_path.iterdir()) == [
        "heads.json", "passwd"]


@pytest.mark.parametrize("command, args", [
    ("verify_events", ()), ("protect_operations", ("--dry-run",)), ("backfill_stop_price", ("--dry-run", "--json")),
    ("rebuild_projections", ("--verify",)), ("rotate_account_keys", ()),
])
def test_an_unreadable_database_is_one_line_and_exit_2(command, args, monkeypatch):
    from django.db import OperationalError

    from stopmonitor import preflight

    def unreachable(using="default"):
        raise OperationalError("connection failed: Connection refused\nIs the server running?")

    monkeypatch.setattr(preflight, "pending_migrations", unreachable)
    with pytest.raises(CommandError) as caught:
        call_command(command, *args)
    assert caught.value.returncode == 2
    assert str(caught.value).endswith("cannot be read: OperationalError: connection failed: Connection refused")


@pytest.mark.parametrize("program, reason, code", [
    ("/nonexistent/stopmonitor-no-such-program", "No such file or directory", 127),
    ("stopmonitor-no-such-program-on-path", "No such file or directory", 127),
    ("{tmp}/not-executable", "Permission denied", 126),
])
def test_doctor_then_a_command_that_cannot_be_run_is_one_line(program, reason, code, monkeypatch, tmp_path):
    """``doctor -- COMMAND`` whose COMMAND is missing or not executable: one line naming it and the
    shell's exit codes (127 not found, 126 not executable), not execvp's traceback (a new user's report)."""
    from stopmonitor.management.commands import doctor

    (tmp_path / "not-executable").write_text("#!/bin/sh\n")  # mode 0644
    program = program.format(tmp=tmp_path)
    monkeypatch.setattr(doctor, "run_checks", lambda *a, **k: [])
    with pytest.raises(CommandError) as caught:
        call_command("doctor", "--quick", "--json", "--", program, "--flag")
    assert (str(caught.value), caught.value.returncode) == (f"cannot run {program}: {reason}", code)


@pytest.mark.parametrize("wait", ["-1", "nan"])
def test_doctor_refuses_a_wait_that_is_not_a_number_of_seconds(wait, capsys):
    # a new user's report: --wait -1 was accepted silently
    with pytest.raises(SystemExit) as exited:
        call_command("doctor", "--wait", wait)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"doctor: --wait must be a number of seconds, 0 or more (got {float(wait)})\n"
