"""The pass (one run of ``monitor_stops``): reconcile, load watched, one quote request, evaluate,
close each trigger with its failure contained, summary (stop-execution.md, "The pass")."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime

from stopmonitor import guardrails as g
from stopmonitor.engine import store
from stopmonitor.engine.accounts import AccountClients, AccountUnavailable
from stopmonitor.engine.close import AccountView, account_block, close_triggered, record_block_outside
from stopmonitor.engine.context import EngineContext, EngineSettings
from stopmonitor.engine.decisions import Action, Decision, Emit, EngineUnavailable, PassSummary, isolated, noop
from stopmonitor.engine.moves import apply_move, plan_moves
from stopmonitor.engine.protection import protection_step
from stopmonitor.engine.reconcile import reconcile_submitted
from stopmonitor.exchange.base import ClockSkew, ExchangeUnavailable, KeysMissing, Quote, RateLimited
from stopmonitor.rules import Trigger, decimal_str, evaluate_trigger


def run_pass(exchange, *, source: str = "cron", dry_run: bool = False, now: datetime | None = None,
             emit: Emit = noop, engine: EngineSettings | None = None, use_lock: bool = True,
             log_decisions: bool = True, clients: AccountClients | None = None) -> PassSummary:
    """One monitor pass: reconcile SUBMITTED executions, then evaluate and close triggers.

    ``dry_run`` evaluates and reports without appending events or placing orders. Each
    decision goes to ``emit``, is counted, and is logged as one JSON line unless
    ``log_decisions`` is False (a caller that prints them itself, ``monitor_stops --json``); the summary is
    recorded as one ``MonitorPass`` row (:mod:`stopmonitor.metrics`). Raises
    :class:`EngineUnavailable` when the pass cannot run (quotes unavailable, rate-limit ban).
    Must be called outside any transaction. ``exchange`` is the default client (market data,
    the default account); ``clients`` the per-account registry (default: built on ``exchange``).
    """
    from stopmonitor import metrics

    def observed(decision: Decision) -> None:
        metrics.observe_decision(decision, log=log_decisions)
        emit(decision)

    ctx = EngineContext.build(exchange, source=source, now=now, engine=engine)
    instrumented = metrics.instrument(exchange)
    run = PassRun(instrumented, ctx, dry_run, observed, clients or AccountClients(instrumented))
    try:
        summary = run.run(use_lock)
    except EngineUnavailable as exc:
        metrics.record_pass(PassSummary(started_at=ctx.now.isoformat(), source=source, venue=exchange.venue,
                                        dry_run=dry_run), error=str(exc))
        raise
    metrics.record_pass(summary)
    return summary


@dataclass
class Evaluated:
    """The pass's verdict on the watched operations: crossed levels and quote problems."""

    triggered: list[tuple[store.Watched, Trigger, Quote]] = field(default_factory=list)
    quote_blocks: list[tuple[store.Watched, g.Block]] = field(default_factory=list)


class PassRun:
    """One pass on ``exchange`` in ``ctx``: each decision is counted in the summary and emitted."""

    def __init__(self, exchange, ctx: EngineContext, dry_run: bool, emit: Emit, clients: AccountClients | None = None):
        self.exchange, self.ctx, self.dry_run, self.emit = exchange, ctx, dry_run, emit
        self.clients = clients or AccountClients(exchange)
        self.started = time.monotonic()
        self.summary = PassSummary(started_at=ctx.now.isoformat(), source=ctx.source, venue=exchange.venue,
                                   dry_run=dry_run)

    def record(self, decision: Decision) -> None:
        decision.source = decision.source or self.ctx.source
        self.summary.count(decision)
        self.emit(decision)

    def run(self, use_lock: bool) -> PassSummary:
        """Under the pass lock (unless ``use_lock`` is False): the steps of the pass, in order."""
        with (store.pass_lock() if use_lock else nullcontext(True)) as acquired:
            if not acquired:
                self.summary.lock_held_elsewhere = True
            else:
                self.steps()
        self.summary.duration_s = round(time.monotonic() - self.started, 4)
        return self.summary

    def steps(self) -> None:
        """Reconcile, one quote read (invariant 9) shared by the protection step and the triggers,
        protection, then evaluate and close. Quotes that cannot be read still let the protection
        step run (it is what protects while the monitor cannot), then the pass fails."""
        if not self.dry_run:
            reconcile_submitted(self.clients, self.ctx, emit=self.record)
        watched = store.load_watched(self.exchange.venue)
        quotes, unreadable = self.read_quotes(watched)
        if not self.dry_run:
            watched = self.protect(watched, quotes)
        self.summary.watched, self.summary.symbols = len(watched), len({w.symbol for w in watched})
        if unreadable is not None:
            raise unreadable
        if not watched:
            return
        found = evaluate(watched, quotes, self.ctx)
        self.block_unquoted(found.quote_blocks)
        if found.triggered:
            if self.dry_run:
                self.report_would_trigger(found.triggered)
            else:
                self.close_all(found.triggered)
        if not self.dry_run:
            self.move_stops(watched, quotes, {w.operation_id for w, _, _ in found.triggered})

    def read_quotes(self, watched: list[store.Watched]) -> tuple[dict[str, Quote], EngineUnavailable | None]:
        """The one quote read of the pass for the watched symbols (none when nothing is watched):
        the quotes, or no quotes and the error when they cannot be read. Its requests are counted."""
        symbols = sorted({w.symbol for w in watched})
        if not symbols:
            return {}, None
        try:
            quotes, requests = fetch_quotes(self.exchange, symbols)
        except EngineUnavailable as exc:
            return {}, exc
        self.summary.exchange_requests += requests
        return quotes, None

    def protect(self, watched: list[store.Watched], quotes: dict[str, Quote]) -> list[store.Watched]:
        """The protection step on this pass's quotes (its requests counted); returns the watched
        operations, read again when the exchange sold for some (closed, or less remaining)."""
        filled = []

        def record(decision: Decision) -> None:
            if decision.action == "exchange_fill":
                filled.append(decision.operation_id)
            self.record(decision)

        self.summary.exchange_requests += protection_step(self.exchange, now=self.ctx.now, source=self.ctx.source,
                                                          emit=record, quotes=quotes, clients=self.clients)
        return store.load_watched(self.exchange.venue) if filled else watched

    def block_unquoted(self, quote_blocks: list[tuple[store.Watched, g.Block]]) -> None:
        for w, block in quote_blocks:
            if self.dry_run:
                self.record(Decision(Action.BLOCKED, w.operation_id, symbol=w.symbol, reason=block.reason,
                                     detail=block.detail))
                continue
            for decision in isolated(w.operation_id, w.symbol, None,
                                     lambda: [record_block_outside(w.operation_id, block, self.ctx)]):
                self.record(decision)

    def report_would_trigger(self, triggered) -> None:
        for w, trig, _ in triggered:
            self.record(Decision(Action.WOULD_TRIGGER, w.operation_id, symbol=w.symbol, reason=trig.kind,
                                 detail=f"level {decimal_str(trig.level)} observed {decimal_str(trig.observed)}"))

    def close_all(self, triggered) -> None:
        """Close the triggered operations account by account (issue #20): the filters once on the
        default client, then per account its free balances and its closes on its own client. An
        account that is disabled, or whose balances cannot be read, holds its own operations
        (``BLOCKED`` once) and no one else's; an IP-wide rate limit stops the pass. The default
        account unreachable still fails the pass (after the other accounts closed)."""
        try:
            filters = self.exchange.symbol_filters(sorted({w.symbol for w, _, _ in triggered}))
        except (RateLimited, ExchangeUnavailable, ClockSkew) as exc:
            raise EngineUnavailable(f"balances or filters unavailable: {exc}") from exc
        self.summary.exchange_requests += 1
        default_error = None
        for account_id, items in by_account(triggered).items():
            error = self.close_account(account_id, items, filters)
            if error is not None:
                default_error = error
        if default_error is not None:
            raise EngineUnavailable(f"balances or filters unavailable: {default_error}") from default_error

    def close_account(self, account_id: int | None, items, filters) -> Exception | None:
        """Close one account's triggered operations on its own client, or hold them (``BLOCKED``)
        when the account is disabled or its balances cannot be read. The default account
        (``account_id`` None) unreadable holds nothing: its error is returned (no decision)."""
        held = account_block(account_id)
        client = account = None
        if held is None:
            try:
                client, account = self.open_account(account_id, items, filters)
            except (AccountUnavailable, ExchangeUnavailable, ClockSkew, KeysMissing) as exc:
                if account_id is None:
                    return exc
                held = g.Block(g.BlockReason.ACCOUNT_UNAVAILABLE, f"balances unavailable: {exc}"[:300],
                               key=str(account_id))
        for w, trig, quote in items:
            if held is not None:
                self.block_unquoted([(w, held)])
                continue
            for decision in isolated(w.operation_id, w.symbol, None, lambda: close_triggered(
                    w.operation_id, trig, quote, client, account, self.ctx)):
                self.record(decision)
        return None

    def open_account(self, account_id: int | None, items, filters) -> tuple[object, AccountView]:
        """The account's client and what its closes see (free balances, filters, the operations
        closing now); the balances request is counted. An IP-wide rate limit stops the pass
        (EngineUnavailable); other errors are the caller's (AccountUnavailable, ExchangeUnavailable, …)."""
        try:
            client = self.clients.for_account(account_id)
            account = AccountView(client.free_balances(), filters,
                                  closing_now=frozenset(w.operation_id for w, _, _ in items))
            self.summary.exchange_requests += 1
        except RateLimited as exc:  # request weight is counted per IP: every account waits
            raise EngineUnavailable(f"balances unavailable: {exc}") from exc
        return client, account

    def move_stops(self, watched, quotes, fired: set[int]) -> None:
        """Trailing and break-even moves for the operations that did not fire (issue #14)."""
        for w, move in plan_moves(watched, quotes, fired, self.ctx):
            for decision in isolated(w.operation_id, w.symbol, None, lambda: apply_move(w.operation_id, move, self.ctx)):
                self.record(decision)


def by_account(triggered) -> dict:
    """The triggered operations grouped by account id (None = the default account), pass order kept."""
    groups: dict = {}
    for item in triggered:
        groups.setdefault(item[0].account_id, []).append(item)
    return groups


def evaluate(watched: list[store.Watched], quotes: dict[str, Quote], ctx: EngineContext) -> Evaluated:
    """The trigger rule in memory for every watched operation; a missing, unusable or stale
    quote is a block instead (its age judged at ``ctx.now``)."""
    found = Evaluated()
    for w in watched:
        quote = quotes.get(w.symbol)
        problem = g.quote_problem(quote, ctx.now, ctx.settings.quote_max_age_seconds)
        if problem is not None:
            found.quote_blocks.append((w, problem))
            continue
        trig = evaluate_trigger(w.side, w.stop_price, w.target_price, quote.bid, quote.ask)
        if trig is not None:
            found.triggered.append((w, trig, quote))
    return found


def evaluate_quotes(exchange, watched: list[store.Watched], quotes: dict[str, Quote], ctx: EngineContext,
                    emit: Emit = noop) -> PassSummary:
    """The pass's steps 3–5 for the given operations and quotes, without reconcile or the pass
    record: the stream's entry (one symbol's operations and the quote just received). Same rule,
    same guardrails, same close protocol as :func:`run_pass`. Raises :class:`EngineUnavailable`
    when balances or filters cannot be read. Must be called outside any transaction."""
    from stopmonitor import metrics

    run = PassRun(metrics.instrument(exchange), ctx, False, emit)
    found = evaluate(watched, quotes, ctx)
    run.block_unquoted(found.quote_blocks)
    if found.triggered:
        run.close_all(found.triggered)
    return run.summary


def fetch_quotes(exchange, symbols: list[str]) -> tuple[dict[str, Quote], int]:
    """Best bid/ask for ``symbols`` in one request (invariant 9); returns quotes and the
    requests the adapter sent for them (its :class:`~stopmonitor.exchange.base.Quotes`
    ``requests``; a plain dict is one request).

    A symbol the exchange does not know (delisted, renamed) is absent, its operations get
    MISSING_PRICE; the adapter deals with Binance refusing the whole list for it (-1121).
    Raises :class:`EngineUnavailable` when quotes cannot be read.
    """
    try:
        quotes = exchange.book_tickers(symbols)
    except (ExchangeUnavailable, RateLimited, ClockSkew) as exc:
        raise EngineUnavailable(f"best bid/ask unavailable for {len(symbols)} symbols: {exc}") from exc
    return quotes, getattr(quotes, "requests", 1)
