"""Logging helpers: a filter that removes secret values from every record, and the JSON decision log."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

REDACTED = "***"


def mask_secrets(text: str, secrets: list[str]) -> str:
    """``text`` with every whole occurrence of a value of ``secrets`` replaced by ``***``.

    Whole: not preceded or followed by a letter or digit, so a short value (an API key ``K``,
    a password ``ey``) is masked where it stands alone (``key=K``, ``:ey@host``) but never inside a
    word (``Invalid API-Key`` stays as it is). Longest values first.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, text)
    return text


def _secret_values() -> list[str]:
    from config.secrets import secret_values

    return [v for v in secret_values() if len(v) >= 8]


class RedactSecretsFilter(logging.Filter):
    """Replace any configured secret value (SECRET_KEY, Binance key and secret, the passwords of the
    database, Redis and RabbitMQ: :func:`config.secrets.secret_values`) by ``***``; a request attached
    to a record is written as its method and path (no query string).

    Applied to the one stdout handler, so no logger can leak them, even through an
    exception's text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        if request is not None and hasattr(request, "get_full_path"):
            # django.request's records carry the request, whose repr holds the query string (a token sent
            # as ?token= would be logged): method and path only
            record.request = f"{getattr(request, 'method', '')} {getattr(request, 'path', '')}"
        secrets = _secret_values()
        if not secrets:
            return True
        message = record.getMessage()
        redacted = mask_secrets(message, secrets)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and record.exc_info[1] is not None:
            text = str(record.exc_info[1])
            if mask_secrets(text, secrets) != text:
                record.exc_info = None
                record.exc_text = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str):
                masked = mask_secrets(value, secrets)
                if masked != value:
                    setattr(record, key, masked)
        return True


def redact(text: str) -> str:
    """``text`` with every configured secret value replaced by ``***`` (whole values: :func:`mask_secrets`)."""
    return mask_secrets(text, _secret_values())


def emit_json(stream: Any, payload: dict) -> None:
    """Write one JSON line (Decimal as string, keys in insertion order) to ``stream`` (stdout by default)."""
    stream = stream or sys.stdout
    stream.write(redact(json.dumps(payload, default=str, separators=(",", ":"))) + "\n")
    stream.flush()


def json_only_stdout() -> None:
    """For ``--json`` commands: standard output carries only JSON lines (issue #12 item 15).

    Log handlers writing text to stdout (``LOG_FORMAT=text``, the development default) are moved
    to stderr; JSON-formatted handlers stay on stdout (their lines are JSON)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.StreamHandler) or getattr(handler, "stream", None) is not sys.stdout:
            continue
        fmt = getattr(handler, "formatter", None)
        if fmt is not None and type(fmt).__name__ == "JsonFormatter":
            continue
        handler.setStream(sys.stderr)
