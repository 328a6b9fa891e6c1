"""Trailing and break-even stop moves in the pass: after the crossed stops fired, each watched
operation that did not fire and trails gets its stop tightened from the observed price.

Rule: :func:`stopmonitor.trailing.next_stop` (pure). Only a move is an event: one ``STOP_MOVED``
with ``source=trailing`` or ``source=break_even``, the observed price and the old and new levels;
a price that tightens nothing writes nothing, so no event per tick (issue #14).
"""

from __future__ import annotations

from django.db import transaction

from stopmonitor import guardrails as g
from stopmonitor.engine import store
from stopmonitor.engine.context import EngineContext
from stopmonitor.engine.decisions import Action, Decision
from stopmonitor.events import append_events, stream_head
from stopmonitor.exchange.base import Quote
from stopmonitor.execution import STOP_MOVED, NewEvent
from stopmonitor.rules import BUY, decimal_str
from stopmonitor.trailing import StopMove, next_stop
from stopmonitor.vocabulary import OperationStatus, SkipReason


def plan_moves(watched: list[store.Watched], quotes: dict[str, Quote], fired: set[int],
               ctx: EngineContext) -> list[tuple[store.Watched, StopMove]]:
    """The stop moves of this pass, in memory: operations in ``fired`` (their stop or target was
    crossed: the close comes first) and operations without a usable quote do not move."""
    moves = []
    for w in watched:
        if not w.trailing.enabled or w.stop_price is None or w.operation_id in fired:
            continue
        quote = quotes.get(w.symbol)
        if g.quote_problem(quote, ctx.now, ctx.settings.quote_max_age_seconds) is not None:
            continue
        observed = quote.bid if w.side == BUY else quote.ask
        move = next_stop(w.side, w.stop_price, w.entry_price, w.trailing, observed, w.tick_size)
        if move is not None:
            moves.append((w, move))
    return moves


def apply_move(operation_id: int, move: StopMove, ctx: EngineContext) -> list[Decision]:
    """Persist one move under the operation's row lock: ``stop_price`` → ``move.new_stop`` and one
    ``STOP_MOVED`` (source ``trailing``/``break_even``). Skipped (nothing written) when the operation is
    no longer ACTIVE or its stop is no longer ``move.old_stop`` (a close or a PATCH came first).
    Commits; no network call."""
    with transaction.atomic():
        op = store.lock_operation(operation_id)
        base = dict(operation_id=op.pk, tenant_id=op.client_id, symbol=op.symbol.symbol, source=move.source)
        if op.status != OperationStatus.ACTIVE:
            return [Decision(Action.SKIPPED, reason=SkipReason.NOT_ACTIVE, **base)]
        if op.stop_price != move.old_stop:
            return [Decision(Action.SKIPPED, reason=SkipReason.LEVEL_MOVED, **base,
                             detail=f"stop is {decimal_str(op.stop_price)}, the move was from {decimal_str(move.old_stop)}")]
        version, _ = stream_head(op.pk)
        op.stop_price = move.new_stop
        op.save(update_fields=["stop_price", "updated_at"])
        payload = {"from": decimal_str(move.old_stop), "to": decimal_str(move.new_stop),
                   "observed": decimal_str(move.observed), "rule": move.source}
        append_events(op, version, [NewEvent(STOP_MOVED, payload)], source=move.source, venue=ctx.venue, now=ctx.now)
    return [Decision(Action.STOP_MOVED, event_type=STOP_MOVED, **base,
                     detail=f"stop {payload['from']} -> {payload['to']} at observed {payload['observed']}")]
