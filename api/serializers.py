"""API serializers: plain input serializers for writes, ``ModelSerializer`` for read-only output.

Money and quantities travel as decimal strings (``COERCE_DECIMAL_TO_STRING``): prices in the
quote asset, quantities in the base asset, at most 20 digits with 8 decimals (the columns'
``DecimalField(20, 8)``). Input serializers refuse unknown fields, so a misspelt field is an
error rather than a silently ignored change.
"""

from __future__ import annotations

import decimal
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
    Symbol,
    TenantConfig,
)

MAX_POSITIVE_INT = 2147483647  # PositiveIntegerField's upper bound


# --------------------------------------------------------------------------------------
# Input building blocks
# --------------------------------------------------------------------------------------


class InputSerializer(serializers.Serializer):
    """Base of every write serializer: unknown fields are refused with ``Unknown field.``."""

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
        return schema


class PositiveDecimalField(serializers.DecimalField):
    """A decimal greater than zero: refuses booleans, NaN, Infinity and too many digits or decimals."""

    default_error_messages = {"not_positive": "Must be greater than 0."}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if value <= 0:
            self.fail("not_positive")
        return value


def money(**kwargs) -> PositiveDecimalField:
    """A price (quote asset) or quantity (base asset): > 0, at most 20 digits and 8 decimals."""
    return PositiveDecimalField(max_digits=20, decimal_places=8, **kwargs)


class PositiveDecimalFieldSchema(OpenApiSerializerFieldExtension):
    """OpenAPI for :class:`PositiveDecimalField`: a decimal string without a sign, within its digits."""

    target_class = PositiveDecimalField

    def map_serializer_field(self, auto_schema, direction):
        whole = self.target.max_digits - self.target.decimal_places
        schema = {"type": "string", "format": "decimal",
                  "pattern": rf"^[0-9]{{1,{whole}}}(?:\.[0-9]{{1,{self.target.decimal_places}}})?$"}
        if self.target.max_value is not None:
            schema["description"] = f"At most {self.target.max_value}."
        return schema


class StrictBooleanField(serializers.BooleanField):
    """JSON ``true``/``false`` only (not ``"yes"``, ``1`` or ``"true"``)."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only (not ``"5"``, ``5.0`` or ``true``)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


class OperationCreateSerializer(InputSerializer):
    """Open a position to monitor. The stop and target are checked against the entry price by
    :func:`stopmonitor.operations.check_levels` when the operation is opened."""

    symbol = serializers.CharField(max_length=20, help_text="An active symbol, e.g. BTCUSDT.")
    side = serializers.ChoiceField(choices=Side.choices, help_text="Opening side: BUY = long, SELL = short.")
    quantity = money(help_text="Opened size in the base asset: a multiple of the symbol's stepSize, at least its minQty "
                                "and minNotional.")
    entry_price = money(help_text="Entry price in the quote asset.")
    stop_price = money(help_text="Stop-loss level in the quote asset: below the entry for a long, above for a short.")
    target_price = money(required=False, help_text="Take-profit level: above the entry for a long, below for a short.")

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
        return attrs


class OperationUpdateSerializer(InputSerializer):
    """Move the stop and/or the target of an ACTIVE operation (at least one of them)."""

    stop_price = money(required=False, help_text="New stop-loss level in the quote asset.")
    target_price = money(required=False, help_text="New take-profit level in the quote asset.")

    def validate(self, attrs):
        if not attrs:
            raise serializers.ValidationError("Give stop_price or target_price.", code="empty")
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
            "entry_price", "stop_price", "target_price", "stop_execution_token", "created_at", "updated_at",
        ]
        read_only_fields = fields

    #: ``QuerySet.values()`` of a listed operation: :meth:`represent_values` renders these rows
    VALUES = ("id", "client_id", "symbol__symbol", "side", "status", "quantity", "closed_quantity", "entry_price",
              "stop_price", "target_price", "stop_execution_token", "created_at", "updated_at")

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
                "stop_execution_token": r["stop_execution_token"],
                "created_at": moment(r["created_at"]),
                "updated_at": moment(r["updated_at"]),
            })
        return out


_ZERO = Decimal("0")
_EIGHT_PLACES = Decimal("1e-8")
_MONEY_CONTEXT = decimal.Context(prec=20, rounding=decimal.ROUND_HALF_EVEN)  # DecimalField(20, 8)'s quantize


def _money_text(value: Decimal | None) -> str | None:
    """A money column as DRF's ``DecimalField(max_digits=20, decimal_places=8)`` renders it: 8 decimals."""
    if value is None:
        return None
    return f"{value.quantize(_EIGHT_PLACES, context=_MONEY_CONTEXT):f}"


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


class OperationDetailSerializer(OperationSerializer):
    """An operation with its latest execution (None before any close attempt)."""

    latest_execution = serializers.SerializerMethodField()

    class Meta(OperationSerializer.Meta):
        fields = OperationSerializer.Meta.fields + ["latest_execution"]
        read_only_fields = fields

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
    """One engine decision made by a close (see :class:`stopmonitor.services.Decision`)."""

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
    """A symbol's circuit breaker (CLOSED → OPEN after consecutive failed closes → HALF_OPEN)."""

    class Meta:
        model = CircuitBreakerState
        fields = ["symbol", "state", "failure_count", "opened_at", "retry_at", "last_error", "updated_at"]
        read_only_fields = fields


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
                  "updated_at", "updated_by"]
        read_only_fields = fields


class RiskConfigUpdateSerializer(InputSerializer):
    """Change the tenant's risk controls; turning the kill switch on or off needs a reason."""

    kill_switch = StrictBooleanField(required=False, help_text="Block every close of the tenant while true.")
    kill_switch_reason = serializers.CharField(required=False, max_length=300,
                                               help_text="Why the kill switch changes (required with kill_switch).")
    max_slippage_pct = PositiveDecimalField(required=False, max_digits=7, decimal_places=4, max_value=Decimal("100"),
                                            help_text="Largest slippage past the level, in percent.")
    slippage_action = serializers.ChoiceField(required=False, choices=SlippageAction.choices)
    max_executions_per_minute = StrictIntegerField(required=False, min_value=1, max_value=MAX_POSITIVE_INT)
    max_executions_per_hour = StrictIntegerField(required=False, min_value=1, max_value=MAX_POSITIVE_INT)

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


class ErrorSerializer(serializers.Serializer):
    """``{"error": {"code", "message", "fields"}}``: every non-2XX answer of the API."""

    error = ErrorBodySerializer()


class NotClosedSerializer(serializers.Serializer):
    """409/502 of ``close``: the error envelope and, when the close protocol ran, what it did."""

    error = ErrorBodySerializer()
    outcome = serializers.CharField(required=False)
    decisions = DecisionSerializer(many=True, required=False)
    operation = OperationDetailSerializer(required=False)

