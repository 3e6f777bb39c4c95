"""Atlas label propagation (ran_bundle.atlas, configs/atlas_inference.json) without MONAI Label.

The geometry is checked with a known field: the image is the atlas deformed by an analytic
displacement and stored in another orientation; feeding that field as the network's prediction must
give back the image's own labels on the image's grid. The shipped weights are then run through the
config the way MONAI Label's ``BundleInferTask`` runs it (bare parser, ``bundle_root`` set, pre-transforms,
network on ``data["image"][None]``, post-transforms).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from ran_bundle.atlas import AtlasPaird, PropagateAtlasLabelsd
from ran_bundle.fields import warp_image
from ran_bundle.metrics import dice

ATLAS = "subject_00"


def mean_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``ref``."""
    return float(np.mean([dice(pred == v, ref == v) for v in np.unique(ref) if v != 0]))


def known_deformation(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth analytic voxel DDF ``(3, *shape)`` of up to 3 voxels in-plane and 1 voxel across slices."""
    x, y, z = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return torch.stack(
        [
            3.0 * torch.sin(2 * torch.pi * y / shape[1]),
            3.0 * torch.cos(2 * torch.pi * x / shape[0]),
            torch.sin(2 * torch.pi * (x + y) / (shape[0] + shape[1])),
        ]
    )


@pytest.fixture(scope="module")
def deformed_atlas(tiny_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The atlas warped by :func:`known_deformation`, written with its first two axes reversed (LPS-like).

    Returns ``u`` (the field on the atlas grid), ``path`` (the image file), its ``affine``, ``label`` (the
    warped atlas labels in the file's voxel order) and ``atlas_affine``.
    """
    img = nib.load(tiny_ct / "images" / f"{ATLAS}.nii.gz")
    lab = nib.load(tiny_ct / "labels" / f"{ATLAS}.nii.gz")
    u = known_deformation(img.shape)
    image = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    label = torch.from_numpy(np.asarray(lab.dataobj))[None, None]
    warped = warp_image(image, u[None])[0, 0].numpy()
    warped_label = warp_image(label, u[None], mode="nearest")[0, 0].numpy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [img.shape[0] - 1, img.shape[1] - 1]  # reversed voxel index -> original index
    affine = img.affine @ flip
    out = tmp_path_factory.mktemp("deformed_atlas")
    path = out / "image.nii.gz"
    nib.save(nib.Nifti1Image(warped[::-1, ::-1].round().astype(np.int16), affine), path)
    return {"u": u, "affine": affine, "label": warped_label[::-1, ::-1], "path": path, "atlas_affine": img.affine}


def propagate(tiny_ct: Path, image: Path, ddf_of_pair) -> dict:
    """Run AtlasPaird, then PropagateAtlasLabelsd with ``ddf_of_pair(data)`` as the network's prediction."""
    pre = AtlasPaird(tiny_ct / "images" / f"{ATLAS}.nii.gz", tiny_ct / "labels" / f"{ATLAS}.nii.gz")
    data = pre({"image": str(image)})
    data["pred"] = ddf_of_pair(data)
    return PropagateAtlasLabelsd()(data)


def test_known_field_recovers_the_image_labels(tiny_ct: Path, deformed_atlas: dict) -> None:
    def true_ddf(data: dict) -> torch.Tensor:
        pair = data["image"]
        assert tuple(pair.shape) == (2, 112, 80, 32)  # atlas and image padded to one shape divisible by 16
        # the image, reoriented to RAS, is the warped atlas array: place the known field where it sits
        o = np.rint(np.linalg.inv(pair.affine.numpy()) @ deformed_atlas["atlas_affine"][:, 3]).astype(int)
        ddf = torch.zeros(3, *pair.shape[1:])
        ddf[:, o[0] : o[0] + 112, o[1] : o[1] + 80, o[2] : o[2] + 30] = deformed_atlas["u"]
        return ddf

    out = propagate(tiny_ct, deformed_atlas["path"], true_ddf)["pred"]
    identity = propagate(tiny_ct, deformed_atlas["path"], lambda d: torch.zeros(3, *d["image"].shape[1:]))["pred"]
    ref = deformed_atlas["label"]
    assert tuple(out.shape) == (1, *ref.shape) and out.dtype == torch.uint8
    np.testing.assert_allclose(out.affine.numpy(), deformed_atlas["affine"], atol=1e-4)
    d_true, d_id = mean_dice(out[0].numpy(), ref), mean_dice(identity[0].numpy(), ref)
    print(f"known field: mean Dice {d_true:.4f} (identity {d_id:.4f})")
    assert d_true > 0.99
    assert d_id < d_true - 0.1


def test_config_runs_like_monailabel_bundle_infer_task(repo_root: Path, tiny_ct: Path) -> None:
    parser = ConfigParser()
    parser.read_config(repo_root / "configs" / "atlas_inference.json")
    parser.config.update({"bundle_root": str(repo_root), "device": "cpu"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(repo_root / "models" / "model.pt", map_location="cpu")["model"])
    network.eval()
    image = tiny_ct / "images" / "subject_03.nii.gz"
    data = {"image": str(image)}
    for t in parser.get_parsed_content("preprocessing").transforms:
        data = t(data)
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SimpleInferer)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    assert tuple(data["pred"].shape) == (3, *data["image"].shape[1:])
    data = parser.get_parsed_content("postprocessing")(data)

    pred = data["pred"][0].numpy()
    ref_img = nib.load(image)
    ref = np.asarray(nib.load(tiny_ct / "labels" / "subject_03.nii.gz").dataobj)
    atlas = np.asarray(nib.load(tiny_ct / "labels" / f"{ATLAS}.nii.gz").dataobj)
    assert pred.shape == ref_img.shape
    np.testing.assert_allclose(data["pred"].affine.numpy(), ref_img.affine, atol=1e-4)
    assert set(np.unique(pred)) <= set(np.unique(atlas))
    d_prop, d_id = mean_dice(pred, ref), mean_dice(atlas, ref)
    # the shipped weights were trained on brain MR: on this CT they give about the identity's overlap
    print(f"shipped weights, atlas -> subject_03: mean Dice {d_prop:.4f} (identity {d_id:.4f})")
    assert d_prop > 0.5


def test_atlas_metadata_matches_the_atlas(repo_root: Path, tiny_ct: Path) -> None:
    meta = json.loads((repo_root / "configs" / "atlas_metadata.json").read_text())
    bundle_meta = json.loads((repo_root / "configs" / "metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = json.loads((tiny_ct / "datalist.json").read_text())["labels"]
    assert channel_def == {"0": "background", **names}
    values = np.unique(np.asarray(nib.load(tiny_ct / "labels" / f"{ATLAS}.nii.gz").dataobj))
    assert sorted(int(k) for k in channel_def) == values.tolist()


def test_image_must_be_a_file(tiny_ct: Path) -> None:
    pre = AtlasPaird(tiny_ct / "images" / f"{ATLAS}.nii.gz", tiny_ct / "labels" / f"{ATLAS}.nii.gz")
    with pytest.raises(TypeError, match="must be a path"):
        pre({"image": torch.zeros(1, 16, 16, 16)})
