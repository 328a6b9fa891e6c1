"""Project configuration package: settings, urls, wsgi/asgi and the Celery app."""
