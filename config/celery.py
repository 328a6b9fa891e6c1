"""The Celery app (``celery -A config.celery:app worker|beat``): RabbitMQ broker, Redis results.

Settings come from Django's (``CELERY_*`` in ``config.settings``, resolved from either
spelling of ``RABBITMQ_URL``/``REDIS_URL``). Tasks live in ``stopmonitor.tasks``. The beat
schedule, for sites that run workers instead of the CronJob: a monitor pass every 60 s and
the outbox relay every 5 s. Passes from any number of workers and the CronJob never close an
operation twice (row locks, invariant 1); the pass lock only saves duplicate work.

Imported only by the Celery processes: Django start-up (``manage.py monitor_stops``, the web
pod) does not import Celery.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("stopmonitor")
app.config_from_object("django.conf:settings", namespace="CELERY")
# keep Django's LOGGING (JSON lines, secrets redacted) in workers and beat
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True
app.autodiscover_tasks(["stopmonitor"])

app.conf.beat_schedule = {
    "monitor-pass": {
        "task": "stopmonitor.tasks.run_monitor_pass",
        "schedule": 60.0,
        "options": {"expires": 55},  # a pass that waited a minute is superseded by the next one
    },
    "outbox-relay": {
        "task": "stopmonitor.tasks.publish_outbox",
        "schedule": 5.0,
        "options": {"expires": 5},
    },
}
