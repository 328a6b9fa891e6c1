"""Tamper evidence and least privilege for the event store (issue 17).

- Every event gets ``chain_hash`` (sha256 over the event and its stream's previous hash, see
  :mod:`stopmonitor.chain`) and ``prev_sequence`` (the event committed before it). The events
  already stored are chained here, in (operation, version) and sequence order, with the append-only
  trigger disabled for this one transaction (the owner role runs migrations).
- ``TRUNCATE`` on the event table is refused to every role but a superuser (statement trigger);
  an operation's tenant cannot change once it has events (row trigger).

Atomic: the new columns are nullable (no rewrite) and every lock is waited for at most 5 s; on a
large event table the chaining of old rows holds the table's lock for its duration (≈1 min per
million events here) — run it in a quiet window.
"""

from django.db import migrations, models

from api.db_operations import NoTruncateTrigger, OperationKeepsItsTenant

BATCH = 5000


def lock_timeout(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SET LOCAL lock_timeout = '5s'")


def chain_existing(apps, schema_editor):
    from stopmonitor import chain

    connection = schema_editor.connection
    table = connection.ops.quote_name("api_stopmonitorevent")
    pg = connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        if not cursor.fetchone()[0]:
            return
        if pg:
            cursor.execute(f"ALTER TABLE {table} DISABLE TRIGGER api_stopmonitorevent_append_only")
        payload = "payload::text" if pg else "payload"
        cursor.execute(f"SELECT sequence, operation_id, version, event_type, tenant_id, symbol, execution_token, "
                       f"source, venue, created_at, {payload} FROM {table} ORDER BY operation_id, version")
        rows = cursor.fetchall()
        updates, current, prev = [], None, None
        for seq, op, version, event_type, tenant, symbol, token, source, venue, created_at, text in rows:
            if op != current:
                current, prev = op, chain.GENESIS
            if not hasattr(created_at, "tzinfo"):  # SQLite returns text here
                from django.utils.dateparse import parse_datetime
                created_at = parse_datetime(created_at)
            if created_at.tzinfo is None:
                from datetime import timezone
                created_at = created_at.replace(tzinfo=timezone.utc)
            prev = chain.link(prev, chain.header(op, version, event_type, tenant, symbol, token, source, venue,
                                                 created_at), text)
            updates.append((prev, seq))
        for i in range(0, len(updates), BATCH):
            cursor.executemany(f"UPDATE {table} SET chain_hash = %s WHERE sequence = %s", updates[i:i + BATCH])
        cursor.execute(f"SELECT sequence FROM {table} ORDER BY sequence")
        seqs = [r[0] for r in cursor.fetchall()]
        links = [(prev_seq, seq) for prev_seq, seq in zip(seqs, seqs[1:])]
        for i in range(0, len(links), BATCH):
            cursor.executemany(f"UPDATE {table} SET prev_sequence = %s WHERE sequence = %s", links[i:i + BATCH])
        if pg:
            cursor.execute(f"ALTER TABLE {table} ENABLE TRIGGER api_stopmonitorevent_append_only")


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0021_outbox_stream_index"),
    ]

    operations = [
        migrations.RunPython(lock_timeout, lock_timeout, elidable=False),
        migrations.AddField(
            model_name="stopmonitorevent",
            name="chain_hash",
            field=models.BinaryField(editable=False, null=True),
        ),
        migrations.AddField(
            model_name="stopmonitorevent",
            name="prev_sequence",
            field=models.BigIntegerField(editable=False, null=True),
        ),
        migrations.RunPython(chain_existing, migrations.RunPython.noop, elidable=False),
        NoTruncateTrigger("api_stopmonitorevent"),
        OperationKeepsItsTenant(),
    ]
