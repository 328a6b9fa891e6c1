"""Logging helpers: a filter that removes secret values from every record, and the JSON decision log."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

REDACTED = "***"


def _secret_values() -> list[str]:
    try:
        from django.conf import settings

        values = [
            getattr(settings, "SECRET_KEY", None),
            getattr(settings, "BINANCE_API_KEY", None),
            getattr(settings, "BINANCE_API_SECRET", None),
        ]
    except Exception:  # settings not configured yet
        return []
    return [v for v in values if v and len(v) >= 8]


class RedactSecretsFilter(logging.Filter):
    """Replace any configured secret value (SECRET_KEY, Binance key and secret) by ``***``.

    Applied to the one stdout handler, so no logger can leak them, even through an
    exception's text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _secret_values()
        if not secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in secrets:
            redacted = redacted.replace(secret, REDACTED)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1])
            if any(s in text for s in secrets):
                record.exc_info = None
                record.exc_text = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and any(s in value for s in secrets):
                for secret in secrets:
                    value = value.replace(secret, REDACTED)
                setattr(record, key, value)
        return True


def redact(text: str) -> str:
    """``text`` with every configured secret value replaced by ``***``."""
    for secret in _secret_values():
        text = text.replace(secret, REDACTED)
    return text


def emit_json(stream: Any, payload: dict) -> None:
    """Write one JSON line (Decimal as string, keys in insertion order) to ``stream`` (stdout by default)."""
    stream = stream or sys.stdout
    stream.write(redact(json.dumps(payload, default=str, separators=(",", ":"))) + "\n")
    stream.flush()
