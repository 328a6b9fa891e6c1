"""The idempotency keys of the API's writes (``Idempotency-Key`` on POST /operations/, PATCH and close):
one row per (user, key) with the first answer, kept at least 24 h (api/idempotency.py). A new table:
nothing existing is locked or rewritten."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0024_symbol_market_max_qty"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="IdempotencyKey",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("key", models.CharField(max_length=255)),
                ("fingerprint", models.CharField(max_length=64)),
                ("method", models.CharField(max_length=10)),
                ("path", models.CharField(max_length=300)),
                ("state", models.CharField(default="started", max_length=10)),
                ("status_code", models.PositiveSmallIntegerField(null=True)),
                ("response_body", models.JSONField(null=True)),
                ("response_headers", models.JSONField(default=dict)),
                ("created_at", models.DateTimeField()),
                ("completed_at", models.DateTimeField(null=True)),
                ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+",
                                           to=settings.AUTH_USER_MODEL)),
            ],
            options={
                "indexes": [models.Index(fields=["user", "created_at"], name="idempotency_key_user_age")],
                "constraints": [models.UniqueConstraint(fields=("user", "key"), name="idempotency_key_unique_per_user")],
            },
        ),
    ]
