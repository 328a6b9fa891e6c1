"""The API's one request parser: JSON, refusing what would otherwise reach the database or the stack.

DRF's ``JSONParser`` plus: a body nested too deeply for the decoder (a ``RecursionError``, Django's
HTML 500 before) and a NUL character (raw, or ``\\u0000`` in a string: PostgreSQL text cannot hold it)
are 400 ``parse_error`` in the envelope. Bodies are at most ``API_MAX_BODY_BYTES`` (api.middleware).
"""

from __future__ import annotations

import json
import re

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant

_ESCAPED_NUL = re.compile(rb"\\u0000", re.I)
MAX_DEPTH = 32


class StrictJSONParser(JSONParser):
    """JSON without NUL characters, at most :data:`MAX_DEPTH` levels of arrays and objects."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        raw = stream.read() if stream is not None else b""
        if b"\x00" in raw:
            raise ParseError("JSON parse error - the body holds a NUL byte.")
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            data = json.loads(raw.decode(encoding), parse_constant=strict_constant)  # no NaN, Infinity
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.") from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        if _too_deep(data, MAX_DEPTH):
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels.")
        if _ESCAPED_NUL.search(raw) and _holds_nul(data):
            raise ParseError("JSON parse error - a string holds a NUL character (\\u0000).")
        return data


def _too_deep(value, budget: int) -> bool:
    if isinstance(value, dict | list):
        if budget <= 0:
            return True
        items = value.values() if isinstance(value, dict) else value
        return any(_too_deep(v, budget - 1) for v in items if isinstance(v, dict | list))
    return False


def _holds_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False
