"""Guards around every request (``RequestGuardMiddleware``, right after the probes).

Before the request runs, answered in the error envelope without reading the body:

* a NUL character in the path or the query string: 400 ``bad_request`` (PostgreSQL text cannot hold
  it: the lookup failed with a 500 before; the schema's string parameters exclude it);
* a ``Content-Length`` over ``API_MAX_BODY_BYTES`` (64 KiB): 413 ``body_too_large`` (once the answer
  is sent the read side of the socket is shut, so gunicorn does not read the body to keep the
  connection alive: it closes it);
* a credential in the query string (``?token=``, ``?access_token=``, ``?api_key=``…): 401
  ``token_in_query`` (the token goes in the ``Authorization`` header; the access log writes such
  values as ``***``, docker/gunicorn.conf.py).

While it runs:

* the request's **deadline** (``API_REQUEST_DEADLINE_SECONDS``, exported by docker/gunicorn.conf.py):
  a request that gets its database connection later than that after it arrived (queued for the
  CPU or the pool) is not executed: 503 ``deadline_exceeded`` (``connection_created`` fires each
  time a request takes a connection from the pool);
* :class:`WriteTracker` watches the request's SQL, so a 503 after a database failure says
  truthfully whether something of it was committed (``committed``: ``no``, ``yes`` or ``unknown``
  when the connection died during the COMMIT);
* an exception no view handled is a JSON 500 (or 503 for a database error), never Django's HTML page.
"""

from __future__ import annotations

import contextvars
import logging
import re
import socket
import time

from django.conf import settings
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.db import OperationalError, connection
from django.db.backends.signals import connection_created
from django.dispatch import receiver
from django.http import Http404

from api.errors import DeadlineExceeded, error_response

log = logging.getLogger("api.errors")

# monotonic arrival time of the request this greenlet/thread serves (None outside requests)
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("api_request_arrived", default=None)

_clock = time.monotonic
_NUL_QUERY = re.compile(r"%00|\x00")
_CREDENTIAL_PARAM = re.compile(
    r"(?:^|&)(?:access_?token|token|api_?key|apikey|key|auth|authorization|bearer|secret|password|session_?id)=",
    re.I)
_READ_ONLY_SQL = ("SELECT", "SET ", "SHOW", "EXPLAIN", "SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN")


class WriteTracker:
    """A ``connection.execute_wrapper``: did this request commit a write (``committed``), or does it hold
    writes whose COMMIT has not been confirmed (``pending``)?"""

    __slots__ = ("committed", "pending", "ignoring")

    def __init__(self):
        self.committed = False
        self.pending = False
        self.ignoring = 0  # > 0: bookkeeping writes (an idempotency claim) that are not the request's effect

    def __call__(self, execute, sql, params, many, context):
        if self.ignoring:
            return execute(sql, params, many, context)
        conn = context["connection"]
        try:
            result = execute(sql, params, many, context)
        except Exception:
            if conn.in_atomic_block:
                self.pending = False  # the statement failed: its transaction rolls back
            raise
        if not str(sql).lstrip()[:9].upper().startswith(_READ_ONLY_SQL):
            if not conn.in_atomic_block:
                self.committed = True  # autocommit: the statement was its own transaction
            elif not self.pending:
                self.pending = True
                conn.on_commit(self._on_commit)
        return result

    def _on_commit(self):
        self.committed, self.pending = True, False

    def rolled_back(self):
        """The caller's transaction failed before its COMMIT: its writes are gone."""
        self.pending = False

    def commit_unconfirmed(self):
        """The caller's COMMIT raised: its writes may or may not be saved."""
        if not self.committed:
            self.pending = True

    @property
    def state(self) -> str:
        """``"yes"`` (something committed), ``"unknown"`` (a COMMIT was not confirmed) or ``"no"``."""
        if self.committed:
            return "yes"
        return "unknown" if self.pending else "no"


def tracker_of(request) -> WriteTracker | None:
    return getattr(request, "db_writes", None)


@receiver(connection_created)
def _refuse_past_deadline(sender, connection, **kwargs):
    arrived = _ARRIVED.get()
    limit = getattr(settings, "API_REQUEST_DEADLINE_SECONDS", 0)
    if arrived is None or not limit:
        return
    waited = _clock() - arrived
    if waited > limit:
        raise DeadlineExceeded(waited, limit)


def _shut_read_side(request) -> None:
    sock = request.META.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class RequestGuardMiddleware:
    """See the module docstring."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        arrived = _clock()
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        request.db_writes = writes = WriteTracker()
        token = _ARRIVED.set(arrived)
        try:
            with connection.execute_wrapper(writes):
                response = self.get_response(request)
        finally:
            _ARRIVED.reset(token)
        if response.status_code == 404 and settings.DEBUG and not request.path.startswith("/admin/") \
                and response.get("Content-Type", "").startswith("text/html"):
            # development (DEBUG): Django answers an unknown URL with its HTML debug page, before any
            # handler404; the API's clients get the one JSON envelope in every environment
            return error_response(404, "not_found", "Not found.")
        return response

    def _refusal(self, request):
        path = request.path
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in path or _NUL_QUERY.search(query):  # PostgreSQL text cannot hold it: a 500 before
            return error_response(400, "bad_request", "The path or the query string holds a NUL character.")
        raw_length = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            return error_response(400, "bad_request", "Content-Length is not a number.")
        limit = settings.API_MAX_BODY_BYTES
        if length > limit:
            response = error_response(413, "body_too_large",
                                      f"The body is {length} bytes; at most {limit} are accepted.")
            response._resource_closers.append(lambda: _shut_read_side(request))
            return response
        if query and _CREDENTIAL_PARAM.search(query):
            return error_response(401, "token_in_query", "Send the token in the Authorization header "
                                                         "(Authorization: Bearer <token>), never in the URL.")
        return None

    def process_exception(self, request, exception):
        """An exception no view handled: the envelope, logged with its traceback (not shown). Django's own
        (404, 403, a suspicious or bad request) go on to its handlers (``config/urls.py``: JSON as well)."""
        if isinstance(exception, Http404 | PermissionDenied | SuspiciousOperation | BadRequest):
            return None
        if settings.DEBUG and not request.path.startswith("/api/"):
            return None  # development: Django's debug page for the admin and the docs (secrets hidden)
        if isinstance(exception, DeadlineExceeded):
            return error_response(503, exception.default_code, str(exception.detail),
                                  headers={"Retry-After": str(exception.retry_after)})
        if isinstance(exception, OperationalError):
            log.error("database error answered 503", exc_info=exception)
            return error_response(503, "database_unavailable", "The database could not complete the request.",
                                  headers={"Retry-After": "2"})
        log.error("unhandled error answered 500", exc_info=exception)
        return error_response(500, "server_error", "The server failed; the error was logged.")
