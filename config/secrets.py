"""Secrets kept out of reprs: a masked ``str``, the configured secret values, and Django's error-page filter.

``celery -A config report`` prints every Django setting through ``repr``; Django's debug page prints
settings, the request's META (under ``runserver`` the whole process environment) and the local
variables of every frame. Neither may show the secret key, the Binance key and secret or a password
of the database, Redis or RabbitMQ:

* :class:`Secret` is a ``str`` (every library uses it as the value it is) whose ``repr`` is
  ``'***'``; ``config/settings.py`` wraps each secret setting and the URLs that carry a password;
* :func:`secret_values` lists the configured secret values (passwords taken out of the URLs), for
  the log filter (:mod:`stopmonitor.logs`) and the error-page filter;
* :class:`config.reporting.SecretsExceptionReporterFilter` uses them on Django's error page.

Nothing here imports Django at module level (``config/settings.py`` imports this module).
"""

from __future__ import annotations

from urllib.parse import urlsplit

MASK = "***"


class Secret(str):
    """A string whose ``repr`` is ``'***'``: it works as its value, and prints as nothing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)

    def __reduce__(self):  # pickling (Celery, caches) keeps the plain value
        return (str, (str(self),))


def secret(value: str | None) -> Secret | str | None:
    """``value`` as a :class:`Secret` (``None`` and ``""`` unchanged)."""
    return Secret(value) if value else value


def url_password(url: str | None) -> str | None:
    """The password in ``scheme://user:password@host/…`` (``None`` without one)."""
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


#: secrets this process learned at run time (an exchange account's decrypted secret and its key:
#: stopmonitor/account_crypto.py registers them): masked like the configured ones
_runtime: set[str] = set()


def register_secret(*values: str | None) -> None:
    """Add ``values`` (4 characters or more) to what :func:`secret_values` masks in this process."""
    _runtime.update(str(v) for v in values if v and len(str(v)) >= 4)
    if any(v and "\n" in str(v) for v in values):  # a PEM: each base64 line too
        _runtime.update(line.strip() for v in values if v for line in str(v).splitlines()
                        if "-----" not in line and len(line.strip()) >= 4)


def secret_values() -> list[str]:
    """Every configured secret value of at least 4 characters: SECRET_KEY, the Binance key and secret
    (or Ed25519 private key and its passphrase), the account encryption keys, the passwords of the
    database, Redis, RabbitMQ and the Celery broker and result backend, and the exchange accounts'
    keys and secrets this process decrypted (:func:`register_secret`)."""
    try:
        from django.conf import settings

        values = [getattr(settings, "SECRET_KEY", None), getattr(settings, "BINANCE_API_KEY", None),
                  getattr(settings, "BINANCE_API_SECRET", None), getattr(settings, "BINANCE_PRIVATE_KEY_PASSPHRASE", None)]
        pem = getattr(settings, "BINANCE_PRIVATE_KEY", None)
        if pem:  # the Ed25519 key: the whole PEM and each of its base64 lines
            values += [str(pem), *(line.strip() for line in str(pem).splitlines() if "-----" not in line)]
        values += str(getattr(settings, "ACCOUNT_ENCRYPTION_KEYS", "") or "").split(",")
        values += [db.get("PASSWORD") for db in getattr(settings, "DATABASES", {}).values()]
        for name in ("REDIS_URL", "RABBITMQ_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            values.append(url_password(getattr(settings, name, None)))
    except Exception:  # noqa: BLE001 - settings not configured yet
        values = []
    values += list(_runtime)
    return sorted({str(v) for v in values if v and len(str(v)) >= 4}, key=len, reverse=True)


def contains_secret(text: str, secrets: list[str]) -> bool:
    return any(s in text for s in secrets)
