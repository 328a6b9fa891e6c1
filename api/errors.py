"""The API's one error envelope: ``{"error": {"code", "message", "fields": {field: [reasons]}}}``."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import OperationalError as DatabaseOperationalError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def _fields(detail) -> dict:
    if isinstance(detail, dict):
        return {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in detail.items()}
    if isinstance(detail, list):
        return {"non_field_errors": [str(x) for x in detail]}
    return {}


def exception_handler(exc, context):
    """Convert every API exception (DRF's, Django's ValidationError, Http404 and PermissionDenied, and
    database OperationalErrors as 503 ``database_unavailable``) to the one envelope.

    Django's exceptions are converted here, before the code is read from ``exc``: DRF's handler
    converts Http404 and PermissionDenied too, but only its own local copy. A Django ``Http404``
    always becomes ``not_found`` / "Not found." (its message, e.g. get_object_or_404's "No
    Operation matches the given query.", names a model); a ``PermissionDenied`` keeps its message
    when it has one.
    """
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(*(str(a) for a in exc.args[:1]))
    elif isinstance(exc, DatabaseOperationalError):
        # no connection within the pool's timeout, a connection that died, a deadlock, a lock or
        # statement timeout: the request's transaction is rolled back and it may be retried
        logging.getLogger("api.errors").error("database error answered 503", exc_info=exc)
        exc = DatabaseUnavailable()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    code = getattr(exc, "default_code", "error")
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        if isinstance(codes, str):
            code = codes
    body = {"error": {"code": code, "message": "", "fields": {}}}
    if isinstance(exc, exceptions.ValidationError):
        body["error"]["code"] = "invalid"
        body["error"]["message"] = "The request has invalid fields."
        body["error"]["fields"] = _fields(exc.detail)
    else:
        detail = getattr(exc, "detail", "")
        body["error"]["message"] = str(detail) if not isinstance(detail, (dict, list)) else "error"
        if isinstance(detail, (dict, list)):
            body["error"]["fields"] = _fields(detail)
    response.data = body
    if isinstance(exc, DatabaseUnavailable):
        response["Retry-After"] = str(DatabaseUnavailable.retry_after)
    return response


class DatabaseUnavailable(exceptions.APIException):
    """503: the database could not complete the request (unreachable, or a deadlock or lock timeout);
    nothing of it was committed. Sent with ``Retry-After``."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "database_unavailable"
    default_detail = ("The database could not complete the request; nothing of it was saved. Read the object "
                      "again before retrying: a close may already be under way.")
    retry_after = 2


class Conflict(exceptions.APIException):
    """409: the operation's state does not allow this change (e.g. CLOSING or CLOSED)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The operation's state does not allow this change."


__all__ = ["exception_handler", "Conflict", "DatabaseUnavailable", "Response"]
