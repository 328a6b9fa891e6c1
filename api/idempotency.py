"""``Idempotency-Key`` on the API's writes (IETF httpapi draft "The Idempotency-Key HTTP Header Field";
Stripe's semantics): a retry with the same key gets the first answer, without a second effect.

* The key is the user's: 1 to 255 visible ASCII characters (a quoted string of the draft is accepted
  too); another user's identical key is another key. Kept at least 24 h (:data:`KEY_TTL`).
* The request is fingerprinted (SHA-256 of method, path and the canonical JSON of the body): the same
  key with another fingerprint is 422 ``idempotency_key_reused`` and changes nothing.
* ``POST /operations/`` and ``PATCH /operations/{id}/`` (:func:`run_atomic`): the key row, the effect
  and the stored answer commit in **one** transaction. A racing retry's insert of the same key waits
  on the unique index until the first commits (then it replays its answer) or rolls back (then it
  runs itself); the wait is bounded by the web connections' ``lock_timeout`` (then 409 ``locked``). A
  request that failed (400, 409, 503…) stored nothing: its retry runs again. When the connection
  died during the COMMIT the client cannot know whether it was saved; a retry with the same key
  finds out (replayed answer, or a first execution).
* ``POST /operations/{id}/close/`` (:func:`run_claimed`): the close commits in several transactions
  around the exchange call, so the key is claimed first in its own transaction (``state=started``)
  and the answer stored after. A retry while the first runs waits up to :data:`WAIT_SECONDS` for
  its answer, then gets 409 ``idempotency_key_in_use``; a close that raised releases its key (the
  engine's one-close-per-operation protocol makes a retry harmless); a claim left ``started`` for
  :data:`STALE_SECONDS` (its process died) is taken over.

Replays carry ``Idempotent-Replayed: true`` and the first answer's status, body and ``Location``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from django.db import connection, transaction
from rest_framework import exceptions, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

HEADER = "Idempotency-Key"
KEY_TTL = timedelta(hours=24)
WAIT_SECONDS = 5.0
STALE_SECONDS = 60.0
STORED_HEADERS = ("Location",)
TABLE = "api_idempotencykey"


class KeyReused(exceptions.APIException):
    """422: this key was used for another request (another body, path or method)."""

    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"
    default_detail = "This Idempotency-Key was used for a different request; use a new key for a new request."


class KeyInUse(exceptions.APIException):
    """409: the first request with this key is still running."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "idempotency_key_in_use"
    default_detail = "A request with this Idempotency-Key is still running; retry after a moment for its answer."


def key_of(request) -> str | None:
    """The request's ``Idempotency-Key`` (``None`` without one); 400 when it is not 1-255 visible ASCII."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= 255 or not all(" " < c <= "~" for c in key):
        raise exceptions.ValidationError({HEADER: ["1 to 255 visible ASCII characters."]})
    return key


def fingerprint(request) -> str:
    data = request.data
    if hasattr(data, "dict"):  # an empty body parses to an empty QueryDict
        data = data.dict()
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{request.method}\n{request.path}\n{body}".encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _claim(user_id: int, key: str, print_: str, request) -> tuple[bool, tuple | None]:
    """Insert the key row (``started``): ``(True, None)`` when this request owns the key, else
    ``(False, (id, fingerprint, state, status, body, headers, created_at))`` of the existing row."""
    now = _now()
    with connection.cursor() as cursor:
        for _ in range(2):
            cursor.execute(
                f"INSERT INTO {TABLE} (user_id, key, fingerprint, method, path, state, response_headers, created_at) "
                f"VALUES (%s, %s, %s, %s, %s, 'started', %s, %s) ON CONFLICT (user_id, key) DO NOTHING RETURNING id",
                [user_id, key, print_, request.method, request.path[:300], "{}", now])
            row = cursor.fetchone()
            if row is not None:
                cursor.execute(f"DELETE FROM {TABLE} WHERE user_id = %s AND created_at < %s AND state = 'done'",
                               [user_id, now - KEY_TTL])
                return True, None
            cursor.execute(f"SELECT id, fingerprint, state, status_code, response_body, response_headers, created_at "
                           f"FROM {TABLE} WHERE user_id = %s AND key = %s", [user_id, key])
            existing = cursor.fetchone()
            if existing is None:  # released between the two statements: claim again
                continue
            if _aware(existing[6]) < now - KEY_TTL and existing[2] == "done":  # expired: a new key
                cursor.execute(f"DELETE FROM {TABLE} WHERE id = %s", [existing[0]])
                continue
            return False, existing
    return False, existing


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _store(user_id: int, key: str, response: Response) -> None:
    body = json.loads(JSONRenderer().render(response.data)) if response.data is not None else None
    headers = {name: response[name] for name in STORED_HEADERS if response.has_header(name)}
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {TABLE} SET state = 'done', status_code = %s, response_body = %s, response_headers = %s, "
            f"completed_at = %s WHERE user_id = %s AND key = %s",
            [response.status_code, json.dumps(body), json.dumps(headers), _now(), user_id, key])


def _release(user_id: int, key: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {TABLE} WHERE user_id = %s AND key = %s AND state = 'started'", [user_id, key])


def _replay(existing: tuple, print_: str) -> Response | None:
    """The stored answer (``None`` while the first request still runs); 422 for another request."""
    _, stored_print, state, status_code, body, headers, _ = existing
    if stored_print != print_:
        raise KeyReused()
    if state != "done":
        return None
    if isinstance(body, str):  # SQLite hands JSON back as text
        body = json.loads(body)
    if isinstance(headers, str):
        headers = json.loads(headers)
    return Response(body, status=status_code, headers={**(headers or {}), "Idempotent-Replayed": "true"})


def run_atomic(request, execute: Callable[[], Response]) -> Response:
    """``execute()`` (which writes through the ORM and may raise) in one transaction with the key row and
    its answer. Without a key: ``execute()`` alone, still in one transaction. Tells the request's
    :class:`api.middleware.WriteTracker` whether a failure came before the COMMIT (nothing saved) or
    from it (unknown)."""
    from api.middleware import tracker_of

    key = key_of(request)
    print_ = fingerprint(request) if key is not None else None
    tracker = tracker_of(request)
    committing = False
    try:
        with transaction.atomic():
            if key is None:
                response = execute()
            else:
                owned, existing = _claim(request.user.pk, key, print_, request)
                if not owned:
                    replay = _replay(existing, print_)
                    if replay is None:  # cannot happen: another transaction's row is invisible until done
                        raise KeyInUse()
                    return replay
                response = execute()
                _store(request.user.pk, key, response)
            committing = True
    except Exception:
        if tracker is not None and not connection.in_atomic_block:
            tracker.commit_unconfirmed() if committing else tracker.rolled_back()
        raise
    return response


def run_claimed(request, execute: Callable[[], Response]) -> Response:
    """``execute()`` (which commits on its own, and calls the exchange) between a committed claim of the
    key and the stored answer. Without a key: ``execute()``."""
    key = key_of(request)
    if key is None:
        return execute()
    from api.middleware import tracker_of

    print_ = fingerprint(request)
    user_id = request.user.pk
    tracker = tracker_of(request)
    with _bookkeeping(tracker):
        replay = _claim_or_replay(request, key, print_, user_id)
    if replay is not None:
        return replay
    try:
        response = execute()
    except BaseException:
        try:
            with _bookkeeping(tracker):
                _release(user_id, key)
        except Exception:  # noqa: BLE001 - the database failed too: the claim goes stale and is taken over
            pass
        raise
    with _bookkeeping(tracker):
        _store(user_id, key, response)
    return response


@contextlib.contextmanager
def _bookkeeping(tracker):
    """The key's own writes are not the request's effect: a 503 after a released claim says committed: no."""
    if tracker is not None:
        tracker.ignoring += 1
    try:
        yield
    finally:
        if tracker is not None:
            tracker.ignoring -= 1


def _claim_or_replay(request, key: str, print_: str, user_id: int) -> Response | None:
    """Claim ``key`` in its own transaction (``None``: this request owns it), or the first answer once it
    is stored (waiting up to :data:`WAIT_SECONDS`; then 409)."""
    waited_until = time.monotonic() + WAIT_SECONDS
    pause = 0.02
    while True:
        with transaction.atomic():
            owned, existing = _claim(user_id, key, print_, request)
        if owned:
            return None
        replay = _replay(existing, print_)
        if replay is not None:
            return replay
        if (_now() - _aware(existing[6])).total_seconds() > STALE_SECONDS and _take_over(existing):
            return None
        if time.monotonic() >= waited_until:
            raise KeyInUse()
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _take_over(existing: tuple) -> bool:
    """Claim a ``started`` row whose request died (older than :data:`STALE_SECONDS`); True when won."""
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {TABLE} SET created_at = %s WHERE id = %s AND state = 'started' AND created_at = %s "
                       f"RETURNING id", [_now(), existing[0], existing[6]])
        return cursor.fetchone() is not None
