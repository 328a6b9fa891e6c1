"""The event chain: each event's hash covers its content and its stream's previous hash (tamper evidence).

``chain_hash(version n) = sha256(chain_hash(version n-1) || header || "\\n" || payload text)``, the
first event of a stream chaining to :data:`GENESIS` (empty). The header is ``operation_id, version,
event_type, tenant_id, symbol, execution_token ("" when none), source, venue, created_at`` (integers
in decimal; created_at in microseconds since the Unix epoch, UTC) joined by the unit separator
``\\x1f`` — identifiers and integers, none of which contains ``\\x1f`` or a newline (event types and
sources are code constants, symbols exchange symbols, the token a UUID), so the split is
unambiguous; the payload text is the database's own rendering of the stored JSON (PostgreSQL:
``payload::text``; SQLite: the stored text), so a verifier reading the rows back needs no second
JSON canonicalizer.

Two writers compute it, proved equal by the tests: :func:`link` in Python (``append_events``) and
:func:`link_sql` in one ``INSERT … SELECT`` (the set-based ``append_many``). The verifier
(:func:`verify_rows`) is Python and independent of any function stored in the database, so a
superuser who edits an event (or replaces a stored function) is found; one who also recomputes
every later hash of the stream is found only against a copy of the heads kept elsewhere (the
restore drill compares the restored chain hashes with the source's).

No Django import: the functions take plain values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable

GENESIS = b""  # the previous hash of a stream's first event
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (exact integer arithmetic, no float)."""
    return (moment - _EPOCH) // _MICROSECOND


def header(operation_id: int, version: int, event_type: str, tenant_id: int, symbol: str,
           execution_token: str | None, source: str, venue: str, created_at: datetime) -> bytes:
    """The event's fields other than the payload, as the bytes the hash covers (see the module docstring).
    Raises ``ValueError`` for a text field containing the separator or a newline (never a real one)."""
    for text in (event_type, symbol, execution_token or "", source, venue):
        if "\x1f" in text or "\n" in text:
            raise ValueError(f"event field {text!r}: no \\x1f or newline allowed")
    return "\x1f".join((str(operation_id), str(version), event_type, str(tenant_id), symbol, execution_token or "",
                         source, venue, str(micros(created_at)))).encode()


def link(prev: bytes | None, head: bytes, payload_text: str) -> bytes:
    """``sha256(prev || head || "\\n" || payload_text)``: 32 bytes. ``prev`` None means :data:`GENESIS`."""
    digest = hashlib.sha256(prev or GENESIS)
    digest.update(head)
    digest.update(b"\n")
    digest.update(payload_text.encode())
    return digest.digest()


def link_sql(prev: str, *, operation_id: str = "operation_id", version: str = "version",
             event_type: str = "event_type", tenant_id: str = "tenant_id", symbol: str = "symbol",
             execution_token: str = "execution_token", source: str = "source", venue: str = "venue",
             created_us: str = "created_us", payload: str = "payload") -> str:
    """:func:`link` as a PostgreSQL expression over the given SQL expressions (``created_us``: bigint
    microseconds; ``payload``: jsonb; ``prev``: bytea or NULL). Built-in functions only."""
    return (f"sha256(COALESCE({prev}, ''::bytea) || convert_to(concat_ws(E'\\x1f', {operation_id}, {version}, "
            f"{event_type}, {tenant_id}, {symbol}, COALESCE({execution_token}, ''), {source}, {venue}, {created_us}) "
            f"|| E'\\n' || ({payload})::text, 'UTF8'))")


@dataclass(frozen=True)
class Broken:
    """One finding of :func:`verify_rows`: ``kind`` is ``hash`` (content or link does not match),
    ``version`` (not 1, 2, 3, … in the stream), ``missing_hash`` or ``global_link`` (the event's
    ``prev_sequence`` is not the sequence of the event committed before it)."""

    kind: str
    sequence: int
    operation_id: int
    version: int
    detail: str

    def line(self) -> str:
        return (f"{self.kind}: event sequence {self.sequence} (operation {self.operation_id} version "
                f"{self.version}): {self.detail}")


@dataclass
class Report:
    """What :func:`verify_rows` and :func:`verify_global` found; ``first`` lists the first break of each stream."""

    events: int = 0
    streams: int = 0
    heads: dict | None = None  # {operation_id: (version, chain hash hex)} when asked for
    broken: list | None = None

    def __post_init__(self):
        self.broken = [] if self.broken is None else self.broken


def verify_rows(rows: Iterable[tuple], *, keep_heads: bool = False, report: Report | None = None) -> Report:
    """Recompute every stream's chain from rows ``(sequence, operation_id, version, event_type, tenant_id,
    symbol, execution_token, source, venue, created_at, payload_text, chain_hash)`` in (operation_id,
    version) order. Records the first break of each stream (later links of a broken stream are not
    re-reported) and, with ``keep_heads``, each stream's last (version, hash)."""
    report = report or Report()
    heads = {} if keep_heads else None
    current = None
    prev = GENESIS
    expected_version = 1
    stream_broken = False
    for row in rows:
        _sequence, operation_id, version, *_fields, stored = row
        if operation_id != current:
            current, prev, expected_version, stream_broken = operation_id, GENESIS, 1, False
            report.streams += 1
        report.events += 1
        stored = bytes(stored) if stored is not None else None
        if not stream_broken:
            problem = _row_break(row, stored, prev, expected_version)
            if problem is not None:
                report.broken.append(problem)
                stream_broken = True
        prev = stored if stored is not None else GENESIS
        expected_version = version + 1
        if heads is not None:
            heads[operation_id] = (version, stored.hex() if stored is not None else None)
    if heads is not None:
        report.heads = heads
    return report


def _row_break(row: tuple, stored: bytes | None, prev: bytes, expected_version: int) -> Broken | None:
    """The break at ``row`` (a :func:`verify_rows` row) of a stream intact so far, or None: a version
    out of turn, no hash stored, or a ``stored`` hash that :func:`link` from ``prev`` does not give."""
    (sequence, operation_id, version, event_type, tenant_id, symbol, token, source, venue, created_at,
     payload_text, _) = row
    if version != expected_version:
        return Broken("version", sequence, operation_id, version, f"expected version {expected_version}")
    if stored is None:
        return Broken("missing_hash", sequence, operation_id, version, "no chain hash stored")
    computed = link(prev, header(operation_id, version, event_type, tenant_id, symbol, token, source, venue,
                                 created_at), payload_text)
    if computed != stored:
        return Broken("hash", sequence, operation_id, version,
                      f"stored {stored.hex()[:16]}…, recomputed {computed.hex()[:16]}… "
                      f"(this event's content or its link to version {version - 1} was changed)")
    return None


def verify_global(rows: Iterable[tuple], report: Report) -> Report:
    """Check the global links over rows ``(sequence, prev_sequence, operation_id, version)`` in sequence
    order: each event names the event committed before it (the table's first event names none), so
    a deleted event is found even where the sequence has gaps from rolled-back appends."""
    last = None
    for sequence, prev_sequence, operation_id, version in rows:
        if prev_sequence != last:
            report.broken.append(Broken("global_link", sequence, operation_id, version,
                                        f"names event {prev_sequence} as the one before it, but the one before "
                                        f"it is {last} (events between were removed or renumbered)"))
        last = sequence
    return report

