"""MonitorPass: one row per monitor pass, so the web pod can export the time of the last completed pass."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('api', '0018_create_stop_indexes_concurrent'),
    ]

    operations = [
        migrations.CreateModel(
            name='MonitorPass',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('finished_at', models.DateTimeField(db_index=True)),
                ('started_at', models.DateTimeField()),
                ('source', models.CharField(max_length=12)),
                ('venue', models.CharField(max_length=20)),
                ('dry_run', models.BooleanField(default=False)),
                ('completed', models.BooleanField(default=True)),
                ('lock_held_elsewhere', models.BooleanField(default=False)),
                ('watched', models.PositiveIntegerField(default=0)),
                ('symbols', models.PositiveIntegerField(default=0)),
                ('triggered', models.PositiveIntegerField(default=0)),
                ('executed', models.PositiveIntegerField(default=0)),
                ('partially_executed', models.PositiveIntegerField(default=0)),
                ('failed', models.PositiveIntegerField(default=0)),
                ('unknown', models.PositiveIntegerField(default=0)),
                ('blocked', models.PositiveIntegerField(default=0)),
                ('reconciled', models.PositiveIntegerField(default=0)),
                ('skipped', models.PositiveIntegerField(default=0)),
                ('exchange_requests', models.PositiveIntegerField(default=0)),
                ('duration_s', models.FloatField(default=0.0)),
                ('error', models.CharField(blank=True, default='', max_length=500)),
            ],
        ),
    ]
