"""Database sessions of long-running engine processes: reconnect before each unit of work, bound every wait.

- :func:`fresh_connection` — called by every loop (``monitor_stops --loop``, ``publish_outbox
  --loop``, the stream) before its next pass or batch: a connection the server terminated,
  or that raised, is dropped so the next query opens a new one (issue #12 item 10: after one
  terminated session, 23 of 23 passes failed while the process looked alive).
- :func:`engine_timeouts` — ``statement_timeout`` and ``lock_timeout`` on the engine's own
  connection (``ENGINE_STATEMENT_TIMEOUT_MS``, ``ENGINE_LOCK_TIMEOUT_MS``; issue #12 item 12), so
  one row held elsewhere cannot stall a pass.
- :func:`is_lock_timeout` — recognise PostgreSQL's ``lock_not_available`` (55P03) or
  ``query_canceled`` by the statement timeout (57014).
"""

from __future__ import annotations

import logging

log = logging.getLogger("stopmonitor.engine")

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"


def fresh_connection(alias: str = "default") -> bool:
    """Drop ``alias``'s connection when it is unusable (terminated, broken by an error) or
    obsolete; returns True when it was dropped. Never inside a transaction (then it does nothing)."""
    from django.db import connections

    conn = connections[alias]
    if conn.connection is None or conn.in_atomic_block:
        return False
    usable = True
    try:
        usable = conn.is_usable()
    except Exception:  # noqa: BLE001 - whatever the driver raises, the session is gone
        usable = False
    if usable and not conn.errors_occurred:
        return False
    log.warning("database connection dropped before the next unit of work; reconnecting",
                extra={"alias": alias, "usable": usable})
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead connection may raise; it is gone either way
        conn.connection = None
    return True


def engine_timeouts(alias: str = "default") -> None:
    """``SET statement_timeout`` and ``lock_timeout`` (session level) on the engine's connection,
    from ``settings.STOPMONITOR`` (PostgreSQL only). Re-applied on every new connection of this
    process through Django's ``connection_created`` signal."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    if connections[alias].vendor != "postgresql":
        return
    connection_created.connect(_apply_timeouts, dispatch_uid="stopmonitor-engine-timeouts")
    if connections[alias].connection is not None:
        _apply_timeouts(None, connections[alias])


def _apply_timeouts(sender, connection, **kwargs) -> None:
    from django.conf import settings

    if connection.vendor != "postgresql":
        return
    knobs = getattr(settings, "STOPMONITOR", {})
    lock_ms = int(knobs.get('ENGINE_LOCK_TIMEOUT_MS', 2000))
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
                       [f"{int(knobs.get('ENGINE_STATEMENT_TIMEOUT_MS', 30000))}ms", f"{lock_ms}ms"])
    connection.stopmonitor_session_lock_timeout = (connection.connection, lock_ms)


def session_lock_timeout_ms(connection) -> int | None:
    """The ``lock_timeout`` (ms) :func:`engine_timeouts` set on ``connection``'s current database
    session, or None (not set on this session: another process kind, or a new session it did not see)."""
    mark = getattr(connection, "stopmonitor_session_lock_timeout", None)
    if mark is None or connection.connection is None or mark[0] is not connection.connection:
        return None
    return mark[1]


def is_lock_timeout(exc: BaseException) -> bool:
    """True for a lock wait cut by ``lock_timeout`` (55P03) or a statement cut by ``statement_timeout`` (57014)."""
    seen = exc
    while seen is not None:
        if getattr(seen, "sqlstate", None) in (LOCK_NOT_AVAILABLE, QUERY_CANCELED):
            return True
        seen = seen.__cause__ or seen.__context__
        if seen is exc:
            break
    return False
