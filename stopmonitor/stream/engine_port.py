"""The stream's one seam into the engine: every DB and REST use case the stream calls, by name.

The stream never re-implements the trigger rule, the guardrails or the close protocol: it
calls the engine's own functions (``stopmonitor.engine``); only this module knows where they
live. Every function here commits and may reach the network: it must be called from a worker
thread, outside any transaction, never on the event loop.
"""

from __future__ import annotations

import logging
from typing import Iterable

from django.core.exceptions import ObjectDoesNotExist
from django.db import close_old_connections, connection

from stopmonitor import metrics
from stopmonitor.engine import store
from stopmonitor.engine.close import record_outcome
from stopmonitor.engine.context import EngineContext, EngineSettings, exchange_now
from stopmonitor.engine.decisions import Decision, EngineUnavailable, PassSummary, isolated
from stopmonitor.engine.monitor import evaluate_quotes, fetch_quotes, run_pass as _run_pass
from stopmonitor.engine.reconcile import reconcile_submitted
from stopmonitor.exchange.base import OrderResult, Quote

log = logging.getLogger("stopmonitor.stream")

PassError = EngineUnavailable  # what the stream catches when the exchange or the database is unusable
Watched = store.Watched
__all__ = ["Decision", "EngineSettings", "PassError", "PassSummary", "Quote", "Watched", "exchange_now",
           "fetch_quotes"]


def _fresh_connection() -> None:
    """A worker thread's connection may have died between jobs (database restart): drop it
    (never one inside a transaction: the caller's, e.g. a test's, stays as it is)."""
    if not connection.in_atomic_block:
        close_old_connections()


def _ctx(exchange, source: str, engine: EngineSettings | None = None) -> EngineContext:
    return EngineContext.build(exchange, source=source, engine=engine)


def load_watched(symbols: Iterable[str] | None = None) -> list[Watched]:
    """Every ACTIVE operation with a stop or target (the pass's own query); only on ``symbols`` when given."""
    _fresh_connection()
    return store.load_watched(symbols=symbols)


def watched_fingerprints() -> dict[str, str] | None:
    """``{symbol: fingerprint of its watched operations}`` (None: not on this database):
    :func:`stopmonitor.engine.store.watched_fingerprints`."""
    _fresh_connection()
    return store.watched_fingerprints()


def watched_snapshot():
    """A context in which :func:`watched_fingerprints` and :func:`load_watched` read one snapshot
    (:func:`stopmonitor.engine.store.watched_snapshot`)."""
    _fresh_connection()
    return store.watched_snapshot()


def run_pass(exchange, *, source: str = "stream") -> PassSummary:
    """One whole REST pass (reconcile, then every watched symbol): the catch-up after a gap.

    Runs without the pass-level advisory lock: the stream works beside the CronJob and the
    per-operation row locks and execution claims keep one close (invariant 1). Raises
    :class:`PassError`.
    """
    _fresh_connection()
    return _run_pass(exchange, source=source, use_lock=False)


def evaluate_quote(exchange, symbol: str, quote: Quote | None, watched: Iterable[Watched], *, source: str = "stream",
                   engine: EngineSettings | None = None) -> list[Decision]:
    """One quote for the watched operations of one symbol: the pass's steps 3–5 for that subset
    (:func:`stopmonitor.engine.monitor.evaluate_quotes`), its age judged when the close is
    decided. Each decision is counted and logged like the pass's. Raises :class:`PassError`."""
    _fresh_connection()
    decisions: list[Decision] = []
    evaluate_quotes(exchange, list(watched), {symbol: quote} if quote is not None else {},
                    _ctx(exchange, source, engine), emit=decisions.append)
    return _observed(decisions, source)


def _observed(decisions: list[Decision], source: str) -> list[Decision]:
    for d in decisions:
        d.source = d.source or source
        metrics.observe_decision(d, log=True)
    return decisions


def submitted_execution(token: str) -> tuple[int, str, str] | None:
    """(operation id, symbol, status) of our execution with this client order id, or None
    when the id is not one of our closes (another bot's order, a protection order)."""
    _fresh_connection()
    try:
        execution = store.get_execution(token)
    except ObjectDoesNotExist:
        return None
    return execution.operation_id, execution.symbol, execution.status


def record_pushed_fill(exchange, token: str, result: OrderResult, *, source: str = "stream",
                       engine: EngineSettings | None = None) -> Decision | None:
    """Resolve a SUBMITTED close from the user data stream's final ``executionReport``.

    ``result`` carries the order's fills rebuilt from its trade reports (price, quantity,
    commission per trade). Idempotent: an execution already recorded (by the REST answer, a
    reconcile or an earlier report) gives a ``skipped`` decision and appends nothing. None
    when ``token`` is not one of our executions.
    """
    row = submitted_execution(token)
    if row is None:
        return None
    operation_id = row[0]
    ctx = _ctx(exchange, source, engine)
    decisions = isolated(operation_id, result.symbol, token, lambda: [record_outcome(operation_id, token, result, ctx)])
    for d in decisions:
        d.extra = {**d.extra, "pushed": True}
    return _observed(decisions, source)[0]


def reconcile_due(exchange, *, source: str = "stream", engine: EngineSettings | None = None) -> int:
    """The engine's reconcile of executions left TRIGGERED/SUBMITTED for longer than
    ``RECONCILE_AFTER_SECONDS`` (REST, by client order id, under each execution's claim): the
    truth after a user-data reconnect or a pushed report that proves nothing. Younger ones are
    left alone (Binance shows a new order late: asking too early could send it twice)."""
    _fresh_connection()
    return reconcile_submitted(exchange, _ctx(exchange, source, engine), emit=lambda d: _observed([d], source))


def protection_report(exchange, report: dict) -> list[Decision]:
    """Hook for a pushed ``executionReport`` of an exchange-held protection order
    (client id ``sp<operation>-<generation>``, ../shared/design/protection.md, step 4).

    The protection engine (issue #13) records its fill (``EXECUTED``/``PARTIALLY_EXECUTED``
    with ``source=exchange``) here once it lands; until then the report is only logged, and
    the pass's REST audit stays the way such fills are noticed.
    """
    log.info("protection order report (no protection engine yet; the pass's audit resolves it)",
             extra={"client_order_id": report.get("c"), "status": report.get("X"), "symbol": report.get("s")})
    return []


def account_signers(venue: str) -> list[tuple[int, object]]:
    """``[(account id, Signer)]`` for every enabled exchange account on ``venue`` (issue #20): the
    user data stream subscribes each one beside the default account. An account whose secret
    cannot be decrypted or read as a key is left out (logged; its fills are still found by the
    REST reconcile and audit)."""
    from stopmonitor import account_crypto

    from .signing import Signer

    _fresh_connection()
    out = []
    for account_id in store.enabled_account_ids(venue):
        try:
            creds = store.account_credentials(account_id)
            if creds.key_type == "ED25519":
                signer = Signer(creds.api_key, private_key_pem=creds.secret)
            else:
                signer = Signer(creds.api_key, secret=creds.secret)
        except (account_crypto.AccountCryptoError, ValueError, ObjectDoesNotExist) as exc:
            log.warning("account left out of the user data stream", extra={"account_id": account_id,
                                                                           "error": type(exc).__name__})
            continue
        out.append((account_id, signer))
    return out

