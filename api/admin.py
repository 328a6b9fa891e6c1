"""Django admin: tenants, symbols and operations editable; events and executions read-only.

An operation's levels and status are read-only here: they change only through the engine
(the API's PATCH, the monitor, the "close now" action) so that its event stream stays complete.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages

from stopmonitor import trailing

from api.models import (
    CircuitBreakerState,
    Client,
    ExchangeAccount,
    Operation,
    StopMonitorEvent,
    StopMonitorExecution,
    StopMonitorProtection,
    Symbol,
    TenantConfig,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """No add, change or delete: the rows are the event log or derived from it (invariant 8)."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Client)
class ClientAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "created_at"]
    search_fields = ["name"]
    filter_horizontal = ["users"]


@admin.register(Symbol)
class SymbolAdmin(admin.ModelAdmin):
    list_display = ["symbol", "base_asset", "quote_asset", "tick_size", "step_size", "min_qty", "min_notional",
                    "is_active", "updated_at"]
    list_filter = ["is_active", "quote_asset"]
    search_fields = ["symbol", "base_asset"]


@admin.action(description="Close now at market (engine, source manual)")
def close_now(modeladmin, request, queryset):
    """Run :func:`stopmonitor.engine.close.close_operation` for each selected ACTIVE operation."""
    from api.views import get_exchange
    from stopmonitor.engine.close import close_operation
    from stopmonitor.engine.decisions import EngineUnavailable

    exchange = get_exchange()
    for op in queryset.filter(status="ACTIVE"):
        try:
            decisions = close_operation(op.pk, exchange, source="manual")
        except EngineUnavailable as exc:
            modeladmin.message_user(request, f"operation {op.pk}: {exc}", messages.ERROR)
            continue
        last = decisions[-1]
        modeladmin.message_user(request, f"operation {op.pk}: {last.action} {last.reason or ''} {last.detail}".strip())


class OperationAdminForm(forms.ModelForm):
    """Refuses levels on the wrong side of the entry price (:func:`stopmonitor.operations.check_levels`)."""

    class Meta:
        model = Operation
        fields = "__all__"

    def clean(self):
        from stopmonitor.operations import LevelError, check_levels, check_trailing

        data = super().clean()
        if self.instance.pk is None and data.get("side"):
            tick = data["symbol"].tick_size if data.get("symbol") else None
            try:
                check_levels(data["side"], data.get("entry_price"), data.get("stop_price"), data.get("target_price"),
                             tick)
                check_trailing(data["side"], data.get("entry_price"), data.get("stop_price"),
                               trailing.TrailingSettings.from_values(*(data.get(c) for c in trailing.COLUMNS)), tick)
            except LevelError as exc:
                self.add_error(exc.field if exc.field in self.fields else None, str(exc))
        if self.instance.pk is None and data.get("symbol") is not None and data.get("quantity") is not None:
            from stopmonitor.admission import opening_notional_error

            problem = opening_notional_error(data["symbol"], data["quantity"], data.get("stop_price"))
            if problem is not None:
                self.add_error("quantity", problem)
        return data


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    """Add opens the operation through :func:`stopmonitor.operations.open_operation` (STOP_SET/TARGET_SET,
    source ``manual``); on change, what the engine owns is read-only (levels move through the API)."""

    form = OperationAdminForm
    list_display = ["id", "client", "symbol", "side", "status", "quantity", "closed_quantity", "entry_price",
                    "stop_price", "target_price", "updated_at"]
    list_filter = ["status", "side", "client", "symbol"]
    list_select_related = ["client", "symbol"]
    search_fields = ["id", "stop_execution_token"]
    raw_id_fields = ["client", "symbol"]
    actions = [close_now]
    add_fields = ["client", "symbol", "side", "quantity", "entry_price", "stop_price", "target_price",
                  *trailing.COLUMNS]
    engine_fields = ["client", "symbol", "side", "quantity", "status", "closed_quantity", "stop_price",
                     "target_price", *trailing.COLUMNS, "stop_execution_token", "last_stop_check_at", "stop_check_count",
                     "created_at", "updated_at"]

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else super().get_fields(request, obj)

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.engine_fields

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        from api.views import lifecycle_venue
        from stopmonitor.operations import open_operation

        op = open_operation(obj.client, obj.symbol, obj.side, obj.quantity, obj.entry_price, obj.stop_price,
                            obj.target_price, source="manual", venue=lifecycle_venue(),
                            trailing_settings=trailing.TrailingSettings.of(obj))
        obj.pk = op.pk
        obj._state.adding = False


@admin.register(StopMonitorEvent)
class StopMonitorEventAdmin(ReadOnlyAdmin):
    list_display = ["sequence", "operation_id", "version", "event_type", "tenant", "symbol", "source", "venue",
                    "execution_token", "created_at"]
    list_filter = ["tenant", "symbol", "event_type", "source", "venue"]
    list_select_related = ["tenant"]
    search_fields = ["execution_token", "=operation__id"]
    ordering = ["-sequence"]


@admin.register(StopMonitorExecution)
class StopMonitorExecutionAdmin(ReadOnlyAdmin):
    list_display = ["execution_token", "operation_id", "tenant", "symbol", "status", "trigger", "side",
                    "requested_quantity", "executed_quantity", "avg_fill_price", "source", "venue", "created_at"]
    list_filter = ["tenant", "symbol", "status", "trigger", "source", "venue"]
    list_select_related = ["tenant"]
    search_fields = ["execution_token", "=operation__id"]
    ordering = ["-created_at"]


@admin.register(TenantConfig)
class TenantConfigAdmin(admin.ModelAdmin):
    list_display = ["client", "kill_switch", "kill_switch_reason", "max_slippage_pct", "slippage_action",
                    "max_executions_per_minute", "max_executions_per_hour", "protection_enabled",
                    "protection_buffer_bps", "updated_by", "updated_at"]
    readonly_fields = ["kill_switch_at", "kill_switch_by", "updated_by", "updated_at"]

    def save_model(self, request, obj, form, change):
        """Through the API's own service (:func:`stopmonitor.risk.update_risk_config`): who and when,
        the kill switch's time and author, and the audit line, like the API."""
        from stopmonitor.risk import update_risk_config

        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in form.cleaned_data
                   and name != "client"}
        if "kill_switch" in changes:
            changes["kill_switch_reason"] = form.cleaned_data.get("kill_switch_reason", obj.kill_switch_reason)
        saved = update_risk_config(obj.client_id, changes, request.user.get_username()[:150])
        obj.pk = saved.pk
        for name in ("updated_by", "updated_at", "kill_switch_at", "kill_switch_by"):
            setattr(obj, name, getattr(saved, name))


@admin.register(StopMonitorProtection)
class StopMonitorProtectionAdmin(ReadOnlyAdmin):
    list_display = ["operation_id", "status", "kind", "side", "quantity", "stop_price", "limit_price",
                    "client_order_id", "exchange_order_id", "reason", "updated_at"]
    list_filter = ["status", "kind", "reason"]
    search_fields = ["client_order_id"]


@admin.register(CircuitBreakerState)
class CircuitBreakerStateAdmin(ReadOnlyAdmin):
    list_display = ["symbol", "state", "failure_count", "opened_at", "retry_at", "last_error", "updated_at"]
    list_filter = ["state"]


class ExchangeAccountForm(forms.ModelForm):
    """The secret is write-only: an empty box keeps the stored one; it is never shown (issue #20)."""

    new_secret = forms.CharField(
        label="Secret", required=False, strip=True, widget=forms.PasswordInput(render_value=False),
        help_text="HMAC secret, or the Ed25519 private key (PEM). Set or replace it; it is never shown again.")

    class Meta:
        model = ExchangeAccount
        fields = ["client", "label", "venue", "key_type", "api_key", "enabled", "disabled_reason"]

    def clean(self):
        data = super().clean()
        if self.instance.pk is None and not data.get("new_secret"):
            self.add_error("new_secret", "A new account needs its secret.")
        return data


@admin.register(ExchangeAccount)
class ExchangeAccountAdmin(admin.ModelAdmin):
    """Exchange accounts: the secret is encrypted on save (:mod:`stopmonitor.accounts`), never displayed."""

    form = ExchangeAccountForm
    list_display = ["id", "client", "label", "venue", "key_type", "key_hint", "enabled", "updated_at"]
    list_filter = ["venue", "enabled"]
    search_fields = ["label", "client__name"]
    readonly_fields = ["key_hint", "created_at", "updated_at"]

    def get_fields(self, request, obj=None):
        return ["client", "label", "venue", "key_type", "api_key", "new_secret", "enabled", "disabled_reason",
                "key_hint", "created_at", "updated_at"]

    def save_model(self, request, obj, form, change):
        from stopmonitor import account_crypto

        secret = form.cleaned_data.get("new_secret")
        if secret:
            try:
                obj.secret_encrypted = account_crypto.encrypt(secret)
            except account_crypto.AccountCryptoError as exc:
                messages.error(request, str(exc))
                return
        super().save_model(request, obj, form, change)
