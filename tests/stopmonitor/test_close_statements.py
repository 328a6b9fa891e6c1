"""The close's statements before its order, on PostgreSQL (issue #15: quote-to-order latency is
mostly the Python and the round trips of these two transactions). Counted exactly, so that a
statement added to the path is a decision, not an accident; and the store's hand-written reads
give what the ORM gives."""

from __future__ import annotations


import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from stopmonitor.engine import store
from stopmonitor.engine.context import EngineContext
from stopmonitor.engine.monitor import evaluate_quotes

from .conftest import NOW
from .regressions.helpers import ENGINE

pytestmark = pytest.mark.django_db(transaction=True)


def _transactions(queries):
    """The captured statements split at BEGIN/COMMIT: ``[[statement, …], …]`` (outside ones dropped)."""
    out, current = [], None
    for q in queries:
        sql = q["sql"]
        if sql == "BEGIN":
            current = []
        elif sql == "COMMIT":
            out.append(current)
            current = None
        elif current is not None:
            current.append(sql)
    return out


@pytest.fixture
def engine_sessions():
    """The session settings monitor_stops gives its connections (engine_timeouts)."""
    from django.db.backends.signals import connection_created

    from stopmonitor.dbhealth import engine_timeouts

    engine_timeouts()
    yield
    connection_created.disconnect(dispatch_uid="stopmonitor-engine-timeouts")
    with connection.cursor() as cursor:
        cursor.execute("RESET lock_timeout; RESET statement_timeout")
    connection.stopmonitor_session_lock_timeout = None


def test_a_stream_close_runs_its_two_transactions_in_a_fixed_number_of_statements(open_op, without_protection,
                                                                                  engine_sessions):
    """A long's close (tracked balances, another long on the asset, the symbol's breaker row made by
    an earlier close): 12 statements in the trigger's transaction, 10 in the submission's, none a
    savepoint. Each one is a round trip and, through the ORM, ~1 ms of Python on a slow core."""
    from dataclasses import replace
    from decimal import Decimal as D

    from stopmonitor.exchange.paper import PaperExchange

    paper = PaperExchange(balances={"BTC": D("2"), "USDT": D("0")}, now=NOW)
    op = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    open_op("BTCUSDT", "BUY", "0.25", entry="9300", stop="9000")  # its coins are not sold
    paper.set_quote("BTCUSDT", "9199.50", "9199.51", bid_qty="10")
    quotes = {s: replace(q, observed_at=NOW) for s, q in paper.quotes.items()}
    with transaction.atomic():
        store.breaker("BTCUSDT", lock=True)
    watched = [w for w in store.load_watched("paper") if w.operation_id == op.pk]
    ctx = EngineContext.build(paper, source="stream", now=NOW, engine=ENGINE)
    with CaptureQueriesContext(connection) as captured:
        evaluate_quotes(paper, watched, quotes, ctx)
    trigger, submit = _transactions(captured.captured_queries)[:2]

    assert [r.quantity for r in paper.order_requests] == [D("0.5")]
    assert not any("SAVEPOINT" in s or "set_config('lock_timeout'" in s for s in trigger + submit)
    assert len(trigger) == 12, "\n".join(trigger)
    assert len(submit) == 10, "\n".join(submit)
    assert trigger[0].startswith('SELECT o."id"') and trigger[0].endswith("FOR NO KEY UPDATE")  # the row lock first


def test_a_symbols_first_close_creates_its_breaker_row_without_a_savepoint(tenant):
    from api.models import CircuitBreakerState, TenantConfig

    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        row = store.breaker("NEWUSDT", lock=True)
    again_queries = CaptureQueriesContext(connection)
    with again_queries, transaction.atomic():
        again = store.breaker("NEWUSDT", lock=True)

    statements = [q["sql"] for q in captured.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]
    assert [s.split()[0] for s in statements] == ["SELECT", "INSERT", "SELECT"]
    assert "ON CONFLICT DO NOTHING" in statements[1]
    stored = CircuitBreakerState.objects.get(symbol="NEWUSDT")
    assert (row.pk, row.state, row.failure_count, row.opened_at, row.last_error) == (stored.pk, "CLOSED", 0, None, "")
    assert stored.updated_at is not None and again.pk == row.pk
    assert len([q for q in again_queries.captured_queries if q["sql"] not in ("BEGIN", "COMMIT")]) == 1
    assert store.breaker("OTHERUSDT", lock=False).pk is None  # read only: not created
    TenantConfig.objects.filter(client=tenant).delete()
    cfg = store.tenant_config(tenant.pk, lock=False)
    assert (cfg.pk, cfg.client_id, cfg.kill_switch) == (None, tenant.pk, False)
    with transaction.atomic():
        assert store.tenant_config(tenant.pk, lock=True).pk is not None  # the rate limit's mutex: created
