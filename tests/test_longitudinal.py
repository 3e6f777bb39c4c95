"""A follow-up scan of the same subject (``--longitudinal``): registration must not move points that are already
aligned, and must bring a pair that differs by a small known field closer.

Real data (slow; skipped without the shared data): Mindboggle test subjects 13 and 15, resampled to 3 mm. Each scan
is the moving image; its follow-up (the fixed image) is the same scan warped by a known smooth random field
(cubic B-spline, control points every 30 mm, scaled to a mean displacement of 2 mm over the brain), with fresh noise
in both images as in a rescan. The error (TRE, mm) is the distance between the registration's mapping and the known
one, averaged over the fixed image's brain voxels; before registration it is the known field's mean, 2 mm.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ran_bundle.cli import LONGITUDINAL, pipeline_options, register_parser
from ran_bundle.defaults import PIPELINE_DEFAULTS
from ran_bundle.fields import write_image_atomic
from ran_bundle.flow import warp
from ran_bundle.pipeline import DEFAULT_WEIGHTS, RegistrationPipeline
from ran_bundle.spatial import foreground_mask
from ran_bundle.synthetic import bspline_field, control_grid_shape

SPACING = 3.0
MEAN_MM = 2.0


def test_longitudinal_preset_fills_only_what_the_user_left_out():
    base = ["--fixed", "f", "--moving", "m", "--out", "o"]
    preset = pipeline_options(register_parser().parse_args([*base, "--longitudinal"]))
    for key, value in LONGITUDINAL.items():
        assert preset[key] == value, key
    assert preset["affine"] == "rigid"
    own = pipeline_options(register_parser().parse_args([*base, "--longitudinal", "--affine", "affine"]))
    assert own["affine"] == "affine"
    plain = pipeline_options(register_parser().parse_args(base))
    assert plain["affine"] == "affine" and plain["io_start"] is None
    assert plain["io_iterations"] == PIPELINE_DEFAULTS.io_iterations


def known_field_pair(image: np.ndarray, affine: np.ndarray, seed: int, mean_mm: float = MEAN_MM):
    """A baseline and a follow-up scan of ``image``: ``image`` and ``image`` warped by a smooth random field, and
    that field.

    Returns:
        ``(baseline, follow_up, field)``: the moving and the fixed image ``(X, Y, Z)``, each with its own noise, with
        ``follow_up(p) = image(p + u(p))``, and the world displacement ``(3, X, Y, Z)`` (RAS mm) that maps each fixed
        voxel centre to its moving point.
    """
    rng = np.random.default_rng(seed)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    control = rng.standard_normal((3, *control_grid_shape(image.shape, 30.0 / spacing)))
    u = bspline_field(image.shape, control)  # voxels, (3, *S)
    brain = foreground_mask(image)
    mm = torch.einsum("ij,j...->i...", torch.as_tensor(affine[:3, :3]), u)  # RAS mm
    scale = mean_mm / float(mm.norm(dim=0)[torch.from_numpy(brain)].mean())
    u, mm = u * scale, mm * scale
    moved = warp(torch.from_numpy(image)[None, None].double(), u[None])[0, 0].numpy()
    noise = 0.01 * float(np.percentile(image[brain], 99))

    def rescan(x: np.ndarray) -> np.ndarray:  # fresh noise inside the head, background kept at 0
        return np.where(x > 0, np.clip(x + noise * rng.standard_normal(x.shape), 0, None), 0).astype(np.float32)

    return rescan(image), rescan(moved), mm.float()


def tre(field: torch.Tensor, truth: torch.Tensor, brain: np.ndarray) -> float:
    """Mean distance (mm) over the brain voxels between a registration's world field ``(1, 3, *F)`` and the truth."""
    return float((field[0] - truth).norm(dim=0)[torch.from_numpy(brain)].mean())


@pytest.fixture(scope="module")
def follow_ups(shared_data: Path, tmp_path_factory, resample_isotropic) -> list[dict]:
    src = shared_data / "mindboggle_oasis_trt20"
    if not (src / "oasis_trt_13" / "image.nii.gz").is_file():
        pytest.skip(f"Mindboggle subjects not found under {src}")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {DEFAULT_WEIGHTS}")
    root = tmp_path_factory.mktemp("followup")
    cases = []
    for i, subject in enumerate(("13", "15")):
        moving = resample_isotropic(
            src / f"oasis_trt_{subject}" / "image.nii.gz", root / f"{subject}.nii.gz", SPACING, False
        )
        img = nib.load(str(moving))
        image = np.asarray(img.dataobj, np.float32)
        baseline, follow_up, truth = known_field_pair(image, img.affine, seed=i)
        moving = write_image_atomic(baseline, img.affine, root / f"{subject}_baseline.nii.gz", "float32")
        fixed = write_image_atomic(follow_up, img.affine, root / f"{subject}_followup.nii.gz", "float32")
        cases.append(
            {"subject": subject, "fixed": fixed, "moving": moving, "truth": truth, "brain": foreground_mask(follow_up)}
        )
    return cases


@pytest.mark.slow
def test_follow_up_registration_lowers_the_error_of_a_known_small_field(follow_ups, capsys):
    torch.set_num_threads(1)
    args = register_parser().parse_args(["--fixed", "f", "--moving", "m", "--out", "o", "--longitudinal", "--quiet"])
    pipe = RegistrationPipeline(device="cpu", **{**pipeline_options(args), "spacing": SPACING})
    for case in follow_ups:
        registration = pipe.register(case["fixed"], case["moving"])
        before = tre(torch.zeros(1, *case["truth"].shape), case["truth"], case["brain"])
        after = tre(registration.field, case["truth"], case["brain"])
        folding = registration.stats["non_positive_jacobian_percent"]
        with capsys.disabled():
            print(
                f"\nfollow-up of subject {case['subject']}: TRE {before:.2f} -> {after:.2f} mm, folding {folding:.3f}%"
            )
        assert after < before, (case["subject"], before, after)
        assert folding < 0.1, (case["subject"], folding)


def test_landmark_tre_of_the_comparison_script(tmp_path):
    """``scripts/compare_brain.py``'s TRE: fixed landmarks mapped by a constant field of (1, -2, 2) mm land 3 mm from
    themselves, and on the moving landmarks placed there (LPS files, RAS field)."""
    from scripts.compare_brain import landmark_tre

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    field = torch.tensor([1.0, -2.0, 2.0]).reshape(1, 3, 1, 1, 1).expand(1, 3, 10, 10, 10).contiguous()
    ras = np.array([[4.0, 6.0, 8.0], [10.0, 2.0, 12.0]])
    lps = ras * np.array([-1, -1, 1])

    def write(path, points):
        path.write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in points))
        return str(path)

    fixed = write(tmp_path / "fixed.csv", lps)
    assert abs(landmark_tre(field, affine, fixed, fixed) - 3.0) < 1e-5
    moving = write(tmp_path / "moving.csv", (ras + [1.0, -2.0, 2.0]) * np.array([-1, -1, 1]))
    assert landmark_tre(field, affine, fixed, moving) < 1e-5
