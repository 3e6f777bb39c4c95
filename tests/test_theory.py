"""Capture range and separability (paper eq. 4-9) against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ran_bundle.theory import capture_range, covers_image, preset_theory, separability

# a three-level pyramid, pools 4, 2, 1, two undilated convolutions per level:
# s = p (1 + 2*2) = 20, 10, 5  ->  a = 9.5, 4.5, 2.0
# tails S_k = 16, 6.5, 2; thresholds t_k = p_k + 2 S_{k+1} = 4 + 13 = 17, 2 + 4 = 6, 1
POOLS = [4, 2, 1]
RATES = [(1, 1)] * 3


def test_capture_range_by_hand():
    assert capture_range(POOLS, RATES) == [9.5, 4.5, 2.0]


@pytest.mark.parametrize(("p", "expected"), [(0, 0), (0.5, 0), (1, 4), (5, 4), (6, 13), (16, 13), (17, 32), (100, 32)])
def test_separability_by_hand(p, expected):
    assert separability(p, POOLS, RATES) == expected


def test_global_reach_eq6():
    assert covers_image(POOLS, RATES, (9, 9)) is True  # 20 >= 19
    assert covers_image(POOLS, RATES, (10, 9)) is False  # 20 < 21


def test_bad_levels_are_named():
    with pytest.raises(ValueError, match="one dilation vector per level"):
        capture_range([2, 1], [(1, 1)])
    with pytest.raises(ValueError, match="must not increase"):
        capture_range([1, 2], [(1, 1), (1, 1)])


def test_presets_keep_capture_range_and_raise_separability():
    """Paper Fig. 3(c)(d): similar capture range, larger area under Delta for higher q."""
    theories = {name: preset_theory(name) for name in ("RAn0", "RAn3", "RAn4")}
    first_ranges = [t["capture_range"][0] for t in theories.values()]
    assert max(first_ranges) / min(first_ranges) < 1.3
    assert theories["RAn0"]["area"] < theories["RAn3"]["area"] < theories["RAn4"]["area"]
    assert theories["RAn3"]["pool_sizes"] == [2, 2, 2, 2, 1]
    assert theories["RAn4"]["dilations"][0] == (16, 16)
    assert np.all(np.diff(theories["RAn4"]["separability"]) >= 0)
