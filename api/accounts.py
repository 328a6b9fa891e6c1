"""``/api/v1/accounts/``: a tenant's exchange accounts (issue #20). The secret is write-only.

List and retrieve show the label, venue, key type, the last four characters of the key id and
whether the account is enabled — never the secret, never the whole key. ``POST`` creates one
(credentials checked with one signed read; refused → 400 with Binance's code and reason),
``POST {id}/secret/`` replaces the credentials, ``POST {id}/disable/`` and ``{id}/enable/``.
Another tenant's account answers 404.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import IntegrityError
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from api.models import AccountVenue, Client, ExchangeAccount, KeyType
from api.permissions import require_tenant_id, scope_to_tenant
from api.serializers import InputSerializer, StrictCharField
from api.views import ExchangeServiceUnavailable, NotFoundAsAPIError, error_responses
from stopmonitor import accounts
from stopmonitor.account_crypto import AccountCryptoError

audit = logging.getLogger("api.audit")


class ExchangeAccountSerializer(serializers.ModelSerializer):
    """An exchange account as shown: no secret, only the key id's last four characters."""

    client = serializers.PrimaryKeyRelatedField(read_only=True)
    key_hint = serializers.CharField(read_only=True, help_text="The key id's last four characters.")

    class Meta:
        model = ExchangeAccount
        fields = ["id", "client", "label", "venue", "key_type", "key_hint", "enabled", "disabled_reason",
                  "created_at", "updated_at"]
        read_only_fields = fields


class AccountCreateSerializer(InputSerializer):
    """A new account: ``secret`` is the HMAC secret, or the Ed25519 private key (PEM) for ``ED25519``."""

    label = StrictCharField(max_length=80)
    venue = serializers.ChoiceField(choices=AccountVenue.choices, required=False)
    key_type = serializers.ChoiceField(choices=KeyType.choices, default=KeyType.HMAC)
    api_key = StrictCharField(max_length=128, write_only=True, trim_whitespace=True)
    secret = StrictCharField(max_length=4000, write_only=True, trim_whitespace=True,
                                   style={"input_type": "password"})


class SecretReplaceSerializer(InputSerializer):
    """New credentials for an existing account (``api_key``/``key_type`` unchanged when omitted)."""

    secret = StrictCharField(max_length=4000, write_only=True, trim_whitespace=True,
                                   style={"input_type": "password"})
    api_key = StrictCharField(max_length=128, write_only=True, required=False)
    key_type = serializers.ChoiceField(choices=KeyType.choices, required=False)


class DisableSerializer(InputSerializer):
    reason = StrictCharField(max_length=300, required=False, allow_blank=True, default="")


def default_venue() -> str:
    """The venue of a new account: the deployment's when it trades on Binance, else ``binance``."""
    return settings.EXCHANGE_VENUE if settings.EXCHANGE_VENUE.startswith("binance") else AccountVenue.BINANCE


def credentials_guarded(fn):
    """Run ``fn`` and turn the credential errors into the API's answers (400 refused, 503 unknown)."""
    try:
        return fn()
    except accounts.CredentialsRefused as exc:
        raise exceptions.ValidationError({"secret": [f"Binance refused these credentials: {exc}"]}) from None
    except accounts.CredentialsUncheckable as exc:
        raise ExchangeServiceUnavailable(f"the credentials could not be checked; nothing was stored: {exc}") from None
    except AccountCryptoError as exc:
        raise ExchangeServiceUnavailable(f"account secrets cannot be stored: {exc}") from None


def resolve_account(tenant_id: int, account_id: int | None) -> ExchangeAccount | None:
    """The account an operation opened by ``tenant_id`` trades on: the named one (it must be the
    tenant's and enabled), else the tenant's only enabled account, else None (the default account,
    the environment's keys) when the tenant has none. Raises ``ValidationError`` on ``account``."""
    mine = ExchangeAccount.objects.filter(client_id=tenant_id)
    if account_id is not None:
        account = mine.filter(pk=account_id).first()
        if account is None:
            raise exceptions.ValidationError({"account": [f"No exchange account {account_id} for this tenant."]})
        if not account.enabled:
            raise exceptions.ValidationError({"account": [f"Exchange account {account_id} is disabled."]})
        return account
    enabled = list(mine.filter(enabled=True)[:2])
    if len(enabled) > 1:
        raise exceptions.ValidationError({"account": ["This tenant has several exchange accounts: name one."]})
    if not enabled and mine.exists():
        raise exceptions.ValidationError({"account": ["Every exchange account of this tenant is disabled."]})
    return enabled[0] if enabled else None


@extend_schema_view(
    list=extend_schema(summary="The tenant's exchange accounts (never the secret).",
                       responses={200: ExchangeAccountSerializer(many=True), **error_responses()}),
    retrieve=extend_schema(summary="One exchange account (never the secret).",
                           responses={200: ExchangeAccountSerializer, **error_responses(404)}),
)
class ExchangeAccountViewSet(NotFoundAsAPIError, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                             viewsets.GenericViewSet):
    """``/accounts/``: where the tenant's orders go and whose balance they spend."""

    queryset = ExchangeAccount.objects.order_by("id")
    serializer_class = ExchangeAccountSerializer
    pagination_class = None
    http_method_names = ["get", "post", "head", "options"]

    def get_queryset(self):
        return scope_to_tenant(super().get_queryset(), self.request.user, "client")

    @extend_schema(summary="Add an exchange account (credentials checked with one signed read).",
                   request=AccountCreateSerializer,
                   responses={201: ExchangeAccountSerializer, **error_responses(400, 403, 415, 503)})
    def create(self, request):
        tenant_id = require_tenant_id(request.user)
        data = AccountCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        venue = v.get("venue") or default_venue()
        if settings.EXCHANGE_VENUE.startswith("binance") and venue != settings.EXCHANGE_VENUE:
            raise exceptions.ValidationError({"venue": [f"This deployment trades on {settings.EXCHANGE_VENUE}."]})
        if ExchangeAccount.objects.filter(client_id=tenant_id, label=v["label"]).exists():
            raise exceptions.ValidationError({"label": ["This tenant already has an account with this label."]})
        try:
            account = credentials_guarded(lambda: accounts.create_account(
                Client.objects.get(pk=tenant_id), label=v["label"], venue=venue, key_type=v["key_type"],
                api_key=v["api_key"], secret=v["secret"]))
        except IntegrityError:
            raise exceptions.ValidationError({"label": ["This tenant already has an account with this label."]}) from None
        audit.info("exchange account created", extra={"account_id": account.pk, "actor": request.user.get_username()})
        return Response(ExchangeAccountSerializer(account).data, status=status.HTTP_201_CREATED,
                        headers={"Location": f"{request.path}{account.pk}/"})

    @extend_schema(summary="Replace the account's credentials (checked with one signed read).",
                   request=SecretReplaceSerializer,
                   responses={200: ExchangeAccountSerializer, **error_responses(400, 404, 415, 503)})
    @action(detail=True, methods=["post"])
    def secret(self, request, pk=None):
        account = self.get_object()
        data = SecretReplaceSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        credentials_guarded(lambda: accounts.replace_secret(account, secret=v["secret"], api_key=v.get("api_key"),
                                                            key_type=v.get("key_type")))
        audit.info("exchange account secret replaced",
                   extra={"account_id": account.pk, "actor": request.user.get_username()})
        return Response(ExchangeAccountSerializer(account).data)

    @extend_schema(summary="Disable the account: its operations are BLOCKED (ACCOUNT_DISABLED) and no order is sent.",
                   request=DisableSerializer, responses={200: ExchangeAccountSerializer, **error_responses(400, 404, 415)})
    @action(detail=True, methods=["post"])
    def disable(self, request, pk=None):
        account = self.get_object()
        data = DisableSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        accounts.set_enabled(account, False, data.validated_data["reason"])
        audit.info("exchange account disabled", extra={"account_id": account.pk, "actor": request.user.get_username()})
        return Response(ExchangeAccountSerializer(account).data)

    @extend_schema(summary="Enable the account again.", request=None,
                   responses={200: ExchangeAccountSerializer, **error_responses(400, 404, 415)})
    @action(detail=True, methods=["post"])
    def enable(self, request, pk=None):
        account = self.get_object()
        accounts.set_enabled(account, True)
        audit.info("exchange account enabled", extra={"account_id": account.pk, "actor": request.user.get_username()})
        return Response(ExchangeAccountSerializer(account).data)
