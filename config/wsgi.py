"""WSGI entry point (gunicorn: ``config.wsgi:application``)."""
import os
import sys

from django.core.wsgi import get_wsgi_application

from config.env import EX_CONFIG, check_settings_module

if _problem := check_settings_module(os.environ):
    sys.stderr.write(_problem + "\n")
    sys.stderr.flush()
    raise SystemExit(EX_CONFIG)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()
