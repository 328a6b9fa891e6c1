"""Before a command or a request touches the schema: is the database migrated? One place for the question.

``pending_migrations()`` is what ``doctor``, ``/health/ready``, the API middleware and every
command ask; ``require_migrated()`` is the one-line call at the top of a command's ``handle``:
it raises :class:`~django.core.management.base.CommandError` (one line on stderr, exit 1)
instead of letting the command reach a missing table or column and print a traceback (or, for
``monitor_stops`` on a database stuck at 0017, exit 0 having watched nothing).
"""

from __future__ import annotations

# the modules a process imports only when it first needs them (a close, a publish, a request): a
# build without one would pass every other check and fail at the first close (module -> package)
RUNTIME_IMPORTS = {
    "binance": "python-binance",
    "psycopg": "psycopg",
    "redis": "redis",
    "kombu": "kombu",
    "gevent": "gevent",
    "pythonjsonlogger": "python-json-logger",
    "whitenoise": "whitenoise",
}

MIGRATE_FIX = "run migrate: python manage.py migrate (docker: `entrypoint.sh migrate`; k8s: the migrate Job)"


def pending_migrations(using: str = "default") -> list[str]:
    """``["api.0018_create_stop_indexes_concurrent", ...]``: the migrations not applied, in order.

    Raises :class:`django.db.DatabaseError` when the database cannot be read.
    """
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections[using])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    return [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]


def not_migrated_message(pending: list[str]) -> str:
    """``"the database is not migrated: 2 unapplied (api.0018_..., api.0019_...): run migrate: ..."``"""
    shown = ", ".join(pending[:2]) + (f", +{len(pending) - 2} more" if len(pending) > 2 else "")
    return f"the database is not migrated: {len(pending)} unapplied ({shown}): {MIGRATE_FIX}"


def require_migrated(using: str = "default", returncode: int = 1) -> None:
    """Raise ``CommandError`` (one line, exit ``returncode``: 2 for the commands whose exit 1 means
    a finding) when the database is unreachable or has unapplied migrations."""
    from django.core.management.base import CommandError
    from django.db import DatabaseError, connections

    try:
        pending = pending_migrations(using)
    except DatabaseError as exc:
        settings = connections[using].settings_dict
        where = settings.get("NAME") if settings["ENGINE"].endswith("sqlite3") else (
            f"{settings.get('HOST') or 'localhost'}:{settings.get('PORT') or 5432}")
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CommandError(f"database at {where} cannot be read: {type(exc).__name__}: {first}",
                           returncode=returncode) from None
    if pending:
        raise CommandError(not_migrated_message(pending), returncode=returncode)


def missing_modules() -> list[str]:
    """``["python-binance (ModuleNotFoundError: No module named 'binance')", ...]``: what does not import."""
    import importlib

    missing = []
    for module, package in RUNTIME_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken package
            missing.append(f"{package} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]})")
    return missing


def other_venue_operations(venue: str) -> dict[str, int]:
    """``{"binance": 3}``: ACTIVE operations remembered on another venue than ``venue`` (migration 0026)."""
    from django.db.models import Count, Q

    from api.models import Operation

    rows = (Operation.objects.filter(status="ACTIVE").exclude(Q(venue=venue) | Q(venue__isnull=True))
            .values("venue").annotate(n=Count("id")).order_by("venue"))
    return {row["venue"]: row["n"] for row in rows}


def require_keys(venue: str) -> None:
    """On a Binance venue, the keys the monitor signs with are accepted (:mod:`stopmonitor.keys`):
    raises :class:`~django.core.management.base.CommandError` (one line, exit 1) when Binance
    refuses them; an answer that says nothing about the keys lets the monitor start."""
    from django.core.management.base import CommandError

    from stopmonitor.exchange.factory import build_exchange
    from stopmonitor.keys import FIX, is_exchange_venue, keys_verdict

    if not is_exchange_venue(venue):
        return
    verdict = keys_verdict(venue, lambda: build_exchange(venue))
    if verdict.status == "refused" and verdict.code is None:
        raise CommandError(f"{venue}: {verdict.detail}; {FIX}")
    if verdict.status == "refused":
        raise CommandError(f"{venue} refused the API keys: {verdict.detail}; {FIX}")


def before_monitor(venue: str | None, stream) -> None:
    """``monitor_stops``' start: :func:`require_migrated`, :func:`require_keys`, then one line on
    ``stream`` when ACTIVE operations belong to another venue (they are left alone: not watched,
    not closed)."""
    from django.conf import settings

    from api.models import recorded_venue

    require_migrated()
    require_keys(venue or settings.EXCHANGE_VENUE)
    mine = recorded_venue(venue)
    others = other_venue_operations(mine)
    if others:
        listed = ", ".join(f"{n} on {name}" for name, n in others.items())
        stream.write(f"monitor on venue {mine}: leaving alone {sum(others.values())} ACTIVE operations of other "
                     f"venues ({listed}); run a monitor with EXCHANGE_VENUE set to theirs to watch them")
