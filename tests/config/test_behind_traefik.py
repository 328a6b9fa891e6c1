"""SECURE_SSL_REDIRECT behind Traefik (issue 18, point 9), and a missing runtime module (point 5)."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

BEHIND_TRAEFIK = dict(DEBUG=False, ALLOWED_HOSTS=["api.staging.rbx.ia.br"], SECURE_SSL_REDIRECT=False,
                      FORWARDED_HTTPS_REDIRECT=True, SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"))
HOST = "api.staging.rbx.ia.br"


@override_settings(**BEHIND_TRAEFIK)
def test_plain_http_at_the_ingress_is_redirected_to_https():
    response = Client().get("/api/schema/?format=json", HTTP_HOST=HOST, HTTP_X_FORWARDED_PROTO="http")
    assert response.status_code == 301
    assert response["Location"] == "https://api.staging.rbx.ia.br/api/schema/?format=json"


@override_settings(**BEHIND_TRAEFIK)
def test_https_at_the_ingress_and_requests_straight_to_a_pod_are_not_redirected():
    # through Traefik over https: served, and Django sees a secure request
    assert Client().get("/api/v1/operations/", HTTP_HOST=HOST, HTTP_X_FORWARDED_PROTO="https").status_code == 401
    # kubectl port-forward / a pod of the namespace: no X-Forwarded-Proto, no 301 to an address the pod does not serve
    assert Client().get("/api/v1/operations/", HTTP_HOST=HOST).status_code == 401


@override_settings(**BEHIND_TRAEFIK)
def test_probes_are_exempt():
    assert Client().get("/health", HTTP_HOST="10.42.0.17:8000", HTTP_X_FORWARDED_PROTO="http").status_code == 200


@override_settings(**dict(BEHIND_TRAEFIK, FORWARDED_HTTPS_REDIRECT=False))
def test_off_when_secure_ssl_redirect_is_false():
    assert Client().get("/api/v1/operations/", HTTP_HOST=HOST, HTTP_X_FORWARDED_PROTO="http").status_code == 401


@pytest.mark.django_db
def test_a_missing_runtime_module_fails_readiness(monkeypatch):
    from stopmonitor import preflight

    monkeypatch.setitem(preflight.RUNTIME_IMPORTS, "binance_missing_for_the_test", "python-binance")
    response = Client().get("/health/ready", HTTP_HOST="10.42.0.17:8000")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["imports"]
    assert body["checks"]["imports"].startswith("missing: python-binance (ModuleNotFoundError: No module named")


def test_the_log_scrubber_masks_whole_values_only():
    """Point 7: with a short key the scrubber masked letters inside words ("Invalid API-***ey")."""
    from stopmonitor.logs import mask_secrets

    assert mask_secrets("Invalid API-key format.", ["k", "ey"]) == "Invalid API-key format."
    assert mask_secrets("key=k secret=ey url=redis://:ey@redis-staging:6379/0", ["k", "ey"]) == (
        "key=*** secret=*** url=redis://:***@redis-staging:6379/0"
    )
    assert mask_secrets("X-MBX-APIKEY: testnet-placeholder", ["testnet-placeholder"]) == "X-MBX-APIKEY: ***"
