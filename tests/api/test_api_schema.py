"""The OpenAPI schema (every error answer described) and schemathesis against the live test server.

schemathesis generates requests from ``/api/schema/`` for every operation — valid ones
(positive) and ones the schema forbids (negative) — and checks each answer: never a 5XX, a
documented status code and content type, and a body matching the documented schema.
Hypothesis runs derandomized with a bounded number of examples. Since issue 16 the run also checks
that schema and behaviour agree: every request the schema forbids is refused (``negative_data_rejection``)
and, on the reads, every request it allows is accepted (``positive_data_acceptance``). (The exact
refusals of invalid input are pinned by test_api_refusals.py; unknown query parameters are ignored, as usual.)
"""

from __future__ import annotations

import os
import time
from collections import Counter
from decimal import Decimal as D

import pytest
import yaml

from tests.api.conftest import NOW

V1 = "/api/v1/"
# ~800 requests (under a minute on a loaded 2-CPU runner); API_FUZZ_SCALE=4 for a longer run.
SCALE = float(os.environ.get("API_FUZZ_SCALE", "1"))
EXAMPLES_PER_OPERATION = {k: max(1, int(v * SCALE)) for k, v in
                          {"positive": 25, "negative": 25, "existing-object": 12, "existing-symbol": 8}.items()}


def _schema_dict(client):
    r = client.get("/api/schema/")
    assert r.status_code == 200
    return yaml.safe_load(r.content)


def test_schema_describes_every_error_with_the_envelope(db, anon):
    schema = _schema_dict(anon)
    assert schema["openapi"].startswith("3.")
    assert schema["components"]["schemas"]["Error"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorBody"}
    operations = [(path, method, op) for path, item in schema["paths"].items() if path.startswith(V1)
                  for method, op in item.items()]
    assert {(p, m) for p, m, _ in operations} == {
        ("/api/v1/events/", "get"), ("/api/v1/executions/", "get"), ("/api/v1/executions/{execution_token}/", "get"),
        ("/api/v1/operations/", "get"), ("/api/v1/operations/", "post"), ("/api/v1/operations/{id}/", "get"),
        ("/api/v1/operations/{id}/", "patch"), ("/api/v1/operations/{id}/close/", "post"),
        ("/api/v1/operations/{id}/events/", "get"), ("/api/v1/risk/circuit-breakers/", "get"),
        ("/api/v1/risk/circuit-breakers/{symbol}/reset/", "post"), ("/api/v1/risk/config/", "get"),
        ("/api/v1/risk/config/", "patch"), ("/api/v1/symbols/", "get"), ("/api/v1/symbols/{symbol}/", "get"),
        # issue #20
        ("/api/v1/accounts/", "get"), ("/api/v1/accounts/", "post"), ("/api/v1/accounts/{id}/", "get"),
        ("/api/v1/accounts/{id}/secret/", "post"), ("/api/v1/accounts/{id}/disable/", "post"),
        ("/api/v1/accounts/{id}/enable/", "post"),
    }
    for path, method, op in operations:
        codes = set(op["responses"])
        assert {"401", "429"} <= codes, (path, method)
        if "{" in path:
            assert "404" in codes, (path, method)
        if method in ("post", "patch"):
            assert {"400", "415"} <= codes or path.endswith("/reset/"), (path, method)
        for code, response in op["responses"].items():
            if code >= "400":
                envelope = ("NotClosed" if path.endswith("/close/") and code in ("409", "502") else "Error")
                assert response["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{envelope}"}
                assert response["description"], (path, method, code)
    close = schema["paths"]["/api/v1/operations/{id}/close/"]["post"]["responses"]
    assert {"200", "202", "409", "502", "503"} <= set(close)
    not_closed = schema["components"]["schemas"]["NotClosed"]
    assert not_closed["properties"]["error"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert not_closed["required"] == ["error"]
    assert "409" in schema["paths"]["/api/v1/operations/{id}/"]["patch"]["responses"]
    assert "403" in schema["paths"]["/api/v1/risk/circuit-breakers/{symbol}/reset/"]["post"]["responses"]


def test_swagger_ui_is_served_without_a_cdn(db, anon):
    r = anon.get("/api/docs/")
    assert r.status_code == 200
    html = r.content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()


# --------------------------------------------------------------------------------------
# schemathesis
# --------------------------------------------------------------------------------------


@pytest.fixture
def seeded(transactional_db, monkeypatch, paper):
    """A trader with a token and ACTIVE operations, a staff token, symbols, an open breaker;
    the paper exchange behind ``close``; throttling out of the way."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from rest_framework.throttling import UserRateThrottle

    from api.models import CircuitBreakerState, Client, Symbol
    from stopmonitor.exchange.paper import bundled_filters
    from stopmonitor.operations import open_operation

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "100000/minute"})
    symbols = {}
    for name, f in sorted(bundled_filters().items()):
        symbols[name] = Symbol.objects.create(symbol=name, base_asset=f.base_asset, quote_asset=f.quote_asset,
                                              tick_size=f.tick_size, step_size=f.step_size, min_qty=f.min_qty,
                                              min_notional=f.min_notional)
    tenant = Client.objects.create(name="acme")
    users = get_user_model().objects
    trader = users.create_user("trader")
    tenant.users.add(trader)
    operator = users.create_user("operator", is_staff=True)
    tenant.users.add(operator)
    ops = [open_operation(tenant, symbols["BTCUSDT"], "BUY", D("0.5"), D("9300"), D("9200"), D("9500"), now=NOW)
           for _ in range(3)]
    CircuitBreakerState.objects.create(symbol="ADAUSDT", state="OPEN", failure_count=3)
    return {
        "trader": {"Authorization": f"Bearer {Token.objects.create(user=trader).key}"},
        "staff": {"Authorization": f"Bearer {Token.objects.create(user=operator).key}"},
        "operation_ids": [op.pk for op in ops],
    }


@pytest.mark.slow
def test_schemathesis_no_5xx_and_answers_conform_to_the_schema(live_server, seeded):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/")
    # conformance both ways (issue 16): what the schema forbids is refused (4XX), and on the reads what it
    # allows is accepted; writes may still be refused (400) by rules the schema cannot express (a stop on
    # the wrong side of the entry, off the tickSize, an unknown symbol), as their descriptions say
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    statuses: Counter = Counter()
    failures: list[str] = []
    started = time.monotonic()

    def exercise(operation, mode, n, headers, path_parameters=None):
        strategy = operation.as_strategy(mode, path_parameters=path_parameters)

        @settings(max_examples=n, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=strategy)
        def run(case):
            # a fresh connection per request: keep-alive on the test server costs a 40 ms delayed ACK each
            # a negative case that took the Authorization header away keeps it away (it must get 401)
            negated = case.meta is not None and any(
                str(getattr(location, "value", location)) == "header" and info.mode.is_negative
                for location, info in case.meta.components.items())
            auth = {} if negated else headers
            response = case.call(base_url=live_server.url, headers={**auth, "Connection": "close"})
            statuses[response.status_code] += 1
            extra = [positive_data_acceptance] if operation.method.upper() == "GET" else []
            case.validate_response(response, checks=checks + extra, headers=auth)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # keep going: one report per (operation, mode) that failed
            failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")

    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(V1):
            continue
        headers = seeded["staff"] if "reset" in operation.path else seeded["trader"]
        exercise(operation, schemathesis.GenerationMode.POSITIVE, EXAMPLES_PER_OPERATION["positive"], headers)
        exercise(operation, schemathesis.GenerationMode.NEGATIVE, EXAMPLES_PER_OPERATION["negative"], headers)
        if "{id}" in operation.path:
            for op_id in seeded["operation_ids"]:
                exercise(operation, schemathesis.GenerationMode.POSITIVE,
                         EXAMPLES_PER_OPERATION["existing-object"] // 3, headers, {"id": op_id})
        if "{symbol}" in operation.path:
            exercise(operation, schemathesis.GenerationMode.POSITIVE, EXAMPLES_PER_OPERATION["existing-symbol"], headers,
                     {"symbol": "ADAUSDT"})

    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    print(f"\nschemathesis: {total} requests in {elapsed:.1f} s; statuses {dict(sorted(statuses.items(), key=str))}")
    assert not failures, "\n\n".join(failures)
    assert not any(isinstance(code, int) and code >= 500 for code in statuses)
    assert total >= 600 * SCALE
    assert all(statuses[code] for code in (200, 201, 400, 404, 409)), statuses
