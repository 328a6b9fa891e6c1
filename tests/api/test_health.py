"""/health and /health/ready answer a Kubernetes probe (plain HTTP, Host = pod IP) under production settings."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

PROD = dict(DEBUG=False, ALLOWED_HOSTS=["api.staging.example"], SECURE_SSL_REDIRECT=True,
            SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))


@override_settings(**PROD)
def test_liveness_answers_probe_without_touching_the_database():
    # no db fixture: pytest-django raises if the view touched the database
    response = Client().get("/health", HTTP_HOST="10.42.0.17:8000")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@override_settings(**PROD)
@pytest.mark.django_db
def test_readiness_reports_each_check_under_production_settings():
    response = Client().get("/health/ready", HTTP_HOST="10.42.0.17:8000")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok" and body["checks"]["migrations"] == "ok"


@override_settings(**PROD)
@pytest.mark.django_db
def test_readiness_503_names_the_failed_check(settings):
    settings.RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1
    response = Client().get("/health/ready", HTTP_HOST="10.42.0.17:8000")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["rabbitmq"] and body["checks"]["rabbitmq"].startswith("unreachable")


@override_settings(**PROD)
def test_other_paths_still_validate_host_and_redirect():
    assert Client().get("/api/schema/", HTTP_HOST="10.42.0.17:8000").status_code == 400
    assert Client().get("/api/schema/", HTTP_HOST="api.staging.example").status_code == 301
