"""The stream's poll of the watched set reads only the symbols whose watched rows changed
(fingerprints computed by PostgreSQL over the pass's own query), and a symbol whose book entry
the stream changed itself (a dropped close) is read again at the next poll."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from django.db import connection

from api.models import Operation
from stopmonitor.engine import store
from stopmonitor.stream.runner import StreamConfig, StreamMonitor

pytestmark = pytest.mark.django_db

needs_postgres = pytest.mark.skipif(connection.vendor != "postgresql", reason="fingerprints are PostgreSQL's")


class Venue:
    venue = "paper"


@pytest.fixture
def monitor(settings):
    settings.EXCHANGE_VENUE = "paper"
    m = StreamMonitor(lambda: Venue(), StreamConfig(stream_url="ws://unused"))
    m._spawn = lambda coro: coro.close()  # no subscriptions, REST reads or filter warm-ups here

    async def inline(fn, *args, **kwargs):  # the worker thread's job, in this thread (the test's transaction)
        return fn(None, *args, **kwargs)

    m._in_thread = inline
    return m


def poll(m):
    """One poll, driven without an event loop: the job runs inline in this thread and context
    (the test's connection and transaction), so the coroutine finishes without suspending."""
    coro = m._poll_once()
    with pytest.raises(StopIteration):
        coro.send(None)


def stops(m, symbol):
    return sorted((w.operation_id, w.stop_price) for w in m.book.by_symbol[symbol].operations)


@needs_postgres
def test_fingerprints_change_only_for_the_symbol_whose_watched_rows_changed(open_op, settings):
    settings.EXCHANGE_VENUE = "paper"
    btc = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    open_op("ETHUSDT", "BUY", "1", entry="300", stop="290")
    before = store.watched_fingerprints()
    assert set(before) == {"BTCUSDT", "ETHUSDT"} and store.watched_fingerprints() == before

    Operation.objects.filter(pk=btc.pk).update(stop_price=D("9210"))
    moved = store.watched_fingerprints()
    assert [s for s in before if moved[s] != before[s]] == ["BTCUSDT"]

    Operation.objects.filter(pk=btc.pk).update(status="CLOSING")
    assert set(store.watched_fingerprints()) == {"ETHUSDT"}  # no watched row left on BTCUSDT


@needs_postgres
def test_a_poll_reads_only_what_changed_and_the_book_follows(monitor, open_op, django_assert_max_num_queries):
    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    b = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9000")
    e = open_op("ETHUSDT", "BUY", "1", entry="300", stop="290")
    poll(monitor)  # the first read: everything
    assert stops(monitor, "BTCUSDT") == [(a.pk, D("9200")), (b.pk, D("9000"))]
    assert stops(monitor, "ETHUSDT") == [(e.pk, D("290"))]

    assert monitor._read_watched(set())[1:] == (set(), [])  # nothing changed: nothing loaded
    with django_assert_max_num_queries(1):
        poll(monitor)  # the fingerprints only

    Operation.objects.filter(pk=a.pk).update(stop_price=D("9250"))
    fingerprints, symbols, watched = monitor._read_watched(set())
    assert symbols == {"BTCUSDT"} and sorted(w.operation_id for w in watched) == [a.pk, b.pk]
    poll(monitor)
    assert stops(monitor, "BTCUSDT") == [(a.pk, D("9200") + 50), (b.pk, D("9000"))]

    Operation.objects.filter(pk=e.pk).update(status="CLOSED")
    poll(monitor)
    assert monitor.book.symbols == {"BTCUSDT"}


@needs_postgres
def test_an_operation_dropped_from_the_book_comes_back_when_it_is_active_again(monitor, open_op):
    """The stream drops an operation it saw NOT_ACTIVE (another process closing it); when that
    close fails and the operation is ACTIVE again with the same levels, the database's fingerprint
    equals the one last read: only the dirty mark makes the next poll read the symbol again."""
    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    poll(monitor)
    monitor.book.drop({a.pk})
    monitor._dirty.add("BTCUSDT")  # what _evaluate does with a NOT_ACTIVE decision
    assert "BTCUSDT" not in monitor.book.symbols

    poll(monitor)

    assert stops(monitor, "BTCUSDT") == [(a.pk, D("9200"))]
    assert monitor._dirty == set()


def test_without_fingerprints_every_poll_reads_everything(monitor, open_op, monkeypatch):
    from stopmonitor.stream import engine_port as port

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    monkeypatch.setattr(port, "watched_fingerprints", lambda: None)  # SQLite
    poll(monitor)
    Operation.objects.filter(pk=a.pk).update(stop_price=D("9250"))
    assert monitor._read_watched(set())[1] is None
    poll(monitor)
    assert stops(monitor, "BTCUSDT") == [(a.pk, D("9250"))]


def test_the_streams_connections_are_persistent_and_prepare_their_statements_on_postgresql(settings):
    """STREAM_PREPARE_THRESHOLD (5) becomes psycopg's prepare_threshold on PostgreSQL; 0 leaves it off."""
    import copy

    from django.db import connections

    from stopmonitor.stream.command import persistent_connections

    saved = (copy.deepcopy(settings.DATABASES["default"]), copy.deepcopy(connections.settings["default"]))
    try:
        settings.STREAM = {**settings.STREAM, "PREPARE_THRESHOLD": 5}
        persistent_connections()
        conf = connections.settings["default"]
        assert (conf["CONN_MAX_AGE"], conf["CONN_HEALTH_CHECKS"]) == (None, True)
        postgres = conf["ENGINE"] == "django.db.backends.postgresql"
        assert conf.get("OPTIONS", {}).get("prepare_threshold") == (5 if postgres else None)
        conf.get("OPTIONS", {}).pop("prepare_threshold", None)
        settings.STREAM = {**settings.STREAM, "PREPARE_THRESHOLD": 0}
        persistent_connections()
        assert "prepare_threshold" not in conf.get("OPTIONS", {})
    finally:
        for live, old in zip((settings.DATABASES["default"], connections.settings["default"]), saved):
            live.clear()
            live.update(old)


def _from_another_connection(fn):
    """Run ``fn`` in a thread of its own (its own connection, committed at once), and wait for it."""
    import threading

    from django.db import connections

    def run():
        try:
            fn()
        finally:
            connections.close_all()

    t = threading.Thread(target=run)
    t.start()
    t.join()


@needs_postgres
@pytest.mark.django_db(transaction=True)
def test_a_change_committed_between_the_fingerprints_and_the_load_is_not_lost(monitor, open_op, monkeypatch):
    """The fingerprints and the load of the changed symbols are one snapshot: a close in flight
    elsewhere (ACTIVE -> CLOSING) committed between the two reads and released (-> ACTIVE, same
    levels) before the next poll must not leave the operation out of the book with the
    fingerprint of a read that had it (the next poll then sees nothing changed, for ever)."""
    from stopmonitor.stream import engine_port as port

    a = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9200")
    poll(monitor)
    b = open_op("BTCUSDT", "BUY", "0.5", entry="9300", stop="9000")  # BTCUSDT's fingerprint changes
    real_load = port.load_watched

    def load_after_a_close_started(symbols=None):
        _from_another_connection(lambda: Operation.objects.filter(pk=a.pk).update(status="CLOSING"))
        return real_load(symbols)

    monkeypatch.setattr(port, "load_watched", load_after_a_close_started)
    poll(monitor)
    monkeypatch.setattr(port, "load_watched", real_load)
    Operation.objects.filter(pk=a.pk).update(status="ACTIVE")  # the close failed: released, same levels

    poll(monitor)
    poll(monitor)

    assert stops(monitor, "BTCUSDT") == [(a.pk, D("9200")), (b.pk, D("9000"))]
