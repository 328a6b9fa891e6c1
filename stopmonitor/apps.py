"""Django app config for the engine (management commands and tasks live here)."""
import os

from django.apps import AppConfig
from django.db.models.signals import post_migrate


def _grant_runtime_role(sender, using="default", **kwargs):
    """After ``migrate`` (the migrate Job, as the owner role): re-grant the runtime role named by
    ``DATABASE_RUNTIME_ROLE`` exactly the policy of :mod:`stopmonitor.roles`, so a table a migration
    just created is covered. Nothing when the variable is unset (development, tests)."""
    runtime = os.environ.get("DATABASE_RUNTIME_ROLE")
    if sender.name != "api" or not runtime:
        return
    from django.db import connections, transaction

    from stopmonitor import roles

    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    owner = os.environ.get("DATABASE_OWNER_ROLE", "stopmonitor_owner")
    with transaction.atomic(using=using), connection.cursor() as cursor:
        roles.setup(cursor, owner=owner, runtime=runtime)


class StopMonitorConfig(AppConfig):
    name = "stopmonitor"
    verbose_name = "Stop monitor engine"

    def ready(self):
        post_migrate.connect(_grant_runtime_role, dispatch_uid="stopmonitor.grant_runtime_role")
