"""Exchange-held protection: the protection projection (one row per operation, folded from the
PROTECTION_* events) and two per-tenant settings (protection on/off, buffer in basis points).

On a live database: a new table, and two columns with a constant default on ``tenantconfig`` (a
metadata-only change on PostgreSQL 11+, no rewrite); the whole migration waits at most 5 s for a
lock (``SET LOCAL lock_timeout``) and can simply be run again.
"""

import django.db.models.deletion
from django.db import migrations, models


def _lock_timeout(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("SET LOCAL lock_timeout = '5s'")


class Migration(migrations.Migration):

    dependencies = [
        ('api', '0026_operation_venue'),
    ]

    operations = [
        migrations.RunPython(_lock_timeout, migrations.RunPython.noop, elidable=True),
        migrations.CreateModel(
            name='StopMonitorProtection',
            fields=[
                ('operation', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, primary_key=True, related_name='protection', serialize=False, to='api.operation')),
                ('status', models.CharField(choices=[('REQUESTED', 'Requested'), ('PLACED', 'Placed'), ('TRIGGERED', 'Triggered'), ('CANCELLED', 'Cancelled'), ('UNPROTECTED', 'Unprotected')], max_length=12)),
                ('generation', models.PositiveIntegerField()),
                ('client_order_id', models.CharField(blank=True, default='', max_length=36)),
                ('kind', models.CharField(blank=True, default='', max_length=10)),
                ('side', models.CharField(blank=True, default='', max_length=4)),
                ('quantity', models.DecimalField(blank=True, decimal_places=8, max_digits=20, null=True)),
                ('stop_price', models.DecimalField(blank=True, decimal_places=8, max_digits=20, null=True)),
                ('limit_price', models.DecimalField(blank=True, decimal_places=8, max_digits=20, null=True)),
                ('exchange_order_id', models.BigIntegerField(blank=True, null=True)),
                ('reason', models.CharField(blank=True, default='', max_length=40)),
                ('replaces', models.CharField(blank=True, default='', max_length=36)),
                ('requested_at', models.DateTimeField(blank=True, null=True)),
                ('placed_at', models.DateTimeField(blank=True, null=True)),
                ('replaced_at', models.DateTimeField(blank=True, null=True)),
                ('updated_at', models.DateTimeField()),
                ('last_version', models.PositiveIntegerField()),
            ],
        ),
        migrations.AddField(
            model_name='tenantconfig',
            name='protection_buffer_bps',
            field=models.PositiveIntegerField(db_default=50, default=50, help_text="How far beyond the monitor's stop the resting stop sits, in basis points."),
        ),
        migrations.AddField(
            model_name='tenantconfig',
            name='protection_enabled',
            field=models.BooleanField(blank=True, default=None, help_text='Rest a stop on the exchange; empty = on for Binance venues.', null=True),
        ),
    ]
