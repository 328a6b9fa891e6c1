"""Pagination: cursor pages for lists, and the ``after=SEQ`` keyset feed of the global event log.

Cursor pages (``?cursor=…&limit=N``) stay stable while rows are added. The event feed pages
by the global ``sequence``: appends are serialized so that sequence order is commit order
(:mod:`stopmonitor.events`), hence ``after`` never skips an event committed late.
"""

from __future__ import annotations

import re

from rest_framework import exceptions
from rest_framework.pagination import BasePagination, CursorPagination
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param


_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)


def int_param(request, name: str, default: int, lo: int, hi: int | None) -> int:
    """The query parameter ``name`` as an integer in [lo, hi] (``default`` when absent): 400 naming it when
    it is empty, not ASCII digits (``"1.5"``, ``"1e3"``, ``"+5"``, ``"١٠"``) or out of range."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise exceptions.ValidationError({name: ["A valid integer is required."]})
    value = int(raw) if len(raw) <= 40 else (-1 if raw.startswith("-") else 1) * 10**40
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise exceptions.ValidationError({name: [f"Must be {bound}."]})
    return value


class StrictCursorPagination(CursorPagination):
    """DRF's cursor pages, but an invalid ``limit`` is 400 (DRF silently uses the default page size)."""

    page_size_query_param = "limit"

    def get_page_size(self, request):
        return int_param(request, self.page_size_query_param, self.page_size, 1, self.max_page_size)

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for param in params:
            if param["name"] == self.page_size_query_param:
                param["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
                param["description"] = f"Page size, 1 to {self.max_page_size} (default {self.page_size})."
        return params


class OperationCursorPagination(StrictCursorPagination):
    """Newest operations first, 50 per page (``limit`` up to 200)."""

    ordering = "-id"
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200


class ExecutionCursorPagination(StrictCursorPagination):
    """Newest executions first, 50 per page (``limit`` up to 200)."""

    ordering = ("-created_at", "execution_token")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200


class StreamCursorPagination(StrictCursorPagination):
    """One operation's stream in version order, 100 events per page (``limit`` up to 500)."""

    ordering = "version"
    page_size = 100
    page_size_query_param = "limit"
    max_page_size = 500


class SequencePagination(BasePagination):
    """``?after=SEQ&limit=N``: the next ``N`` events with ``sequence > SEQ``, in sequence order.

    The answer carries ``last_sequence`` (the ``after`` for the next request; unchanged when
    nothing new) and ``next`` (a link when the page is full, so more may follow).
    """

    default_limit = 100
    max_limit = 500

    def paginate_queryset(self, queryset, request, view=None):
        self.request = request
        self.after = int_param(request, "after", 0, 0, 2**63 - 1)
        self.limit = int_param(request, "limit", self.default_limit, 1, self.max_limit)
        self.page = list(queryset.filter(sequence__gt=self.after).order_by("sequence")[: self.limit])
        return self.page

    def get_paginated_response(self, data):
        last = self.page[-1].sequence if self.page else self.after
        next_url = None
        if len(self.page) == self.limit:
            next_url = replace_query_param(self.request.build_absolute_uri(), "after", last)
        return Response({"next": next_url, "last_sequence": last, "results": data})

    def get_paginated_response_schema(self, schema):
        return {
            "type": "object",
            "required": ["next", "last_sequence", "results"],
            "properties": {
                "next": {"type": "string", "nullable": True, "format": "uri"},
                "last_sequence": {"type": "integer"},
                "results": schema,
            },
        }

    def get_schema_operation_parameters(self, view):
        return [
            {
                "name": "after",
                "required": False,
                "in": "query",
                "description": "Return events with a sequence greater than this (default 0).",
                "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            },
            {
                "name": "limit",
                "required": False,
                "in": "query",
                "description": f"Page size, 1 to {self.max_limit} (default {self.default_limit}).",
                "schema": {"type": "integer", "minimum": 1, "maximum": self.max_limit},
            },
        ]
