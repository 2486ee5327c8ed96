"""The refresh schedule: every-N and atlas-style piecewise specs."""

from __future__ import annotations

import pytest

from openbook.refresher.schedule import RefreshSchedule


def _due(spec, upto):
    s = RefreshSchedule(spec)
    return [t for t in range(upto) if s.due(t)]


def test_every_n():
    assert _due("10", 35) == [10, 20, 30]
    assert _due(3, 10) == [3, 6, 9]


def test_piecewise_matches_a_direct_enumeration():
    got = _due("0-100:10,100-:500", 1200)
    expected = [t for t in range(1, 100) if t % 10 == 0] + [t for t in range(100, 1200) if (t - 100) % 500 == 0]
    assert got == expected == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 600, 1100]


def test_closed_last_piece_stops():
    assert _due("0-20:5", 50) == [5, 10, 15]
    assert RefreshSchedule("0-20:5").interval(25) is None


@pytest.mark.parametrize("spec", ["0", "", "off"])
def test_disabled(spec):
    assert not RefreshSchedule(spec).enabled
    assert _due(spec, 100) == []


@pytest.mark.parametrize("spec", ["abc", "0-10:0", "10-5:2", "0-:10,5-:3", "0-10:2,5-20:3"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="refresh schedule"):
        RefreshSchedule(spec)
