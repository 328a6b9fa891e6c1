"""Query filters of the list endpoints (django-filter; an invalid value answers 400 with the field)."""

from __future__ import annotations

import django_filters
from django import forms
from django_filters.rest_framework import DjangoFilterBackend

from api.models import ExecutionStatus, Operation, OperationStatus, Side, StopMonitorExecution


class OperationFilter(django_filters.FilterSet):
    """``?status=ACTIVE&symbol=BTCUSDT&side=BUY``."""

    status = django_filters.ChoiceFilter(choices=OperationStatus.choices)
    symbol = django_filters.CharFilter(field_name="symbol__symbol", max_length=20)
    side = django_filters.ChoiceFilter(choices=Side.choices)

    class Meta:
        model = Operation
        fields = ["status", "symbol", "side"]


class IntegerFilter(django_filters.NumberFilter):
    """A whole-number filter (``1.5`` and ``NaN`` are refused)."""

    field_class = forms.IntegerField


class ExecutionFilter(django_filters.FilterSet):
    """``?status=EXECUTED&operation=42``."""

    status = django_filters.ChoiceFilter(choices=ExecutionStatus.choices)
    operation = IntegerFilter(field_name="operation_id", min_value=1, max_value=2**63 - 1)

    class Meta:
        model = StopMonitorExecution
        fields = ["status", "operation"]


class FilterBackend(DjangoFilterBackend):
    """django-filter's backend, skipped when the query has no parameter but the view's pagination
    ones (``cursor``, ``limit``): no filter is given then, and the filterset would hand the queryset
    back unchanged after building and validating its form (about a tenth of a list request's CPU)."""

    def filter_queryset(self, request, queryset, view):
        paginator = getattr(view, "paginator", None)
        pagination = {getattr(paginator, "cursor_query_param", None), getattr(paginator, "page_size_query_param", None)}
        if all(name in pagination for name in request.query_params):
            return queryset
        return super().filter_queryset(request, queryset, view)
