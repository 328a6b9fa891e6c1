"""The read-side commands' one-line errors once the schema check has passed: a database error
while reading, and an event sequence the fold refuses, are each one line and exit 2 (1 is a
finding for rebuild_projections --verify and verify_events). The patches are undone inside each
test: the autouse check after it (tests/stopmonitor/conftest.py) folds the events itself."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError

pytestmark = pytest.mark.django_db


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("target, args", [
    ("rebuild", ()), ("rebuild_protection", ()), ("verify", ("--verify",)), ("verify_protection", ("--verify",)),
])
def test_rebuild_projections_database_error_is_one_line_exit_2(target, args, monkeypatch):
    from stopmonitor import projections

    with monkeypatch.context() as patch, pytest.raises(CommandError) as caught:
        patch.setattr(projections, target, _raise(OperationalError("server closed\n  the connection")))
        call_command("rebuild_projections", *args)
    assert (str(caught.value), caught.value.returncode) == (
        "database error: OperationalError: server closed the connection", 2)


@pytest.mark.parametrize("args", [(), ("--verify",)])
def test_rebuild_projections_refused_fold_is_one_line_exit_2(args, monkeypatch):
    from stopmonitor import projections

    refused = _raise(ValueError("EXECUTED before STOP_TRIGGERED"))
    with monkeypatch.context() as patch, pytest.raises(CommandError) as caught:
        patch.setattr(projections, "rebuild", refused)
        patch.setattr(projections, "verify", refused)
        call_command("rebuild_projections", *args)
    assert (str(caught.value), caught.value.returncode) == ("cannot fold the events: EXECUTED before STOP_TRIGGERED", 2)


def test_rebuild_projections_names_a_missing_operation_before_folding(monkeypatch):
    from stopmonitor import projections

    with monkeypatch.context() as patch, pytest.raises(CommandError) as caught:
        patch.setattr(projections, "rebuild", _raise(AssertionError("must not fold")))
        call_command("rebuild_projections", "--operation", "999")
    assert (str(caught.value), caught.value.returncode) == ("operation 999 does not exist", 2)


def test_verify_events_database_error_is_one_line_exit_2(monkeypatch):
    from stopmonitor import integrity

    with monkeypatch.context() as patch, pytest.raises(CommandError) as caught:
        patch.setattr(integrity, "verify_store", _raise(OperationalError("gone")))
        call_command("verify_events")
    assert (str(caught.value), caught.value.returncode) == ("database error: OperationalError: gone", 2)


def test_events_database_error_while_streaming_is_one_line_exit_2(monkeypatch):
    from django.db.models.query import QuerySet

    with monkeypatch.context() as patch, pytest.raises(CommandError) as caught:
        patch.setattr(QuerySet, "iterator", _raise(OperationalError("canceling statement\ndue to timeout")))
        call_command("events")
    assert (str(caught.value), caught.value.returncode) == (
        "database error: OperationalError: canceling statement due to timeout", 2)
