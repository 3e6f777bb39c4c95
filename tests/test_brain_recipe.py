"""The brain training recipe (configs/brain_mindboggle.json over train.json) and its datalist split."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
DATALIST = REPO / "configs" / "datalists" / "brain_mindboggle.json"


def _subject(path: str) -> str:
    return Path(path).parent.name


def test_split_is_by_subject_and_the_test_subjects_are_never_seen():
    raw = json.loads(DATALIST.read_text())
    splits = {name: {_subject(s["image"]) for s in raw[name]} for name in ("training", "validation", "test")}
    assert not splits["training"] & splits["validation"]
    assert not (splits["training"] | splits["validation"]) & splits["test"]
    assert len(splits["test"]) >= 3 and all(s.startswith("oasis_trt_") for s in splits["test"])
    # the reference of the affine stage is a training subject, never a validation or test one
    assert _subject(raw["reference"]) in splits["training"]
    # every labelled subject has the Mindboggle label map; the label values cover the one-hot channels
    assert len(raw["label_values"]) == len(set(raw["label_values"])) == len(raw["labels"])


def test_recipe_records_its_settings():
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json"), str(REPO / "configs" / "brain_mindboggle.json")])
    parser["bundle_root"] = str(REPO)
    get = parser.get_parsed_content
    assert get("spacing") == [2.0, 2.0, 2.0] and get("roi_size") == [64, 64, 64] and get("intensity") == "mr"
    assert get("learning_rate") == 1e-4 and get("amp") is True
    loss = get("loss")
    assert (loss.sim_weight, loss.smooth_weight, loss.dice_weight, loss.fold_weight) == (2.0, 4.0, 1.0, 500.0)
    assert get("pretrained_ckpt").endswith("models/model.pt")


def _run(tmp_path: Path, datalist: Path, num_epochs: int, resume: bool, shared: Path, name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAN_SHARED_DATA": str(shared)}
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        f"['{REPO / 'configs' / 'train.json'}','{REPO / 'configs' / 'brain_mindboggle.json'}']",
        "--bundle_root",
        str(REPO),
        "--datalist",
        str(datalist),
        "--ckpt_dir",
        str(tmp_path / name / "models"),
        "--output_dir",
        str(tmp_path / name / "eval"),
        "--align_cache",
        str(tmp_path / "affine_cache"),
        "--spacing",
        "[4.0,4.0,4.0]",
        "--roi_size",
        "[32,32,32]",
        "--pairs_per_epoch",
        "2",
        "--num_epochs",
        str(num_epochs),
        "--resume",
        str(resume),
        "--progress_bar",
        "False",
    ]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_resuming_the_recipe_continues_its_learning_curve(shared_data: Path, tmp_path: Path):
    """Four subjects of the split at 4 mm: 2 epochs, then resumed to 4, against 4 epochs at once. The resumed run
    starts at epoch 3 and its validation Dice and folding per epoch are those of the uninterrupted run."""
    raw = json.loads(DATALIST.read_text())
    small = {
        **raw,
        "training": [s for s in raw["training"] if "label" in s][:2],
        "validation": raw["validation"][:2],
        "test": [],
    }
    datalist = tmp_path / "small.json"
    datalist.write_text(json.dumps(small))
    if not (shared_data / small["training"][0]["image"]).is_file():
        pytest.skip("Mindboggle subjects not in the shared data")
    straight = _run(tmp_path, datalist, 4, False, shared_data, "straight")
    _run(tmp_path, datalist, 2, False, shared_data, "resumed")
    resumed = _run(tmp_path, datalist, 4, True, shared_data, "resumed")
    pattern = r"Epoch\[(\d+)\] Metrics -- val_folding_percent: ([0-9.]+) val_mean_dice: ([0-9.]+)"
    curve = {int(e): (float(f), float(d)) for e, f, d in re.findall(pattern, straight)}
    after = {int(e): (float(f), float(d)) for e, f, d in re.findall(pattern, resumed)}
    assert sorted(curve) == [1, 2, 3, 4] and sorted(after) == [3, 4], resumed[-2000:]
    for epoch in (3, 4):
        assert after[epoch][1] == pytest.approx(curve[epoch][1], abs=2e-3), (epoch, after, curve)
        assert after[epoch][0] == pytest.approx(curve[epoch][0], abs=0.05), (epoch, after, curve)
