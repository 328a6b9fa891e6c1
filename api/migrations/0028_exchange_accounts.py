"""Per-tenant exchange accounts (issue #20): ``ExchangeAccount`` and ``Operation.account``.

The new column is nullable with no default (no table rewrite, no long lock): null means the
default account, the environment's ``BINANCE_API_KEY``, so a deployment with one key keeps
working with no data entry. (The column's index is built in the migration's transaction: the
operations table is small next to the event table; the integrator may move it to
``AddIndexConcurrentlyRepairing`` like 0018/0021.)
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0025_protection"),
    ]

    operations = [
        migrations.CreateModel(
            name="ExchangeAccount",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("venue", models.CharField(choices=[("binance", "Binance"), ("binance-testnet", "Binance Testnet")],
                                           default="binance", max_length=20)),
                ("label", models.CharField(max_length=80)),
                ("key_type", models.CharField(choices=[("HMAC", "Hmac"), ("ED25519", "Ed25519")], default="HMAC",
                                              max_length=8)),
                ("api_key", models.CharField(max_length=128)),
                ("secret_encrypted", models.TextField(editable=False)),
                ("enabled", models.BooleanField(default=True)),
                ("disabled_reason", models.CharField(blank=True, default="", max_length=300)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("client", models.ForeignKey(on_delete=django.db.models.deletion.PROTECT,
                                             related_name="exchange_accounts", to="api.client")),
            ],
            options={
                "constraints": [models.UniqueConstraint(fields=("client", "label"), name="account_tenant_label_uniq")],
            },
        ),
        migrations.AddField(
            model_name="operation",
            name="account",
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT,
                                    related_name="operations", to="api.exchangeaccount"),
        ),
    ]
