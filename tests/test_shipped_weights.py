"""The shipped ``models/model.pt`` registers unseen brains better than the affine stage alone, without folding.

The pairs are every ordered pair of the test subjects of ``configs/datalists/brain_mindboggle.json`` (Mindboggle-101
OASIS-TRT-20 subjects 13, 14 and 15; Klein & Tourville 2012, CC BY-NC-SA 3.0), which no training and no model
selection saw, read from ``../shared/data`` (``conftest.shared_data``; skipped when absent). Each pair goes through
``ran-register``'s pipeline with the network alone (no instance optimisation): the affine stage, the network on the
2 mm grid of the fixed brain, and the whole mapping on the fixed image's own 1 mm grid, where Dice (labels of at
least 100 voxels) and folding (det J <= 0 inside the fixed foreground) are counted, as in the comparison run of
``docs/results.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ran_bundle.data import load_datalist
from ran_bundle.pipeline import RegistrationPipeline

REPO = Path(__file__).resolve().parents[1]
#: mean Dice gain of the network alone over the affine stage on the test pairs (measured 0.078, below); the 0.2.0
#: weights lose Dice there (0.402 against the affine stage's 0.415 on 13->14), so this test fails on them
MIN_DICE_GAIN = 0.06
#: folding bound of the network alone (% det J <= 0 in the fixed foreground), every pair
MAX_FOLDING_PERCENT = 0.5
# measured with the 0.3.0 weights (docs/results.md, row 'RAN'): mean Dice 0.496 against the affine stage's 0.418
# (gain 0.078, per pair 0.064-0.095), folding 0.23-0.47% per pair; the 0.4.0 weights on pairs 13->14 and 13->15:
# gains 0.082 and 0.079, folding 0.10% and 0.12%


@pytest.mark.slow
def test_shipped_weights_beat_the_affine_stage_on_the_test_subjects_without_folding(shared_data: Path):
    data = load_datalist(REPO / "configs" / "datalists" / "brain_mindboggle.json", base_dir=shared_data)
    pairs = data["test_pairs"]
    assert len(pairs) == 6
    torch.set_num_threads(2)
    pipe = RegistrationPipeline(io_iterations=(0, 0), progress=False)
    gains, folding = [], []
    for pair in pairs:
        registration = pipe.register(
            pair["fixed_image"], pair["moving_image"], pair["fixed_label"], pair["moving_label"]
        )
        dice = registration.stats["dice"]
        gains.append(dice["mean_registered_100"] - dice["mean_affine_100"])
        folding.append(registration.stats["non_positive_jacobian_percent"])
    print(f"Dice gains over the affine stage {np.round(gains, 4).tolist()}, folding % {np.round(folding, 3).tolist()}")
    assert np.mean(gains) > MIN_DICE_GAIN and min(gains) > 0, gains
    assert max(folding) < MAX_FOLDING_PERCENT, folding
