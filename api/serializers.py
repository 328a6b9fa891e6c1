"""API serializers: plain input serializers for writes, ``ModelSerializer`` for read-only output.

Money and quantities travel as decimal strings (``COERCE_DECIMAL_TO_STRING``): prices in the
quote asset, quantities in the base asset, at most 20 digits with 8 decimals (the columns'
``DecimalField(20, 8)``). Input serializers refuse unknown fields, so a misspelt field is an
error rather than a silently ignored change.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Mapping
from decimal import Decimal

from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from api.models import (
    CircuitBreakerState,
    Operation,
    Side,
    SlippageAction,
    StopMonitorEvent,
    StopMonitorExecution,
    StopMonitorProtection,
    Symbol,
    TenantConfig,
)
from stopmonitor.protection import MAX_BUFFER_BPS

MAX_POSITIVE_INT = 2147483647  # PositiveIntegerField's upper bound


# --------------------------------------------------------------------------------------
# Input building blocks
# --------------------------------------------------------------------------------------


class InputSerializer(serializers.Serializer):
    """Base of every write serializer: unknown fields are refused with ``Unknown field.``;
    ``min_fields`` > 0 refuses a body with fewer fields (published as ``minProperties``)."""

    min_fields = 0

    def to_internal_value(self, data):
        errors = {}
        if isinstance(data, Mapping):
            errors = {name: ["Unknown field."] for name in sorted(set(data) - set(self.fields))}
        try:
            value = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if not errors or not isinstance(exc.detail, Mapping):
                raise
            raise serializers.ValidationError({**exc.detail, **errors}) from None
        if errors:
            raise serializers.ValidationError(errors)
        return value


class InputSerializerSchema(OpenApiSerializerExtension):
    """OpenAPI for :class:`InputSerializer` subclasses: ``additionalProperties: false``, as enforced."""

    target_class = InputSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        schema = auto_schema._map_basic_serializer(self.target, direction)
        schema["additionalProperties"] = False
        if self.target.min_fields:
            schema["minProperties"] = self.target.min_fields
        return schema


class PositiveDecimalField(serializers.DecimalField):
    """A decimal greater than zero, sent as a JSON string matching :attr:`pattern` (the one published in
    the schema): ASCII digits, an optional ``.`` and at most ``decimal_places`` decimals. Refused with the
    field named: JSON numbers (a float cannot carry 8 exact decimals), exponents (``"1e5"``), ``"1_000"``,
    signs, spaces, Arabic-Indic or full-width digits (Python's ``Decimal`` accepts all of them), NaN,
    Infinity, too many digits or decimals."""

    default_error_messages = {
        "not_positive": "Must be greater than 0.",
        "not_a_string": "Must be a decimal string such as \"0.5\" (not a JSON number).",
        "pattern": "Must be ASCII digits with an optional '.' and at most {places} decimals, e.g. \"9300.5\".",
    }

    @property
    def pattern(self) -> str:
        whole = self.max_digits - self.decimal_places
        return rf"^[0-9]{{1,{whole}}}(?:\.[0-9]{{1,{self.decimal_places}}})?$"

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        value = super().to_internal_value(data)  # DRF's reasons first: not a number, too many digits/decimals
        if value <= 0:
            self.fail("not_positive")
        if not re.fullmatch(self.pattern, data, re.ASCII):  # what Decimal takes but the schema does not
            self.fail("pattern", places=self.decimal_places)
        return value


def money(**kwargs) -> PositiveDecimalField:
    """A price (quote asset) or quantity (base asset): > 0, at most 20 digits and 8 decimals."""
    return PositiveDecimalField(max_digits=20, decimal_places=8, **kwargs)


def percent(**kwargs) -> PositiveDecimalField:
    """A percentage: > 0, at most 3 whole digits and 4 decimals (the ``DecimalField(7, 4)`` columns)."""
    return PositiveDecimalField(max_digits=7, decimal_places=4, **kwargs)


class TrailingFields(serializers.Serializer):
    """The optional trailing-stop and break-even settings (stopmonitor.trailing), on open and on PATCH.

    Checked by :func:`stopmonitor.operations.check_trailing`: one distance (absolute or percent),
    activation and break-even levels on the profitable side of the entry and on the tick, the step a
    multiple of tickSize. On PATCH, ``null`` clears a setting.
    """

    trail_distance = money(required=False, allow_null=True,
                           help_text="Trail distance in the quote asset: the stop follows the best bid (long) / "
                                     "ask (short) at this distance, never loosening.")
    trail_distance_percent = percent(required=False, allow_null=True, max_value=Decimal("99.9999"),
                                     help_text="Trail distance in percent of the observed price (instead of trail_distance).")
    trail_activation_price = money(required=False, allow_null=True,
                                   help_text="Trailing starts once the price reaches this level (default: at once).")
    trail_step = money(required=False, allow_null=True,
                       help_text="The stop moves only on the ladder entry_price + k × trail_step (whole steps).")
    break_even_price = money(required=False, allow_null=True,
                             help_text="Once the price reaches this level, the stop moves (once) to the entry price "
                                       "plus break_even_fee_percent.")
    break_even_fee_percent = percent(required=False, allow_null=True, max_value=Decimal("99.9999"),
                                     help_text="Fee allowance in percent of the entry price (default 0).")

    @staticmethod
    def given(attrs: dict) -> dict:
        """The trailing columns present in validated ``attrs`` (None = cleared)."""
        return {name: attrs[name] for name in TRAILING_FIELD_NAMES if name in attrs}


TRAILING_FIELD_NAMES = ("trail_distance", "trail_distance_percent", "trail_activation_price", "trail_step",
                        "break_even_price", "break_even_fee_percent")


class PositiveDecimalFieldSchema(OpenApiSerializerFieldExtension):
    """OpenAPI for :class:`PositiveDecimalField`: a decimal string without a sign, within its digits."""

    target_class = PositiveDecimalField

    def map_serializer_field(self, auto_schema, direction):
        schema = {"type": "string", "format": "decimal", "pattern": self.target.pattern}
        if self.target.max_value is not None:
            schema["description"] = f"At most {self.target.max_value}."
        return schema


class StrictBooleanField(serializers.BooleanField):
    """JSON ``true``/``false`` only (not ``"yes"``, ``1`` or ``"true"``)."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictCharField(serializers.CharField):
    """A JSON string only: DRF's CharField turns ``5`` or ``true`` into ``"5"``/``"True"``, which the
    schema (``type: string``) refuses (Schemathesis: an integer ``api_key`` was accepted, 201)."""

    default_error_messages = {"not_a_string": "Must be a JSON string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only (not ``"5"``, ``5.0`` or ``true``)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


class OperationCreateSerializer(TrailingFields, InputSerializer):
    """Open a position to monitor. The stop and target are checked against the entry price by
    :func:`stopmonitor.operations.check_levels` when the operation is opened."""

    symbol = StrictCharField(max_length=20, help_text="An active symbol, e.g. BTCUSDT.")
    side = serializers.ChoiceField(choices=Side.choices, help_text="Opening side: BUY = long, SELL = short.")
    quantity = money(help_text="Opened size in the base asset: a multiple of the symbol's stepSize, at least its minQty "
                                "and minNotional.")
    entry_price = money(help_text="Entry price in the quote asset.")
    stop_price = money(help_text="Stop-loss level in the quote asset: below the entry for a long, above for a short.")
    target_price = money(required=False, help_text="Take-profit level: above the entry for a long, below for a short.")
    account = serializers.IntegerField(required=False, allow_null=True, help_text=(
        "The tenant's exchange account (/accounts/) the position lives on; default: its only one, or the "
        "deployment's default account when it has none."))

    def validate_symbol(self, value: str) -> Symbol:
        symbol = Symbol.objects.filter(symbol=value, is_active=True).first()
        if symbol is None:
            raise serializers.ValidationError(f"Unknown or inactive symbol {value!r}.")
        return symbol

    def validate(self, attrs):
        symbol: Symbol = attrs["symbol"]
        quantity: Decimal = attrs["quantity"]
        if symbol.min_qty is not None and quantity < symbol.min_qty:
            raise serializers.ValidationError(
                {"quantity": [f"Below the symbol's minQty {_plain(symbol.min_qty)}."]}, code="below_min_qty"
            )
        # Binance LOT_SIZE: a quantity off the step could never be sold in full; the close would leave
        # a remainder below minQty that stays open (and watched) for ever
        if symbol.step_size and symbol.step_size > 0 and quantity % symbol.step_size != 0:
            raise serializers.ValidationError(
                {"quantity": [f"{_plain(quantity)} is not a multiple of the symbol's stepSize "
                              f"{_plain(symbol.step_size)}."]}, code="off_step_size"
            )
        notional = quantity * attrs["entry_price"]
        if symbol.min_notional is not None and notional < symbol.min_notional:
            raise serializers.ValidationError(
                {"quantity": [f"Notional {_plain(notional)} is below the symbol's minNotional {_plain(symbol.min_notional)}."]},
                code="below_min_notional",
            )
        # invariant 5: a position we accept can always be closed — the notional at the *stop*
        from stopmonitor.admission import opening_notional_error

        problem = opening_notional_error(symbol, quantity, attrs.get("stop_price"))
        if problem is not None:
            raise serializers.ValidationError({"quantity": [problem]}, code="below_min_notional_at_stop")
        return attrs


class OperationUpdateSerializer(TrailingFields, InputSerializer):
    """Move the stop and/or the target of an ACTIVE operation, or change its trailing settings (at
    least one field)."""

    min_fields = 1

    stop_price = money(required=False, help_text="New stop-loss level in the quote asset.")
    target_price = money(required=False, help_text="New take-profit level in the quote asset.")

    def validate(self, attrs):
        if not attrs:
            raise serializers.ValidationError("Give stop_price, target_price or a trailing setting.", code="empty")
        return attrs


class CloseRequestSerializer(InputSerializer):
    """``POST /operations/{id}/close/`` takes no fields (an empty body or ``{}``)."""


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


class ExecutionSerializer(serializers.ModelSerializer):
    """One close attempt (the projection folded from the events); quantities in the base asset."""

    operation = serializers.PrimaryKeyRelatedField(read_only=True)
    tenant = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = StopMonitorExecution
        fields = [
            "execution_token", "operation", "tenant", "symbol", "attempt", "trigger", "status", "side",
            "trigger_price", "observed_price", "requested_quantity", "executed_quantity", "avg_fill_price",
            "commission", "commission_asset", "slippage_pct", "exchange_order_id", "exchange_status",
            "error_code", "error_message", "source", "venue", "last_version", "created_at", "updated_at",
            "submitted_at",
        ]
        read_only_fields = fields


class OperationSerializer(serializers.ModelSerializer):
    """An operation as listed: levels in the quote asset, quantities in the base asset."""

    client = serializers.PrimaryKeyRelatedField(read_only=True)
    symbol = serializers.CharField(source="symbol.symbol", read_only=True)
    remaining_quantity = serializers.DecimalField(max_digits=20, decimal_places=8, read_only=True)

    class Meta:
        model = Operation
        fields = [
            "id", "client", "symbol", "side", "status", "quantity", "closed_quantity", "remaining_quantity",
            "entry_price", "stop_price", "target_price", *TRAILING_FIELD_NAMES, "stop_execution_token", "created_at",
            "updated_at", "account",
        ]
        read_only_fields = fields

    #: ``QuerySet.values()`` of a listed operation: :meth:`represent_values` renders these rows
    VALUES = ("id", "client_id", "symbol__symbol", "side", "status", "quantity", "closed_quantity", "entry_price",
              "stop_price", "target_price", *TRAILING_FIELD_NAMES, "stop_execution_token", "created_at", "updated_at",
              "account_id")

    @classmethod
    def represent_values(cls, rows) -> list[dict]:
        """``cls(operations, many=True).data`` from ``QuerySet.values(*cls.VALUES)`` rows: the same dicts
        (same keys in ``Meta.fields`` order, same strings), without a model instance and a pass through
        every DRF field per row — the bulk of a 50-row list's CPU (``bench/bench_api.py``).
        ``tests/api/test_api_operations.py`` compares both for every field."""
        money, moment = _money_text, _moment_text()
        out = []
        for r in rows:
            quantity, closed = r["quantity"], r["closed_quantity"]
            out.append({
                "id": r["id"],
                "client": r["client_id"],
                "symbol": r["symbol__symbol"],
                "side": r["side"],
                "status": r["status"],
                "quantity": money(quantity),
                "closed_quantity": money(closed),
                # Operation.remaining_quantity
                "remaining_quantity": money(max(quantity - (closed or _ZERO), _ZERO)),
                "entry_price": money(r["entry_price"]),
                "stop_price": money(r["stop_price"]),
                "target_price": money(r["target_price"]),
                **{name: _decimal_text(r[name], places) for name, places in _TRAILING_PLACES},
                "stop_execution_token": r["stop_execution_token"],
                "created_at": moment(r["created_at"]),
                "updated_at": moment(r["updated_at"]),
                "account": r["account_id"],  # issue #20: None = the default account
            })
        return out


_ZERO = Decimal("0")
_EIGHT_PLACES = Decimal("1e-8")
_MONEY_CONTEXT = decimal.Context(prec=20, rounding=decimal.ROUND_HALF_EVEN)  # DecimalField(20, 8)'s quantize


_TRAILING_PLACES = tuple((name, 4 if name.endswith("_percent") else 8) for name in TRAILING_FIELD_NAMES)


def _decimal_text(value: Decimal | None, places: int) -> str | None:
    """A decimal column as DRF's ``DecimalField`` renders it with ``places`` decimals."""
    if value is None:
        return None
    return f"{value.quantize(Decimal(1).scaleb(-places), context=_MONEY_CONTEXT):f}"


def _money_text(value: Decimal | None) -> str | None:
    """A money column as DRF's ``DecimalField(max_digits=20, decimal_places=8)`` renders it: 8 decimals."""
    return _decimal_text(value, 8)


def _moment_text():
    """DRF's ``DateTimeField`` rendering (ISO 8601 in the current time zone, ``Z`` for UTC) as a function."""
    field = serializers.DateTimeField()
    tz = field.default_timezone()
    if tz is None:  # USE_TZ off: DRF's own path
        return lambda value: None if value is None else field.to_representation(value)

    def moment(value):
        if value is None:
            return None
        if value.tzinfo is None:
            return field.to_representation(value)
        text = value.astimezone(tz).isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text

    return moment


class ProtectionSerializer(serializers.ModelSerializer):
    """The exchange-held protection of an operation (the projection folded from its PROTECTION_*
    events): a STOP_LOSS (or OCO) resting on the exchange on the closing ``side``; prices in the
    quote asset, quantity in the base asset, times UTC."""

    class Meta:
        model = StopMonitorProtection
        fields = ["status", "generation", "client_order_id", "kind", "side", "quantity", "stop_price", "limit_price",
                  "exchange_order_id", "reason", "requested_at", "placed_at", "replaced_at", "updated_at"]
        read_only_fields = fields


class OperationDetailSerializer(OperationSerializer):
    """An operation with its latest execution (None before any close attempt) and its exchange-held
    protection (None when none was ever requested)."""

    latest_execution = serializers.SerializerMethodField()
    protection = serializers.SerializerMethodField()

    class Meta(OperationSerializer.Meta):
        fields = OperationSerializer.Meta.fields + ["latest_execution", "protection"]
        read_only_fields = fields

    @extend_schema_field(ProtectionSerializer(allow_null=True))
    def get_protection(self, obj):
        row = StopMonitorProtection.objects.filter(pk=obj.pk).first()
        return ProtectionSerializer(row).data if row is not None else None

    @extend_schema_field(ExecutionSerializer(allow_null=True))
    def get_latest_execution(self, obj):
        latest = obj.executions.order_by("-created_at", "-attempt").first()
        return ExecutionSerializer(latest).data if latest is not None else None


class EventSerializer(serializers.ModelSerializer):
    """One immutable event: ``version`` within its operation's stream, ``sequence`` in the global log."""

    operation = serializers.PrimaryKeyRelatedField(read_only=True)
    tenant = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = StopMonitorEvent
        fields = [
            "sequence", "event_id", "operation", "version", "event_type", "tenant", "symbol", "execution_token",
            "source", "venue", "payload", "created_at",
        ]
        read_only_fields = fields


class StreamEventSerializer(EventSerializer):
    """An event of one operation's stream (its own OpenAPI component: the stream pages by cursor,
    the global feed by ``after``)."""


class DecisionSerializer(serializers.Serializer):
    """One engine decision made by a close (see :class:`stopmonitor.engine.decisions.Decision`)."""

    action = serializers.ChoiceField(choices=[
        "triggered", "submitted", "executed", "partially_executed", "failed", "unknown", "blocked", "skipped",
        "reconciled",
    ])
    execution_token = serializers.CharField(allow_null=True)
    event_type = serializers.CharField(allow_null=True)
    reason = serializers.CharField(allow_null=True)
    detail = serializers.CharField(allow_blank=True)


class CloseResultSerializer(serializers.Serializer):
    """What ``close`` did: the last decision's ``action`` as ``outcome``, every decision, and the operation after it."""

    outcome = serializers.CharField()
    decisions = DecisionSerializer(many=True)
    operation = OperationDetailSerializer()


class SymbolSerializer(serializers.ModelSerializer):
    """A spot market and its exchange filters (tickSize, stepSize, minQty, minNotional)."""

    class Meta:
        model = Symbol
        fields = ["symbol", "base_asset", "quote_asset", "tick_size", "step_size", "min_qty", "min_notional",
                  "is_active", "updated_at"]
        read_only_fields = fields


class CircuitBreakerSerializer(serializers.ModelSerializer):
    """A symbol's circuit breaker (CLOSED → OPEN after consecutive failed closes → HALF_OPEN).

    The row is shared by every tenant, but ``last_error`` is the text of one tenant's refused close
    (its side, quantity, client order id with its operation id): only staff read it; a tenant's
    user gets ``""`` (the tenant's own refusals are in its executions and events)."""

    last_error = serializers.SerializerMethodField(help_text="Staff only (empty for a tenant's user): the "
                                                             "exchange's last refusal on this symbol.")

    class Meta:
        model = CircuitBreakerState
        fields = ["symbol", "state", "failure_count", "opened_at", "retry_at", "last_error", "updated_at"]
        read_only_fields = fields

    def get_last_error(self, obj) -> str:
        request = self.context.get("request")
        user = getattr(request, "user", None)
        return obj.last_error if user is not None and user.is_staff else ""


# --------------------------------------------------------------------------------------
# Risk controls
# --------------------------------------------------------------------------------------


class RiskConfigSerializer(serializers.ModelSerializer):
    """A tenant's risk controls and who changed them last (times UTC)."""

    client = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = TenantConfig
        fields = ["client", "kill_switch", "kill_switch_reason", "kill_switch_at", "kill_switch_by",
                  "max_slippage_pct", "slippage_action", "max_executions_per_minute", "max_executions_per_hour",
                  "protection_enabled", "protection_buffer_bps", "updated_at", "updated_by"]
        read_only_fields = fields


class RiskConfigUpdateSerializer(InputSerializer):
    """Change the tenant's risk controls; turning the kill switch on or off needs a reason."""

    min_fields = 1

    kill_switch = StrictBooleanField(required=False, help_text="Block every close of the tenant while true.")
    kill_switch_reason = StrictCharField(required=False, max_length=300,
                                               help_text="Why the kill switch changes (required with kill_switch).")
    max_slippage_pct = PositiveDecimalField(required=False, max_digits=7, decimal_places=4, max_value=Decimal("100"),
                                            help_text="Largest slippage past the level, in percent.")
    slippage_action = serializers.ChoiceField(required=False, choices=SlippageAction.choices)
    max_executions_per_minute = StrictIntegerField(required=False, min_value=1, max_value=MAX_POSITIVE_INT)
    max_executions_per_hour = StrictIntegerField(required=False, min_value=1, max_value=MAX_POSITIVE_INT)
    protection_enabled = StrictBooleanField(
        required=False, allow_null=True,
        help_text="Rest a stop on the exchange for each ACTIVE operation; null = the venue's default (on for Binance).")
    protection_buffer_bps = StrictIntegerField(
        required=False, min_value=0, max_value=MAX_BUFFER_BPS,
        help_text="How far beyond the monitor's stop the resting stop sits, in basis points (50 = 0.5 %).")

    def validate_kill_switch_reason(self, value: str) -> str:
        value = value.strip()
        if not value:
            raise serializers.ValidationError("This field may not be blank.", code="blank")
        return value

    def validate(self, attrs):
        if not attrs:
            raise serializers.ValidationError("Give at least one field to change.", code="empty")
        if "kill_switch" in attrs and "kill_switch_reason" not in attrs:
            raise serializers.ValidationError(
                {"kill_switch_reason": ["Required when kill_switch is given."]}, code="required"
            )
        if "kill_switch_reason" in attrs and "kill_switch" not in attrs:
            raise serializers.ValidationError(
                {"kill_switch_reason": ["Only allowed together with kill_switch."]}, code="invalid"
            )
        return attrs


# --------------------------------------------------------------------------------------
# The error envelope (for the OpenAPI schema; produced by api.errors.exception_handler)
# --------------------------------------------------------------------------------------


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable: invalid, not_found, conflict, throttled, …")
    message = serializers.CharField(allow_blank=True)
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()),
                                   help_text="Field name → reasons (400 only; empty otherwise).")
    committed = serializers.ChoiceField(
        choices=["no", "yes", "unknown"], required=False,
        help_text="503 after a database failure only: whether something of the request was saved — no, yes "
                  "(part of it: read the object before retrying), unknown (the connection died during the "
                  "commit: retry with the same Idempotency-Key).")


class ErrorSerializer(serializers.Serializer):
    """``{"error": {"code", "message", "fields"}}``: every non-2XX answer of the API."""

    error = ErrorBodySerializer()


class NotClosedSerializer(serializers.Serializer):
    """409/502 of ``close``: the error envelope and, when the close protocol ran, what it did."""

    error = ErrorBodySerializer()
    outcome = serializers.CharField(required=False)
    decisions = DecisionSerializer(many=True, required=False)
    operation = OperationDetailSerializer(required=False)

