"""Long-running loops reconnect after the server terminated their session; engine connections bound
their lock waits (issue #12 items 10 and 12)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import OperationalError, connection, transaction

from stopmonitor.dbhealth import engine_timeouts, fresh_connection, is_lock_timeout

pytestmark = pytest.mark.django_db(transaction=True)


def _dsn() -> str:
    s = connection.settings_dict
    return f"host={s['HOST'] or '127.0.0.1'} port={s['PORT'] or 5432} dbname={s['NAME']} user={s['USER']}"


def _terminate(pid: int) -> None:
    with psycopg.connect(_dsn(), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


def test_a_terminated_session_is_dropped_and_the_next_unit_of_work_reconnects():
    assert one() == 1
    old_pid = connection.connection.info.backend_pid
    _terminate(old_pid)
    with pytest.raises(OperationalError):
        one()  # what every later pass saw before

    assert fresh_connection() is True
    assert one() == 1
    assert connection.connection.info.backend_pid != old_pid
    assert fresh_connection() is False  # a healthy connection is kept


def test_a_row_lock_held_elsewhere_is_waited_for_at_most_the_lock_timeout(settings, open_op):
    settings.STOPMONITOR = {**settings.STOPMONITOR, "ENGINE_LOCK_TIMEOUT_MS": 300}
    op = open_op()
    held, release = threading.Event(), threading.Event()

    def hold():
        with psycopg.connect(_dsn()) as other:
            other.execute("SELECT id FROM api_operation WHERE id = %s FOR UPDATE", [op.pk])
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    engine_timeouts()
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError) as info, transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT id FROM api_operation WHERE id = %s FOR UPDATE", [op.pk])
    finally:
        release.set()
        t.join()
        from django.db.backends.signals import connection_created

        connection_created.disconnect(dispatch_uid="stopmonitor-engine-timeouts")
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout; RESET statement_timeout")
        connection.stopmonitor_session_lock_timeout = None
    waited = time.monotonic() - started

    assert is_lock_timeout(info.value)
    assert waited < 2.0


def test_lock_operation_sets_the_lock_timeout_only_where_the_session_does_not_have_it(settings, open_op):
    """monitor_stops sets ENGINE_LOCK_TIMEOUT_MS on its sessions (engine_timeouts): the close's
    transactions then skip their SET LOCAL (a statement fewer before the order); any other session
    (the API's, a shell's) or another value still gets it in the transaction."""
    from django.test.utils import CaptureQueriesContext

    from stopmonitor.dbhealth import session_lock_timeout_ms
    from stopmonitor.engine.store import lock_operation

    settings.STOPMONITOR = {**settings.STOPMONITOR, "ENGINE_LOCK_TIMEOUT_MS": 700}
    op = open_op()

    def statements():
        with CaptureQueriesContext(connection) as ctx, transaction.atomic():
            lock_operation(op.pk)
            with connection.cursor() as cursor:
                cursor.execute("SHOW lock_timeout")
                shown = cursor.fetchone()[0]
        return [q["sql"] for q in ctx.captured_queries if "lock_timeout" in q["sql"]], shown

    assert session_lock_timeout_ms(connection) is None
    assert statements() == (["SELECT set_config('lock_timeout', '700ms', true)", "SHOW lock_timeout"], "700ms")
    engine_timeouts()
    try:
        assert session_lock_timeout_ms(connection) == 700
        assert statements() == (["SHOW lock_timeout"], "700ms")  # the session's own
        settings.STOPMONITOR = {**settings.STOPMONITOR, "ENGINE_LOCK_TIMEOUT_MS": 900}
        assert statements() == (["SELECT set_config('lock_timeout', '900ms', true)", "SHOW lock_timeout"], "900ms")
    finally:
        from django.db.backends.signals import connection_created

        connection_created.disconnect(dispatch_uid="stopmonitor-engine-timeouts")
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout; RESET statement_timeout")
        connection.stopmonitor_session_lock_timeout = None
