"""Query filters of the list endpoints (django-filter; an invalid value answers 400 with the field)."""

from __future__ import annotations

import django_filters
from django import forms
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema_field

from api.models import ExecutionStatus, Operation, OperationStatus, Side, StopMonitorExecution


class PresentChoiceField(forms.ChoiceField):
    """A choice that, when the parameter is given, must be one of the choices: ``?status=`` is refused
    (the schema's enum has no empty value; django-filter would ignore it)."""

    def clean(self, value):
        if value == "":
            raise forms.ValidationError(f"Select one of {', '.join(str(c) for c, _ in self.choices if c)}.",
                                        code="invalid_choice")
        return super().clean(value)


class StrictChoiceFilter(django_filters.ChoiceFilter):
    field_class = PresentChoiceField


@extend_schema_field({"type": "string", "maxLength": 20, "pattern": "^[^\\x00]*$"})
class SymbolFilter(django_filters.CharFilter):
    """A symbol name, at most 20 characters (the column's length), as the schema says."""


class OperationFilter(django_filters.FilterSet):
    """``?status=ACTIVE&symbol=BTCUSDT&side=BUY``."""

    status = StrictChoiceFilter(choices=OperationStatus.choices)
    symbol = SymbolFilter(field_name="symbol__symbol", max_length=20)
    side = StrictChoiceFilter(choices=Side.choices)

    class Meta:
        model = Operation
        fields = ["status", "symbol", "side"]


class StrictIntegerField(forms.IntegerField):
    """ASCII digits only: ``int()`` would also take ``" 5"``, ``"+5"``, ``"1_0"`` and ``"١٠"``."""

    def to_python(self, value):
        if value not in self.empty_values and not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return super().to_python(value)


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": 2**63 - 1})
class IntegerFilter(django_filters.NumberFilter):
    """A whole-number filter of an id: 1 … 2**63-1 (``1.5``, ``NaN``, ``0`` and ``-1`` are refused, as the
    schema says)."""

    field_class = StrictIntegerField


class ExecutionFilter(django_filters.FilterSet):
    """``?status=EXECUTED&operation=42``."""

    status = StrictChoiceFilter(choices=ExecutionStatus.choices)
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
