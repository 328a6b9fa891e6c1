"""The API's one error envelope: ``{"error": {"code", "message", "fields": {field: [reasons]}}}``."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import OperationalError as DatabaseOperationalError
from django.http import Http404, JsonResponse
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
    exc = _as_api_exception(exc, context)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    response.data = {"error": _envelope(exc)}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


def _as_api_exception(exc, context):
    """Django's ValidationError, Http404, PermissionDenied and database OperationalError as DRF's
    exceptions (see :func:`exception_handler`); any other exception as it is."""
    if isinstance(exc, DjangoValidationError):
        return exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, Http404):
        return exceptions.NotFound()
    if isinstance(exc, DjangoPermissionDenied):
        return exceptions.PermissionDenied(*(str(a) for a in exc.args[:1]))
    if isinstance(exc, DatabaseOperationalError):
        return _database_error(exc, context)
    return exc


def _envelope(exc) -> dict:
    """``{"code", "message", "fields"}`` (+ ``committed`` for a database outage) of one API exception."""
    code = getattr(exc, "default_code", "error")
    if isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        if isinstance(codes, str):
            code = codes
    error = {"code": code, "message": "", "fields": {}}
    if isinstance(exc, exceptions.ValidationError):
        error.update(code="invalid", message="The request has invalid fields.", fields=_fields(exc.detail))
    else:
        detail = getattr(exc, "detail", "")
        error["message"] = str(detail) if not isinstance(detail, (dict, list)) else "error"
        if isinstance(detail, (dict, list)):
            error["fields"] = _fields(detail)
    if isinstance(exc, DatabaseUnavailable):
        error["committed"] = exc.committed
    return error


def _database_error(exc, context) -> exceptions.APIException:
    """A database ``OperationalError`` as the API answers it: a lock wait over ``lock_timeout`` is 409
    ``locked``; no pooled connection within the pool's timeout 503 ``database_busy``; anything else (a
    connection that died, a deadlock) 503 ``database_unavailable``. Each says whether something of the
    request was committed (api.middleware.WriteTracker), so a client knows whether to read before retrying."""
    from api.middleware import tracker_of

    cause = exc.__cause__
    sqlstate = getattr(cause, "sqlstate", None)
    tracker = tracker_of(context.get("request")) if context else None
    committed = tracker.state if tracker is not None else "unknown"
    if sqlstate == "55P03" and committed == "no":  # lock_not_available
        return Locked()
    if type(cause).__name__ == "PoolTimeout":
        return DatabaseUnavailable(committed, busy=True)
    logging.getLogger("api.errors").error("database error answered 503", exc_info=exc)
    return DatabaseUnavailable(committed)


def error_response(status_code: int, code: str, message: str, fields: dict | None = None,
                   headers: dict | None = None) -> JsonResponse:
    """The envelope as a plain Django response (middleware and handlers outside DRF)."""
    return JsonResponse({"error": {"code": code, "message": message, "fields": fields or {}}}, status=status_code,
                        headers=headers)


def handler400(request, exception=None):
    return error_response(400, "bad_request", "Bad request.")


def handler403(request, exception=None):
    return error_response(403, "permission_denied", "You do not have permission to perform this action.")


def handler404(request, exception=None):
    return error_response(404, "not_found", "Not found.")


def handler500(request):
    return error_response(500, "server_error", "The server failed; the error was logged.")


def csrf_failure(request, reason=""):
    return error_response(403, "csrf_failed", f"CSRF check failed: {reason}")


class DatabaseUnavailable(exceptions.APIException):
    """503: the database could not complete the request (unreachable, a dead connection, a deadlock, no
    free pooled connection). ``committed`` says what of it was saved: ``no``, ``yes`` (part of it, e.g.
    a close that had recorded its trigger) or ``unknown`` (the connection died during the COMMIT).
    Sent with ``Retry-After``."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "database_unavailable"
    retry_after = 2
    MESSAGES = {
        "no": "The database could not complete the request; nothing of it was saved. Retry after Retry-After.",
        "yes": ("The database failed after part of the request was saved. Read the object before retrying "
                "(a close may be under way); a retry with the same Idempotency-Key never repeats what was saved."),
        "unknown": ("The database connection failed while the request was being committed: it may or may not "
                    "have been saved. Retry with the same Idempotency-Key (a saved request is answered, not "
                    "repeated), or read the object before retrying without one."),
    }

    def __init__(self, committed: str = "no", busy: bool = False):
        self.committed = committed
        detail = self.MESSAGES[committed]
        if busy and committed == "no":
            detail = "Every database connection is busy; the request was not executed. Retry after Retry-After."
        super().__init__(detail, "database_busy" if busy else self.default_code)


class DeadlineExceeded(exceptions.APIException):
    """503: the request waited longer than ``API_REQUEST_DEADLINE_SECONDS`` (CPU or connection queue) before
    it could start; it was not executed."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_code = "deadline_exceeded"
    retry_after = 1

    def __init__(self, waited: float, limit: float):
        super().__init__(f"The request waited {waited:.1f} s for the service (deadline {limit:g} s) and was not "
                         f"executed; nothing was saved. Retry after Retry-After.")


class Locked(exceptions.APIException):
    """409: the row is locked by another writer (a close, the monitor) for longer than the lock timeout;
    nothing was changed."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "locked"
    default_detail = ("The operation is being changed by someone else (e.g. a close in progress); nothing was "
                      "changed. Read it and retry.")
    retry_after = 1


class Conflict(exceptions.APIException):
    """409: the operation's state does not allow this change (e.g. CLOSING or CLOSED)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The operation's state does not allow this change."


__all__ = ["exception_handler", "Conflict", "DatabaseUnavailable", "DeadlineExceeded", "Locked", "Response",
           "error_response"]
