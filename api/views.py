"""REST API views under ``/api/v1/``: they parse input, call the stopmonitor use cases, render.

Every query is narrowed to the caller's tenant (:mod:`api.permissions`); another tenant's
object answers 404. Writes that change what is monitored go through
:mod:`stopmonitor.operations` and :func:`stopmonitor.engine.close.close_operation`, so the event
stream of an operation is complete whoever changed it. Errors come back in the one envelope
of :mod:`api.errors`.
"""

from __future__ import annotations

from django.conf import settings
from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from api import idempotency
from api.errors import Conflict
from api.filters import ExecutionFilter, FilterBackend, OperationFilter
from api.models import (
    CircuitBreakerState,
    Client,
    Operation,
    StopMonitorEvent,
    StopMonitorExecution,
    Symbol,
    TenantConfig,
)
from api.pagination import (
    ExecutionCursorPagination,
    OperationCursorPagination,
    SequencePagination,
    StreamCursorPagination,
)
from api.permissions import IsStaff, NoTenant, require_tenant_id, scope_to_tenant, tenant_id_of
from api.serializers import (
    CircuitBreakerSerializer,
    CloseRequestSerializer,
    CloseResultSerializer,
    NotClosedSerializer,
    ErrorSerializer,
    EventSerializer,
    ExecutionSerializer,
    OperationCreateSerializer,
    OperationDetailSerializer,
    OperationSerializer,
    OperationUpdateSerializer,
    TRAILING_FIELD_NAMES,
    TrailingFields,
    RiskConfigSerializer,
    RiskConfigUpdateSerializer,
    StreamEventSerializer,
    SymbolSerializer,
)
from stopmonitor.events import ConcurrencyConflict
from stopmonitor.operations import LevelError, StateConflict, move_levels, open_operation
from stopmonitor.risk import reset_breaker, update_risk_config
from stopmonitor.trailing import TrailingSettings



class ExchangeServiceUnavailable(exceptions.APIException):
    """503: the exchange could not be read (quotes, balances or filters); nothing was changed."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "exchange_unavailable"
    default_detail = "The exchange cannot be reached now; nothing was changed. Try again."


def get_exchange():
    """The configured exchange adapter (``settings.EXCHANGE_VENUE``); tests replace this function."""
    from stopmonitor.exchange.factory import build_exchange

    return build_exchange()


def lifecycle_venue() -> str:
    """The venue recorded on lifecycle events (``STOP_SET``…): replay trades on paper."""
    venue = settings.EXCHANGE_VENUE
    return "paper" if venue in ("paper", "replay") else venue


def actor_of(request) -> str:
    """Who made the request, as recorded on changes (the username)."""
    return request.user.get_username()[:150]


# --------------------------------------------------------------------------------------
# OpenAPI: every error answer is described with the envelope
# --------------------------------------------------------------------------------------

_ERROR_TEXT = {
    400: ("Invalid input, a body that is not JSON, or a NUL character in the path or query: `fields` gives each "
          "refused field and its reasons. Nothing changed."),
    401: "Missing or invalid bearer token.",
    403: "Not allowed (staff only, or the user belongs to no tenant).",
    404: "No such object for this tenant (another tenant's objects are not found either), or an invalid cursor.",
    409: "The operation's state does not allow this (CLOSING, CLOSED or CANCELLED; or being closed by someone else).",
    413: "The body is larger than the limit (64 KiB); it was not read.",
    415: "The request body must be application/json.",
    422: "This Idempotency-Key was used for a different request (another body, path or method); nothing changed.",
    429: "Too many requests for this user; retry after the Retry-After header.",
    503: ("The exchange cannot be read, the database cannot complete the request (`committed` says whether "
          "something of it was saved), or the request waited past its deadline; sent with Retry-After."),
}

_IDEMPOTENCY_KEY = OpenApiParameter(
    idempotency.HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
    description=("A key of yours (1-255 visible ASCII characters, e.g. a UUID) making the request safe to "
                 "retry: a retry with the same key and body within 24 h gets the first answer (header "
                 "`Idempotent-Replayed: true`) and changes nothing; the same key with another body is 422; "
                 "a retry while the first request still runs waits for its answer (409 "
                 "`idempotency_key_in_use` after 5 s)."),
)


# POST /operations/{id}/close/: the HTTP status says whether the position was closed (the body's
# ``outcome`` says how): sold (in full or in part, or found sold by reconcile) 200; the order was
# sent and its outcome is unknown (the monitor reconciles it) 202; the exchange refused it 502; a
# guardrail held it, or the block was already recorded, 409; an unexpected error 500
CLOSE_STATUS = {
    "executed": status.HTTP_200_OK, "partially_executed": status.HTTP_200_OK, "reconciled": status.HTTP_200_OK,
    "unknown": status.HTTP_202_ACCEPTED, "submitted": status.HTTP_202_ACCEPTED,
    "failed": status.HTTP_502_BAD_GATEWAY, "error": status.HTTP_500_INTERNAL_SERVER_ERROR,
}


def error_responses(*codes: int) -> dict:
    """OpenAPI responses for ``codes`` plus 400 (a NUL in the path or query, api.middleware), 401 and 429
    (every endpoint), all with the error envelope."""
    return {code: OpenApiResponse(ErrorSerializer, description=_ERROR_TEXT[code])
            for code in sorted({400, 401, 429, *codes})}


def no_nul_in_string_parameters(result, generator, request, public):
    """drf-spectacular postprocessing hook: every string path or query parameter without a pattern or an
    enum gets ``pattern: ^[^\\x00]*$`` — a NUL is refused with 400 (PostgreSQL text cannot hold it)."""
    for item in result.get("paths", {}).values():
        for operation in item.values():
            for param in operation.get("parameters", []) if isinstance(operation, dict) else []:
                schema = param.get("schema", {})
                if param.get("in") in ("path", "query") and schema.get("type") == "string" and not (
                        {"pattern", "enum", "format"} & set(schema)):
                    schema["pattern"] = "^[^\\x00]*$"
    return result


class NotFoundAsAPIError:
    """``get_object`` raising DRF's ``NotFound`` (code ``not_found``) rather than Django's ``Http404``,
    so the envelope carries a machine-readable code and a message. Any path segment reaches the
    view (``lookup_value_regex``), so ``/operations/1.5/`` is a JSON 404 too, not Django's HTML page."""

    lookup_value_regex = "[^/]+"

    def get_object(self):
        try:
            return super().get_object()
        except Http404:
            raise exceptions.NotFound() from None


# --------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="List the tenant's operations (newest first).",
                       responses={200: OperationSerializer(many=True), **error_responses(400, 404)}),
    retrieve=extend_schema(summary="One operation with its latest execution.",
                           responses={200: OperationDetailSerializer, **error_responses(404)}),
)
class OperationViewSet(NotFoundAsAPIError, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """``/operations/``: the positions being monitored."""

    queryset = Operation.objects.select_related("symbol")
    serializer_class = OperationSerializer
    filter_backends = [FilterBackend]
    filterset_class = OperationFilter
    pagination_class = OperationCursorPagination
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self):
        return scope_to_tenant(super().get_queryset(), self.request.user, "client")

    def get_serializer_class(self):
        return OperationDetailSerializer if self.action == "retrieve" else OperationSerializer

    def list(self, request, *args, **kwargs):
        # the columns of a listed operation as dicts, rendered without model instances (the cursor
        # pagination reads ``id`` from a dict as well); the body equals OperationSerializer's
        rows = self.filter_queryset(self.get_queryset()).values(*OperationSerializer.VALUES)
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(OperationSerializer.represent_values(page))

    def _detail(self, pk: int, status_code=status.HTTP_200_OK, headers=None) -> Response:
        op = Operation.objects.select_related("symbol").get(pk=pk)
        return Response(OperationDetailSerializer(op).data, status=status_code, headers=headers)

    @extend_schema(
        summary="Open an operation: appends STOP_SET (and TARGET_SET).",
        request=OperationCreateSerializer,
        parameters=[_IDEMPOTENCY_KEY],
        responses={201: OperationDetailSerializer, **error_responses(400, 403, 409, 413, 415, 422, 503)},
        examples=[OpenApiExample("A long on BTCUSDT", request_only=True, value={
            "symbol": "BTCUSDT", "side": "BUY", "quantity": "0.5", "entry_price": "9300", "stop_price": "9200",
            "target_price": "9500"})],
    )
    def create(self, request):
        tenant_id = require_tenant_id(request.user)
        data = OperationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data

        from api.accounts import resolve_account  # issue #20: the account the position lives on

        def execute():
            trail = TrailingFields.given(v)
            account = resolve_account(tenant_id, v.get("account"))
            try:
                op = open_operation(Client.objects.get(pk=tenant_id), v["symbol"], v["side"], v["quantity"],
                                    v["entry_price"], v["stop_price"], v.get("target_price"), source="api",
                                    venue=lifecycle_venue(),
                                    trailing_settings=TrailingSettings.from_values(
                                        *(trail.get(name) for name in TRAILING_FIELD_NAMES)),
                                    account=account)
            except LevelError as exc:
                raise exceptions.ValidationError({exc.field: [str(exc)]}) from None
            return self._detail(op.pk, status.HTTP_201_CREATED, {"Location": f"{request.path}{op.pk}/"})

        # the operation, its answer and the Idempotency-Key commit together (api/idempotency.py)
        return idempotency.run_atomic(request, execute)

    @extend_schema(
        summary="Move the stop and/or target: appends STOP_MOVED / TARGET_SET.",
        request=OperationUpdateSerializer,
        parameters=[_IDEMPOTENCY_KEY],
        responses={200: OperationDetailSerializer, **error_responses(400, 404, 409, 413, 415, 422, 503)},
        examples=[OpenApiExample("Trail the stop of a long", request_only=True, value={"stop_price": "9250"})],
    )
    def partial_update(self, request, pk=None):
        op = self.get_object()
        data = OperationUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)

        def execute():
            try:
                move_levels(op.pk, stop_price=data.validated_data.get("stop_price"),
                            target_price=data.validated_data.get("target_price"), source="api",
                            venue=lifecycle_venue(), actor=actor_of(request),
                            trailing_changes=TrailingFields.given(data.validated_data))
            except StateConflict as exc:
                raise Conflict(str(exc)) from None
            except LevelError as exc:
                raise exceptions.ValidationError({exc.field: [str(exc)]}) from None
            return self._detail(op.pk)

        return idempotency.run_atomic(request, execute)

    @extend_schema(
        summary="Close now at market through the engine (source api, exactly once).",
        description=(
            "Runs the same close protocol as the monitor. The status says whether the position was closed and "
            "`outcome` (the last decision) how: 200 executed or partially_executed (the rest stays protected); "
            "202 unknown (the order was sent and may exist; the monitor reconciles it); 502 failed (the exchange "
            "refused the order; the operation stays ACTIVE); 409 blocked (a guardrail held it: the reason is in "
            "the error message, the decision and the stream), or the operation is not ACTIVE, or someone else "
            "(the monitor, another request) is closing it: no order is placed. 409 and 502 carry the error "
            "envelope and, when close ran, its outcome, decisions and operation."
        ),
        request=CloseRequestSerializer,
        parameters=[_IDEMPOTENCY_KEY],
        responses={**error_responses(400, 404, 413, 415, 422, 503), 200: CloseResultSerializer, 202: CloseResultSerializer,
                   409: OpenApiResponse(NotClosedSerializer, description=_ERROR_TEXT[409]),
                   502: OpenApiResponse(NotClosedSerializer, description="The exchange refused the order.")},
    )
    @action(detail=True, methods=["post"], filter_backends=[], pagination_class=None)
    def close(self, request, pk=None):
        op = self.get_object()
        CloseRequestSerializer(data=request.data).is_valid(raise_exception=True)
        # a retry with the key gets the first answer: the close commits in several transactions around
        # the exchange call, so the key is claimed first and the answer stored after (api/idempotency.py)
        return idempotency.run_claimed(request, lambda: self._close(request, op))

    def _close(self, request, op) -> Response:
        decisions = self._close_decisions(op)
        outcome = decisions[-1].action
        body = {
            "outcome": outcome,
            "decisions": [
                {"action": d.action, "execution_token": d.execution_token, "event_type": d.event_type,
                 "reason": d.reason, "detail": d.detail}
                for d in decisions
            ],
            "operation": OperationDetailSerializer(Operation.objects.select_related("symbol").get(pk=op.pk)).data,
        }
        status_code = CLOSE_STATUS.get(outcome, status.HTTP_409_CONFLICT)
        if status_code >= 400:  # nothing (more) was sold: the error envelope, and what close did
            last = decisions[-1]
            why = ": ".join(x for x in (last.reason, last.detail) if x)
            body = {"error": {"code": "not_closed", "message": f"operation {op.pk} was not closed ({outcome}"
                                                               f"{': ' + why if why else ''})", "fields": {}}, **body}
        return Response(body, status=status_code)

    @staticmethod
    def _close_decisions(op) -> list:
        """The engine's close of ``op`` (source ``api``) and its decisions. Raises Conflict (not
        ACTIVE, being changed, already closing elsewhere) and ExchangeServiceUnavailable (503)."""
        from stopmonitor.engine.close import close_operation
        from stopmonitor.engine.decisions import EngineUnavailable

        if op.status != "ACTIVE":
            raise Conflict(f"operation {op.pk} is {op.status}: it cannot be closed now")
        try:
            exchange = get_exchange()
        except (ValueError, ImportError) as exc:
            raise ExchangeServiceUnavailable(f"no exchange: {exc}") from None
        try:
            decisions = close_operation(op.pk, exchange, source="api")
        except EngineUnavailable as exc:
            raise ExchangeServiceUnavailable(str(exc)) from None
        except ConcurrencyConflict:
            raise Conflict(f"operation {op.pk} is being changed by someone else") from None
        if any(d.action == "skipped" and d.reason == "NOT_ACTIVE" for d in decisions):
            raise Conflict(f"operation {op.pk} is already being closed by someone else")
        return decisions

    @extend_schema(
        summary="The operation's stream in version order.",
        responses={200: StreamEventSerializer(many=True), **error_responses(404)},
    )
    @action(detail=True, methods=["get"], serializer_class=StreamEventSerializer, filter_backends=[],
            pagination_class=StreamCursorPagination)
    def events(self, request, pk=None):
        op = self.get_object()
        page = self.paginate_queryset(StopMonitorEvent.objects.filter(operation_id=op.pk))
        return self.get_paginated_response(StreamEventSerializer(page, many=True).data)


# --------------------------------------------------------------------------------------
# History and executions
# --------------------------------------------------------------------------------------


@extend_schema(
    summary="The global event feed in sequence order (?after=SEQ).",
    description="Poll with `after` = the previous answer's `last_sequence`; never skips an event committed late.",
    responses={200: EventSerializer(many=True), **error_responses(400)},
)
class EventFeedView(ListAPIView):
    """``/events/?after=SEQ&limit=N``: the tenant's events after a global sequence number."""

    queryset = StopMonitorEvent.objects.all()
    serializer_class = EventSerializer
    pagination_class = SequencePagination

    def get_queryset(self):
        return scope_to_tenant(super().get_queryset(), self.request.user, "tenant")


@extend_schema_view(
    list=extend_schema(summary="The tenant's executions (newest first).",
                       responses={200: ExecutionSerializer(many=True), **error_responses(400, 404)}),
    retrieve=extend_schema(summary="One execution by its token (the client order id).",
                           responses={200: ExecutionSerializer, **error_responses(404)}),
)
class ExecutionViewSet(NotFoundAsAPIError, viewsets.ReadOnlyModelViewSet):
    """``/executions/``: close attempts (the projection of the events)."""

    queryset = StopMonitorExecution.objects.all()
    serializer_class = ExecutionSerializer
    filter_backends = [FilterBackend]
    filterset_class = ExecutionFilter
    pagination_class = ExecutionCursorPagination

    def get_queryset(self):
        return scope_to_tenant(super().get_queryset(), self.request.user, "tenant")


# --------------------------------------------------------------------------------------
# Risk controls
# --------------------------------------------------------------------------------------

_CLIENT_PARAM = OpenApiParameter(
    "client", {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}, OpenApiParameter.QUERY, required=False,
    description="Tenant id (staff; defaults to the caller's tenant).",
)


class RiskConfigView(APIView):
    """``/risk/config/``: the tenant's kill switch, slippage limit and execution rate limits."""

    def _tenant_id(self, request) -> int:
        raw = request.query_params.get("client")
        if raw is None:
            tenant_id = tenant_id_of(request.user)
            if tenant_id is None:
                if request.user.is_staff:
                    raise exceptions.ValidationError({"client": ["Required for a staff user without a tenant."]})
                raise NoTenant()
            return tenant_id
        if not (raw.isascii() and raw.isdigit()):  # int() also takes " 5", "+5", "1_0" and "١٠"
            raise exceptions.ValidationError({"client": ["A valid integer is required."]})
        wanted = int(raw)
        if not 0 < wanted < 2**63 or not _visible_clients(request.user).filter(pk=wanted).exists():
            raise exceptions.NotFound()
        return wanted

    @extend_schema(summary="The tenant's risk controls.", parameters=[_CLIENT_PARAM],
                   responses={200: RiskConfigSerializer, **error_responses(400, 403, 404)})
    def get(self, request):
        tenant_id = self._tenant_id(request)
        cfg = TenantConfig.objects.filter(client_id=tenant_id).first() or TenantConfig(client_id=tenant_id)
        return Response(RiskConfigSerializer(cfg).data)

    @extend_schema(
        summary="Change the risk controls (the kill switch needs a reason); records who and when.",
        parameters=[_CLIENT_PARAM],
        request=RiskConfigUpdateSerializer,
        responses={200: RiskConfigSerializer, **error_responses(400, 403, 404, 415)},
        examples=[OpenApiExample("Stop every close", request_only=True,
                                 value={"kill_switch": True, "kill_switch_reason": "exchange incident"})],
    )
    def patch(self, request):
        tenant_id = self._tenant_id(request)
        data = RiskConfigUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        cfg = update_risk_config(tenant_id, data.validated_data, actor_of(request))
        return Response(RiskConfigSerializer(cfg).data)


def _visible_clients(user):
    qs = Client.objects.all()
    if user.is_staff:
        return qs
    tenant_id = tenant_id_of(user)
    return qs.filter(pk=tenant_id) if tenant_id is not None else qs.none()


@extend_schema_view(
    list=extend_schema(summary="Every symbol's circuit breaker.",
                       responses={200: CircuitBreakerSerializer(many=True), **error_responses()}),
)
class CircuitBreakerViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """``/risk/circuit-breakers/``: per-symbol breakers (shared by every tenant)."""

    lookup_value_regex = "[^/]+"
    queryset = CircuitBreakerState.objects.order_by("symbol")
    serializer_class = CircuitBreakerSerializer
    lookup_field = "symbol"
    pagination_class = None

    @extend_schema(
        summary="Staff: close the symbol's breaker now (failures forgotten).",
        request=None,
        responses={200: CircuitBreakerSerializer, **error_responses(403, 404)},
    )
    @action(detail=True, methods=["post"], permission_classes=[IsAuthenticated, IsStaff])
    def reset(self, request, symbol=None):
        row = reset_breaker(symbol, actor_of(request))
        if row is None:
            raise exceptions.NotFound()
        return Response(CircuitBreakerSerializer(row).data)


# --------------------------------------------------------------------------------------
# Symbols
# --------------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Symbols and their exchange filters.",
                       responses={200: SymbolSerializer(many=True), **error_responses()}),
    retrieve=extend_schema(summary="One symbol.", responses={200: SymbolSerializer, **error_responses(404)}),
)
class SymbolViewSet(NotFoundAsAPIError, viewsets.ReadOnlyModelViewSet):
    """``/symbols/``: read-only; kept in sync with exchangeInfo by ``manage.py sync_symbols``."""

    queryset = Symbol.objects.order_by("symbol")
    serializer_class = SymbolSerializer
    lookup_field = "symbol"
    pagination_class = None

