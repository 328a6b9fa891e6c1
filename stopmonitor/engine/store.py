"""The engine's reads and writes of ``api.models`` — the only engine module that imports them.

Every function that locks (``select_for_update``) must run inside ``transaction.atomic``; the
advisory locks (:func:`pass_lock`, :func:`execution_claim`) are session-level and hold across
transactions. Every lock wait is bounded by the database's ``lock_timeout``.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Iterable

from django.db import connection, transaction
from django.db.models import Q

from api.models import (
    CircuitBreakerState,
    ExchangeAccount,
    Operation,
    StopMonitorEvent,
    StopMonitorExecution,
    StopMonitorProtection,
    Symbol,
    TenantConfig,
    current_venue,
    recorded_venue,
)
from stopmonitor import guardrails as g
from stopmonitor import protection as p
from stopmonitor.execution import STOP_TRIGGERED
from stopmonitor import trailing
from stopmonitor.trailing import TrailingSettings
from stopmonitor.vocabulary import ExecutionStatus, OperationStatus

PASS_LOCK_KEY = 0x4D4F4E49  # "MONI": one pass at a time across pods (pg_try_advisory_lock)


@dataclass(frozen=True)
class Watched:
    """An ACTIVE operation with a stop or target, as loaded by the pass (no ORM objects)."""

    operation_id: int
    symbol: str
    side: str
    stop_price: Decimal | None
    target_price: Decimal | None
    entry_price: Decimal | None = None
    tick_size: Decimal | None = None
    trailing: TrailingSettings = TrailingSettings()
    account_id: int | None = None  # None: the default account (the environment's keys)


# ----------------------------------------------------------------------------- advisory locks


@contextmanager
def session_lock(key: int):
    """Try a PostgreSQL session-level advisory lock (``pg_try_advisory_lock``) without waiting;
    yields whether it is held, and releases it on exit. Elsewhere (SQLite: one process) yields True."""
    if connection.vendor != "postgresql":
        yield True
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


@contextmanager
def pass_lock():
    """Session-level advisory lock so overlapping CronJob pods don't both work (PostgreSQL).

    Yields True when this process holds it, False when another pass does. Row locks keep
    correctness either way; this only avoids duplicate work. Elsewhere always yields True.
    """
    with session_lock(PASS_LOCK_KEY) as acquired:
        yield acquired


@contextmanager
def execution_claim(token: str):
    """Claim one execution for this process while its order is in flight (PostgreSQL
    session-level advisory lock keyed by the client order id; not a row lock).

    Yields False when another process holds it: the order may be on its way, so nobody else
    may ask "does it exist?" and re-send it. A crash releases it with the session. Re-entrant
    within one process. Elsewhere (SQLite: one process) always yields True.
    """
    key = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "big", signed=True)
    with session_lock(key) as acquired:
        yield acquired


# ----------------------------------------------------------------------------- operations


def lock_operation(operation_id: int) -> Operation:
    """The ``Operation`` (with its symbol) locked until the end of the caller's transaction: the one
    lock every writer of an operation takes before it reads the stream and appends (invariant 1).

    ``FOR NO KEY UPDATE`` of the operation row and of its symbol row: closers and level changes of
    one symbol still queue for each other (the per-symbol order the breaker relies on), but the lock
    does not conflict with the ``FOR KEY SHARE`` that PostgreSQL takes on the symbol (and the operation)
    when a row referencing it is inserted — with a plain ``FOR UPDATE``, an insert holding that key
    lock and waiting for the append lock, a closer queued on the symbol and the append lock's holder
    needing the same key lock deadlocked (266 of 600 requests under 40 concurrent API clients).
    Raises ``Operation.DoesNotExist``. Must run inside ``transaction.atomic``.

    The wait for the lock (and for every later lock of the transaction) is bounded by
    ``ENGINE_LOCK_TIMEOUT_MS`` (``SET LOCAL lock_timeout``, PostgreSQL; not repeated on a session
    :func:`~stopmonitor.dbhealth.engine_timeouts` already set to it: a statement fewer in each of
    the close's transactions): one row held elsewhere raises ``OperationalError`` (55P03), which
    the pass reports as a skipped decision and takes next pass (issue #12 item 12), instead of
    stalling every other close behind it.
    """
    if connection.vendor == "postgresql":
        from django.conf import settings

        from stopmonitor.dbhealth import session_lock_timeout_ms

        ms = int(getattr(settings, "STOPMONITOR", {}).get("ENGINE_LOCK_TIMEOUT_MS", 2000))
        if session_lock_timeout_ms(connection) != ms:
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{ms}ms"])
        return _lock_operation_pg(operation_id)
    return Operation.objects.select_for_update(no_key=True).select_related("symbol").get(pk=operation_id)


def _columns(model, alias: str) -> str:
    return ", ".join(f"{alias}.{connection.ops.quote_name(f.column)}" for f in model._meta.concrete_fields)


def _from_row(model, row):
    """A model instance from the values of its concrete fields, in their order (as the ORM builds it)."""
    return model.from_db(connection.alias, [f.attname for f in model._meta.concrete_fields], row)


def _lock_operation_pg(operation_id: int) -> Operation:
    """:func:`lock_operation`'s query hand-written (PostgreSQL): the same ``FOR NO KEY UPDATE`` of the
    operation and its symbol row, the same instances, without compiling the query each time (each of
    the close's transactions starts with it)."""
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_columns(Operation, 'o')}, {_columns(Symbol, 's')} FROM {qn(Operation._meta.db_table)} o "
                       f"JOIN {qn(Symbol._meta.db_table)} s ON s.id = o.symbol_id WHERE o.id = %s FOR NO KEY UPDATE",
                       [operation_id])
        row = cursor.fetchone()
    if row is None:
        raise Operation.DoesNotExist(f"Operation matching id={operation_id} does not exist.")
    n = len(Operation._meta.concrete_fields)
    op = _from_row(Operation, row[:n])
    Operation.symbol.field.set_cached_value(op, _from_row(Symbol, row[n:]))
    return op


def get_operation(operation_id: int) -> Operation:
    """The ``Operation`` with its symbol, not locked. Raises ``Operation.DoesNotExist``."""
    return Operation.objects.select_related("symbol").get(pk=operation_id)


def create_operation(**fields) -> Operation:
    """Insert one ``Operation`` row (the caller appends its first events in the same transaction)."""
    return Operation.objects.create(**fields)


_WATCHED_COLUMNS = ("id", "symbol__symbol", "side", "stop_price", "target_price", "entry_price", "symbol__tick_size",
                    *trailing.COLUMNS, "account_id")


def _watched_rows(venue: str | None, symbols: Iterable[str] | None = None):
    """The watched rows' query: ACTIVE operations of ``venue`` (default EXCHANGE_VENUE, or of no
    recorded venue) with a stop or target, as tuples of ``_WATCHED_COLUMNS`` (partial index from
    0018); only ``symbols`` when given."""
    rows = (Operation.objects.filter(Q(venue=venue or current_venue()) | Q(venue__isnull=True),
                                     status=OperationStatus.ACTIVE)
            .filter(Q(stop_price__isnull=False) | Q(target_price__isnull=False)))
    if symbols is not None:
        rows = rows.filter(symbol__symbol__in=sorted(symbols))
    return rows.values_list(*_WATCHED_COLUMNS)


def load_watched(venue: str | None = None, symbols: Iterable[str] | None = None) -> list[Watched]:
    """Every ACTIVE operation of ``venue`` (default EXCHANGE_VENUE) with a stop or target, in one
    query (partial index from 0018); another venue's operations are left alone (migration 0026).
    ``symbols``: only the operations on those symbols (the stream's reload of what changed)."""
    return [Watched(*row[:7], trailing=_trailing(row[7:13]), account_id=row[13])
            for row in _watched_rows(venue, symbols)]


def watched_fingerprints(venue: str | None = None) -> dict[str, str] | None:
    """``{symbol: md5 of its watched rows}``, computed by PostgreSQL over exactly the rows and
    columns :func:`load_watched` reads (ordered by id): a symbol whose fingerprint is unchanged
    has the same watched operations with the same levels. The database does the work, so a poll
    of 10k operations costs the caller one round trip instead of building 10k rows in Python.
    None on a database other than PostgreSQL (the caller then reloads everything)."""
    if connection.vendor != "postgresql":
        return None
    sql, params = _watched_rows(venue).query.sql_with_params()
    names = ", ".join(f"c{i}" for i in range(len(_WATCHED_COLUMNS)))
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT w.c1, md5(string_agg(w::text, ';' ORDER BY w.c0)) FROM ({sql}) AS w({names}) "
                       "GROUP BY w.c1", params)
        return dict(cursor.fetchall())


@contextmanager
def watched_snapshot():
    """One snapshot for :func:`watched_fingerprints` and the :func:`load_watched` that follows it
    (a read-only REPEATABLE READ transaction on PostgreSQL, outside any transaction already open):
    read in two snapshots, a change committed between the reads and undone before the next poll
    (a close elsewhere: ACTIVE -> CLOSING, then released) left the loaded rows without the
    operation under the fingerprint of rows that had it, and no later fingerprint differed."""
    if connection.in_atomic_block or connection.vendor != "postgresql":  # the caller's transaction (a test's)
        yield
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


_NO_TRAILING = TrailingSettings()


def _trailing(values: tuple) -> TrailingSettings:
    """The trailing settings of one watched row (one shared empty value when none is set)."""
    return TrailingSettings.from_values(*values) if any(v is not None for v in values[:5]) else _NO_TRAILING


def start_closing(op: Operation, token: str, now: datetime) -> None:
    """ACTIVE → CLOSING with ``token`` as the one close in flight (invariant 1). Caller holds the row lock."""
    op.status = OperationStatus.CLOSING
    op.stop_execution_token = token
    op.last_stop_check_at = now
    op.stop_check_count = (op.stop_check_count or 0) + 1
    op.save(update_fields=["status", "stop_execution_token", "last_stop_check_at", "stop_check_count", "updated_at"])


def release(op: Operation) -> None:
    """The close is over without closing everything: back to ACTIVE (the rest stays protected)."""
    op.status = OperationStatus.ACTIVE
    op.stop_execution_token = None
    op.save(update_fields=["status", "stop_execution_token", "updated_at"])


def record_closed_quantity(op: Operation, closed_qty: Decimal) -> bool:
    """Add a fill to the operation's closed quantity; CLOSED when nothing remains, else back to
    ACTIVE. Returns whether it is closed. Caller holds the row lock."""
    op.closed_quantity = (op.closed_quantity or Decimal("0")) + closed_qty
    closed = op.remaining_quantity <= 0
    if closed:
        op.status = OperationStatus.CLOSED
    else:
        op.status = OperationStatus.ACTIVE
        op.stop_execution_token = None
    op.save(update_fields=["closed_quantity", "status", "stop_execution_token", "updated_at"])
    return closed


# ----------------------------------------------------------------------------- tenant and breaker


def tenant_config(client_id: int, lock: bool) -> TenantConfig:
    """The tenant's risk configuration (defaults when it has none). ``lock``: the row is the
    tenant's mutex for the rate limit, created so there is one to lock."""
    if lock:
        found = _one(TenantConfig, "client_id", client_id, lock=True)
        if found is not None:
            return found
        cfg, _ = TenantConfig.objects.select_for_update().get_or_create(client_id=client_id)
        return cfg
    if connection.vendor == "postgresql":
        return _one(TenantConfig, "client_id", client_id, lock=False) or TenantConfig(client_id=client_id)
    return TenantConfig.objects.filter(client_id=client_id).first() or TenantConfig(client_id=client_id)


def _one(model, column: str, value, *, lock: bool):
    """PostgreSQL: the row of ``model`` whose unique ``column`` is ``value`` (``lock``: ``FOR UPDATE``)
    in one hand-written statement; None when there is none (the caller creates it) or elsewhere."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_columns(model, 't')} FROM {connection.ops.quote_name(model._meta.db_table)} t "
                       f"WHERE t.{connection.ops.quote_name(column)} = %s{' FOR UPDATE' if lock else ''}", [value])
        row = cursor.fetchone()
    return _from_row(model, row) if row is not None else None


def _create_missing(model, **fields) -> None:
    """PostgreSQL: insert ``model(**fields)`` with its defaults unless its unique key exists already
    (``ON CONFLICT DO NOTHING``: no savepoint, unlike ``get_or_create``); values prepared by the fields."""
    row = model(**fields)
    concrete = [f for f in model._meta.concrete_fields if not f.primary_key or f.attname in fields]
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {qn(model._meta.db_table)} ({', '.join(qn(f.column) for f in concrete)}) "
                       f"VALUES ({', '.join(['%s'] * len(concrete))}) ON CONFLICT DO NOTHING",
                       [f.get_db_prep_save(f.pre_save(row, add=True), connection) for f in concrete])


def breaker(symbol: str, lock: bool) -> CircuitBreakerState:
    """The symbol's circuit-breaker row (``lock``: created and locked)."""
    if lock:
        if connection.vendor == "postgresql":  # every symbol's first close creates its row: no savepoint
            found = _one(CircuitBreakerState, "symbol", symbol, lock=True)
            if found is None:
                _create_missing(CircuitBreakerState, symbol=symbol)
                found = _one(CircuitBreakerState, "symbol", symbol, lock=True)
            return found
        row, _ = CircuitBreakerState.objects.select_for_update().get_or_create(symbol=symbol)
        return row
    if connection.vendor == "postgresql":
        return _one(CircuitBreakerState, "symbol", symbol, lock=False) or CircuitBreakerState(symbol=symbol)
    return CircuitBreakerState.objects.filter(symbol=symbol).first() or CircuitBreakerState(symbol=symbol)


def breaker_domain(row: CircuitBreakerState) -> g.BreakerState:
    """The row as the pure :class:`stopmonitor.guardrails.BreakerState`."""
    return g.BreakerState(row.state, row.failure_count, row.opened_at, row.retry_at, row.last_error)


def save_breaker(row: CircuitBreakerState, state: g.BreakerState) -> None:
    """Write ``state`` into the breaker row."""
    row.state, row.failure_count, row.opened_at, row.retry_at, row.last_error = (
        state.state, state.failure_count, state.opened_at, state.retry_at, state.last_error
    )
    row.save()


# ----------------------------------------------------------------------------- executions


IN_FLIGHT = (ExecutionStatus.TRIGGERED, ExecutionStatus.SUBMITTED)


def get_execution(token: str) -> StopMonitorExecution:
    """The execution projection row of ``token``."""
    return StopMonitorExecution.objects.get(pk=token)


def close_in_flight(symbol: str) -> bool:
    """Whether any execution on ``symbol`` is TRIGGERED or SUBMITTED (the half-open breaker's trial)."""
    return StopMonitorExecution.objects.filter(symbol=symbol, status__in=IN_FLIGHT).exists()


def attempts_so_far(operation_id: int) -> int:
    """How many ``STOP_TRIGGERED`` the operation's stream holds (the next attempt is one more)."""
    return StopMonitorEvent.objects.filter(operation_id=operation_id, event_type=STOP_TRIGGERED).count()


def trigger_counts(tenant_id: int, operation_id: int, now: datetime) -> tuple[int, int, int]:
    """``(the tenant's STOP_TRIGGERED in the last minute, in the last hour, the operation's so far)``:
    :func:`recent_triggers` and :func:`attempts_so_far` in ONE statement on PostgreSQL (the
    (tenant, created_at) and (operation, version) indexes), the two queries elsewhere."""
    if connection.vendor != "postgresql":
        return (*recent_triggers(tenant_id, now), attempts_so_far(operation_id))
    table = connection.ops.quote_name(StopMonitorEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FILTER (WHERE created_at > %s), count(*), "
            f"(SELECT count(*) FROM {table} WHERE operation_id = %s AND event_type = %s) "
            f"FROM {table} WHERE tenant_id = %s AND event_type = %s AND created_at > %s",
            [now - timedelta(minutes=1), operation_id, STOP_TRIGGERED, tenant_id, STOP_TRIGGERED,
             now - timedelta(hours=1)])
        minute, hour, attempts = cursor.fetchone()
    return minute, hour, attempts


def recent_triggers(tenant_id: int, now: datetime) -> tuple[int, int]:
    """The tenant's ``STOP_TRIGGERED`` in the last minute and the last hour before ``now``."""
    recent = list(StopMonitorEvent.objects.filter(
        tenant_id=tenant_id, event_type=STOP_TRIGGERED, created_at__gt=now - timedelta(hours=1)
    ).values_list("created_at", flat=True))
    return sum(1 for t in recent if t > now - timedelta(minutes=1)), len(recent)


def pending_executions(cutoff: datetime) -> list[tuple[str, int, str, str, int | None]]:
    """Executions TRIGGERED or SUBMITTED not updated since ``cutoff``, oldest first:
    (token, operation id, symbol, status, the operation's account id or None)."""
    return list(
        StopMonitorExecution.objects.filter(status__in=IN_FLIGHT, updated_at__lte=cutoff)
        .order_by("created_at")
        .values_list("execution_token", "operation_id", "symbol", "status", "operation__account_id")
    )


# ----------------------------------------------------------------------------- evidence (issue #12)


def protection_shares(op: Operation, closing_too=()) -> tuple[Decimal, Decimal, Decimal]:
    """``(own, need, protected)`` in ``op``'s base asset, in ONE query (it was three before the order):

    - ``own``: what the operation's own SELL protection (PLACED or REQUESTED in the projection)
      holds, 0 when none does (P6: sellable by its close, which releases it);
    - ``need`` and ``protected``: for the OTHER ACTIVE long operations on the same exchange account
      (the default account when none; whatever their tenant: they share its balance, issue #20),
      what they still need (remaining), and how much of it their resting protection holds outside
      the free balance. The caller bounds both credits by what the exchange says is locked (a
      projection can be stale). Operations in ``closing_too`` (triggered in the same pass: each is
      closing from this balance next) are not reserved: the account's coins go to the closes in
      order, the last one short. For a short, need and protected are 0.

    Invariant 5: a close never sells what another operation needs."""
    resting = (p.PLACED, p.REQUESTED)
    if op.side == "BUY":  # the operation itself is one of these rows (a long of that account and asset)
        rows = (Operation.objects.filter(account_id=op.account_id, side="BUY", symbol__base_asset=op.symbol.base_asset)
                .filter(Q(status=OperationStatus.ACTIVE) | Q(pk=op.pk)).exclude(pk__in=[c for c in closing_too if c != op.pk]))
    else:
        rows = Operation.objects.filter(pk=op.pk)
    rows = rows.values_list("pk", "quantity", "closed_quantity", "protection__side", "protection__status",
                            "protection__quantity")
    own = need = protected = Decimal("0")
    for pk, q, c, side, status, held in rows:
        held = (held or Decimal("0")) if side == "SELL" and status in resting else Decimal("0")
        if pk == op.pk:
            own = held
            continue
        remaining = max(q - (c or Decimal("0")), Decimal("0"))
        need += remaining
        protected += min(held, remaining)
    return own, need, protected


def trigger_payload(token: str) -> dict:
    """The ``STOP_TRIGGERED`` payload of execution ``token`` (its planned dust, quantity, …)."""
    row = (StopMonitorEvent.objects.filter(execution_token=token, event_type=STOP_TRIGGERED)
           .values_list("payload", flat=True).first())
    return row or {}


def has_resubmission(token: str) -> bool:
    """Whether ``token`` was already sent once more by a reconcile (an earlier send may exist)."""
    return StopMonitorEvent.objects.filter(execution_token=token, event_type="RECONCILED",
                                           payload__resubmitted=True).exists()


def recorded_order_ids(symbol: str) -> list[int]:
    """Exchange order ids already recorded on ``symbol`` (EXECUTED / PARTIALLY_EXECUTED / FAILED):
    trades of these orders belong to other executions."""
    return [int(v) for v in StopMonitorExecution.objects.filter(symbol=symbol, exchange_order_id__isnull=False)
            .values_list("exchange_order_id", flat=True)]


def last_recorded_order(symbol: str, venue: str) -> tuple[str, int] | None:
    """(client order id, order id) of the newest order recorded as filled on ``symbol`` at ``venue``:
    if the exchange no longer knows it, its orders are gone (a testnet reset)."""
    row = (StopMonitorExecution.objects.filter(symbol=symbol, venue=venue, exchange_order_id__isnull=False,
                                               status__in=(ExecutionStatus.EXECUTED, ExecutionStatus.PARTIALLY_EXECUTED))
           .order_by("-updated_at").values_list("execution_token", "exchange_order_id").first())
    return (row[0], int(row[1])) if row else None


def review_already_recorded(op_id: int, token: str) -> bool:
    """Whether the stream's last event is already the NEEDS_REVIEW block of ``token`` (recorded once)."""
    last = StopMonitorEvent.objects.filter(operation_id=op_id).order_by("-version").values_list(
        "event_type", "payload").first()
    return bool(last and last[0] == "BLOCKED" and last[1].get("reason") == g.BlockReason.NEEDS_REVIEW
                and last[1].get("client_order_id") == token)


# ----------------------------------------------------------------------------- exchange accounts


@dataclass(frozen=True)
class AccountCredentials:
    """One exchange account as the engine needs it; ``api_key``/``secret`` never in its repr.

    ``secret`` is the decrypted HMAC secret or Ed25519 private key (PEM) per ``key_type``."""

    account_id: int
    label: str
    venue: str
    key_type: str
    enabled: bool
    disabled_reason: str
    api_key: str = field(repr=False)
    secret: str = field(repr=False)


def account_credentials(account_id: int) -> AccountCredentials:
    """The account's credentials, its secret decrypted (:mod:`stopmonitor.account_crypto`).

    Raises ``ExchangeAccount.DoesNotExist`` and :class:`~stopmonitor.account_crypto.AccountCryptoError`."""
    from stopmonitor import account_crypto

    from config.secrets import register_secret

    row = ExchangeAccount.objects.get(pk=account_id)
    register_secret(row.api_key)  # the key id is a credential too (config/secrets.py)
    return AccountCredentials(row.pk, row.label, row.venue, row.key_type, row.enabled, row.disabled_reason,
                              row.api_key, account_crypto.decrypt(row.secret_encrypted))


def enabled_account_ids(venue: str) -> list[int]:
    """Ids of the enabled exchange accounts on ``venue``, oldest first."""
    return list(ExchangeAccount.objects.filter(venue=venue, enabled=True).order_by("pk").values_list("pk", flat=True))


def account_enabled(account_id: int | None) -> tuple[bool, str]:
    """Whether the account may place orders (the default account always may) and, if not, why."""
    if account_id is None:
        return True, ""
    row = ExchangeAccount.objects.filter(pk=account_id).values_list("enabled", "disabled_reason", "label").first()
    if row is None:
        return False, f"account {account_id} does not exist"
    enabled, reason, label = row
    return enabled, "" if enabled else f"account {label!r} is disabled" + (f": {reason}" if reason else "")


# ----------------------------------------------------------------------------- protection (issue #13)


ALL_ACCOUNTS = object()  # a protection query over every account's operations (no tenant accounts in play)


def stop_operations(venue: str, operation_ids=None, account=ALL_ACCOUNTS) -> list[Operation]:
    """ACTIVE operations of ``venue`` (or of no recorded venue, as before migration 0026) with a
    stop, oldest first, with their symbol, tenant settings and protection row (one query); only
    ``operation_ids`` and only ``account``'s (an id, or None for the default account) when given."""
    qs = (Operation.objects.filter(Q(venue=recorded_venue(venue)) | Q(venue__isnull=True), status="ACTIVE",
                                   stop_price__isnull=False)
          .select_related("symbol", "client__risk_config", "protection").order_by("pk"))
    if operation_ids is not None:
        qs = qs.filter(pk__in=list(operation_ids))
    if account is not ALL_ACCOUNTS:
        qs = qs.filter(account_id=account)
    return list(qs)


def protection_row(op: Operation) -> StopMonitorProtection | None:
    """The operation's protection projection row (loaded with it, or one query), None when never armed."""
    try:
        return op.protection
    except StopMonitorProtection.DoesNotExist:
        return None


def protection_of(operation_id: int) -> StopMonitorProtection | None:
    """The protection projection row of ``operation_id``, not locked; None when never armed."""
    return StopMonitorProtection.objects.filter(pk=operation_id).first()


def leftover_protections(venue: str, expected_ids: set[int], account=ALL_ACCOUNTS) -> list[StopMonitorProtection]:
    """Protection rows still PLACED/REQUESTED of ``venue``'s operations (or of no recorded venue)
    outside ``expected_ids`` and not CLOSING (a close in flight), with their operation's symbol;
    only ``account``'s operations (an id, or None for the default account) when given."""
    rows = (StopMonitorProtection.objects.filter(status__in=(p.PLACED, p.REQUESTED))
            .filter(Q(operation__venue=recorded_venue(venue)) | Q(operation__venue__isnull=True))
            .exclude(operation_id__in=expected_ids).exclude(operation__status="CLOSING"))
    if account is not ALL_ACCOUNTS:
        rows = rows.filter(operation__account_id=account)
    return list(rows.select_related("operation__symbol"))


def operation_exists(operation_id: int) -> bool:
    """Whether the operation row exists (not locked)."""
    return Operation.objects.filter(pk=operation_id).exists()


def protection_accounts() -> dict:
    """``{account id or None: operation ids}`` of the operations protection looks after (every
    venue): ACTIVE ones with a stop and every one whose protection still rests (PLACED/REQUESTED).
    Only ``{None: …}`` (or nothing) when no operation is on a tenant account: two queries, the
    second only when some are."""
    if not Operation.objects.filter(account_id__isnull=False).exists():
        return {None: set()}
    groups: dict = {None: set()}  # the default account's audit always runs (its orders left over are its own)
    for op_id, account_id in (Operation.objects.filter(status="ACTIVE", stop_price__isnull=False)
                              .values_list("pk", "account_id")):
        groups.setdefault(account_id, set()).add(op_id)
    for op_id, account_id in (StopMonitorProtection.objects.filter(status__in=(p.PLACED, p.REQUESTED))
                              .values_list("operation_id", "operation__account_id")):
        groups.setdefault(account_id, set()).add(op_id)
    return groups
