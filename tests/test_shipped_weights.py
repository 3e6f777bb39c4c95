"""The shipped ``models/model.pt`` registers the unseen brain MR subject better than doing nothing.

The pairs are the validation pairs of ``configs/datalists/brain_mr.json``: OASIS subject B (never a training
image) to subject A and back, from ``../shared/data`` (``conftest.shared_data``; skipped when absent). They are
preprocessed as the bundle's evaluation does at the weights' resolution (2 mm, MR percentile scaling) and scored
on the grey and white matter labels with the bundle's metrics. The model card's table comes from the same
computation through ``configs/evaluate.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate

from ran_bundle.data import load_datalist
from ran_bundle.engines import prepare_batch
from ran_bundle.fields import spacing_of
from ran_bundle.metrics import evaluate_pair
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.networks.blocks import warp
from ran_bundle.synthetic import load_pretrained
from ran_bundle.transforms import registration_transforms

MIN_DICE_GAIN = 0.02  # mean Dice over both pairs; measured +0.028 (0.640 -> 0.668, see the model card)
MAX_FOLDING_PERCENT = 3.0  # voxels with det J <= 0 inside the fixed labels; measured 0.4% and 0.8%


def _mean_row(rows: list[dict]) -> dict:
    """The ``label="mean"`` row of :func:`evaluate_pair`: Dice averaged over the labels, folding in their union."""
    return next(r for r in rows if r["label"] == "mean")


def test_shipped_weights_raise_overlap_on_the_unseen_subject_without_much_folding(repo_root, shared_data):
    data = load_datalist(repo_root / "configs" / "datalists" / "brain_mr.json", base_dir=shared_data)
    pre = registration_transforms("eval", spacing=(2.0, 2.0, 2.0), intensity="mr", with_labels=True)
    net = load_pretrained(ResidualAlignerNetwork(3, "ref"), str(repo_root / "models" / "model.pt"), "cpu").eval()
    identity, registered, folding = [], [], []
    with torch.no_grad():
        for pair in data["validation_pairs"]:
            batch = list_data_collate([pre(pair)])
            inputs, _ = prepare_batch(batch, "cpu")
            moving_label, fixed_label = batch["moving_label"].as_tensor(), batch["fixed_label"][0, 0]
            spacing = spacing_of(np.asarray(batch["fixed_image"].affine[0]))
            ddf = net(inputs)
            zero = torch.zeros_like(ddf[0])
            before = _mean_row(evaluate_pair(moving_label[0, 0], fixed_label, zero, spacing, [1, 2]))
            warped_label = warp(moving_label, ddf, mode="nearest")[0, 0]
            after = _mean_row(evaluate_pair(warped_label, fixed_label, ddf[0], spacing, [1, 2]))
            identity.append(before["dice"])
            registered.append(after["dice"])
            folding.append(after["non_pos_jac_percent"])
    assert len(registered) == 2
    assert np.mean(registered) > np.mean(identity) + MIN_DICE_GAIN, (identity, registered)
    assert min(r - i for r, i in zip(registered, identity, strict=True)) > 0, (identity, registered)
    assert max(folding) < MAX_FOLDING_PERCENT, folding


def test_finetune_config_records_the_recipe_of_the_shipped_weights(repo_root):
    """brain_mr_finetune.json over brain_mr.json: 2 mm, 48^3 crops, lr 1e-4, 6 x 70 pairs, smoothness weight 4."""
    parser = ConfigParser()
    names = ("train", "brain_mr", "brain_mr_finetune")
    parser.read_config([str(repo_root / "configs" / f"{name}.json") for name in names])
    parser["bundle_root"] = str(repo_root)
    assert parser.get_parsed_content("spacing") == [2.0] * 3 and parser.get_parsed_content("roi_size") == [48] * 3
    assert parser.get_parsed_content("learning_rate") == 1e-4
    assert parser.get_parsed_content("pairs_per_epoch") * parser.get_parsed_content("num_epochs") == 420
    loss = parser.get_parsed_content("loss")
    assert (loss.sim_weight, loss.smooth_weight) == (2.0, 4.0)
    smoothness = loss.smoothness  # the released code's edge-aware form, as in stage 1
    assert (smoothness.mode, smoothness.p, smoothness.edge_weight) == ("code", 1, 25.0)
