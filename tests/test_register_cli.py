"""``ran-register`` and ``ran-warp``: the installed commands in subprocesses, and the pure functions of
:mod:`ran_bundle.register` in-process.

Real-data tests use the OASIS brain pair of ``../shared/data`` (``conftest.shared_data``; skipped when
absent): subject B registered to subject A with the shipped ``models/model.pt``. To keep the module
within a few minutes on 2 CPU cores the 1 mm images are first resampled to 2 mm files (SimpleITK,
linear for images, nearest neighbour for labels) and the network runs at ``--spacing 4 4 4``
(a 48^3 grid); the outputs live on the 2 mm fixed grid. The instance-optimisation test uses a central
128 x 128 x 96 mm crop of the same 2 mm pair (a 32^3 network grid), with and without ``--io-steps``.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.cli import _join_spacing
from ran_bundle.fields import ddf_voxel_to_mm, warp_image, write_displacement_nifti
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.register import (
    InputError,
    _staging_dir,
    instance_optimise,
    load_network,
    parse_spacing,
    predict,
    preprocess_pair,
    read_points_csv,
    write_points_csv,
)
from ran_bundle.spatial import (
    field_to_voxel_ddf,
    map_points,
    read_displacement_field,
    resample_field,
    sample_voxels,
    warp_to_grid,
)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "models" / "model.pt"
NET_SPACING = ["--spacing", "4", "4", "4"]
IO_STEPS = 3  # at the default --io-lr
LPS = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def command(name: str) -> list[str]:
    """The installed console script, or ``python -m ran_bundle [warp]`` when it is not on PATH."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    return [sys.executable, "-m", "ran_bundle"] + (["warp"] if name == "ran-warp" else [])


def run(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*command(name), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        pytest.fail(f"{proc.args[0]} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def itk_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in ITK index order (= our array axis order)."""
    a = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    return np.transpose(a, tuple(range(nd - 1, -1, -1)) + tuple(range(nd, a.ndim)))


def nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def smooth_field(shape, seed=0, amp=3.0) -> torch.Tensor:
    """``(1, 3, *shape)`` smooth random voxel DDF with maximum ``amp``."""
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(3)])
    u *= amp / np.abs(u).max()
    return torch.tensor(u[None], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# pure functions (no network, fast)
# ------------------------------------------------------------------------------------------------


def test_parse_spacing_and_argv():
    assert parse_spacing("none") is None and parse_spacing(None) is None
    assert parse_spacing(2) == (2.0, 2.0, 2.0)
    assert parse_spacing((1, 2, 3)) == (1.0, 2.0, 3.0)
    assert parse_spacing("1.5,2,2") == (1.5, 2.0, 2.0)
    assert parse_spacing("[1, 1, 2]") == (1.0, 1.0, 2.0)
    for bad in ("a", (1, 2), "0", "-1 1 1", "1 1 nan"):
        with pytest.raises(InputError, match="--spacing"):
            parse_spacing(bad)
    assert _join_spacing(["--spacing", "2", "2", "3", "--png"]) == ["--spacing=2,2,3", "--png"]
    assert _join_spacing(["--spacing", "none", "--amp"]) == ["--spacing", "none", "--amp"]
    assert _join_spacing(["--spacing", "4", "x.nii"]) == ["--spacing", "4", "x.nii"]


def test_sample_voxels_is_the_package_warp_on_other_grids():
    img = torch.rand(1, 2, 12, 10, 9)
    ddf = smooth_field((12, 10, 9), seed=2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (12, 10, 9)], indexing="ij")).double()
    coords = grid[None] + ddf.double()
    same = sample_voxels(img, coords)  # same grid: routed through fields.warp_image
    assert torch.allclose(same, warp_image(img, ddf), atol=1e-6)
    # a smaller output grid takes the grid_sample path: it must give the same values
    other = sample_voxels(img, coords[..., :-2])
    assert other.shape == (1, 2, 12, 10, 7)
    assert torch.allclose(other, same[..., :-2], atol=1e-5)
    lab = torch.randint(0, 5, (1, 1, 12, 10, 9), dtype=torch.int16)
    near = sample_voxels(lab, coords[..., :-2], mode="nearest")
    assert near.dtype == torch.int16
    assert torch.equal(near, warp_image(lab, ddf, mode="nearest")[..., :-2])


def test_world_pipeline_reproduces_the_network_grid_warp(tmp_path: Path):
    """Field of the network grid -> world mm -> original (LPS-ordered, offset) grids == the network-grid warp.

    Moving and fixed files have different origins and a non-RAS orientation (axes permuted and
    flipped), so the bundle's preprocessing reorients and pads them; ``intensity="none"`` keeps the
    values. Warping the ORIGINAL moving image onto the ORIGINAL fixed grid with the world field must
    give, voxel by voxel, the warp of the preprocessed images on the network grid.
    """
    rng = np.random.default_rng(0)
    shape = (20, 18, 24)
    aff_f = np.array([[0, 0, -2.0, 40], [-1.5, 0, 0, 30], [0, 2.5, 0, -20], [0, 0, 0, 1]])
    aff_m = aff_f.copy()
    aff_m[:3, 3] += [3.0, -4.5, 5.0]  # not a whole voxel: the moving grid is offset in world space
    fixed = gaussian_filter(rng.random(shape), 2).astype(np.float32)
    moving = gaussian_filter(rng.random(shape), 2).astype(np.float32)
    pf, pm = nifti(fixed, aff_f, tmp_path / "f.nii.gz"), nifti(moving, aff_m, tmp_path / "m.nii.gz")
    moving_p, fixed_p = preprocess_pair(pf, pm, spacing=None, intensity="none")
    a_fp, a_mp = (t.affine.numpy().astype(np.float64) for t in (fixed_p, moving_p))
    assert moving_p.shape[1:] == fixed_p.shape[1:] and all(s % 16 == 0 for s in fixed_p.shape[1:])
    ddf = smooth_field(fixed_p.shape[1:], seed=1, amp=2.5)
    expected_net = warp_image(moving_p[None].as_tensor(), ddf)[0, 0]  # on the network grid

    v = resample_field(ddf_voxel_to_mm(ddf, a_fp, moving_affine=a_mp), a_fp, shape, aff_f)
    ours = warp_to_grid(torch.from_numpy(moving)[None, None], aff_m, v, aff_f)[0, 0].numpy()
    # the network voxel of each original fixed voxel: x = A_fp^-1 A_f y (integers here)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    x = np.linalg.inv(a_fp) @ aff_f @ np.vstack([idx, np.ones(idx.shape[1])])
    x = np.rint(x[:3]).astype(int)
    expected = expected_net.numpy()[x[0], x[1], x[2]].reshape(shape)
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    # sensitivity: ignoring the moving grid's offset would be far off
    bad = warp_to_grid(torch.from_numpy(moving)[None, None], aff_f, v, aff_f)[0, 0].numpy()
    assert np.abs(bad - expected).mean() > 10 * np.abs(ours - expected).mean() + 1e-3


def test_read_displacement_field_inverts_the_writer(tmp_path: Path):
    aff = np.array([[0, 0, -2.0, 5], [-1.5, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    u = smooth_field((7, 8, 9), seed=3)
    path = write_displacement_nifti(u, aff, tmp_path / "ddf.nii.gz", dtype="float64")
    v, affine = read_displacement_field(path)
    np.testing.assert_allclose(affine, aff, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), ddf_voxel_to_mm(u.double(), aff).numpy(), atol=1e-6)
    np.testing.assert_allclose(field_to_voxel_ddf(v, affine).numpy(), u.numpy(), atol=1e-5)
    with pytest.raises(InputError, match="not a 3D displacement field"):
        read_displacement_field(nifti(np.zeros((4, 4, 4), np.float32), aff, tmp_path / "scalar.nii.gz"))


def test_map_points_matches_itk_transform_point(tmp_path: Path):
    aff = np.array([[0, 0, -2.0, 5], [-1.5, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    shape = (10, 12, 9)
    u = smooth_field(shape, seed=4, amp=2.0)
    path = write_displacement_nifti(u, aff, tmp_path / "ddf.nii.gz", dtype="float64")
    v, affine = read_displacement_field(path)
    rng = np.random.default_rng(5)
    idx = rng.uniform(-0.4, np.asarray(shape) - 0.6, size=(200, 3))
    idx = np.vstack([idx, [[-3.0, 2.0, 2.0], [2.0, 40.0, 1.0]]])  # two points outside the grid
    pts_ras = (aff[:3, :3] @ idx.T).T + aff[:3, 3]
    mapped, inside = map_points(pts_ras, v, affine)
    assert inside[:200].all() and not inside[200:].any()
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    itk = np.array([transform.TransformPoint(tuple(float(c) for c in LPS @ p)) for p in pts_ras]) @ LPS
    np.testing.assert_allclose(mapped, itk, atol=1e-4)
    np.testing.assert_allclose(mapped[200:], pts_ras[200:])  # outside: unmoved, as ITK
    assert np.abs(mapped - pts_ras).max() > 1.0

    # CSV round trip in both frames; extra columns are kept
    csv_in = tmp_path / "pts.csv"
    with open(csv_in, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["X", "y", "z", "name"])
        for i, p in enumerate(pts_ras[:3] @ LPS):
            w.writerow([*p, f"p{i}"])
    rows, names, pts = read_points_csv(csv_in, frame="lps")
    np.testing.assert_allclose(pts, pts_ras[:3])
    out = write_points_csv(tmp_path / "o.csv", rows, names, pts, frame="ras")
    _, names2, back = read_points_csv(out, frame="ras")
    assert names2 == ["X", "y", "z", "name"]
    np.testing.assert_allclose(back, pts_ras[:3], atol=1e-5)
    with pytest.raises(InputError, match="x, y, z"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_points_csv(tmp_path / "bad.csv")


def test_load_network_errors(tmp_path: Path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read it as a PyTorch checkpoint"):
        load_network(junk)
    other = tmp_path / "ran4.pt"
    torch.save({"model": ResidualAlignerNetwork(3, "RAn4").state_dict()}, other)
    with pytest.raises(InputError, match="do not fit the RAN preset 'ref'"):
        load_network(other, "ref")
    plain = tmp_path / "plain.pt"
    torch.save(ResidualAlignerNetwork(3, "RAn4").state_dict(), plain)  # a bare state dict is accepted
    assert isinstance(load_network(plain, "RAn4"), ResidualAlignerNetwork)
    with pytest.raises(InputError, match="unknown"):
        load_network(plain, "RAn9")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a tiny input, several threads on a busy 2-core machine spend far longer in sync."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_predict_and_instance_optimise_on_a_tiny_pair(one_thread):
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, "ref").eval()
    torch.nn.init.normal_(net.output_head.weight, std=0.1)  # a non-trivial field
    m, f = torch.rand(1, 16, 16, 32), torch.rand(1, 16, 16, 32)
    ddf, bwd = predict(net, m, f, backward=True)
    assert ddf.shape == bwd.shape == (1, 3, 16, 16, 32) and ddf.dtype == torch.float32
    assert ddf.abs().mean() > 0.01
    # the backward field is the network's prediction for the swapped pair (fixed onto moving)
    swapped, none = predict(net, f, m)
    assert none is None and torch.allclose(bwd, swapped, atol=1e-5) and not torch.allclose(ddf, swapped, atol=1e-3)
    amp_ddf, _ = predict(net, m, f, amp=True)  # autocast (bfloat16 on CPU), float32 out
    assert amp_ddf.dtype == torch.float32 and torch.allclose(amp_ddf, ddf, atol=0.1 * ddf.abs().max().item())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tuned, losses = instance_optimise(net, m, f, steps=2, lr=1e-3, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert not tuned.training


def test_staging_dir_leaves_nothing_on_failure(tmp_path: Path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with _staging_dir(out) as tmp:
            (tmp / "x.txt").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with _staging_dir(out) as tmp:
        (tmp / "x.txt").write_text("done")
    assert [p.name for p in out.parent.iterdir()] == ["out"] and (out / "x.txt").read_text() == "done"


# ------------------------------------------------------------------------------------------------
# real data through the installed commands
# ------------------------------------------------------------------------------------------------


def _resample_2mm(src: Path, dst: Path, label: bool, size: tuple[int, int, int] | None = None) -> Path:
    """Resample ``src`` to 2 mm (``size`` voxels centred on the image centre; default: the whole image)."""
    img = sitk.ReadImage(str(src))
    size = size or tuple(int(math.ceil(n / 2)) for n in img.GetSize())
    ref = sitk.Image([int(n) for n in size], img.GetPixelID())
    ref.SetSpacing([2.0, 2.0, 2.0])
    ref.SetDirection(img.GetDirection())
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    half = np.reshape(img.GetDirection(), (3, 3)) @ ((np.asarray(size) - 1) * 2.0 / 2)
    ref.SetOrigin(tuple(centre - half))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), interp, 0), str(dst))
    return dst


def _oasis_2mm(shared_data: Path, root: Path, size: tuple[int, int, int] | None = None) -> dict[str, Path]:
    src = shared_data / "oasis_brain_mr"
    if not (src / "lapirn_image_A" / "image.nii.gz").is_file():
        pytest.skip(f"OASIS pair not found under {src}")
    if not WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {WEIGHTS}")
    out = {}
    for role, subject in (("fixed", "lapirn_image_A"), ("moving", "lapirn_image_B")):
        out[role] = _resample_2mm(src / subject / "image.nii.gz", root / f"{role}.nii.gz", False, size)
        out[f"{role}_label"] = _resample_2mm(src / subject / "label.nii.gz", root / f"{role}_label.nii.gz", True, size)
    return out


@pytest.fixture(scope="module")
def oasis(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The OASIS pair B (moving) -> A (fixed), resampled to 2 mm files (80 x 96 x 72 voxels)."""
    return _oasis_2mm(shared_data, tmp_path_factory.mktemp("oasis2mm"))


@pytest.fixture(scope="module")
def oasis_crop(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The central 64 x 64 x 48 voxels (2 mm) of the same pair: a 32^3 network grid at 4 mm."""
    return _oasis_2mm(shared_data, tmp_path_factory.mktemp("oasis_crop"), size=(64, 64, 48))


def _register(oasis: dict[str, Path], out: Path, *extra: str) -> dict:
    proc = ok(
        run(
            "ran-register",
            "--fixed", oasis["fixed"], "--moving", oasis["moving"],
            "--fixed-label", oasis["fixed_label"], "--moving-label", oasis["moving_label"],
            "--out", out, "--device", "cpu", *NET_SPACING, *extra,
        )
    )  # fmt: skip
    assert "Traceback" not in proc.stderr
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def registered(oasis: dict[str, Path], tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reg") / "out"
    return out, _register(oasis, out, "--inverse", "--png")


def test_outputs_geometry_and_report(oasis, registered):
    out, report = registered
    ref = nib.load(str(oasis["fixed"]))
    expected = {"warped.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "jacobian.nii.gz", "inverse_ddf.nii.gz"}
    assert expected | {"overview.png", "report.json"} == {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging folder left
    for name in ("warped.nii.gz", "warped_label.nii.gz", "jacobian.nii.gz"):
        img = nib.load(str(out / name))
        assert img.shape == ref.shape, name
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    assert np.issubdtype(nib.load(str(out / "warped_label.nii.gz")).get_data_dtype(), np.integer)
    field = sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    fixed_itk = sitk.ReadImage(str(oasis["fixed"]))
    assert field.GetSize() == fixed_itk.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), fixed_itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(field.GetDirection(), fixed_itk.GetDirection(), atol=1e-6)
    inv = sitk.ReadImage(str(out / "inverse_ddf.nii.gz"), sitk.sitkVectorFloat64)
    moving_itk = sitk.ReadImage(str(oasis["moving"]))
    assert inv.GetSize() == moving_itk.GetSize()
    np.testing.assert_allclose(inv.GetOrigin(), moving_itk.GetOrigin(), atol=1e-4)
    png = sitk.ReadImage(str(out / "overview.png"))
    assert png.GetDimension() == 2 and png.GetSize()[1] > 3 * png.GetSize()[0] / 2  # 5 rows x 3 columns

    assert report["network"]["grid_spacing_mm"] == [4.0, 4.0, 4.0]
    assert report["arguments"]["inverse"] is True and report["arguments"]["spacing"] == [4, 4, 4]
    for stage in ("check_inputs", "load_weights", "preprocess", "predict", "resample", "metrics", "write", "total"):
        assert report["timings_s"][stage] >= 0, stage
    jac = np.asarray(nib.load(str(out / "jacobian.nii.gz")).dataobj)
    assert report["field"]["non_positive_jacobian_count"] == int((jac <= 0).sum())
    assert math.isclose(report["field"]["non_positive_jacobian_percent"], 100 * (jac <= 0).mean(), rel_tol=1e-6)
    assert report["field"]["sdlogj"] > 0
    dice = report["dice"]
    assert set(dice["labels"]) == {"1", "2"}
    assert 0.3 < dice["mean_before"] < 0.8 and 0.3 < dice["mean_after"] < 0.9
    # Dice recomputed from the written files
    fl = np.asarray(nib.load(str(oasis["fixed_label"])).dataobj)
    wl = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    d1 = 2 * ((fl == 1) & (wl == 1)).sum() / ((fl == 1).sum() + (wl == 1).sum())
    assert math.isclose(dice["labels"]["1"]["after"], d1, rel_tol=1e-9)
    assert report["inverse_consistency"]["mean_mm"] >= 0


def test_simpleitk_resample_with_the_field_reproduces_our_warp(oasis, registered):
    """Assertion 1: ``sitk.Resample(moving, fixed, DisplacementFieldTransform(ddf))`` == warped.nii.gz.

    Tolerance: 1e-4 (intensities in [0, 1]) on every voxel whose mapped point lies inside the moving
    image (ITK and ``grid_sample`` treat the outer half voxel differently); 99.9 % of the warped labels
    equal ITK's nearest-neighbour resampling.
    """
    out, _ = registered
    moving = sitk.ReadImage(str(oasis["moving"]), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(oasis["fixed"]), sitk.sitkFloat32)
    field_img = sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    vec = itk_array(field_img)  # (X, Y, Z, 3) LPS mm
    itk = itk_array(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field_img), sitk.sitkLinear, 0.0))
    ours = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    # where does each fixed voxel land in the moving image (continuous index)?
    shape = ours.shape
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    lin = np.reshape(fixed.GetDirection(), (3, 3)) * np.asarray(fixed.GetSpacing())
    pts = idx @ lin.T + np.asarray(fixed.GetOrigin())
    assert np.allclose(pts[-1], fixed.TransformIndexToPhysicalPoint(tuple(int(n) - 1 for n in shape)))
    lin_m = np.reshape(moving.GetDirection(), (3, 3)) * np.asarray(moving.GetSpacing())
    cidx = (pts + vec.reshape(-1, 3) - np.asarray(moving.GetOrigin())) @ np.linalg.inv(lin_m).T
    inside = ((cidx >= 0) & (cidx <= np.asarray(moving.GetSize()) - 1)).all(1).reshape(shape)
    assert inside.mean() > 0.8
    err = np.abs(itk - ours)
    print(f"ITK vs ours: max |diff| inside {err[inside].max():.2e}, everywhere {err.max():.2e}")
    assert err[inside].max() < 1e-4
    assert np.abs(ours[inside] - itk_array(moving)[inside]).mean() > 0.01  # the field moves the image
    # the opposite direction of the field would not reproduce it
    # (DisplacementFieldTransform takes over its image's buffer: read the file again)
    field_img = sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    neg_img = sitk.GetImageFromArray(-sitk.GetArrayFromImage(field_img), isVector=True)
    neg_img.CopyInformation(field_img)
    bad = itk_array(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(neg_img), sitk.sitkLinear, 0.0))
    assert np.abs(bad - ours)[inside].mean() > 100 * err[inside].mean() + 1e-3

    lab_itk = itk_array(
        sitk.Resample(
            sitk.ReadImage(str(oasis["moving_label"])),
            fixed,
            sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)),
            sitk.sitkNearestNeighbor,
            0,
        )
    )
    lab_ours = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    agree = (lab_itk == lab_ours)[inside].mean()
    print(f"warped labels equal to ITK's nearest neighbour on {100 * agree:.3f} % of the voxels")
    assert agree > 0.999


def test_points_agree_with_the_label_warp(oasis, registered, tmp_path: Path):
    """Assertion 2: fixed-space points mapped by ``ran-warp --points`` land in the label the warped label map says.

    2,000 voxel centres drawn inside the labels of the warped moving label map (fixed grid), written in
    LPS mm, mapped by ddf.nii.gz to moving space; the moving label map's label at the mapped point
    (nearest voxel) must equal the warped label at the fixed voxel for >= 99 % of the points.
    """
    out, _ = registered
    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    fixed_aff = nib.load(str(oasis["fixed"])).affine
    moving_lab_img = nib.load(str(oasis["moving_label"]))
    moving_lab = np.asarray(moving_lab_img.dataobj)
    rng = np.random.default_rng(0)
    cand = np.argwhere(warped_label > 0)
    vox = cand[rng.choice(len(cand), 2000, replace=False)]
    pts_ras = vox @ fixed_aff[:3, :3].T + fixed_aff[:3, 3]
    csv_in, csv_out = tmp_path / "fixed_points.csv", tmp_path / "moving_points.csv"
    with open(csv_in, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "z", "id"])
        for i, p in enumerate(pts_ras @ LPS):
            w.writerow([f"{c:.6f}" for c in p] + [i])
    ok(run("ran-warp", "--field", out / "ddf.nii.gz", "--points", csv_in, "--out", csv_out))
    with open(csv_out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == list(range(2000))
    mapped_ras = np.array([[float(r[k]) for k in "xyz"] for r in rows]) @ LPS
    assert np.linalg.norm(mapped_ras - pts_ras, axis=1).mean() > 0.5  # the points really move
    idx = np.rint((mapped_ras - moving_lab_img.affine[:3, 3]) @ np.linalg.inv(moving_lab_img.affine[:3, :3]).T)
    idx = np.clip(idx.astype(int), 0, np.asarray(moving_lab.shape) - 1)
    agree = (moving_lab[idx[:, 0], idx[:, 1], idx[:, 2]] == warped_label[tuple(vox.T)]).mean()
    print(f"points vs warped labels: {100 * agree:.2f} % agree")
    assert agree >= 0.99
    # the opposite direction (p - v) would not
    back = 2 * pts_ras - mapped_ras
    idx = np.rint((back - moving_lab_img.affine[:3, 3]) @ np.linalg.inv(moving_lab_img.affine[:3, :3]).T)
    idx = np.clip(idx.astype(int), 0, np.asarray(moving_lab.shape) - 1)
    assert (moving_lab[idx[:, 0], idx[:, 1], idx[:, 2]] == warped_label[tuple(vox.T)]).mean() < agree - 0.05


def test_ran_warp_images_and_labels_reproduce_ran_register(oasis, registered, tmp_path: Path):
    out, _ = registered
    ok(run("ran-warp", "--field", out / "ddf.nii.gz", "--image", oasis["moving"], "--out", tmp_path / "w.nii.gz"))
    ok(
        run(
            "ran-warp", "--field", out / "ddf.nii.gz", "--image", oasis["moving_label"], "--label",
            "--out", tmp_path / "l.nii.gz",
        )
    )  # fmt: skip
    w, ref = nib.load(str(tmp_path / "w.nii.gz")), nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(w.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(w.dataobj), np.asarray(ref.dataobj), atol=1e-4)
    lab, lab_ref = nib.load(str(tmp_path / "l.nii.gz")), nib.load(str(out / "warped_label.nii.gz"))
    assert np.issubdtype(lab.get_data_dtype(), np.integer)
    assert (np.asarray(lab.dataobj) == np.asarray(lab_ref.dataobj)).mean() > 0.9999


def test_io_steps_raise_dice(oasis_crop, tmp_path: Path):
    """Assertion 4: instance optimisation (IO_STEPS Adam steps, default rate) raises the mean Dice (GM, WM)."""
    base = _register(oasis_crop, tmp_path / "plain")
    report = _register(oasis_crop, tmp_path / "io", "--io-steps", str(IO_STEPS))
    lr = report["network"]["io_lr"]
    assert report["network"]["grid_shape"] == base["network"]["grid_shape"] == [32, 32, 32]
    before, without, with_io = base["dice"]["mean_before"], base["dice"]["mean_after"], report["dice"]["mean_after"]
    print(
        f"OASIS B->A, central 64x64x48 crop at 2 mm, network at 4 mm: mean Dice identity {before:.4f}, "
        f"RAN {without:.4f}, RAN + {IO_STEPS} io-steps (lr {lr:g}) {with_io:.4f}"
    )
    assert report["network"]["io_steps"] == IO_STEPS
    assert report["network"]["io_loss_last"] < report["network"]["io_loss_first"]
    assert report["timings_s"]["instance_optimisation"] > 0
    assert with_io > without + 0.005


# ------------------------------------------------------------------------------------------------
# bad inputs: one-line errors, non-zero exit, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Tiny valid and invalid inputs (32^3 voxels; errors are raised before the network runs)."""
    d = tmp_path_factory.mktemp("bad")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 32)).astype(np.float32)
    lab = (img > 0.5).astype(np.int16)
    nan = img.copy()
    nan[3, 4, 5] = np.nan
    shifted = aff.copy()
    shifted[:3, 3] = [4.0, 0.0, 0.0]
    junk = d / "junk.pt"
    junk.write_text("not a checkpoint")
    ran4 = d / "ran4.pt"
    torch.save({"model": ResidualAlignerNetwork(3, "RAn4").state_dict()}, ran4)
    return {
        "img": nifti(img, aff, d / "img.nii.gz"),
        "lab": nifti(lab, aff, d / "lab.nii.gz"),
        "flat": nifti(img[:, :, 0], aff, d / "flat.nii.gz"),
        "vol4d": nifti(np.stack([img, img], -1), aff, d / "vol4d.nii.gz"),
        "nan": nifti(nan, aff, d / "nan.nii.gz"),
        "const": nifti(np.zeros_like(img), aff, d / "const.nii.gz"),
        "lab_shape": nifti(lab[:, :, :30], aff, d / "lab_shape.nii.gz"),
        "lab_affine": nifti(lab, shifted, d / "lab_affine.nii.gz"),
        "missing": d / "missing.nii.gz",
        "junk": junk,
        "ran4": ran4,
    }


BAD_CASES = {
    "missing fixed": (dict(fixed="missing"), ["fixed image", "missing.nii.gz", "file not found"]),
    "2D image": (dict(moving="flat"), ["moving image", "flat.nii.gz", "not a 3D image"]),
    "4D image": (dict(fixed="vol4d"), ["fixed image", "vol4d.nii.gz", "not a 3D image"]),
    "NaN values": (dict(moving="nan"), ["moving image", "nan.nii.gz", "1 NaN"]),
    "constant image": (dict(fixed="const"), ["fixed image", "const.nii.gz", "same value"]),
    "label shape": (dict(moving_label="lab_shape"), ["moving label", "lab_shape.nii.gz", "shape (32, 32, 30)"]),
    "label affine": (dict(fixed_label="lab_affine"), ["fixed label", "lab_affine.nii.gz", "affine differs"]),
    "unreadable weights": (dict(weights="junk"), ["weights", "junk.pt", "cannot read"]),
    "incompatible weights": (dict(weights="ran4"), ["weights", "ran4.pt", "do not fit the RAN preset 'ref'"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(small, tmp_path: Path, case: str):
    """Assertion 3: non-zero exit, one line naming the file and the problem, no traceback, no output."""
    change, expected = BAD_CASES[case]
    args = {"fixed": "img", "moving": "img", **change}
    cmd = ["--out", tmp_path / "out", "--device", "cpu"]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", small[value]]
    proc = run("ran-register", *cmd, timeout=300)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ran-register: error:")]
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor a staging folder


def test_ran_warp_bad_field_fails_cleanly(small, tmp_path: Path):
    proc = run("ran-warp", "--field", small["img"], "--image", small["img"], "--out", tmp_path / "o.nii.gz")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "img.nii.gz: not a 3D displacement field" in proc.stderr
    proc = run("ran-warp", "--field", small["missing"], "--points", small["img"], "--out", tmp_path / "o.csv")
    assert proc.returncode != 0 and "missing.nii.gz: file not found" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_states_the_point_direction():
    proc = ok(run("ran-warp", "--help"))
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "maps FIXED-space points to MOVING space" in text and "lps" in text
    proc = ok(run("ran-register", "--help"))
    assert "maps a FIXED-space point p to the MOVING-space point p + v(p)" in " ".join(
        (proc.stdout + proc.stderr).split()
    )
