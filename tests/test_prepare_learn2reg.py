"""``scripts/prepare_learn2reg.py`` on fake Learn2Reg releases built from the real images of ``data/tiny_ct``.

The fake folders copy the releases' layouts (a dataset JSON with ``"training"`` entries and a ``"labels"`` table,
``imagesTr``/``labelsTr``/``masksTr``; the 2020 lung ``scans``/``lungMasks`` layout) with symbolic links to the
tiny_ct files, so every datalist written is loaded back with :func:`ran_bundle.data.load_datalist` and a pair is
preprocessed with the override configs' settings.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from ran_bundle.data import load_datalist
from ran_bundle.transforms import registration_transforms


@pytest.fixture(scope="module")
def prep(repo_root):
    spec = importlib.util.spec_from_file_location("prepare_learn2reg", repo_root / "scripts" / "prepare_learn2reg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the tiny_ct label values under Learn2Reg-like names; the values are NOT Learn2Reg's, so they must be
#: found by name (esophagus is listed though absent from the images)
LABEL_TABLE = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gall bladder",
    "5": "liver",
    "6": "stomach",
    "7": "aorta",
    "8": "inferior vena cava",
    "9": "portal vein and splenic vein",
    "10": "pancreas",
    "11": "esophagus",
}


def _link(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst.name


def fake_abdomen(root: Path, tiny: Path, n: int, registration_val: list | None = None) -> Path:
    """``AbdomenCTCT_dataset.json`` + ``imagesTr``/``labelsTr``/``masksTr`` of ``n`` cases (tiny_ct files cycled)."""
    training = []
    for k in range(1, n + 1):
        src = f"subject_{(k - 1) % 6:02d}.nii.gz"
        name = f"AbdomenCTCT_{k:04d}_0000.nii.gz"
        _link(tiny / "images" / src, root / "imagesTr" / name)
        _link(tiny / "labels" / src, root / "labelsTr" / name)
        _link(tiny / "labels" / src, root / "masksTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "mask": f"./masksTr/{name}"})
    _link(tiny / "images" / "subject_00.nii.gz", root / "imagesTs" / "AbdomenCTCT_0099_0000.nii.gz")
    raw = {
        "name": "AbdomenCTCT",
        "release": "fake",
        "labels": LABEL_TABLE,
        "training": training,
        "test": [{"image": "./imagesTs/AbdomenCTCT_0099_0000.nii.gz"}],
    }
    if registration_val is not None:
        raw["registration_val"] = registration_val
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(raw))
    return root


def fake_nlst(root: Path, tiny: Path, n: int) -> Path:
    """``NLST_dataset.json``: ``n`` cases with two time points each (``_0000``, ``_0001``) and lung masks."""
    training = []
    for k in range(1, n + 1):
        for phase in (0, 1):
            src = f"subject_{(k + phase) % 6:02d}.nii.gz"
            name = f"NLST_{k:04d}_{phase:04d}.nii.gz"
            _link(tiny / "images" / src, root / "imagesTr" / name)
            _link(tiny / "labels" / src, root / "masksTr" / name)
            training.append({"image": f"./imagesTr/{name}", "mask": f"./masksTr/{name}"})
    (root / "NLST_dataset.json").write_text(json.dumps({"name": "NLST", "labels": {}, "training": training}))
    return root


def test_abdomen_paper_split(prep, tiny_ct, tmp_path):
    """30 subjects -> the paper's 23 training (21 + 2 validation) and 7 test subjects, 42 test pairs, 9 organs."""
    root = fake_abdomen(tmp_path / "AbdomenCTCT", tiny_ct, 30)
    out = tmp_path / "out" / "abdomen.json"
    assert prep.main(["abdomen", "--root", str(root), "--out", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert (len(raw["training"]), len(raw["validation"]), len(raw["test"])) == (21, 2, 7)
    assert len(raw["test_pairs"]) == 42 and [0, 1] in raw["test_pairs"] and [1, 0] in raw["test_pairs"]
    # 9 organs found by name, at this fake release's values (esophagus 11), background and extra organs dropped
    assert raw["labels"] == {
        "1": "spleen",
        "2": "right kidney",
        "3": "left kidney",
        "5": "liver",
        "7": "aorta",
        "8": "inferior vena cava",
        "9": "portal and splenic vein",
        "10": "pancreas",
        "11": "esophagus",
    }
    # subjects sorted by case id, the last 7 are test; the unlabelled test entry is not used
    assert raw["test"][0]["image"].endswith("AbdomenCTCT_0024_0000.nii.gz")
    assert raw["training"][0]["label"].endswith("labelsTr/AbdomenCTCT_0001_0000.nii.gz")
    assert not any("0099" in s["image"] for k in ("training", "validation", "test") for s in raw[k])
    data = load_datalist(out)
    assert len(data["test_pairs"]) == 42 and all("moving_label" in p for p in data["test_pairs"])
    assert data["validation_pairs"][0]["moving_image"] != data["validation_pairs"][0]["fixed_image"]


def test_abdomen_small_split_relative_and_config(prep, repo_root, tiny_ct, tmp_path):
    """Options --num-test/--num-val/--relative; the datalist runs through abdomen_ct.json's preprocessing."""
    root = fake_abdomen(tmp_path / "rel", tiny_ct, 6)
    out = tmp_path / "lists" / "abdomen.json"
    argv = ["abdomen", "--root", str(root), "--out", str(out), "--num-test", "2", "--num-val", "0", "--relative"]
    assert prep.main(argv) == 0
    raw = json.loads(out.read_text())
    assert "validation" not in raw and (len(raw["training"]), len(raw["test"])) == (4, 2)
    assert raw["test_pairs"] == [[0, 1], [1, 0]]
    assert raw["test"][0]["image"] == "../rel/imagesTr/AbdomenCTCT_0005_0000.nii.gz"
    pair = load_datalist(out)["test_pairs"][0]

    parser = ConfigParser()
    parser.read_config([str(repo_root / "configs" / "train.json"), str(repo_root / "configs" / "abdomen_ct.json")])
    parser["bundle_root"] = str(repo_root)
    parser["resolution_mm"] = 6.0  # the override mechanism of --resolution_mm, at a toy resolution
    assert parser.get_parsed_content("spacing") == [6.0, 6.0, 6.0]
    assert parser.get_parsed_content("roi_size") == [43] * 3  # 128 * 2 / 6, not a multiple of 16: eval only here
    xform = registration_transforms(
        "eval", spacing=parser.get_parsed_content("spacing"), intensity=parser.get_parsed_content("intensity")
    )
    d = xform(pair)
    assert d["moving_image"].shape[1:] == d["fixed_label"].shape[1:] == (64, 48, 16)  # 112x80x30 at 3 mm -> 6 mm
    assert 0.0 <= float(d["moving_image"].min()) and float(d["moving_image"].max()) <= 1.0
    assert set(d["fixed_label"].unique().tolist()) <= {float(v) for v in range(11)}


def test_configs_record_the_paper_protocol(repo_root):
    """abdomen_ct.json: 2 mm (4 mm option), 9 organs, NCC 2 + smooth 0.5; lung_ct.json: 1 mm, MSE 2 + smooth 0.05."""

    def parsed(name: str, **over):
        p = ConfigParser()
        p.read_config([str(repo_root / "configs" / "train.json"), str(repo_root / "configs" / f"{name}.json")])
        p["bundle_root"] = str(repo_root)
        for k, v in over.items():
            p[k] = v
        return p

    abd = parsed("abdomen_ct")
    assert abd.get_parsed_content("spacing") == [2.0] * 3 and abd.get_parsed_content("intensity") == "ct"
    assert parsed("abdomen_ct", resolution_mm=4.0).get_parsed_content("roi_size") == [64] * 3
    assert abd.get_parsed_content("validate#key_metric#val_mean_dice#metric_fn").labels == [1, 2, 3, 5, 6, 8, 9, 10, 11]
    loss = abd.get_parsed_content("loss")
    assert type(loss.similarity).__name__ == "LocalNCCLoss" and (loss.sim_weight, loss.smooth_weight) == (2.0, 0.5)
    assert loss.smoothness.edge_weight == 25.0
    assert (
        abd.get_parsed_content("learning_rate") == 1e-4 and abd.get_parsed_content("train#dataloader#batch_size") == 3
    )
    steps = abd.get_parsed_content("pairs_per_epoch") * abd.get_parsed_content("num_epochs") // 3
    assert steps == 100_000  # the paper's iterations on real data
    lung = parsed("lung_ct")
    assert lung.get_parsed_content("spacing") == [1.0] * 3
    loss = lung.get_parsed_content("loss")
    assert type(loss.similarity).__name__ == "MaskedMSELoss" and loss.similarity.mask_threshold == 0.01
    assert (loss.sim_weight, loss.smooth_weight, loss.smoothness.edge_weight) == (2.0, 0.05, 9.0)


def test_lung_json_one_phase_per_subject(prep, tiny_ct, tmp_path):
    """NLST-style JSON: one time point per case (--phase), masks as label 1; paper split 12 / 8, 56 test pairs."""
    root = fake_nlst(tmp_path / "NLST", tiny_ct, 20)
    out = tmp_path / "lung.json"
    assert prep.main(["lung", "--root", str(root), "--out", str(out), "--phase", "0001"]) == 0
    raw = json.loads(out.read_text())
    assert raw["labels"] == {"1": "lung"}
    assert (len(raw["training"]), len(raw["validation"]), len(raw["test"]), len(raw["test_pairs"])) == (10, 2, 8, 56)
    subjects = [s for k in ("training", "validation", "test") for s in raw[k]]
    assert all(s["image"].endswith("_0001.nii.gz") and "masksTr" in s["label"] for s in subjects)
    assert len({s["image"] for s in subjects}) == 20
    load_datalist(out)


def test_lung_2020_layout_and_learn2reg_split(prep, tiny_ct, tmp_path):
    """The 2020 task 2 folders (scans/, lungMasks/); the release's own registration_val pairs as test pairs."""
    root = tmp_path / "training"
    for k in range(1, 7):
        for phase in ("exp", "insp"):
            src = f"subject_{(k - 1) % 6:02d}.nii.gz"
            _link(tiny_ct / "images" / src, root / "scans" / f"case_{k:03d}_{phase}.nii.gz")
            _link(tiny_ct / "labels" / src, root / "lungMasks" / f"case_{k:03d}_{phase}.nii.gz")
    out = tmp_path / "lung2020.json"
    assert prep.main(["lung", "--root", str(root), "--out", str(out), "--num-test", "2", "--num-val", "0"]) == 0
    raw = json.loads(out.read_text())
    assert [Path(s["image"]).name for s in raw["test"]] == ["case_005_exp.nii.gz", "case_006_exp.nii.gz"]
    assert all(Path(s["label"]).parent.name == "lungMasks" for s in raw["training"])

    val = [{"fixed": "./imagesTr/AbdomenCTCT_0005_0000.nii.gz", "moving": "./imagesTr/AbdomenCTCT_0006_0000.nii.gz"}]
    abd = fake_abdomen(tmp_path / "abd", tiny_ct, 6, registration_val=val)
    out = tmp_path / "l2r.json"
    assert prep.main(["abdomen", "--root", str(abd), "--out", str(out), "--split", "learn2reg", "--num-val", "2"]) == 0
    raw = json.loads(out.read_text())
    assert [Path(s["image"]).name[12:16] for s in raw["test"]] == ["0006", "0005"]
    assert raw["test_pairs"] == [[0, 1]] and len(raw["training"]) == 2 and len(raw["validation"]) == 2
    pair = load_datalist(out)["test_pairs"][0]
    assert pair["moving_image"].endswith("0006_0000.nii.gz") and pair["fixed_label"].endswith("0005_0000.nii.gz")


def test_missing_files_fail_clearly(prep, tiny_ct, tmp_path, capsys):
    """No download: a missing dataset JSON, image or mask stops with exit code 2 and the missing path named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prep.main(["abdomen", "--root", str(empty), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert str(empty / "AbdomenCTCT_dataset.json") in err and "learn2reg.grand-challenge.org" in err
    assert not (tmp_path / "x.json").exists()

    assert prep.main(["lung", "--root", str(empty), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "LungCT_dataset.json" in err and "NLST_dataset.json" in err and "zenodo" in err

    root = fake_abdomen(tmp_path / "broken", tiny_ct, 6)
    (root / "labelsTr" / "AbdomenCTCT_0003_0000.nii.gz").unlink()
    assert prep.main(["abdomen", "--root", str(root), "--out", str(tmp_path / "x.json"), "--num-test", "2"]) == 2
    assert str(root / "labelsTr" / "AbdomenCTCT_0003_0000.nii.gz") in capsys.readouterr().err

    lung = tmp_path / "lung2020"
    _link(tiny_ct / "images" / "subject_00.nii.gz", lung / "scans" / "case_001_exp.nii.gz")
    (lung / "lungMasks").mkdir()
    assert prep.main(["lung", "--root", str(lung), "--out", str(tmp_path / "x.json")]) == 2
    assert str(lung / "lungMasks" / "case_001_exp.nii.gz") in capsys.readouterr().err

    bad_split = fake_abdomen(tmp_path / "few", tiny_ct, 6)
    assert prep.main(["abdomen", "--root", str(bad_split), "--out", str(tmp_path / "x.json")]) == 2  # 7 test of 6
    assert "--num-test" in capsys.readouterr().err
