"""The schema: tenants, symbols, operations, the event store and its projections.

Money and quantities are ``DecimalField(20, 8)``: prices in the quote asset, quantities in the
base asset. Times are UTC. The event table is append-only (invariant 8): on PostgreSQL a
trigger from migration 0015 refuses UPDATE and DELETE, and the ORM methods refuse them too.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from uuid6 import uuid7


def money_field(**kwargs):
    """``DecimalField(max_digits=20, decimal_places=8)``: the one column type for prices and quantities."""
    return models.DecimalField(max_digits=20, decimal_places=8, **kwargs)


class Side(models.TextChoices):
    BUY = "BUY"
    SELL = "SELL"


class Client(models.Model):
    """A tenant: one trader or desk whose operations, limits and kill switch are its own."""

    name = models.CharField(max_length=120, unique=True)
    users = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="clients")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Symbol(models.Model):
    """A spot market and its exchange filters (Binance exchangeInfo: PRICE_FILTER, LOT_SIZE, NOTIONAL)."""

    symbol = models.CharField(max_length=20, unique=True)
    base_asset = models.CharField(max_length=12)
    quote_asset = models.CharField(max_length=12)
    tick_size = money_field(null=True, blank=True)
    step_size = money_field(null=True, blank=True)
    min_qty = money_field(null=True, blank=True)
    min_notional = money_field(null=True, blank=True)
    #: MARKET_LOT_SIZE maxQty (with LOT_SIZE's): a close larger than this goes in chunks, each
    #: of which must clear minNotional at the stop (checked at opening; issue #12 item 6)
    market_max_qty = money_field(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.symbol


class OperationStatus(models.TextChoices):
    PLANNED = "PLANNED"
    ACTIVE = "ACTIVE"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"
    CANCELLED = "CANCELLED"


def current_venue() -> str:
    """The venue this deployment trades on, as its exchange adapter names itself (``exchange.venue``):
    what a new operation remembers. ``EXCHANGE_VENUE=replay`` fills on paper, so it is ``paper``."""
    from django.conf import settings

    venue = str(settings.EXCHANGE_VENUE)
    return "paper" if venue == "replay" else venue


def recorded_venue(venue: str | None = None) -> str:
    """The venue operations remember for an adapter or setting named ``venue`` (``replay`` fills on
    paper); None or empty: this deployment's (:func:`current_venue`)."""
    if not venue:
        return current_venue()
    return "paper" if venue == "replay" else venue


class Operation(models.Model):
    """One position of one tenant on one symbol; its events form one stream.

    ``side`` is the opening side: BUY = long (closed by a SELL), SELL = short (closed by a
    BUY). ``quantity`` is the opened size in the base asset, ``closed_quantity`` what fills
    have closed so far. ``stop_price``/``target_price`` are absolute levels in the quote asset;
    the ``*_percent`` fields are deprecated inputs for ``backfill_stop_price`` only.
    """

    client = models.ForeignKey(Client, on_delete=models.PROTECT, related_name="operations")
    symbol = models.ForeignKey(Symbol, on_delete=models.PROTECT, related_name="operations")
    side = models.CharField(max_length=4, choices=Side.choices)
    status = models.CharField(max_length=10, choices=OperationStatus.choices, default=OperationStatus.PLANNED)
    quantity = money_field()
    entry_price = money_field(null=True, blank=True)
    stop_loss_percent = models.DecimalField(
        max_digits=7, decimal_places=4, null=True, blank=True, help_text="Deprecated: use stop_price."
    )
    stop_gain_percent = models.DecimalField(
        max_digits=7, decimal_places=4, null=True, blank=True, help_text="Deprecated: use target_price."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # 0015
    closed_quantity = money_field(default=Decimal("0"), db_default=Decimal("0"))
    # 0016 (nullable, no default: no table rewrite); 0017 sets the database default of the count
    stop_price = money_field(null=True, blank=True)
    target_price = money_field(null=True, blank=True)
    stop_execution_token = models.CharField(max_length=36, null=True, blank=True)
    last_stop_check_at = models.DateTimeField(null=True, blank=True)
    stop_check_count = models.IntegerField(null=True, blank=True, db_default=0)
    # 0027: trailing stop and break-even settings (all optional; stopmonitor.trailing.TrailingSettings)
    trail_distance = money_field(null=True, blank=True, help_text="Trail distance in the quote asset.")
    trail_distance_percent = models.DecimalField(
        max_digits=7, decimal_places=4, null=True, blank=True, help_text="Trail distance in percent of the best price."
    )
    trail_activation_price = money_field(null=True, blank=True, help_text="Trailing starts once the price reaches it.")
    trail_step = money_field(null=True, blank=True, help_text="The stop moves only in whole steps from the entry.")
    break_even_price = money_field(null=True, blank=True, help_text="Move the stop to break-even at this price.")
    break_even_fee_percent = models.DecimalField(
        max_digits=7, decimal_places=4, null=True, blank=True, help_text="Fee allowance above the entry, percent."
    )
    # 0026: the venue the operation was opened on (binance, binance-testnet, paper, replay); a
    # monitor on another venue leaves it alone. Rows older than 0026 got the venue of the
    # deployment that ran the migration. NULL only for a row written around the ORM (raw SQL):
    # watched by any venue, as before 0026.
    venue = models.CharField(max_length=20, null=True, blank=True, default=current_venue)
    # 0028: the exchange account the position lives on; null = the default account (the environment's keys)
    account = models.ForeignKey("ExchangeAccount", on_delete=models.PROTECT, related_name="operations",
                                null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["status", "symbol"],
                name="op_active_stop_idx",
                condition=Q(status="ACTIVE") & (Q(stop_price__isnull=False) | Q(target_price__isnull=False)),
            ),
            models.Index(
                fields=["stop_execution_token"],
                name="op_stop_exec_token_idx",
                condition=Q(stop_execution_token__isnull=False),
            ),
        ]

    @property
    def remaining_quantity(self) -> Decimal:
        """Base-asset quantity still open (never negative)."""
        return max(self.quantity - (self.closed_quantity or Decimal("0")), Decimal("0"))

    def __str__(self) -> str:
        return f"op {self.pk} {self.side} {self.quantity} {self.symbol_id}"


class Order(models.Model):
    """An order known to the service (opening orders from the legacy schema; closes are in executions)."""

    operation = models.ForeignKey(Operation, on_delete=models.PROTECT, related_name="orders", null=True, blank=True)
    client_order_id = models.CharField(max_length=36, unique=True)
    exchange_order_id = models.BigIntegerField(null=True, blank=True)
    side = models.CharField(max_length=4, choices=Side.choices)
    order_type = models.CharField(max_length=20, default="MARKET")
    status = models.CharField(max_length=20, default="NEW")
    quantity = money_field()
    executed_quantity = money_field(default=Decimal("0"))
    price = money_field(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("the event store is append-only (invariant 8)")

    def delete(self):
        raise PermissionError("the event store is append-only (invariant 8)")


class StopMonitorEvent(models.Model):
    """One immutable event of one operation's stream.

    ``version`` is 1, 2, 3, … within the stream (unique with the operation); ``sequence`` is
    the global order, filled by the database, and appends are serialized so that sequence
    order is commit order (``/events/?after=SEQ`` never skips). ``payload`` holds the
    type-specific fields with Decimals as strings. Written only by
    :func:`stopmonitor.events.append_events`.
    """

    sequence = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(default=uuid7, unique=True, editable=False)
    # the (operation, version) unique index serves lookups by operation: no index of its own; no
    # constraint check per event either: the one writer appends for an operation row it has locked,
    # and a trigger refuses to delete an operation that has events (migration 0020)
    operation = models.ForeignKey(Operation, on_delete=models.PROTECT, related_name="events", db_index=False,
                                  db_constraint=False)
    version = models.PositiveIntegerField()
    event_type = models.CharField(max_length=32)
    # copied from the operation by the one writer (the operation's own foreign key guards it):
    # no constraint check per event, and the (tenant, sequence) index serves the feed
    tenant = models.ForeignKey(Client, on_delete=models.PROTECT, related_name="events", db_index=False,
                               db_constraint=False)
    symbol = models.CharField(max_length=20)
    execution_token = models.CharField(max_length=36, null=True, blank=True)
    source = models.CharField(max_length=12)
    venue = models.CharField(max_length=20)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    # tamper evidence (stopmonitor.chain, migration 0023): sha256 over this event and its stream's
    # previous hash, and the sequence of the event committed just before it (a removed event
    # breaks that link); both written by the one writer, checked by ``verify_events``
    chain_hash = models.BinaryField(null=True, editable=False)
    prev_sequence = models.BigIntegerField(null=True, editable=False)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["operation", "version"], name="event_stream_version_uniq")]
        indexes = [
            # the fold and reconcile look events up by token; most events (level changes) have none
            models.Index(fields=["execution_token"], name="event_token_idx", condition=Q(execution_token__isnull=False)),
            # /events/?after=SEQ for one tenant
            models.Index(fields=["tenant", "sequence"], name="event_tenant_seq_idx"),
            # the per-tenant executions-per-minute/hour guard counts recent triggers
            models.Index(fields=["tenant", "created_at"], name="event_tenant_trigger_idx",
                         condition=Q(event_type="STOP_TRIGGERED")),
        ]

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise PermissionError("the event store is append-only (invariant 8)")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("the event store is append-only (invariant 8)")


class ExecutionStatus(models.TextChoices):
    TRIGGERED = "TRIGGERED"
    SUBMITTED = "SUBMITTED"
    EXECUTED = "EXECUTED"
    PARTIALLY_EXECUTED = "PARTIALLY_EXECUTED"
    FAILED = "FAILED"


class StopMonitorExecution(models.Model):
    """Projection: one attempt to close one operation, folded from its events.

    Derived state (invariant 8): :func:`stopmonitor.projections.rebuild` recreates every row
    from the events. ``execution_token`` is the ``newClientOrderId`` sent to Binance.
    """

    execution_token = models.CharField(max_length=36, primary_key=True)
    operation = models.ForeignKey(Operation, on_delete=models.PROTECT, related_name="executions")
    tenant = models.ForeignKey(Client, on_delete=models.PROTECT, related_name="executions")
    symbol = models.CharField(max_length=20)
    attempt = models.PositiveIntegerField()
    trigger = models.CharField(max_length=12)  # STOP_LOSS | TAKE_PROFIT | MANUAL
    status = models.CharField(max_length=20, choices=ExecutionStatus.choices)
    side = models.CharField(max_length=4, choices=Side.choices)  # the closing side
    trigger_price = money_field(null=True, blank=True)
    observed_price = money_field(null=True, blank=True)
    requested_quantity = money_field(null=True, blank=True)
    executed_quantity = money_field(null=True, blank=True)
    avg_fill_price = money_field(null=True, blank=True)
    commission = money_field(null=True, blank=True)
    commission_asset = models.CharField(max_length=12, blank=True, default="")
    slippage_pct = money_field(null=True, blank=True)
    exchange_order_id = models.BigIntegerField(null=True, blank=True)
    exchange_status = models.CharField(max_length=20, blank=True, default="")
    error_code = models.IntegerField(null=True, blank=True)
    error_message = models.CharField(max_length=300, blank=True, default="")
    source = models.CharField(max_length=12)
    venue = models.CharField(max_length=20)
    last_version = models.PositiveIntegerField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    submitted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "submitted_at"], name="exec_status_submitted_idx")]


class ProtectionStatus(models.TextChoices):
    REQUESTED = "REQUESTED"
    PLACED = "PLACED"
    TRIGGERED = "TRIGGERED"
    CANCELLED = "CANCELLED"
    UNPROTECTED = "UNPROTECTED"


class StopMonitorProtection(models.Model):
    """Projection: the exchange-held protection of one operation, folded from its protection
    events (:func:`stopmonitor.protection.apply_protection`; field names equal
    :class:`stopmonitor.protection.ProtectionState`'s, a test compares them). Derived state
    (invariant 8): rebuilt from the events by ``rebuild_projections``."""

    operation = models.OneToOneField(Operation, on_delete=models.PROTECT, primary_key=True, related_name="protection")
    status = models.CharField(max_length=12, choices=ProtectionStatus.choices)
    generation = models.PositiveIntegerField()
    client_order_id = models.CharField(max_length=36, blank=True, default="")
    kind = models.CharField(max_length=10, blank=True, default="")  # STOP_LOSS | OCO
    side = models.CharField(max_length=4, blank=True, default="")  # the closing side
    quantity = money_field(null=True, blank=True)
    stop_price = money_field(null=True, blank=True)
    limit_price = money_field(null=True, blank=True)
    exchange_order_id = models.BigIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=40, blank=True, default="")
    replaces = models.CharField(max_length=36, blank=True, default="")
    requested_at = models.DateTimeField(null=True, blank=True)
    placed_at = models.DateTimeField(null=True, blank=True)
    replaced_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField()
    last_version = models.PositiveIntegerField()


class SlippageAction(models.TextChoices):
    WARN = "warn"
    BLOCK = "block"


class TenantConfig(models.Model):
    """A tenant's risk controls: kill switch, slippage limit and action, execution rate limits."""

    client = models.OneToOneField(Client, on_delete=models.CASCADE, related_name="risk_config")
    kill_switch = models.BooleanField(default=False)
    kill_switch_reason = models.CharField(max_length=300, blank=True, default="")
    kill_switch_at = models.DateTimeField(null=True, blank=True)
    kill_switch_by = models.CharField(max_length=150, blank=True, default="")
    max_slippage_pct = models.DecimalField(max_digits=7, decimal_places=4, default=Decimal("1.0"))
    slippage_action = models.CharField(max_length=5, choices=SlippageAction.choices, default=SlippageAction.WARN)
    max_executions_per_minute = models.PositiveIntegerField(default=30)
    max_executions_per_hour = models.PositiveIntegerField(default=600)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, blank=True, default="")
    # 0025: exchange-held protection (../shared/design/protection.md). None = the venue's default
    # (on for Binance venues, off for paper: stopmonitor.protection.protection_enabled)
    protection_enabled = models.BooleanField(null=True, blank=True, default=None,
                                             help_text="Rest a stop on the exchange; empty = on for Binance venues.")
    protection_buffer_bps = models.PositiveIntegerField(
        default=50, db_default=50, help_text="How far beyond the monitor's stop the resting stop sits, in basis points.")


class BreakerStatus(models.TextChoices):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitBreakerState(models.Model):
    """Per-symbol circuit breaker (CLOSED → OPEN after N consecutive failed closes → HALF_OPEN after the cool-down)."""

    symbol = models.CharField(max_length=20, unique=True)
    state = models.CharField(max_length=10, choices=BreakerStatus.choices, default=BreakerStatus.CLOSED)
    failure_count = models.PositiveIntegerField(default=0)
    opened_at = models.DateTimeField(null=True, blank=True)
    retry_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)


class Outbox(models.Model):
    """One event waiting to be published to RabbitMQ (written in the event's transaction)."""

    # written from the inserted event in the same statement, and events are never deleted
    # (invariant 8): the unique index stays, the per-row constraint check at commit does not
    event = models.OneToOneField(StopMonitorEvent, on_delete=models.PROTECT, related_name="outbox", db_constraint=False)
    operation_id_ref = models.BigIntegerField()
    routing_key = models.CharField(max_length=120)
    created_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["event"], name="outbox_unpublished_idx", condition=Q(published_at__isnull=True)),
            # the relay's claim: "no earlier unpublished row of the same operation" is one index probe
            # (without it, an anti-join over the whole backlog per batch: 3.6 s a batch at 10k rows)
            models.Index(fields=["operation_id_ref", "event"], name="outbox_stream_unpublished_idx",
                         condition=Q(published_at__isnull=True)),
        ]


class MonitorPass(models.Model):
    """One monitor pass as it ended: the :class:`~stopmonitor.engine.decisions.PassSummary` counts.

    Written once per pass (one INSERT, by :func:`stopmonitor.metrics.record_pass`) so a web
    pod can export "time of the last completed pass" for a CronJob pod that lived seconds.
    ``completed`` is False when the pass could not run (``error`` says why);
    ``lock_held_elsewhere`` when it found another pass running and did nothing.
    Times are UTC; ``duration_s`` in seconds.
    """

    finished_at = models.DateTimeField(db_index=True)
    started_at = models.DateTimeField()
    source = models.CharField(max_length=12)
    venue = models.CharField(max_length=20)
    dry_run = models.BooleanField(default=False)
    completed = models.BooleanField(default=True)
    lock_held_elsewhere = models.BooleanField(default=False)
    watched = models.PositiveIntegerField(default=0)
    symbols = models.PositiveIntegerField(default=0)
    triggered = models.PositiveIntegerField(default=0)
    executed = models.PositiveIntegerField(default=0)
    partially_executed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    unknown = models.PositiveIntegerField(default=0)
    blocked = models.PositiveIntegerField(default=0)
    reconciled = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    exchange_requests = models.PositiveIntegerField(default=0)
    duration_s = models.FloatField(default=0.0)
    error = models.CharField(max_length=500, blank=True, default="")


class IdempotencyKey(models.Model):
    """A write answered under an ``Idempotency-Key`` header (:mod:`api.idempotency`): the first answer,
    replayed to every retry of the same user with the same key and the same request.

    ``fingerprint`` is the SHA-256 of the method, the path and the canonical JSON of the body; a
    retry with another fingerprint is refused (422). ``state`` is ``started`` while the first request
    runs (a close: its effects commit in several transactions), ``done`` once ``status_code``,
    ``response_body`` and ``response_headers`` hold its answer. Kept at least 24 h: a user's rows
    older than that are deleted when they store a new key.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    method = models.CharField(max_length=10)
    path = models.CharField(max_length=300)
    state = models.CharField(max_length=10, default="started")
    status_code = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True)
    response_headers = models.JSONField(default=dict)
    created_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_unique_per_user")]
        indexes = [models.Index(fields=["user", "created_at"], name="idempotency_key_user_age")]


class AccountVenue(models.TextChoices):
    BINANCE = "binance"
    BINANCE_TESTNET = "binance-testnet"


class KeyType(models.TextChoices):
    HMAC = "HMAC"  # API key + secret (HMAC-SHA256 signatures)
    ED25519 = "ED25519"  # API key + Ed25519 private key (PEM)


class ExchangeAccount(models.Model):
    """One tenant's exchange account: where its operations' orders go and whose balance they spend.

    ``secret_encrypted`` holds the HMAC secret or the Ed25519 private key (PEM), encrypted with
    :mod:`stopmonitor.accounts.crypto` (Fernet, ``ACCOUNT_ENCRYPTION_KEYS``); it is write-only:
    set or replaced through the API and the admin, never read back, never in a repr. An operation
    with no account uses the default account: the environment's ``BINANCE_API_KEY``/secret.
    """

    client = models.ForeignKey(Client, on_delete=models.PROTECT, related_name="exchange_accounts")
    venue = models.CharField(max_length=20, choices=AccountVenue.choices, default=AccountVenue.BINANCE)
    label = models.CharField(max_length=80)
    key_type = models.CharField(max_length=8, choices=KeyType.choices, default=KeyType.HMAC)
    api_key = models.CharField(max_length=128)  # the key id Binance shows (not the secret)
    secret_encrypted = models.TextField(editable=False)
    enabled = models.BooleanField(default=True)
    disabled_reason = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["client", "label"], name="account_tenant_label_uniq")]

    @property
    def key_hint(self) -> str:
        """The last four characters of the key id (what the API and admin show of it)."""
        return f"…{self.api_key[-4:]}" if self.api_key else ""

    def __repr__(self) -> str:  # never the key id in full, never the secret
        return f"<ExchangeAccount {self.pk} {self.label!r} {self.venue} key {self.key_hint}>"

    def __str__(self) -> str:
        return f"{self.label} ({self.venue}, key {self.key_hint})"
