"""Regression fixtures (from the adversarial review): reuse the engine fixtures (tenant, symbols, paper, open_op) and the autouse
projection check from tests/stopmonitor/conftest.py."""

from tests.stopmonitor.conftest import (  # noqa: F401
    NOW,
    _projection_matches_events,
    open_op,
    paper,
    symbols,
    tenant,
)
