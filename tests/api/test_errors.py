"""api.errors.exception_handler: Django's own exceptions raised inside an API view get the one envelope.

The views are tiny APIViews called through APIRequestFactory (the project's DRF settings apply,
so EXCEPTION_HANDLER is api.errors.exception_handler); no URLconf and no database are needed.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.shortcuts import get_object_or_404
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from api.errors import exception_handler
from tests.api.conftest import NOT_FOUND, error, invalid


def _view(raise_):
    class Raising(APIView):
        authentication_classes: list = []
        permission_classes = [AllowAny]
        throttle_classes: list = []

        def get(self, request):
            raise_()

    return Raising.as_view()


def _call(raise_):
    response = _view(raise_)(APIRequestFactory().get("/x/"))
    response.render()
    return response.status_code, response.data


def _raise(exc):
    def raise_():
        raise exc

    return raise_


def test_django_http404_is_not_found():
    assert _call(_raise(Http404())) == (404, NOT_FOUND)


def test_django_http404_with_a_message_does_not_leak_it():
    # get_object_or_404's message names the model; the envelope says only "Not found."
    assert _call(_raise(Http404("No Operation matches the given query."))) == (404, NOT_FOUND)


@pytest.mark.django_db
def test_get_object_or_404_in_a_plain_apiview():
    from django.contrib.auth import get_user_model

    def raise_():
        get_object_or_404(get_user_model(), pk=987654321)

    assert _call(raise_) == (404, NOT_FOUND)


def test_django_permission_denied_without_message():
    assert _call(_raise(DjangoPermissionDenied())) == (
        403,
        error("permission_denied", "You do not have permission to perform this action."),
    )


def test_django_permission_denied_keeps_its_message():
    assert _call(_raise(DjangoPermissionDenied("Only staff users may do this."))) == (
        403,
        error("permission_denied", "Only staff users may do this."),
    )


def test_django_validation_error_with_fields_outside_a_serializer():
    exc = DjangoValidationError({"stop_percent": ["Must be between 0.1 and 50."], "symbol": "Unknown symbol."})
    assert _call(_raise(exc)) == (
        400,
        invalid(stop_percent=["Must be between 0.1 and 50."], symbol=["Unknown symbol."]),
    )


def test_django_validation_error_without_fields_is_non_field_errors():
    assert _call(_raise(DjangoValidationError("The operation is already closed."))) == (
        400,
        invalid(non_field_errors=["The operation is already closed."]),
    )


def test_drf_exceptions_unchanged():
    assert _call(_raise(exceptions.NotFound())) == (404, NOT_FOUND)
    assert _call(_raise(exceptions.NotFound("Invalid cursor"))) == (404, error("not_found", "Invalid cursor"))
    assert _call(_raise(exceptions.PermissionDenied())) == (
        403,
        error("permission_denied", "You do not have permission to perform this action."),
    )


def test_handler_called_directly_with_a_fake_context():
    response = exception_handler(Http404(), {"view": None, "request": None})
    assert (response.status_code, response.data) == (404, NOT_FOUND)
    response = exception_handler(DjangoPermissionDenied(), {"view": None, "request": None})
    assert response.status_code == 403 and response.data["error"]["code"] == "permission_denied"


def test_other_exceptions_are_left_to_django():
    assert exception_handler(RuntimeError("boom"), {"view": None, "request": None}) is None


def test_a_database_error_is_a_json_503_with_retry_after_and_changes_nothing(alice, open_op, monkeypatch, caplog):
    """A pool timeout, a dead connection or a deadlock answered Django's HTML 500 page before."""
    from django.db import OperationalError

    from api.models import Operation
    from stopmonitor import operations

    op = open_op(alice.tenant)

    def deadlock(operation_id):
        raise OperationalError("deadlock detected")

    monkeypatch.setattr(operations, "lock_operation", deadlock)
    with caplog.at_level("ERROR", logger="api.errors"):
        r = alice.api.patch(f"/api/v1/operations/{op.pk}/", {"stop_price": "9100"}, format="json")
    assert r.status_code == 503
    body = error("database_unavailable", "The database could not complete the request; nothing of it was saved. "
                                         "Retry after Retry-After.")
    body["error"]["committed"] = "no"
    assert r.json() == body
    assert r["Retry-After"] == "2"
    assert Operation.objects.get(pk=op.pk).stop_price == op.stop_price
    assert [rec.getMessage() for rec in caplog.records if rec.name == "api.errors"] == ["database error answered 503"]
