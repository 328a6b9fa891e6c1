"""Rebuild and verify the execution projection from the event log (invariant 8)."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction

from stopmonitor.events import execution_state_of, save_execution_state, to_stored
from stopmonitor.execution import apply, state_field_names

CHUNK = 2000


def _replay(operation_id: int | None = None):
    """Fold the log (or one stream) in sequence order; returns ``{token: ExecutionState}``.
    Streams events with ``iterator()`` so memory holds states, not events."""
    from api.models import StopMonitorEvent

    qs = StopMonitorEvent.objects.exclude(execution_token=None).order_by("sequence")
    if operation_id is not None:
        qs = qs.filter(operation_id=operation_id)
    states = {}
    for row in qs.iterator(chunk_size=CHUNK):
        states[row.execution_token] = apply(states.get(row.execution_token), to_stored(row))
    return states


@dataclass(frozen=True)
class Difference:
    """One projection row that differs from the fold: ``field`` is ``"<missing>"``/``"<extra>"`` for whole rows."""

    execution_token: str
    field: str
    stored: object
    rebuilt: object


def verify(operation_id: int | None = None) -> list[Difference]:
    """Compare the stored projection with a fold of the events; writes nothing."""
    from api.models import StopMonitorExecution

    rebuilt = _replay(operation_id)
    qs = StopMonitorExecution.objects.all()
    if operation_id is not None:
        qs = qs.filter(operation_id=operation_id)
    stored = {row.execution_token: execution_state_of(row) for row in qs}
    diffs: list[Difference] = []
    for token, state in rebuilt.items():
        if token not in stored:
            diffs.append(Difference(token, "<missing>", None, state.status))
            continue
        for name in state_field_names():
            a, b = getattr(stored[token], name), getattr(state, name)
            if a != b:
                diffs.append(Difference(token, name, a, b))
    for token in stored.keys() - rebuilt.keys():
        diffs.append(Difference(token, "<extra>", stored[token].status, None))
    return diffs


def rebuild(operation_id: int | None = None) -> int:
    """Replace the projection (all, or one operation's) with the fold of the events; returns rows written."""
    from api.models import StopMonitorExecution

    states = _replay(operation_id)
    with transaction.atomic():
        qs = StopMonitorExecution.objects.all()
        if operation_id is not None:
            qs = qs.filter(operation_id=operation_id)
        qs.delete()
        for state in states.values():
            save_execution_state(state)
    return len(states)
