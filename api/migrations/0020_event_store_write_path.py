"""The event store's write path at backfill scale (issue 4): fewer and narrower indexes and checks.

- ``event_id`` becomes a UUID version 7 (time-ordered; ``uuid6.uuid7`` in Python, the SQL function
  ``stopmonitor_uuid7()`` for set-based appends): new ids go to the right edge of their unique index.
- The stream index (operation, version) serves lookups by operation: the operation column's own
  index goes. The tenant column's index becomes (tenant, sequence), what ``/events/?after=SEQ``
  reads.
- No foreign key constraint is checked per appended event (three checks per event and outbox row
  at commit were a fifth of the backfill's time): the one writer appends for an operation row it
  holds locked and copies the tenant from it; a trigger on ``api_operation`` refuses to delete an
  operation that has events (or change its id), the side the constraint guarded against later
  changes. Django's ``on_delete=PROTECT`` still applies to ORM deletes.
- The token index keeps only events that have a token; the (tenant, type, time) index becomes
  (tenant, time) of ``STOP_TRIGGERED`` events, the only type the rate guard counts.
- The outbox row is written from its event in the same statement and events are never deleted
  (invariant 8): the unique index stays, the per-row constraint check at commit goes.

Non-atomic: new indexes are built ``CONCURRENTLY`` before the old ones are dropped
``CONCURRENTLY``, so a live event table keeps taking appends; every step that takes a table lock
waits at most 5 s for it (``lock_timeout``) and every step can run again, so a run that timed out
behind a long transaction is simply re-run. SQLite keeps its foreign keys (its tables are not
rebuilt for this).
"""

import django.db.models.deletion
import uuid6
from django.db import migrations, models

from api.db_operations import (
    AddIndexConcurrentlyRepairing,
    CreateUUID7Function,
    DropForeignKeyConstraint,
    DropIndexByNameConcurrently,
    OperationKeepsItsEvents,
    RemoveIndexConcurrently,
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("api", "0019_monitor_pass"),
    ]

    operations = [
        CreateUUID7Function(),
        migrations.AlterField(
            model_name="stopmonitorevent",
            name="event_id",
            field=models.UUIDField(default=uuid6.uuid7, editable=False, unique=True),
        ),
        AddIndexConcurrentlyRepairing(
            model_name="stopmonitorevent",
            index=models.Index(condition=models.Q(("execution_token__isnull", False)), fields=["execution_token"],
                               name="event_token_idx"),
        ),
        AddIndexConcurrentlyRepairing(
            model_name="stopmonitorevent",
            index=models.Index(fields=["tenant", "sequence"], name="event_tenant_seq_idx"),
        ),
        AddIndexConcurrentlyRepairing(
            model_name="stopmonitorevent",
            index=models.Index(condition=models.Q(("event_type", "STOP_TRIGGERED")), fields=["tenant", "created_at"],
                               name="event_tenant_trigger_idx"),
        ),
        RemoveIndexConcurrently(model_name="stopmonitorevent", name="event_exec_token_idx"),
        RemoveIndexConcurrently(model_name="stopmonitorevent", name="event_tenant_type_time_idx"),
        # the foreign keys' own indexes, dropped concurrently (AlterField's DROP INDEX IF EXISTS then finds none)
        DropIndexByNameConcurrently("api_stopmonitorevent", "api_stopmonitorevent_operation_id_ba39ecd4",
                                    ["operation_id"]),
        DropIndexByNameConcurrently("api_stopmonitorevent", "api_stopmonitorevent_tenant_id_43281414", ["tenant_id"]),
        OperationKeepsItsEvents(),
        # the constraints, each dropped under a lock timeout (re-runnable); the state follows
        DropForeignKeyConstraint(
            "api_stopmonitorevent", "api_stopmonitorevent_operation_id_ba39ecd4_fk_api_operation_id",
            'FOREIGN KEY ("operation_id") REFERENCES "api_operation" ("id") DEFERRABLE INITIALLY DEFERRED'),
        DropForeignKeyConstraint(
            "api_stopmonitorevent", "api_stopmonitorevent_tenant_id_43281414_fk_api_client_id",
            'FOREIGN KEY ("tenant_id") REFERENCES "api_client" ("id") DEFERRABLE INITIALLY DEFERRED'),
        DropForeignKeyConstraint(
            "api_outbox", "api_outbox_event_id_23d4bbb2_fk_api_stopmonitorevent_sequence",
            'FOREIGN KEY ("event_id") REFERENCES "api_stopmonitorevent" ("sequence") DEFERRABLE INITIALLY DEFERRED'),
        migrations.SeparateDatabaseAndState(state_operations=[
            migrations.AlterField(
                model_name="stopmonitorevent",
                name="operation",
                field=models.ForeignKey(db_constraint=False, db_index=False,
                                        on_delete=django.db.models.deletion.PROTECT, related_name="events",
                                        to="api.operation"),
            ),
            migrations.AlterField(
                model_name="stopmonitorevent",
                name="tenant",
                field=models.ForeignKey(db_constraint=False, db_index=False,
                                        on_delete=django.db.models.deletion.PROTECT, related_name="events",
                                        to="api.client"),
            ),
            migrations.AlterField(
                model_name="outbox",
                name="event",
                field=models.OneToOneField(db_constraint=False, on_delete=django.db.models.deletion.PROTECT,
                                           related_name="outbox", to="api.stopmonitorevent"),
            ),
        ]),
    ]
