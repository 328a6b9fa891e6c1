"""``backfill_stop_price``'s model path (:meth:`Backfill._batch`, the one other databases than
PostgreSQL run) against its set-based path (:meth:`Backfill._batch_sql`) on the same rows: the
same levels, events, skip lines and counters. The model path is forced by sending the SQL batch
to it; on SQLite the command takes the model path by itself and the comparison still holds."""

from __future__ import annotations

import json
from decimal import Decimal as D
from io import StringIO

import pytest
from django.core.management import call_command

from api.management.commands import backfill_stop_price as bf

pytestmark = pytest.mark.django_db(transaction=True)

# (symbol, side, entry, stop_pct, target_pct, status, quantity, stop_price)
ROWS = [
    ("BTCUSDT", "BUY", "9300", "2.5", "3.333", "ACTIVE", "1", None),  # both levels
    ("BTCUSDT", "SELL", "43251.37", "1.7", None, "PLANNED", "1", None),  # a short's stop
    ("ADAUSDT", "SELL", "0.3852", None, "12.5", "ACTIVE", "100", None),  # a short's target only
    ("BTCUSDT", "BUY", "9300", "2.5", "3.333", "ACTIVE", "1", "9000"),  # the stop is set: the target only
    ("BTCUSDT", "BUY", None, "2.5", None, "ACTIVE", "1", None),  # no_entry_price
    ("NOTICKUSDT", "BUY", "10", "2.5", None, "ACTIVE", "1", None),  # no_tick_size
    ("BTCUSDT", "BUY", "9300", "100", "3", "ACTIVE", "1", None),  # percent_out_of_range (the stop only)
    ("BTCUSDT", "BUY", "100", "0.001", None, "ACTIVE", "1", None),  # wrong_side after rounding
    ("BTCUSDT", "BUY", "9600", "6.25", None, "ACTIVE", "0.00053", None),  # below_min_notional_at_stop
    ("BTCUSDT", "BUY", "9300", "2.5", None, "CLOSED", "1", None),  # not open: not a candidate
]


def _model_batch(self, last_id: int, size: int) -> tuple[int, int]:
    """What :meth:`Backfill._next_batch` does on a database other than PostgreSQL."""
    ids = list(bf.candidates_query(self.tenant_id).filter(pk__gt=last_id).order_by("pk")
               .values_list("pk", flat=True)[:size])
    if ids:
        self._with_retry(lambda: self._batch(ids))
    return len(ids), (ids[-1] if ids else last_id)


@pytest.fixture
def tenants():
    from api.models import Client, Symbol

    made = {name: Symbol.objects.create(symbol=name, base_asset=name[:-4], quote_asset="USDT", tick_size=tick,
                                        min_notional=D("5"))
            for name, tick in (("BTCUSDT", D("0.01")), ("ADAUSDT", D("0.0001")), ("NOTICKUSDT", None))}
    return [_seed(Client.objects.create(name=name), made) for name in ("sql", "model")]


def _seed(client, symbols):
    from api.models import Operation

    for symbol, side, entry, stop_pct, target_pct, status, qty, stop in ROWS:
        Operation.objects.create(
            client=client, symbol=symbols[symbol], side=side, status=status, quantity=D(qty),
            entry_price=None if entry is None else D(entry),
            stop_loss_percent=None if stop_pct is None else D(stop_pct),
            stop_gain_percent=None if target_pct is None else D(target_pct),
            stop_price=None if stop is None else D(stop))
    return client


def _run(tenant, *args) -> tuple[list[dict], dict]:
    """The command's JSON lines for ``tenant`` with operation ids replaced by their position."""
    from api.models import Operation

    out = StringIO()
    try:
        call_command("backfill_stop_price", "--json", "--batch-size", "4", "--tenant", str(tenant.pk), *args,
                     stdout=out, stderr=StringIO())
    except SystemExit:
        pass
    position = {pk: i for i, pk in enumerate(Operation.objects.filter(client=tenant).order_by("pk")
                                             .values_list("pk", flat=True))}
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        if "operation_id" in line:
            line["operation_id"] = position[line["operation_id"]]
        for skip in line.get("skips", []):
            skip["operation_id"] = position[skip["operation_id"]]
        line.pop("duration_s", None)
        line.pop("rows_per_s", None)
    return lines[:-1], lines[-1]


def _state(tenant) -> list:
    from api.models import Operation, StopMonitorEvent

    return [(op.stop_price, op.target_price,
             [(e.event_type, e.version, e.source, e.venue, e.payload)
              for e in StopMonitorEvent.objects.filter(operation_id=op.pk).order_by("version")])
            for op in Operation.objects.filter(client=tenant).order_by("pk")]


@pytest.mark.parametrize("args", [(), ("--dry-run",)], ids=["write", "dry-run"])
def test_the_model_path_writes_and_reports_what_the_sql_path_does(tenants, monkeypatch, args):
    sql, model = tenants
    sql_lines, sql_summary = _run(sql, *args)
    monkeypatch.setattr(bf.Backfill, "_batch_sql", _model_batch)
    model_lines, model_summary = _run(model, *args)

    assert model_lines == sql_lines
    assert model_summary == sql_summary
    assert _state(model) == _state(sql)
    assert sql_summary["skipped_by_reason"] == {"below_min_notional_at_stop": 1, "no_entry_price": 1,
                                                "no_tick_size": 1, "percent_out_of_range": 1, "wrong_side": 1}
    assert (sql_summary["updated"], sql_summary["stops_set"], sql_summary["targets_set"]) == (4, 2, 3)


def test_the_model_path_falls_back_to_one_append_per_operation_and_skips_a_moved_stream(tenants, monkeypatch):
    """The bulk append refused (a stream moved): one append per operation; the one that moved is
    skipped as ``conflict`` and the others written."""
    from stopmonitor import events

    sql, model = tenants
    _run(sql)
    real_append = events.append_events
    first = {}

    def bulk_refused(*args, **kwargs):
        raise events.ConcurrencyConflict("a stream moved")

    def append_events(op, version, evs, **kwargs):
        first.setdefault("pk", op.pk)
        if op.pk == first["pk"]:
            raise events.ConcurrencyConflict(f"operation {op.pk}: stream moved")
        return real_append(op, version, evs, **kwargs)

    monkeypatch.setattr(bf.Backfill, "_batch_sql", _model_batch)
    monkeypatch.setattr(events, "append_many", bulk_refused)
    monkeypatch.setattr(events, "append_events", append_events)
    lines, summary = _run(model)

    assert {"type": "skip", "operation_id": 0, "field": None, "reason": "conflict",
            "detail": f"operation {first['pk']}: stream moved"} in lines
    assert (summary["updated"], summary["stops_set"], summary["targets_set"]) == (3, 1, 2)
    assert summary["skipped_by_reason"]["conflict"] == 1
    assert _state(model)[0] == (None, None, [])
    assert _state(model)[1:] == _state(sql)[1:]
