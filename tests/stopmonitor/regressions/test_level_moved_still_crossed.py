"""The stop is moved (operations.move_levels) between the pass's load and begin_close's row lock,
to a level the pass's fresh quote ALSO crosses. begin_close compares the new level with the
loaded one and skips (LEVEL_MOVED) instead of re-evaluating: the position stays open for a whole
extra pass (60 s) with its stop crossed, and no event says why (invariant 6, "no silent skips")."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from stopmonitor.operations import move_levels

from .conftest import NOW
from .helpers import refresh, run, types

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_stop_moved_to_another_crossed_level_still_closes_in_this_pass(paper, open_op):
    op = open_op(stop="9200")
    paper.set_quote("BTCUSDT", "9150", "9150.01")
    real = paper.book_tickers
    moved = []

    def tickers(symbols):
        if not moved:  # after load_watched, before the lock: the user tightens the stop to 9180
            moved.append(move_levels(op.pk, stop_price=D("9180"), now=NOW))
        return real(symbols)

    paper.book_tickers = tickers
    summary, decisions = run(paper)
    assert refresh(op).status == "CLOSED", (
        f"bid 9150 <= new stop 9180 but: {[(d.action, d.reason) for d in decisions]}; stream {types(op)}")
