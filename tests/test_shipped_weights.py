"""The shipped ``models/model.pt`` registers the unseen brain MR subject better than doing nothing.

The pairs are the validation pairs of ``configs/datalists/brain_mr.json``: OASIS subject B (never a training
image) to subject A and back, from ``../shared/data`` (``conftest.shared_data``; skipped when absent). They are
scored by :mod:`ran_bundle.evaluation` (what ``scripts/compare.py`` scores with): the bundle's evaluation
preprocessing at the weights' resolution (2 mm, MR percentile scaling) and its metrics, on the grey and white
matter labels. The model card's table comes
from the same preprocessing and metrics through ``configs/evaluate.json``.
"""

from __future__ import annotations

import numpy as np
from monai.bundle import ConfigParser

from ran_bundle.data import load_datalist
from ran_bundle.evaluation import evaluate_model, evaluation_pairs
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.synthetic import load_pretrained

MIN_DICE_GAIN = 0.02  # mean Dice over both pairs; measured +0.028 (0.640 -> 0.668, see the model card)
MAX_FOLDING_PERCENT = 3.0  # voxels with det J <= 0 inside the fixed labels; measured 0.4% and 0.8%


def _mean_rows(rows: list[dict]) -> dict[str, dict]:
    """``{pair: row}`` of the ``label="mean"`` rows: Dice averaged over the labels, folding in their union."""
    return {r["pair"]: r for r in rows if r["label"] == "mean"}


def test_shipped_weights_raise_overlap_on_the_unseen_subject_without_much_folding(repo_root, shared_data):
    data = load_datalist(repo_root / "configs" / "datalists" / "brain_mr.json", base_dir=shared_data)
    pairs = evaluation_pairs(data["validation_pairs"], (2.0, 2.0, 2.0), "mr")
    net = load_pretrained(ResidualAlignerNetwork(3, "ref"), str(repo_root / "models" / "model.pt"), "cpu")
    identity = _mean_rows(evaluate_model(None, pairs, [1, 2], "cpu")["rows"])
    registered = _mean_rows(evaluate_model(net, pairs, [1, 2], "cpu")["rows"])
    assert len(registered) == 2 and registered.keys() == identity.keys()
    gains = [registered[p]["dice"] - identity[p]["dice"] for p in registered]
    assert np.mean(gains) > MIN_DICE_GAIN and min(gains) > 0, gains
    folding = [r["non_pos_jac_percent"] for r in registered.values()]
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
