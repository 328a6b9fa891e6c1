"""The engine entry points the model-based test drives (one place to follow the engine's layout)."""

from __future__ import annotations

from stopmonitor.engine.close import close_operation
from stopmonitor.engine.context import EngineSettings
from stopmonitor.engine.decisions import EngineUnavailable as PassError
from stopmonitor.engine.monitor import run_pass

ENGINE_SETTINGS = EngineSettings(quote_max_age_seconds=10, reconcile_after_seconds=30, breaker_threshold=1000,
                                 breaker_cooldown_seconds=300)


def one_pass(exchange):
    """One monitor pass at the exchange's clock; a pass that cannot run is not a failure here."""
    try:
        return run_pass(exchange, now=exchange.clock(), engine=ENGINE_SETTINGS, use_lock=False, log_decisions=False)
    except PassError:
        return None


def close_now(operation_id, exchange):
    """The API's "close now"."""
    try:
        return close_operation(operation_id, exchange, now=exchange.clock(), engine=ENGINE_SETTINGS)
    except PassError:
        return None


def empty_api_tables():
    """Every table of the ``api`` app emptied, ids restarted: each example of a machine starts clean."""
    from django.apps import apps
    from django.db import connection

    tables = ", ".join(m._meta.db_table for m in apps.get_app_config("api").get_models())
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
