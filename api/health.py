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


def readiness_checks() -> dict[str, str]:
    """Run each readiness check; returns ``{name: "ok" | "<reason>"}``.

    Checks: ``database`` (a query), ``migrations`` (nothing unapplied), ``redis`` and
    ``rabbitmq`` (TCP connect) when configured. Secrets never appear in reasons.
    """
    from django.conf import settings
    from django.db import DEFAULT_DB_ALIAS, connections
    from django.db.migrations.executor import MigrationExecutor

    results: dict[str, str] = {}
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        results["database"] = "ok"
        try:
            executor = MigrationExecutor(connection)
            plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
            results["migrations"] = "ok" if not plan else f"{len(plan)} unapplied"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            results["migrations"] = f"error: {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001
        results["database"] = f"unreachable: {type(exc).__name__}"
        results["migrations"] = "unknown"
    if settings.REDIS_URL:
        try:
            _tcp_reachable(settings.REDIS_URL, 6379)
            results["redis"] = "ok"
        except OSError as exc:
            results["redis"] = f"unreachable: {type(exc).__name__}"
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
            started = time.monotonic()
            checks = readiness_checks()
            failed = [name for name, result in checks.items() if result != "ok"]
            body = {
                "status": "ok" if not failed else "unavailable",
                "checks": checks,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            }
            if failed:
                body["failed"] = failed
            return _json(200 if not failed else 503, body)
        return self.get_response(request)
