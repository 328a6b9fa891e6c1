"""Finding.final_fill: executed (all or part) and final is the exchange's fill to record; nothing else is."""

from decimal import Decimal as D

import pytest

from stopmonitor.protection import Finding


@pytest.mark.parametrize("finding, expected", [
    (Finding("FILLED", D("1"), True), True),
    (Finding("PARTIAL", D("0.4"), True), True),
    (Finding("PARTIAL", D("0.4"), False), False),  # more can come: not yet
    (Finding("GONE", final=True), False),
    (Finding("RESTING"), False),
    (Finding("NOT_VISIBLE"), False),
])
def test_final_fill(finding, expected):
    assert finding.final_fill is expected
