"""Masks (``--fixed-mask`` / ``--moving-mask``): voxels left out of the affine metric and of the instance
optimisation's similarity.

Small synthetic checks (fast): the affine stage and the similarity ignore what a mask removes, bad masks are refused
before any work, the report counts the removed voxels. Real-data checks (slow, skipped without the shared data): a
Mindboggle test pair (subject 14 onto subject 13, resampled to 3 mm and registered on a 3 mm network grid to keep the
module to minutes on one core) with

- a partial field of view: the top quarter of the moving brain cut away (image and labels set to 0, as a scan
  with a short field of view); with ``--moving-mask`` marking the part that is present, the mean Dice over the
  labels the cut leaves whole is at least the whole image's minus 0.03;
- a synthetic lesion: a dark cavity-like blob over about 4 % of the moving brain; the mean Dice over the labels
  outside it is no worse than the lesion-free pair's minus 0.01, with and without the mask.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ran_bundle.affine import register_affine
from ran_bundle.cli import register_main
from ran_bundle.fields import write_image_atomic
from ran_bundle.inputs import InputError
from ran_bundle.metrics import dice_per_label
from ran_bundle.optimise import optimise_field
from ran_bundle.pipeline import RegistrationPipeline
from ran_bundle.spatial import foreground_mask

SPACING = 3.0  # mm: images and network grid (the shipped weights' 2 mm is slower by 3.4x on one core)


# ------------------------------------------------------------------------------------------------ synthetic
def _blob_image(shift_mm: float = 0.0, size: int = 40, spacing: float = 2.0) -> sitk.Image:
    """A smooth ellipsoid with inner texture, shifted along x by ``shift_mm``."""
    x = (np.arange(size) - size / 2 + 0.5) * spacing
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    r = ((xx - shift_mm) / 24) ** 2 + (y / 18) ** 2 + (z / 20) ** 2
    arr = np.clip(1.2 - r, 0, 1) * (1 + 0.3 * np.sin((xx - shift_mm) / 4) * np.cos(y / 5))
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([spacing] * 3)
    return img


def test_affine_metric_mask_ignores_what_it_removes():
    """A bright artefact in the moving image drags the unmasked affine; masked out, the translation is found."""
    fixed, moving = _blob_image(0.0), _blob_image(6.0)
    arr = sitk.GetArrayFromImage(moving)
    arr[:, :, :8] = 4.0  # a bright slab at one side, absent from the fixed image
    spoiled = sitk.GetImageFromArray(arr)
    spoiled.CopyInformation(moving)
    mask_arr = np.ones_like(arr, dtype=np.uint8)
    mask_arr[:, :, :12] = 0
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(moving)
    kwargs = {"stage": "rigid", "working_spacing": 2.0, "shrink_factors": (1,), "smoothing_mm": (1.0,)}
    plain = register_affine(fixed, spoiled, **kwargs)
    masked = register_affine(fixed, spoiled, moving_mask=mask, **kwargs)
    # RAS x = -LPS x: the moving content sits 6 mm further along +x (LPS), i.e. -6 mm along RAS x
    err_masked = abs(masked.matrix[0, 3] + 6.0)
    err_plain = abs(plain.matrix[0, 3] + 6.0)
    assert err_masked < 1.0 and err_masked < err_plain, (err_masked, err_plain)
    with pytest.raises(ValueError, match="moving mask is not on the moving image's grid"):
        register_affine(fixed, spoiled, moving_mask=sitk.Image([8, 8, 8], sitk.sitkUInt8), **kwargs)


def test_masked_similarity_ignores_a_blob_that_only_the_moving_image_has():
    """Instance optimisation from zero on a pair that differs by a smooth shift plus a dark blob in the moving
    image: with the blob masked out, the field inside the blob's neighbourhood follows the true shift better."""
    torch.manual_seed(0)
    size = 24
    g = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    texture = lambda s: (1.2 - (x**2 + y**2 + z**2)).clamp(0, 1) * (1 + 0.4 * torch.sin(6 * (x + s)) * torch.cos(5 * y))  # noqa: E731
    fixed = texture(0.0)[None, None]
    moving = texture(2 / (size - 1) * 1.5)[None, None]  # 1.5 voxels along the last axis
    blob = ((x - 0.2) ** 2 + y**2 + z**2 < 0.08)[None, None]
    lesioned = torch.where(blob, torch.zeros_like(moving), moving)
    mask = (~blob).float()
    zero = torch.zeros(1, 3, size, size, size)
    kwargs = {"iterations": (0, 40), "weight": 1.0, "fold_weight": 0.0, "progress": False}
    plain = optimise_field(lesioned, fixed, zero, **kwargs).ddf
    masked = optimise_field(lesioned, fixed, zero, moving_mask=mask, **kwargs).ddf
    near = (((x - 0.2) ** 2 + y**2 + z**2) < 0.2)[None].expand(3, -1, -1, -1)
    truth = torch.zeros(3, size, size, size)
    truth[2] = -1.5  # warped(x) = moving(x + u): the moving content sits 1.5 voxels further along the axis
    err_plain = (plain[0] - truth)[near].abs().mean()
    err_masked = (masked[0] - truth)[near].abs().mean()
    assert err_masked < err_plain, (float(err_masked), float(err_plain))


def test_bad_masks_are_refused_before_any_work(tmp_path, tiny_ct, capsys):
    """A mask on another grid or one that removes every voxel: one line, exit status 2, nothing written."""
    fixed, moving = tiny_ct / "images" / "subject_00.nii.gz", tiny_ct / "images" / "subject_01.nii.gz"
    img = nib.load(str(moving))
    empty = write_image_atomic(np.zeros(img.shape, np.uint8), img.affine, tmp_path / "empty.nii.gz")
    small = write_image_atomic(np.ones((8, 8, 8), np.uint8), img.affine, tmp_path / "small.nii.gz")
    for flag, path, message in (
        ("--moving-mask", empty, "holds only zeros"),
        ("--fixed-mask", small, "does not match the fixed image"),
    ):
        out = tmp_path / f"out{flag}"
        with pytest.raises(SystemExit) as e:
            register_main(["--fixed", str(fixed), "--moving", str(moving), flag, str(path), "--out", str(out),
                           "--intensity", "ct", "--spacing", "3", "--device", "cpu", "--quiet"])  # fmt: skip
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() or not any(out.iterdir())


def test_pipeline_refuses_bad_mask_paths_and_counts_the_removed_voxels(tmp_path, tiny_ct):
    fixed, moving = tiny_ct / "images" / "subject_00.nii.gz", tiny_ct / "images" / "subject_01.nii.gz"
    img = nib.load(str(fixed))
    arr = np.ones(img.shape, np.uint8)
    arr[:10] = 0
    mask = write_image_atomic(arr, img.affine, tmp_path / "mask.nii.gz")
    pipe = RegistrationPipeline(network=torch.nn.Identity(), spacing=3, intensity="ct", fixed_mask=mask)
    inputs = pipe.check_inputs(fixed, moving)
    assert inputs.mask_counts() == {
        "fixed_mask": {"path": str(mask), "voxels": int(arr.size), "voxels_removed": int((arr == 0).sum())}
    }
    with pytest.raises(InputError, match="moving mask .*not found|moving mask"):
        pipe.check_inputs(fixed, moving, moving_mask=tmp_path / "missing.nii.gz")


# ------------------------------------------------------------------------------------------------ real data
def superior_axis(affine: np.ndarray) -> tuple[int, int]:
    """The array axis closest to RAS superior (+z) and its sign (+1: indices grow upwards)."""
    column = affine[:3, :3][2]
    axis = int(np.argmax(np.abs(column)))
    return axis, int(np.sign(column[axis]))


def cut_top(image: np.ndarray, label: np.ndarray, affine: np.ndarray, fraction: float = 0.25):
    """Image, labels and the mask of what is present after cutting away the top ``fraction`` of the brain's
    superior-inferior extent (set to 0)."""
    axis, sign = superior_axis(affine)
    brain = np.nonzero(np.any(foreground_mask(image), axis=tuple(a for a in range(3) if a != axis)))[0]
    lo, hi = brain.min(), brain.max()
    index = np.arange(image.shape[axis])
    keep_1d = index <= hi - fraction * (hi - lo) if sign > 0 else index >= lo + fraction * (hi - lo)
    shape = [1, 1, 1]
    shape[axis] = -1
    keep = np.broadcast_to(keep_1d.reshape(shape), image.shape)
    return np.where(keep, image, 0), np.where(keep, label, 0), keep.astype(np.uint8)


def paint_lesion(image: np.ndarray, spacing: float, seed: int = 0, fraction: float = 0.04):
    """A dark cavity-like blob (a smooth ball at a tenth of the brain's median intensity) over about ``fraction`` of
    the brain, centred on a random brain voxel at least its radius from the background; returns the image and the
    blob (bool)."""
    rng = np.random.default_rng(seed)
    brain = foreground_mask(image)
    radius = (3 * fraction * brain.sum() / (4 * np.pi)) ** (1 / 3)  # voxels
    inner = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(brain.astype(np.uint8))))
    candidates = np.argwhere(inner < -radius)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    r = np.linalg.norm(grid - centre, axis=-1) / radius
    weight = np.clip((1.15 - r) / 0.3, 0, 1)  # 1 inside, a soft edge
    dark = 0.1 * float(np.median(image[brain]))
    return (image * (1 - weight) + dark * weight).astype(np.float32), weight > 0


def mean_dice(warped: np.ndarray, fixed: np.ndarray, labels) -> float:
    return float(np.nanmean(list(dice_per_label(warped, fixed, labels).values())))


def whole_labels(before: np.ndarray, after: np.ndarray, min_voxels: int = 20, kept: float = 0.99) -> list[int]:
    """Labels of at least ``min_voxels`` voxels that keep at least ``kept`` of their voxels from ``before`` to
    ``after``."""
    values, counts = np.unique(np.rint(before).astype(np.int64), return_counts=True)
    after_counts = dict(zip(*np.unique(np.rint(after).astype(np.int64), return_counts=True), strict=True))
    return [
        int(v)
        for v, c in zip(values, counts, strict=True)
        if v and c >= min_voxels and after_counts.get(v, 0) >= kept * c
    ]


@pytest.fixture(scope="module")
def pair(mindboggle_3mm: dict[str, Path]) -> dict[str, Path]:
    """Mindboggle test subjects 14 (moving) and 13 (fixed) at 3 mm (``SPACING``)."""
    return mindboggle_3mm


def _pipeline() -> RegistrationPipeline:
    torch.set_num_threads(1)
    return RegistrationPipeline(spacing=SPACING, device="cpu", progress=False)


def _warped_labels(pipe: RegistrationPipeline, pair: dict, moving: Path, moving_label: Path, **masks) -> np.ndarray:
    registration = pipe.register(pair["fixed_image"], moving, None, moving_label, **masks)
    return registration.warped_label.numpy()


@pytest.mark.slow
def test_partial_field_of_view_with_moving_mask(pair, capsys):
    img = nib.load(str(pair["moving_image"]))
    image, label = np.asarray(img.dataobj, np.float32), np.rint(np.asarray(nib.load(str(pair["moving_label"])).dataobj))
    cut_image, cut_label, present = cut_top(image, label, img.affine)
    root = pair["root"]
    files = {
        "cut_image": write_image_atomic(cut_image, img.affine, root / "cut_image.nii.gz", "float32"),
        "cut_label": write_image_atomic(cut_label, img.affine, root / "cut_label.nii.gz", np.int16),
        "present": write_image_atomic(present, img.affine, root / "present.nii.gz", np.uint8),
    }
    fixed_label = np.rint(np.asarray(nib.load(str(pair["fixed_label"])).dataobj)).astype(np.int64)
    labels = whole_labels(label, cut_label)
    assert len(labels) > 30
    pipe = _pipeline()
    whole = mean_dice(_warped_labels(pipe, pair, pair["moving_image"], pair["moving_label"]), fixed_label, labels)
    cut = mean_dice(_warped_labels(pipe, pair, files["cut_image"], files["cut_label"]), fixed_label, labels)

    out = root / "masked"
    argv = ["--fixed", pair["fixed_image"], "--moving", files["cut_image"], "--moving-label", files["cut_label"],
            "--moving-mask", files["present"], "--spacing", SPACING, "--threads", 1, "--out", out]  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        register_main([str(a) for a in [*argv, "--device", "cpu", "--quiet"]])
    report = json.loads((out / "report.json").read_text())
    removed = int((present == 0).sum())
    assert report["masks"] == {
        "moving_mask": {"path": str(files["present"]), "voxels": int(present.size), "voxels_removed": removed}
    }
    masked_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    masked = mean_dice(masked_label, fixed_label, labels)
    with capsys.disabled():
        print(f"\npartial field of view ({len(labels)} whole labels): whole {whole:.4f}, cut {cut:.4f}, "
              f"cut + --moving-mask {masked:.4f}")  # fmt: skip
    assert masked >= whole - 0.03, (whole, cut, masked)


@pytest.mark.slow
def test_lesion_with_and_without_mask(pair, capsys):
    img = nib.load(str(pair["moving_image"]))
    image, label = np.asarray(img.dataobj, np.float32), np.rint(np.asarray(nib.load(str(pair["moving_label"])).dataobj))
    lesioned, blob = paint_lesion(image, SPACING)
    brain = foreground_mask(image)
    assert 0.025 < (blob & brain).sum() / brain.sum() < 0.07
    root = pair["root"]
    lesion_file = write_image_atomic(lesioned, img.affine, root / "lesion_image.nii.gz", "float32")
    mask_file = write_image_atomic((~blob).astype(np.uint8), img.affine, root / "lesion_mask.nii.gz", np.uint8)
    fixed_label = np.rint(np.asarray(nib.load(str(pair["fixed_label"])).dataobj)).astype(np.int64)
    labels = whole_labels(label, np.where(blob, 0, label))  # the labels the lesion does not touch
    assert len(labels) > 30
    pipe = _pipeline()
    clean = mean_dice(_warped_labels(pipe, pair, pair["moving_image"], pair["moving_label"]), fixed_label, labels)
    plain = mean_dice(_warped_labels(pipe, pair, lesion_file, pair["moving_label"]), fixed_label, labels)
    masked_labels = _warped_labels(pipe, pair, lesion_file, pair["moving_label"], moving_mask=mask_file)
    masked = mean_dice(masked_labels, fixed_label, labels)
    with capsys.disabled():
        print(f"\nlesion ({len(labels)} labels outside it): lesion-free {clean:.4f}, lesion {plain:.4f}, "
              f"lesion + --moving-mask {masked:.4f}")  # fmt: skip
    assert plain >= clean - 0.01 and masked >= clean - 0.01, (clean, plain, masked)
