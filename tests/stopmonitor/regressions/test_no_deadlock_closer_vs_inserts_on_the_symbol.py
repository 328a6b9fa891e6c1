"""FIXED: a closer's row lock deadlocked with an operation being opened on the same symbol (found by a
load test of the API: 266 of 600 requests at 40 clients on one symbol answered 500 "deadlock detected").

Every writer locks its operation with its symbol (``lock_operation``). ``open_operation`` inserts the
operation, takes the append lock and commits; the operation's foreign key to its symbol is checked at
COMMIT (deferred), which takes ``FOR KEY SHARE`` on the symbol row while the append lock is held. A
closer that had locked the symbol ``FOR UPDATE`` and then waited for the append lock closed the cycle:
the opener waited for the closer's row lock, the closer for the opener's append lock. ``FOR NO KEY
UPDATE`` does not conflict with ``FOR KEY SHARE``: the opener commits and the closer goes on. Closers
of one symbol still serialize on the symbol row (NO KEY UPDATE conflicts with itself)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import connection, transaction

from stopmonitor.events import APPEND_LOCK_KEY

pytestmark = [pytest.mark.django_db(transaction=True),
              pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL row locks")]

INSERT_OPERATION = ("INSERT INTO api_operation (client_id, symbol_id, side, status, quantity, closed_quantity, "
                    "stop_check_count, created_at, updated_at) VALUES (%s, %s, 'BUY', 'ACTIVE', 1, 0, 0, now(), now())")


def _dsn() -> str:
    s = connection.settings_dict
    return f"host={s['HOST'] or '127.0.0.1'} port={s['PORT'] or 5432} user={s['USER'] or 'postgres'} dbname={s['NAME']}"


def test_an_opener_committing_under_the_append_lock_and_a_closer_of_the_same_symbol_both_finish(
        open_op, tenant, symbols):
    from api.models import Operation
    from stopmonitor.engine.store import lock_operation

    btc = symbols["BTCUSDT"]
    existing = open_op()
    errors: dict[str, BaseException] = {}
    closer_locked = threading.Event()

    def closer():
        try:
            with transaction.atomic(), connection.cursor() as cur:
                lock_operation(existing.pk)                                   # the operation and its symbol
                closer_locked.set()
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])  # then appends
        except BaseException as exc:  # noqa: BLE001
            errors["closer"] = exc
        finally:
            connection.close()

    with psycopg.connect(_dsn()) as opener:
        opener.execute(INSERT_OPERATION, [tenant.pk, btc.pk])  # the foreign key is checked at COMMIT
        opener.execute("SELECT pg_advisory_xact_lock(%s)", [APPEND_LOCK_KEY])
        thread = threading.Thread(target=closer)
        thread.start()
        assert closer_locked.wait(5)
        time.sleep(0.2)  # the closer now waits for the append lock
        try:
            opener.commit()  # FOR KEY SHARE on the symbol, under the append lock
        except psycopg.Error as exc:
            errors["opener"] = exc
        thread.join(10)
    assert errors == {}
    assert Operation.objects.filter(symbol=btc).count() == 2
