"""Kubernetes probes: ``/health`` (liveness) and ``/health/ready`` (readiness).

Served by a middleware placed first, so a probe (plain HTTP, ``Host:`` = the pod IP) gets the
same answer in production with a strict ``ALLOWED_HOSTS`` and ``SECURE_SSL_REDIRECT`` on:
host validation and the redirect never run for these two paths.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

from django.http import HttpResponse

LIVENESS_PATH = "/health"
READINESS_PATH = "/health/ready"


def _json(status: int, body: dict) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


def _tcp_reachable(url: str, default_port: int, timeout: float = 1.0) -> None:
    """Open and close a TCP connection to ``url``'s host and port; raises ``OSError`` on failure."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "localhost", parsed.port or default_port), timeout=timeout):
        pass


#: Checks whose failure leaves the pod able to serve and protect: readiness says "degraded"
#: (HTTP 200) instead of taking it out of the Service. Redis is a shared cache (ban horizon,
#: clock offset, filters) with a process-memory fallback; an exchange ban only delays calls;
#: refused keys (stopmonitor/keys.py) stop closes, not reads: the API still serves history.
DEGRADING = frozenset({"redis", "exchange", "exchange_keys"})


def _redis_check(url: str) -> str:
    """A real authenticated command (``PING`` after the URL's ``AUTH``), 1 s timeouts: a Redis
    with a wrong password is not "ok". Returns "ok" or a reason without secrets."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
        return "ok"
    except redis.AuthenticationError:
        return "authentication failed"
    except redis.ResponseError as exc:  # NOAUTH, WRONGPASS
        return "authentication failed" if "AUTH" in str(exc).upper() or "WRONGPASS" in str(exc).upper() else "error"
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return f"unreachable: {type(exc).__name__}"
    finally:
        client.close()


def exchange_ban() -> tuple[str, int | None]:
    """("ok", None) or ("banned: N s left", N): the configured Binance venue's stored ban horizon
    (429/418 ``Retry-After``; :func:`stopmonitor.exchange.state.ban_horizon`)."""
    import math
    from datetime import datetime, timezone

    from django.conf import settings

    venue = getattr(settings, "EXCHANGE_VENUE", "")
    if not str(venue).startswith("binance"):
        return "ok", None
    from stopmonitor.exchange.state import ban_horizon

    until = ban_horizon(venue)
    left = (until - datetime.now(timezone.utc)).total_seconds() if until else 0
    if left <= 0:
        return "ok", None
    seconds = math.ceil(left)
    return f"banned: {seconds} s left (no calls to {venue} until {until.isoformat()})", seconds


def readiness_checks() -> dict[str, str]:
    """Run each readiness check; returns ``{name: "ok" | "<reason>"}``.

    Checks: ``imports`` (every runtime module), ``database`` (a query), ``migrations`` (nothing
    unapplied), ``redis`` (an authenticated ``PING``) and ``rabbitmq`` (TCP connect) when configured,
    ``exchange`` (no 429/418 ban in force) and ``exchange_keys`` (the last signed read's verdict,
    refreshed in the background: stopmonitor/keys.py) for a Binance venue. Secrets never appear in reasons.
    """
    from django.conf import settings
    from django.db import DEFAULT_DB_ALIAS, connections

    from stopmonitor.preflight import missing_modules, pending_migrations

    results: dict[str, str] = {}
    missing = missing_modules()  # imported once per process: then a dictionary lookup each
    results["imports"] = "ok" if not missing else "missing: " + "; ".join(missing)
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        results["database"] = "ok"
        try:
            plan = pending_migrations()
            results["migrations"] = "ok" if not plan else f"{len(plan)} unapplied"
            if not plan:
                MigrationsPendingMiddleware.migrated = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results["migrations"] = f"error: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001
        results["database"] = f"unreachable: {type(exc).__name__}"
        results["migrations"] = "unknown"
    if settings.REDIS_URL:
        results["redis"] = _redis_check(settings.REDIS_URL)
    results["exchange"] = exchange_ban()[0]
    from stopmonitor.keys import is_exchange_venue, readiness_value

    venue = getattr(settings, "EXCHANGE_VENUE", "")
    if is_exchange_venue(venue):
        from stopmonitor.exchange.factory import build_exchange

        results["exchange_keys"] = readiness_value(venue, lambda: build_exchange(venue))
    if settings.RABBITMQ_URL:
        try:
            _tcp_reachable(settings.RABBITMQ_URL, 5672)
            results["rabbitmq"] = "ok"
        except OSError as exc:
            results["rabbitmq"] = f"unreachable: {type(exc).__name__}"
    return results


class HealthProbeMiddleware:
    """Answer ``/health`` and ``/health/ready`` before any other middleware runs."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        path = request.path_info.rstrip("/") or "/"
        if path == LIVENESS_PATH and request.method in ("GET", "HEAD"):
            return _json(200, {"status": "ok"})
        if path == READINESS_PATH and request.method in ("GET", "HEAD"):
            return readiness_response()
        return self.get_response(request)


def _failing(checks: dict[str, str]) -> tuple[list[str], list[str]]:
    """(checks that fail readiness, checks in ``DEGRADING`` that only degrade it)."""
    failed = [name for name, result in checks.items() if result != "ok" and name not in DEGRADING]
    degraded = [name for name, result in checks.items() if result not in ("ok", "unchecked") and name in DEGRADING]
    return failed, degraded


def readiness_response():
    """``/health/ready``: 503 when a check that is not in ``DEGRADING`` fails; 200 ``degraded``
    when only a degrading one does; every check's result and the time they took, in ms."""
    started = time.monotonic()
    checks = readiness_checks()
    failed, degraded = _failing(checks)
    body = {
        "status": "unavailable" if failed else ("degraded" if degraded else "ok"),
        "checks": checks,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
        **({"failed": failed} if failed else {}),
        **({"degraded": degraded} if degraded else {}),
    }
    if checks.get("exchange", "ok") != "ok":
        body["exchange_ban_seconds_left"] = exchange_ban()[1]
    return _json(200 if not failed else 503, body)


class MigrationsPendingMiddleware:
    """While the database has unapplied migrations, every API request answers JSON 503
    ``migrations_pending`` (with ``Retry-After``) instead of reaching a missing table.

    Asked at most every ``RECHECK_SECONDS`` until the answer is "all applied", then never again
    in this process (a release migrates before its pods start; readiness keeps asking). A
    database that cannot be read is left to the API's own 503 ``database_unavailable``.
    """

    RECHECK_SECONDS = 5.0
    migrated = False  # class-wide: one answer per process
    _checked_at = float("-inf")
    _pending: list[str] = []

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        cls = type(self)
        if not cls.migrated:
            now = time.monotonic()
            if now - cls._checked_at >= cls.RECHECK_SECONDS:
                from django.db import DatabaseError

                from stopmonitor.preflight import pending_migrations

                try:
                    cls._pending = pending_migrations()
                    cls._checked_at = now
                    cls.migrated = not cls._pending
                except DatabaseError:
                    cls._pending = []
            if cls._pending:
                from stopmonitor.preflight import not_migrated_message

                response = _json(503, {"error": {"code": "migrations_pending",
                                                 "message": not_migrated_message(cls._pending),
                                                 "fields": {}}})
                response["Retry-After"] = "30"
                return response
        return self.get_response(request)


class ForwardedHttpsRedirectMiddleware:
    """``SECURE_SSL_REDIRECT`` behind Traefik: redirect to https only a request that reached the
    ingress over plain http (``X-Forwarded-Proto: http``).

    Traefik terminates TLS and sets ``X-Forwarded-Proto`` on what it forwards; Django trusts that
    header (``SECURE_PROXY_SSL_HEADER``), which is safe because only the ingress controller reaches
    the pods' port (NetworkPolicy allow-ingress-to-backend). A request straight to a pod
    (``kubectl port-forward``, the kubelet's probes, a pod in the namespace) carries no such
    header and is answered as it is, instead of a 301 to an https address the pod does not serve.
    Django's own ``SECURE_SSL_REDIRECT`` stays off; ``config.settings`` sets
    ``FORWARDED_HTTPS_REDIRECT`` from the ``SECURE_SSL_REDIRECT`` variable.
    """

    def __init__(self, get_response):
        from django.conf import settings
        from django.core.exceptions import MiddlewareNotUsed

        if not getattr(settings, "FORWARDED_HTTPS_REDIRECT", False):
            raise MiddlewareNotUsed
        self.get_response = get_response

    def __call__(self, request):
        from django.http import HttpResponsePermanentRedirect

        forwarded = request.META.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
        if forwarded == "http":
            return HttpResponsePermanentRedirect(f"https://{request.get_host()}{request.get_full_path()}")
        return self.get_response(request)
