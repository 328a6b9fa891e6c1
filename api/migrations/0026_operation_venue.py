"""Operations remember their venue (issue 18, point 8): a monitor on another venue leaves them alone.

``ADD COLUMN ... DEFAULT '<venue>'`` with a constant default is a catalog-only change on
PostgreSQL 11+ (no table rewrite): every existing row reads the venue of the deployment that runs
this migration (``EXCHANGE_VENUE`` at migrate time), which is the venue its monitor was watching
it on. Django then drops the database default; new rows get ``api.models.current_venue()``
(NULL only when written around the ORM: watched by any venue, as before).
"""

from django.db import migrations, models

import api.models


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0022_idempotency_key"),
    ]

    operations = [
        migrations.AddField(
            model_name="operation",
            name="venue",
            field=models.CharField(blank=True, default=api.models.current_venue, max_length=20, null=True),
        ),
    ]
