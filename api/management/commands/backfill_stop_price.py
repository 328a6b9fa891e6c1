"""``python manage.py backfill_stop_price``: legacy percentage stops and targets → absolute prices.

For every PLANNED or ACTIVE operation with ``stop_loss_percent`` and no ``stop_price`` (or
``stop_gain_percent`` and no ``target_price``), computes the level from the entry price and
writes it together with a ``STOP_SET`` / ``TARGET_SET`` event (``source=backfill``, payload:
the level, the percentage, the entry price and the tickSize) in one transaction. Closed,
closing and cancelled operations are not monitored and are left alone.

Levels (prices in the quote asset, ``Decimal`` throughout), every one rounded to the symbol's
tickSize **towards the entry price**:

- long (BUY): stop ``entry × (1 − pct/100)`` rounded up (protective: the stop never ends
  further from the entry than asked); target ``entry × (1 + pct/100)`` rounded down (the
  conservative side: never further than asked).
- short (SELL): stop ``entry × (1 + pct/100)`` rounded down; target ``entry × (1 − pct/100)``
  rounded up.

An operation is skipped — nothing of it is written — and reported by id with a reason when a
level cannot be computed or would be wrong: ``no_entry_price`` (missing or not positive),
``no_tick_size``, ``percent_out_of_range`` (≤ 0 or ≥ 100), ``wrong_side`` (after rounding the
level is not strictly beyond the entry on its side, e.g. a tiny percentage on a coarse tick),
``locked`` (another transaction — the API, the monitor — holds the row; a re-run picks it up)
and ``conflict`` (its event stream moved while we held the lock; a re-run picks it up).

How it runs on a live database: each batch is one short transaction that takes the next
candidates by walking the primary key (keyset: ``id > last ORDER BY id LIMIT batch``), locks
them with ``SELECT … FOR UPDATE SKIP LOCKED`` (never waits on, never overwrites a row someone
else is changing), re-checks them under the lock, appends the events through
:func:`stopmonitor.events.append_many` (the bulk form of the one event writer) and updates the
rows. On PostgreSQL all of it is set-based SQL and only skipped rows reach Python (see
:meth:`Backfill._batch_sql`: the levels are computed in ``numeric``, exactly as
:func:`compute_level` does with ``Decimal``, which stays the definition and decides every row
SQL refuses); elsewhere (SQLite in development) one model object per operation. A written row no longer matches,
so the command is resumable by construction: stopping it at any point (Ctrl-C, SIGTERM, a
killed pod) loses at most the uncommitted batch, and a new run continues; a second full run
changes nothing and says so. SIGINT/SIGTERM finish the current batch, print the summary and
exit with 128 + the signal number.

Output: progress on stderr (a bar with rows/s and ETA on a terminal, plain lines every
``--progress-interval`` seconds otherwise); on stdout one line per skipped operation (and per
operation that would change with ``--dry-run``) and a final summary (``--json``: JSON lines).
Exit status: 0 done with nothing skipped, 1 done with skipped operations, 2 on error (one line,
no traceback), 128 + signal number when interrupted.

Test hooks (environment, seconds; unset in production): ``STOPMONITOR_BACKFILL_BATCH_SLEEP``
sleeps inside each batch's transaction after its writes and before the commit (announced on
stderr with ``hook: inside batch N``); ``STOPMONITOR_BACKFILL_PAUSE`` sleeps after each commit.
They let tests kill the process inside a batch or between batches.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.preflight import require_migrated

OPEN_STATUSES = ("PLANNED", "ACTIVE")
NO_ENTRY_PRICE = "no_entry_price"
NO_TICK_SIZE = "no_tick_size"
PERCENT_OUT_OF_RANGE = "percent_out_of_range"
WRONG_SIDE = "wrong_side"
LOCKED = "locked"
CONFLICT = "conflict"
BELOW_MIN_NOTIONAL_AT_STOP = "below_min_notional_at_stop"  # the stop could never close it (issue #12 item 6)
SKIP_REASONS = (NO_ENTRY_PRICE, NO_TICK_SIZE, PERCENT_OUT_OF_RANGE, WRONG_SIDE, LOCKED, CONFLICT,
                BELOW_MIN_NOTIONAL_AT_STOP)
# (kind, level field, percentage field, event type)
LEVELS = (
    ("stop", "stop_price", "stop_loss_percent", "STOP_SET"),
    ("target", "target_price", "stop_gain_percent", "TARGET_SET"),
)
MAX_LISTED_SKIPS = 1000  # skips kept for the --json summary; every skip is printed as it happens
RETRYABLE_PGCODES = ("40P01", "40001")  # deadlock detected, serialization failure


class Skip(Exception):
    """A level that cannot be computed or would be wrong: ``reason`` (one of ``SKIP_REASONS``) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def compute_level(kind: str, side: str, entry: Decimal | None, percent: Decimal, tick: Decimal | None) -> Decimal:
    """The absolute ``kind`` ("stop" or "target") level of a ``side`` (BUY long, SELL short)
    operation, in the quote asset, rounded to ``tick`` towards ``entry`` (see the module
    docstring). Raises :class:`Skip` with the reason when it cannot be computed
    (:func:`_require_inputs`) or lands on the wrong side of the entry (the rule of
    :func:`stopmonitor.operations.check_levels`)."""
    from stopmonitor.operations import LevelError, check_levels
    from stopmonitor.rules import decimal_str, round_to_tick

    # the same numbers without the column's trailing zeros, so messages read "100", not "100.00000000"
    entry, percent, tick = (None if v is None else Decimal(decimal_str(v)) for v in (entry, percent, tick))
    _require_inputs(kind, entry, percent, tick)
    below = (kind == "stop") == (side == "BUY")  # a long's stop and a short's target sit below the entry
    raw = entry * (1 - percent / 100) if below else entry * (1 + percent / 100)
    price = round_to_tick(raw, tick, up=below)
    try:
        check_levels(side, entry, price if kind == "stop" else None, price if kind == "target" else None)
    except LevelError as exc:
        raise Skip(WRONG_SIDE, f"{kind} {decimal_str(price)} from {percent}% at tickSize {tick}: {exc}") from None
    return price


def _require_inputs(kind: str, entry: Decimal | None, percent: Decimal, tick: Decimal | None) -> None:
    """Raises :class:`Skip` ``no_entry_price`` (missing or not positive), ``no_tick_size`` or
    ``percent_out_of_range`` (≤ 0 or ≥ 100), checked in that order."""
    if entry is None or entry <= 0:
        raise Skip(NO_ENTRY_PRICE, "entry_price is empty" if entry is None else f"entry_price {entry} is not positive")
    if tick is None or tick <= 0:
        raise Skip(NO_TICK_SIZE, "the symbol has no tickSize")
    if percent <= 0 or percent >= 100:
        raise Skip(PERCENT_OUT_OF_RANGE, f"{kind} percentage {percent} is not between 0 and 100")


def event_venue(configured: str) -> str:
    """The ``venue`` recorded on backfill events: ``paper`` for the paper and replay venues, else the configured one."""
    return "paper" if configured in ("paper", "replay") else configured


@dataclass
class Summary:
    """What a run did. ``scanned`` counts candidate operations looked at (locked ones included)."""

    dry_run: bool
    total: int = 0
    scanned: int = 0
    updated: int = 0
    stops_set: int = 0
    targets_set: int = 0
    already_done: int = 0
    batches: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    skipped_operations: int = 0
    skips: list = field(default_factory=list)
    duration_s: float = 0.0
    interrupted: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        rate = self.scanned / self.duration_s if self.duration_s > 0 else 0.0
        return {
            "type": "summary",
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "updated": self.updated,
            "stops_set": self.stops_set,
            "targets_set": self.targets_set,
            "already_done": self.already_done,
            "skipped": self.skipped_operations,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "skips": self.skips,
            "skips_truncated": self.skipped_operations > len(self.skips),
            "batches": self.batches,
            "duration_s": round(self.duration_s, 3),
            "rows_per_s": round(rate, 1),
            "interrupted": self.interrupted,
            "error": self.error,
            "nothing_to_do": self.scanned == 0 and self.error is None,
        }


@dataclass(frozen=True)
class Change:
    """The levels one operation gets: ``{level field: (price, percentage)}``."""

    operation_id: int
    levels: dict


def candidates_query(tenant_id: int | None):
    """Operations that still need a level: open, with a percentage and no absolute price."""
    from django.db.models import Q

    from api.models import Operation

    qs = Operation.objects.filter(status__in=OPEN_STATUSES).filter(
        Q(stop_price__isnull=True, stop_loss_percent__isnull=False)
        | Q(target_price__isnull=True, stop_gain_percent__isnull=False)
    )
    if tenant_id is not None:
        qs = qs.filter(client_id=tenant_id)
    return qs


def plan_operation(op) -> tuple[Change | None, list[tuple[str, Skip]]]:
    """Decide for one operation read under its row lock: ``(change or None, [(level field, skip)])``.
    Any skip means nothing of the operation is written; ``(None, [])`` means nothing is left to do."""
    levels, skips = {}, []
    for kind, price_field, pct_field, _ in LEVELS:
        percent = getattr(op, pct_field)
        if getattr(op, price_field) is not None or percent is None:
            continue
        try:
            levels[price_field] = (compute_level(kind, op.side, op.entry_price, percent, op.symbol.tick_size), percent)
        except Skip as skip:
            skips.append((price_field, skip))
    if "stop_price" in levels and getattr(op, "quantity", None) is not None:
        from stopmonitor.admission import opening_notional_error

        problem = opening_notional_error(op.symbol, op.quantity, levels["stop_price"][0])
        if problem is not None:
            skips.append(("stop_price", Skip(BELOW_MIN_NOTIONAL_AT_STOP, problem)))
    if skips or not levels:
        return None, skips
    return Change(op.pk, levels), []


# -- PostgreSQL: the set-based batch ---------------------------------------------------------------

BATCH_TABLE = "stopmonitor_backfill_batch"  # the locked rows of the current batch (temporary, emptied at commit)
EVENTS_VIEW = "stopmonitor_backfill_events"  # the events of its ``ok`` rows (:func:`_events_view_sql`)
_BATCH_TABLE_DDL_TEMPLATE = f"""
DO $$ BEGIN
  IF to_regclass('pg_temp.{BATCH_TABLE}') IS NULL THEN
    CREATE TEMPORARY TABLE {BATCH_TABLE} (
      id bigint NOT NULL, tenant_id bigint, symbol varchar(20), side varchar(4), entry numeric, stop_pct numeric,
      target_pct numeric, stop_price numeric, target_price numeric, tick numeric, version integer,
      new_stop numeric, new_target numeric, state text NOT NULL,
      quantity numeric, min_notional numeric, max_qty numeric
    ) ON COMMIT DELETE ROWS;
  END IF;
  IF to_regclass('pg_temp.{EVENTS_VIEW}') IS NULL THEN
    EXECUTE $view$ {{events_view}} $view$;
  END IF;
END $$"""


def _level_sql(pct: str, need: str, below: str) -> str:
    """:func:`compute_level` in ``numeric`` (exact: ``* 0.01`` and ``div``/``mod`` never round) for
    one level of the row ``l``: NULL when an input is out of range. ``below`` is the SQL condition
    "this level sits below the entry" (rounded up, towards the entry; else rounded down)."""
    raw = f"(l.entry_price * (1 + CASE WHEN {below} THEN -1 ELSE 1 END * {pct} * 0.01))"
    return (f"CASE WHEN {need} AND l.entry_price > 0 AND l.tick_size > 0 AND {pct} > 0 AND {pct} < 100 THEN "
            f"div({raw}, l.tick_size) * l.tick_size "
            f"+ CASE WHEN ({below}) AND mod({raw}, l.tick_size) <> 0 THEN l.tick_size ELSE 0 END END")


def _beyond_sql(level: str, below: str) -> str:
    """The level is positive and strictly on its side of the entry (:func:`stopmonitor.operations.check_levels`)."""
    return (f"({level} > 0 AND CASE WHEN {below} THEN {level} < p.entry_price ELSE {level} > p.entry_price END)")


def _notional_at_stop_sql() -> str:
    """:func:`stopmonitor.rules.opening_notional_problem` is None, in ``numeric`` for row ``p``: the
    last MARKET_LOT_SIZE chunk × the new stop reaches minNotional with the margin (else the row
    goes to the Python check, which names the figures in its skip)."""
    from stopmonitor.admission import notional_margin_pct

    margin = notional_margin_pct()
    chunk = ("(CASE WHEN p.market_max_qty > 0 AND p.quantity > p.market_max_qty THEN "
             "CASE WHEN mod(p.quantity, p.market_max_qty) > 0 THEN mod(p.quantity, p.market_max_qty) "
             "ELSE p.market_max_qty END ELSE p.quantity END)")
    return (f"(p.min_notional IS NULL OR p.min_notional <= 0 OR p.quantity IS NULL "
            f"OR {chunk} * p.new_stop >= p.min_notional * (1 + {margin} / 100.0))")


def _lock_and_plan_sql(by_tenant: bool) -> str:
    """Step 1 of :meth:`Backfill._batch_sql`. Returns one row: candidates, last candidate id, the
    ids locked by someone else, and how many locked rows are ``done``, ``check`` and ``ok``."""
    from api.models import Operation, StopMonitorEvent, Symbol

    op, sym, ev = (Operation._meta.db_table, Symbol._meta.db_table, StopMonitorEvent._meta.db_table)
    tenant = "AND client_id = %(tenant)s" if by_tenant else ""
    open_ = ", ".join(f"'{status}'" for status in OPEN_STATUSES)
    return f"""
WITH cand AS MATERIALIZED (
  SELECT id FROM {op}
  WHERE id > %(last)s AND status IN ({open_}) {tenant}
    AND ((stop_price IS NULL AND stop_loss_percent IS NOT NULL) OR (target_price IS NULL AND stop_gain_percent IS NOT NULL))
  ORDER BY id LIMIT %(size)s
), locked AS MATERIALIZED (
  SELECT o.id, o.client_id, s.symbol, o.side, o.status, o.entry_price, o.stop_loss_percent, o.stop_gain_percent,
         o.stop_price, o.target_price, s.tick_size, o.quantity, s.min_notional, s.market_max_qty
  FROM {op} o JOIN {sym} s ON s.id = o.symbol_id
  WHERE o.id = ANY(ARRAY(SELECT id FROM cand)) ORDER BY o.id
  FOR UPDATE OF o SKIP LOCKED
), needs AS (
  SELECT l.*, l.stop_price IS NULL AND l.stop_loss_percent IS NOT NULL AS need_stop,
         l.target_price IS NULL AND l.stop_gain_percent IS NOT NULL AS need_target
  FROM locked l
), planned AS (
  SELECT l.*, {_level_sql("l.stop_loss_percent", "l.need_stop", "l.side = 'BUY'")} AS new_stop,
         {_level_sql("l.stop_gain_percent", "l.need_target", "l.side <> 'BUY'")} AS new_target
  FROM needs l
), staged AS (
  INSERT INTO {BATCH_TABLE} (id, tenant_id, symbol, side, entry, stop_pct, target_pct, stop_price, target_price, tick,
                             version, new_stop, new_target, state, quantity, min_notional, max_qty)
  SELECT p.id, p.client_id, p.symbol, p.side, p.entry_price, p.stop_loss_percent, p.stop_gain_percent, p.stop_price,
         p.target_price, p.tick_size,
         COALESCE((SELECT max(e.version) FROM {ev} e WHERE e.operation_id = p.id), 0),
         p.new_stop, p.new_target,
         CASE WHEN p.status NOT IN ({open_}) OR NOT (p.need_stop OR p.need_target) THEN 'done'
              WHEN (NOT p.need_stop OR {_beyond_sql("p.new_stop", "p.side = 'BUY'")})
               AND (NOT p.need_target OR {_beyond_sql("p.new_target", "p.side <> 'BUY'")})
               AND (NOT p.need_stop OR {_notional_at_stop_sql()}) THEN 'ok'
              ELSE 'check' END,
         p.quantity, p.min_notional, p.market_max_qty
  FROM planned p
  RETURNING id, state
)
SELECT (SELECT count(*) FROM cand), (SELECT max(id) FROM cand),
       ARRAY(SELECT id FROM cand WHERE id NOT IN (SELECT id FROM staged) ORDER BY id),
       (SELECT count(*) FROM staged WHERE state = 'done'),
       (SELECT count(*) FROM staged WHERE state = 'check'),
       (SELECT count(*) FROM staged WHERE state = 'ok')
"""


def _events_view_sql() -> str:
    """Step 3 of :meth:`Backfill._batch_sql`: a temporary view of the STOP_SET/TARGET_SET events of
    the ``ok`` rows of the batch table, with the columns of :func:`stopmonitor.events.append_stage`,
    read by ``append_many(relation=…)`` (no copy of the rows). Payload values as
    :func:`decimal_str` writes them: ``trim_scale(x)::text`` (numeric prints fixed-point, never an
    exponent)."""
    parts = []
    for n, (_, price_field, pct_field, event_type) in enumerate(LEVELS):
        new, pct = ("new_stop", "stop_pct") if price_field == "stop_price" else ("new_target", "target_pct")
        # the stop comes first: the target is the stream's second event when there is a stop too
        ord_ = "1" if n == 0 else "CASE WHEN new_stop IS NULL THEN 1 ELSE 2 END"
        parts.append(
            f"SELECT id, version, {ord_}, '{event_type}'::varchar, tenant_id, symbol, NULL::varchar, "
            f"jsonb_build_object('{price_field}', trim_scale({new})::text, '{pct_field}', trim_scale({pct})::text, "
            f"'entry_price', trim_scale(entry)::text, 'tick_size', trim_scale(tick)::text, "
            f"'rounding', 'towards_entry') "
            f"FROM {BATCH_TABLE} WHERE state = 'ok' AND {new} IS NOT NULL"
        )
    return (f"CREATE TEMPORARY VIEW {EVENTS_VIEW} (operation_id, expected_version, ord, event_type, tenant_id, "
            f"symbol, execution_token, payload) AS " + " UNION ALL ".join(parts))


# the batch table and its events view, created once per session
_BATCH_TABLE_DDL = _BATCH_TABLE_DDL_TEMPLATE.replace("{events_view}", _events_view_sql())


def _update_levels_sql() -> str:
    """Step 4 of :meth:`Backfill._batch_sql`: the levels of the ``ok`` rows; returns (operations, stops, targets)."""
    from api.models import Operation

    return f"""
WITH u AS (
  UPDATE {Operation._meta.db_table} AS o
  SET stop_price = COALESCE(b.new_stop, o.stop_price), target_price = COALESCE(b.new_target, o.target_price),
      updated_at = %s
  FROM {BATCH_TABLE} b WHERE o.id = b.id AND b.state = 'ok'
  RETURNING b.new_stop IS NOT NULL AS stop, b.new_target IS NOT NULL AS target
) SELECT count(*), count(*) FILTER (WHERE stop), count(*) FILTER (WHERE target) FROM u
"""


@dataclass(frozen=True)
class _Symbol:
    tick_size: Decimal | None
    min_notional: Decimal | None = None
    market_max_qty: Decimal | None = None


@dataclass(frozen=True)
class _Row:
    """The columns of a locked operation that :func:`plan_operation` and the dry-run lines read."""

    pk: int
    side: str
    entry_price: Decimal | None
    stop_loss_percent: Decimal | None
    stop_gain_percent: Decimal | None
    stop_price: Decimal | None
    target_price: Decimal | None
    symbol: _Symbol
    quantity: Decimal | None = None


@dataclass
class _BatchOutcome:
    """What one batch found, kept until its transaction has committed: the summary is counted
    only then, so a retried batch counts once. ``skips``: ``(operation id, level field or None,
    reason, detail)``; ``would``: ``(row, Change)`` with ``--dry-run``; ``already``: candidates
    with nothing left to do; ``updated`` / ``stops_set`` / ``targets_set``: what was written."""

    skips: list[tuple[int, str | None, str, str]] = field(default_factory=list)
    would: list = field(default_factory=list)
    already: int = 0
    updated: int = 0
    stops_set: int = 0
    targets_set: int = 0

    def skip_locked(self, ids) -> None:
        """``ids`` (in order) are held by another transaction: skipped, a re-run picks them up."""
        self.skips.extend((pk, None, LOCKED, "row locked by another transaction; a re-run picks it up") for pk in ids)

    def take(self, pk: int, planned: tuple[Change | None, list[tuple[str, Skip]]]) -> Change | None:
        """:func:`plan_operation`'s answer for ``pk``: the change to write, else None — its skips
        recorded, or counted as already done when nothing is left to do."""
        change, level_skips = planned
        if level_skips:
            self.skips.extend((pk, name, sk.reason, sk.detail) for name, sk in level_skips)
            return None
        if change is None:
            self.already += 1
        return change

    def count(self, change: Change) -> None:
        """One operation updated (or, with ``--dry-run``, that would be)."""
        self.updated += 1
        self.stops_set += "stop_price" in change.levels
        self.targets_set += "target_price" in change.levels


def _decide_check_rows(cursor, out: _BatchOutcome) -> int:
    """Step 2 of :meth:`Backfill._batch_sql`: the ``check`` rows through :func:`plan_operation`
    (skips and already-done counted in ``out``); a row it accepts after all becomes ``ok`` with
    its levels. Returns how many it accepted."""
    cursor.execute(f"SELECT id, side, entry, stop_pct, target_pct, stop_price, target_price, tick, "
                   f"quantity, min_notional, max_qty FROM {BATCH_TABLE} WHERE state = 'check' ORDER BY id")
    accepted = []
    for (pk, side, entry, stop_pct, target_pct, stop_price, target_price, tick, quantity, min_notional,
         max_qty) in cursor.fetchall():
        op = _Row(pk, side, entry, stop_pct, target_pct, stop_price, target_price,
                  _Symbol(tick, min_notional, max_qty), quantity)
        change = out.take(pk, plan_operation(op))
        if change is not None:  # numeric said no, Decimal says yes: Python decides (has not happened; kept safe)
            levels = change.levels
            accepted.append((levels.get("stop_price", (None,))[0], levels.get("target_price", (None,))[0], pk))
    if accepted:
        cursor.executemany(f"UPDATE {BATCH_TABLE} SET state = 'ok', new_stop = %s, new_target = %s "
                           f"WHERE id = %s", accepted)
    return len(accepted)


def _would_set_rows(cursor) -> list[tuple[_Row, Change]]:
    """``--dry-run`` of :meth:`Backfill._batch_sql`: the ``ok`` rows and the levels they would get."""
    cursor.execute(f"SELECT id, side, entry, tick, new_stop, stop_pct, new_target, target_pct "
                   f"FROM {BATCH_TABLE} WHERE state = 'ok' ORDER BY id")
    would = []
    for pk, side, entry, tick, new_stop, stop_pct, new_target, target_pct in cursor.fetchall():
        levels = {}
        if new_stop is not None:
            levels["stop_price"] = (new_stop, stop_pct)
        if new_target is not None:
            levels["target_price"] = (new_target, target_pct)
        would.append((_Row(pk, side, entry, None, None, None, None, _Symbol(tick)), Change(pk, levels)))
    return would


class Backfill:
    """One run: walks the candidates in batches and reports through ``out`` (stdout lines) and ``progress``."""

    def __init__(self, *, batch_size: int, limit: int | None, tenant_id: int | None, dry_run: bool, venue: str,
                 as_json: bool, out, progress):
        self.batch_size = batch_size
        self.limit = limit
        self.tenant_id = tenant_id
        self.dry_run = dry_run
        self.venue = venue
        self.as_json = as_json
        self.out = out
        self.progress = progress
        self.summary = Summary(dry_run=dry_run)
        self.stop_signal: int | None = None
        self.batch_sleep = float(os.environ.get("STOPMONITOR_BACKFILL_BATCH_SLEEP") or 0)
        self.pause = float(os.environ.get("STOPMONITOR_BACKFILL_PAUSE") or 0)

    # -- output ---------------------------------------------------------------------------
    def _line(self, record: dict, text: str) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) if self.as_json else text)
        self.out.flush()

    def _report_skip(self, operation_id: int, field_name: str | None, reason: str, detail: str) -> None:
        record = {"type": "skip", "operation_id": operation_id, "field": field_name, "reason": reason, "detail": detail}
        if len(self.summary.skips) < MAX_LISTED_SKIPS:
            self.summary.skips.append({k: v for k, v in record.items() if k != "type"})
        where = f" {field_name}" if field_name else ""
        self._line(record, f"skip op={operation_id}{where} {reason}: {detail}")

    def _report_would_set(self, op, change: Change) -> None:
        from stopmonitor.rules import decimal_str

        record = {"type": "would_set", "operation_id": op.pk, "side": op.side, "entry_price": decimal_str(op.entry_price),
                  "tick_size": decimal_str(op.symbol.tick_size)}
        parts = []
        for name, (price, pct) in change.levels.items():
            record[name] = decimal_str(price)
            parts.append(f"{name}={decimal_str(price)} ({decimal_str(pct)}%)")
        self._line(record, f"would set op={op.pk} {op.side} entry={decimal_str(op.entry_price)} "
                           f"tickSize={decimal_str(op.symbol.tick_size)} " + " ".join(parts))

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> Summary:
        """Walk every candidate once. Commits one transaction per batch (none with dry-run)."""
        s = self.summary
        started = time.monotonic()
        total = candidates_query(self.tenant_id).count()
        s.total = min(total, self.limit) if self.limit is not None else total
        self.progress.start(s.total)
        last_id = 0
        try:
            while self.stop_signal is None:
                size = self.batch_size
                if self.limit is not None:
                    size = min(size, self.limit - s.scanned)
                    if size <= 0:
                        break
                n, last_id = self._next_batch(last_id, size)
                if not n:
                    break
                s.scanned += n
                s.batches += 1
                s.duration_s = time.monotonic() - started
                self.progress.update(s)
                if self.pause:
                    time.sleep(self.pause)
        finally:
            s.duration_s = time.monotonic() - started
            self.progress.finish(s)
        if self.stop_signal is not None:
            s.interrupted = signal.Signals(self.stop_signal).name
        return s

    def _next_batch(self, last_id: int, size: int) -> tuple[int, int]:
        """Process the next ``size`` candidates after ``last_id``: ``(candidates looked at, their last id)``."""
        from django.db import connection

        if connection.vendor == "postgresql":
            return self._with_retry(lambda: self._batch_sql(last_id, size))
        ids = list(candidates_query(self.tenant_id).filter(pk__gt=last_id).order_by("pk")
                   .values_list("pk", flat=True)[:size])
        if ids:
            self._with_retry(lambda: self._batch(ids))
        return len(ids), (ids[-1] if ids else last_id)

    def _with_retry(self, batch):
        from django.db import DatabaseError

        for attempt in range(3):
            try:
                return batch()
            except DatabaseError as exc:
                code = getattr(exc.__cause__, "sqlstate", None) or getattr(exc.__cause__, "pgcode", None)
                if code not in RETRYABLE_PGCODES or attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _batch_sql(self, last_id: int, size: int) -> tuple[int, int]:
        """PostgreSQL: one transaction, set-based, the operations never become Python objects.

        1. one statement picks the next ``size`` candidates by keyset, locks the free ones
           (``FOR UPDATE SKIP LOCKED``), re-checks them under the lock, computes their levels in
           ``numeric`` (:func:`_level_sql`, the same arithmetic as :func:`compute_level`) with
           their stream version, and keeps them in a temporary table with a state: ``ok`` (write),
           ``done`` (nothing left to do) or ``check`` (some level cannot be written);
        2. the ``check`` rows — the only ones read into Python — go through :func:`plan_operation`,
           which names every skip (and is the authority: a level it computes is written)
           (:func:`_decide_check_rows`);
        3. the events of the ``ok`` rows are built with ``jsonb_build_object`` into the staging
           table of :func:`stopmonitor.events.append_many`, which appends them in one statement;
           a stream that moved is skipped as ``conflict`` and the rest appended;
        4. one ``UPDATE … FROM`` writes the levels (3 and 4: :meth:`_write_ok_rows`; with
           ``--dry-run`` the ``ok`` rows are read instead, :func:`_would_set_rows`).
        Returns ``(candidates looked at, the last candidate id)``."""
        from django.db import connection, transaction

        now = datetime.now(timezone.utc)
        out = _BatchOutcome()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_BATCH_TABLE_DDL)
            params = {"last": last_id, "size": size, "tenant": self.tenant_id}
            cursor.execute(_lock_and_plan_sql(self.tenant_id is not None), params)
            n, last, locked_ids, out.already, n_check, n_ok = cursor.fetchone()
            if not n:
                return 0, last_id
            out.skip_locked(locked_ids)
            if n_check:
                n_ok += _decide_check_rows(cursor, out)
            if n_ok and self.dry_run:
                out.would = _would_set_rows(cursor)
            elif n_ok:
                self._write_ok_rows(cursor, now, out)
            self._inside_batch_hook()
        self._apply(out)  # committed (or a read-only dry run)
        return n, last

    def _write_ok_rows(self, cursor, now: datetime, out: _BatchOutcome) -> None:
        """Steps 3 and 4 of :meth:`_batch_sql`: append the events of the ``ok`` rows (a stream that
        moved meanwhile: its rows become ``conflict`` skips and the rest is appended again), then
        write their levels."""
        from stopmonitor.events import ConcurrencyConflict, append_many

        while True:
            try:
                append_many(staged=True, relation=EVENTS_VIEW, source="backfill", venue=self.venue, now=now)
                break
            except ConcurrencyConflict as exc:  # those streams moved: skip them, append the rest
                moved = getattr(exc, "moved", None)
                if not moved:
                    raise
                ids = sorted(moved)
                out.skips.extend((pk, None, CONFLICT, f"operation {pk}: stream at version {moved[pk][0]}, "
                                                      f"expected {moved[pk][1]}") for pk in ids)
                cursor.execute(f"UPDATE {BATCH_TABLE} SET state = 'conflict' WHERE id = ANY(%s)", [ids])
        cursor.execute(_update_levels_sql(), [now])
        out.updated, out.stops_set, out.targets_set = cursor.fetchone()

    def _inside_batch_hook(self) -> None:
        """``STOPMONITOR_BACKFILL_BATCH_SLEEP``: announce the batch and sleep before its commit."""
        if self.batch_sleep:
            self.progress.note(f"hook: inside batch {self.summary.batches + 1}")
            time.sleep(self.batch_sleep)

    def _apply(self, out: _BatchOutcome) -> None:
        """Count and report a committed batch (or a dry run's): would-set lines, then skip lines."""
        s = self.summary
        s.already_done += out.already
        for op, change in out.would:
            self._report_would_set(op, change)
            out.count(change)
        s.updated += out.updated
        s.stops_set += out.stops_set
        s.targets_set += out.targets_set
        self._count_skips(out.skips)

    def _count_skips(self, skips: list[tuple[int, str | None, str, str]]) -> None:
        s = self.summary
        skipped_ops: dict[int, set] = {}
        for pk, field_name, reason, detail in skips:
            self._report_skip(pk, field_name, reason, detail)
            skipped_ops.setdefault(pk, set()).add(reason)
        s.skipped_operations += len(skipped_ops)
        for reasons in skipped_ops.values():
            s.skipped_by_reason.update(reasons)

    def _batch(self, ids: list[int]) -> None:
        """Other databases than PostgreSQL (development on SQLite): the same batch, one model object
        and one :func:`compute_level` per operation. One transaction: lock what is free, re-check
        under the lock (:func:`_plan_rows`), append events, update rows (:meth:`_write_plans`).
        Counters are applied only after the commit, so a retried batch counts once."""
        from django.db import transaction

        from api.models import Operation

        now = datetime.now(timezone.utc)
        out = _BatchOutcome()
        with transaction.atomic():
            rows = list(
                Operation.objects.select_for_update(skip_locked=True, of=("self",)).select_related("symbol")
                .filter(pk__in=ids).order_by("pk")
            )
            out.skip_locked(sorted(set(ids) - {op.pk for op in rows}))
            plans = _plan_rows(rows, out)
            if self.dry_run:
                out.would = plans
            elif plans:
                self._write_plans(plans, now, out)
            self._inside_batch_hook()
        self._apply(out)  # committed (or a read-only dry run)

    def _write_plans(self, plans: list, now: datetime, out: _BatchOutcome) -> None:
        """The model path's writes for ``plans`` (``(operation, Change)``, rows locked): their
        STOP_SET / TARGET_SET events at each stream's current version (:meth:`_append_plans`),
        then the levels of the operations whose events were appended, in one ``bulk_update``."""
        from django.db.models import Max

        from api.models import Operation, StopMonitorEvent

        versions = dict(
            StopMonitorEvent.objects.filter(operation_id__in=[op.pk for op, _ in plans])
            .values("operation_id").annotate(v=Max("version")).values_list("operation_id", "v")
        )
        items = [(op, versions.get(op.pk, 0), _level_events(op, change), change) for op, change in plans]
        to_update = []
        for op, change in self._append_plans(items, now, out):
            for name, (price, _) in change.levels.items():
                setattr(op, name, price)
            op.updated_at = now
            to_update.append(op)
            out.count(change)
        if to_update:
            Operation.objects.bulk_update(to_update, ["stop_price", "target_price", "updated_at"])

    def _append_plans(self, items: list, now: datetime, out: _BatchOutcome) -> list:
        """Append the events of ``items`` (``(operation, version, events, Change)``) with the
        set-based writer: one version check and one COPY for the batch. A stream that moved makes it
        refuse them all: then one append per operation, and the moved ones are ``conflict`` skips.
        Returns ``(operation, Change)`` of those appended."""
        from django.db import transaction

        from stopmonitor.events import ConcurrencyConflict, append_events, append_many

        try:
            append_many([(op, v, evs) for op, v, evs, _ in items], source="backfill", venue=self.venue, now=now)
            return [(op, change) for op, _, _, change in items]
        except ConcurrencyConflict:  # a stream moved: fall back to one append per operation
            pass
        appended = []
        for op, v, evs, change in items:
            try:
                with transaction.atomic():
                    append_events(op, v, evs, source="backfill", venue=self.venue, now=now)
            except ConcurrencyConflict as exc:
                out.skips.append((op.pk, None, CONFLICT, str(exc)))
                continue
            appended.append((op, change))
        return appended


def _plan_rows(rows: list, out: _BatchOutcome) -> list:
    """The model path's re-check under the lock: ``(operation, Change)`` for each row to write;
    one closed or cancelled since it was listed, or whose levels were set meanwhile, counts as
    already done; skips are recorded in ``out``."""
    plans = []
    for op in rows:
        if op.status not in OPEN_STATUSES:
            out.already += 1  # closed or cancelled since it was listed
            continue
        change = out.take(op.pk, plan_operation(op))
        if change is not None:
            plans.append((op, change))
    return plans


def _level_events(op, change: Change) -> list:
    """The ``STOP_SET`` / ``TARGET_SET`` events (stop first) of ``change`` for ``op``; payload
    values as :func:`stopmonitor.rules.decimal_str` writes them."""
    from stopmonitor.execution import NewEvent
    from stopmonitor.rules import decimal_str

    events = []
    for _, price_field, pct_field, event_type in LEVELS:
        if price_field not in change.levels:
            continue
        price, pct = change.levels[price_field]
        events.append(NewEvent(event_type, {
            price_field: decimal_str(price),
            pct_field: decimal_str(pct),
            "entry_price": decimal_str(op.entry_price),
            "tick_size": decimal_str(op.symbol.tick_size),
            "rounding": "towards_entry",
        }))
    return events


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress on ``stream`` (stderr): a redrawn bar on a terminal, a plain line every ``interval`` s otherwise."""

    def __init__(self, stream, interval: float, tty: bool | None = None):
        self.stream = stream
        self.interval = interval
        self.tty = stream.isatty() if tty is None else tty
        self.total = 0
        self.started = time.monotonic()
        self.last = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        if not self.tty:
            self._write(f"backfill: {total} operations to look at\n")

    def note(self, text: str) -> None:
        self._write(("\n" if self.tty else "") + text + "\n")

    def update(self, s: Summary, force: bool = False) -> None:
        now = time.monotonic()
        if not force and not self.tty and self.interval > 0 and now - self.last < self.interval:
            return
        if not force and self.tty and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = s.scanned / elapsed
        total = max(self.total, s.scanned)
        eta = (total - s.scanned) / rate if rate > 0 else 0
        pct = 100.0 * s.scanned / total if total else 100.0
        counts = f"updated={s.updated} skipped={s.skipped_operations}"
        if self.tty:
            width = 30
            filled = int(width * pct / 100)
            bar = "#" * filled + "." * (width - filled)
            self._write(f"\r[{bar}] {pct:5.1f}% {s.scanned}/{total} {rate:,.0f} rows/s ETA {_fmt_eta(eta)} {counts}")
        else:
            self._write(f"backfill: {s.scanned}/{total} ({pct:.1f}%) {rate:.0f} rows/s ETA {_fmt_eta(eta)} "
                        f"batches={s.batches} {counts}\n")

    def finish(self, s: Summary) -> None:
        if self.tty:
            self.update(s, force=True)
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: progress is best effort
            pass


class Command(BaseCommand):
    help = "Backfill stop_price/target_price from the deprecated percentages, with STOP_SET/TARGET_SET events."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=1000, help="operations per transaction (default 1000)")
        parser.add_argument("--limit", type=int, default=None, help="look at no more than N operations")
        parser.add_argument("--tenant", type=int, default=None, help="only this tenant's (client id) operations")
        parser.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
        parser.add_argument("--json", action="store_true", help="skips, would-set lines and the summary as JSON lines")
        parser.add_argument("--progress-interval", type=float, default=5.0,
                            help="seconds between progress lines when stderr is not a terminal (0 = every batch)")

    def handle(self, *args, **opts):
        require_migrated(returncode=2)  # one line, exit 2 (1 is a finding here), never a traceback
        from django.conf import settings
        from django.db import DatabaseError

        from api.models import Client

        if opts["batch_size"] <= 0:
            raise CommandError("--batch-size must be a positive integer", returncode=2)
        if opts["limit"] is not None and opts["limit"] < 0:
            raise CommandError("--limit must not be negative", returncode=2)
        try:
            if opts["tenant"] is not None and not Client.objects.filter(pk=opts["tenant"]).exists():
                raise CommandError(f"tenant {opts['tenant']} does not exist", returncode=2)
        except DatabaseError as exc:
            raise CommandError(f"database error: {type(exc).__name__}: {_one_line(exc)}", returncode=2) from None

        run = Backfill(batch_size=opts["batch_size"], limit=opts["limit"], tenant_id=opts["tenant"],
                       dry_run=opts["dry_run"], venue=event_venue(settings.EXCHANGE_VENUE), as_json=opts["json"],
                       out=self.stdout, progress=Progress(sys.stderr, opts["progress_interval"]))

        def _stop(signum, frame):
            run.stop_signal = signum

        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            summary = run.run()
        except DatabaseError as exc:
            run.summary.error = f"database error: {type(exc).__name__}: {_one_line(exc)}"
            self._print_summary(run.summary, opts["json"])
            raise CommandError(run.summary.error, returncode=2) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._print_summary(summary, opts["json"])
        if summary.interrupted:
            sys.exit(128 + signal.Signals[summary.interrupted].value)
        if summary.skipped_operations:
            sys.exit(1)

    def _print_summary(self, s: Summary, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(s.as_dict(), separators=(",", ":")))
            return
        d = s.as_dict()
        reasons = ", ".join(f"{k}={v}" for k, v in d["skipped_by_reason"].items())
        verb = "would update" if s.dry_run else "updated"
        line = (f"backfill{' (dry run)' if s.dry_run else ''}: scanned={s.scanned} {verb}={s.updated} "
                f"(stops={s.stops_set} targets={s.targets_set}) skipped={s.skipped_operations}"
                f"{' (' + reasons + ')' if reasons else ''} already_done={s.already_done} batches={s.batches} "
                f"{d['duration_s']:.3f}s {d['rows_per_s']:.0f} rows/s")
        if s.interrupted:
            line += f"; interrupted by {s.interrupted}: run again to continue"
        self.stdout.write(line)
        if d["nothing_to_do"]:
            self.stdout.write("nothing to backfill: every open operation already has its absolute levels")
        elif s.updated == 0 and not s.dry_run and not s.interrupted:
            self.stdout.write("no changes: the operations listed above need attention")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
