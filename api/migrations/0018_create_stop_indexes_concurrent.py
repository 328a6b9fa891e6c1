"""Partial indexes for the monitor's hot query and for execution tokens, built CONCURRENTLY.

Non-atomic: PostgreSQL refuses CREATE INDEX CONCURRENTLY inside a transaction. A failed
earlier build that left an INVALID index is repaired (dropped and built again).
"""

from django.db import migrations, models
from django.db.models import Q

from api.db_operations import AddIndexConcurrentlyRepairing


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("api", "0017_set_stop_check_default"),
    ]

    operations = [
        AddIndexConcurrentlyRepairing(
            model_name="operation",
            index=models.Index(
                condition=Q(status="ACTIVE") & (Q(stop_price__isnull=False) | Q(target_price__isnull=False)),
                fields=["status", "symbol"],
                name="op_active_stop_idx",
            ),
        ),
        AddIndexConcurrentlyRepairing(
            model_name="operation",
            index=models.Index(
                condition=Q(stop_execution_token__isnull=False),
                fields=["stop_execution_token"],
                name="op_stop_exec_token_idx",
            ),
        ),
    ]
