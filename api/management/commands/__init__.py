"""``python manage.py`` commands of the api app: ``backfill_stop_price``."""
