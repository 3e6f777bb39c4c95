"""Atlas label propagation (ran_bundle.atlas, configs/atlas_inference.json) without MONAI Label.

The config is run the way MONAI Label's ``BundleInferTask`` runs it (bare parser, ``bundle_root`` and
``device`` set, the network built from ``network_def`` with ``models/model.pt``, the pre-transforms, the
inferer on ``data["image"][None]``, the post-transforms). The propagated labels are scored against the
target's own labels and against the affine stage alone (the same pipeline's ``to_world`` with a zero
deformable field): mean Dice over the target's labels of at least 100 voxels, as ``ran-register`` reports it.

To stay fast on 2 CPU cores, the brain atlas and target (two Mindboggle subjects of ``../shared/data``;
skipped when absent) are resampled to 3 mm and registered on a 3 mm network grid with 10 + 10
instance-optimisation iterations; the tiny CT atlas (``data/tiny_ct``) is stored at 3 mm already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from ran_bundle.atlas import ATLAS_STATE_KEY, AtlasRegistrationd, load_label_names
from ran_bundle.inputs import InputError
from ran_bundle.metrics import dice_per_label

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "atlas_inference.json"
FAST = {"spacing": 3.0, "io_iterations": [10, 10], "device": "cpu"}
ATLAS, TARGET = "oasis_trt_01", "oasis_trt_14"


def run_like_bundle_infer_task(image: Path, **overrides: Any) -> tuple[dict, np.ndarray, ConfigParser]:
    """Run ``configs/atlas_inference.json`` on ``image`` as ``BundleInferTask`` does, with config ``overrides``.

    Returns the post-processed data, the affine stage's label map alone (on the image grid) and the parser.
    """
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.config.update({"bundle_root": str(REPO), **overrides})
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(REPO / "models" / "model.pt", map_location="cpu")["model"])
    network.eval()
    data: dict = {"image": str(image)}
    for t in parser.get_parsed_content("preprocessing").transforms:
        data = t(data)
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SimpleInferer)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert tuple(data["pred"].shape) == (3, *data["image"].shape[1:])
    state = data[ATLAS_STATE_KEY]
    data = parser.get_parsed_content("postprocessing")(data)
    assert ATLAS_STATE_KEY not in data
    pipeline = parser.get_parsed_content("pipeline")
    zero = torch.zeros(1, 3, *state.pair.grid.shape)
    affine_only = pipeline.to_world(state.inputs, state.affine, state.pair.grid, zero)["warped_label"].numpy()
    return data, affine_only, parser


def mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the labels of ``ref`` with at least 100 voxels."""
    values, counts = np.unique(ref, return_counts=True)
    labels = [int(v) for v, c in zip(values, counts, strict=True) if v != 0 and c >= 100]
    return float(np.nanmean(list(dice_per_label(pred, ref, labels).values())))


def check_label_map(data: dict, image: Path, atlas_label: Path) -> np.ndarray:
    """The label map is on the image's grid as read, int32, holding atlas label values only; returns it."""
    pred = data["pred"]
    img = nib.load(image)
    assert tuple(pred.shape) == (1, *img.shape) and pred.dtype == torch.int32
    np.testing.assert_allclose(pred.affine.numpy(), img.affine, atol=1e-4)
    atlas = np.unique(np.asarray(nib.load(atlas_label).dataobj)).round().astype(int)
    assert set(np.unique(pred.numpy()).tolist()) <= set(atlas.tolist())
    return pred[0].numpy()


@pytest.fixture(scope="module")
def brain_pair(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, resample_isotropic) -> dict[str, Path]:
    """Mindboggle subject 01 (atlas) and 14 (target), images and labels, resampled to 3 mm."""
    src = shared_data / "mindboggle_oasis_trt20"
    if not all((src / s / f).is_file() for s in (ATLAS, TARGET) for f in ("image.nii.gz", "label.nii.gz")):
        pytest.skip(f"Mindboggle subjects {ATLAS} and {TARGET} not found under {src}")
    out = tmp_path_factory.mktemp("brain_atlas")
    files = {}
    for role, subject in (("atlas", ATLAS), ("target", TARGET)):
        for kind in ("image", "label"):
            files[f"{role}_{kind}"] = resample_isotropic(
                src / subject / f"{kind}.nii.gz", out / f"{role}_{kind}.nii.gz", 3.0, kind == "label"
            )
    return files


def test_brain_atlas_beats_the_affine_stage(brain_pair: dict[str, Path]) -> None:
    data, affine_only, parser = run_like_bundle_infer_task(
        brain_pair["target_image"],
        atlas_image=str(brain_pair["atlas_image"]),
        atlas_label=str(brain_pair["atlas_label"]),
        **FAST,
    )
    pipeline = parser.get_parsed_content("pipeline")
    assert (pipeline.intensity, pipeline.affine_stage) == ("mr", "affine")  # the brain weights' defaults
    pred = check_label_map(data, brain_pair["target_image"], brain_pair["atlas_label"])
    ref = np.asarray(nib.load(brain_pair["target_label"]).dataobj).round().astype(int)
    d_prop, d_affine = mean_dice(pred, ref), mean_dice(affine_only, ref)
    result = data["result"]
    print(
        f"\nbrain atlas {ATLAS} -> {TARGET} (3 mm): mean Dice {d_prop:.4f}, affine stage alone {d_affine:.4f}; {result}"
    )
    assert d_prop > d_affine + 0.03
    assert result["non_positive_jacobian_percent"] < 1.0 and result["affine_stage"] == "affine"
    assert "atlas_label_values_without_names" not in result  # every Mindboggle value is named in the datalist
    json.dumps(result)  # MONAI Label returns it as JSON


def test_tiny_ct_atlas_still_works(tiny_ct: Path) -> None:
    """The CT atlas of data/tiny_ct through the same config, by overriding the atlas keys and the intensity."""
    image, atlas_label = tiny_ct / "images" / "subject_03.nii.gz", tiny_ct / "labels" / "subject_00.nii.gz"
    data, affine_only, _ = run_like_bundle_infer_task(
        image,
        atlas_image=str(tiny_ct / "images" / "subject_00.nii.gz"),
        atlas_label=str(atlas_label),
        atlas_label_names=str(tiny_ct / "datalist.json"),
        intensity="ct",
        **FAST,
    )
    pred = check_label_map(data, image, atlas_label)
    ref = np.asarray(nib.load(tiny_ct / "labels" / "subject_03.nii.gz").dataobj).astype(int)
    d_prop, d_affine = mean_dice(pred, ref), mean_dice(affine_only, ref)
    print(f"\ntiny CT atlas subject_00 -> subject_03: mean Dice {d_prop:.4f}, affine stage alone {d_affine:.4f}")
    assert d_prop >= d_affine - 0.01 and d_prop > 0.8


def test_label_names_come_from_a_file(repo_root: Path, tiny_ct: Path, tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.config["bundle_root"] = str(repo_root)
    names = parser.get_parsed_content("label_names")  # the default: the brain datalist's names
    assert len(names) == 104 and names[17] == "Left-Hippocampus" and 0 not in names
    assert load_label_names(tiny_ct / "datalist.json")[1] == "spleen"
    plain = tmp_path / "names.json"
    plain.write_text(json.dumps({"0": "background", "2": "b", "1": "a"}))
    assert load_label_names(plain) == {1: "a", 2: "b"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"one": "a"}))
    with pytest.raises(InputError, match="expected a JSON object"):
        load_label_names(bad)
    with pytest.raises(InputError, match="file not found"):
        load_label_names(tmp_path / "missing.json")


def test_atlas_metadata_fits_bundle_infer_task(repo_root: Path) -> None:
    meta = json.loads((repo_root / "configs" / "atlas_metadata.json").read_text())
    bundle_meta = json.loads((repo_root / "configs" / "metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    # BundleInferTask takes the first input and output: the user's image and the label map
    assert next(iter(meta["network_data_format"]["inputs"])) == "image"
    assert next(iter(meta["network_data_format"]["outputs"])) == "pred"


def test_image_must_be_a_file(tiny_ct: Path) -> None:
    pre = AtlasRegistrationd(None, tiny_ct / "images" / "subject_00.nii.gz", tiny_ct / "labels" / "subject_00.nii.gz")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a path"):
        pre({"image": torch.zeros(1, 16, 16, 16)})
