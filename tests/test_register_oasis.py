"""``ran-register`` and ``ran-warp`` on a real brain pair, checked against SimpleITK and against each other.

The OASIS pair of ``../shared/data`` (``conftest.shared_data``; skipped when absent): subject B (moving) registered
to subject A (fixed) with the shipped ``models/model.pt``, in-process (:func:`ran_bundle.cli.register_main`). To
keep the module to about a minute on 2 busy cores the 1 mm images are resampled to 2 mm files first (SimpleITK,
linear for images, nearest neighbour for labels; 80 x 96 x 72 voxels), and instance optimisation runs 2 + 2
iterations from the network's field (``--network-start``). The network runs at its training resolution, 2 mm.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ran_bundle.affine import read_transform
from ran_bundle.cli import register_main, warp_main
from ran_bundle.pipeline import DEFAULT_WEIGHTS
from ran_bundle.spatial import foreground_mask

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

LPS = np.diag([-1.0, -1.0, 1.0])
COMMON = ("--network-start", "--io-iterations", "2", "2", "--device", "cpu", "--quiet")  # the network, then IO


def itk_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in ITK index order (= our array axis order), vector components last."""
    a = sitk.GetArrayFromImage(img)
    return np.transpose(a, (2, 1, 0, 3) if a.ndim == 4 else (2, 1, 0))


def _resample_2mm(src: Path, dst: Path, label: bool) -> Path:
    img = sitk.ReadImage(str(src))
    size = [int(math.ceil(n / 2)) for n in img.GetSize()]
    ref = sitk.Image(size, img.GetPixelID())
    ref.SetSpacing([2.0, 2.0, 2.0])
    ref.SetDirection(img.GetDirection())
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    half = np.reshape(img.GetDirection(), (3, 3)) @ ((np.asarray(size) - 1) * 2.0 / 2)
    ref.SetOrigin(tuple(centre - half))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), interp, 0), str(dst))
    return dst


def register(*argv) -> str:
    """``ran-register`` in-process (module fixtures have no ``capsys``): its stderr; fails on a non-zero exit."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            register_main([str(a) for a in argv])
        except SystemExit as e:
            pytest.fail(f"ran-register exited {e.code}:\n{err.getvalue()[-3000:]}")
    return err.getvalue()


def warp(capsys, *argv) -> None:
    try:
        warp_main([str(a) for a in argv])
    except SystemExit as e:
        pytest.fail(f"ran-warp exited {e.code}:\n{capsys.readouterr().err[-3000:]}")


@pytest.fixture(scope="module")
def oasis(shared_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The OASIS pair B (moving) -> A (fixed), resampled to 2 mm files."""
    src = shared_data / "oasis_brain_mr"
    if not (src / "lapirn_image_A" / "image.nii.gz").is_file():
        pytest.skip(f"OASIS pair not found under {src}")
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {DEFAULT_WEIGHTS}")
    root = tmp_path_factory.mktemp("oasis2mm")
    out = {}
    for role, subject in (("fixed", "lapirn_image_A"), ("moving", "lapirn_image_B")):
        out[role] = _resample_2mm(src / subject / "image.nii.gz", root / f"{role}.nii.gz", False)
        out[f"{role}_label"] = _resample_2mm(src / subject / "label.nii.gz", root / f"{role}_label.nii.gz", True)
    return out


@pytest.fixture(scope="module")
def registered(oasis: dict[str, Path], tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reg") / "out"
    register("--fixed", oasis["fixed"], "--moving", oasis["moving"], "--fixed-label", oasis["fixed_label"],
             "--moving-label", oasis["moving_label"], "--out", out, "--inverse", "--png", *COMMON)  # fmt: skip
    return out, json.loads((out / "report.json").read_text())


def test_outputs_geometry_and_report(oasis, registered):
    out, report = registered
    ref = nib.load(str(oasis["fixed"]))
    expected = {"warped.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "affine.tfm", "jacobian.nii.gz"}
    expected |= {"inverse_ddf.nii.gz", "overview.png", "report.json"}
    assert {p.name for p in out.iterdir()} == expected == set(report["outputs"].values())
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging folder, no lock left
    for name in ("warped.nii.gz", "warped_label.nii.gz", "jacobian.nii.gz"):
        img = nib.load(str(out / name))
        assert img.shape == ref.shape, name
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    assert np.issubdtype(nib.load(str(out / "warped_label.nii.gz")).get_data_dtype(), np.integer)
    field = sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)
    fixed_itk = sitk.ReadImage(str(oasis["fixed"]))
    assert field.GetSize() == fixed_itk.GetSize() and field.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(field.GetOrigin(), fixed_itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(field.GetDirection(), fixed_itk.GetDirection(), atol=1e-6)
    inv = sitk.ReadImage(str(out / "inverse_ddf.nii.gz"), sitk.sitkVectorFloat64)
    moving_itk = sitk.ReadImage(str(oasis["moving"]))
    assert inv.GetSize() == moving_itk.GetSize()
    np.testing.assert_allclose(inv.GetOrigin(), moving_itk.GetOrigin(), atol=1e-4)
    png = sitk.ReadImage(str(out / "overview.png"))
    assert png.GetDimension() == 2 and png.GetSize()[1] > png.GetSize()[0]  # 6 rows x 3 columns
    np.testing.assert_allclose(read_transform(out / "affine.tfm"), report["affine"]["matrix_ras"], atol=1e-6)

    assert report["network"]["grid_spacing_mm"] == [2.0, 2.0, 2.0]
    assert report["arguments"]["inverse"] is True and report["arguments"]["io_iterations"] == [2, 2]
    for step in ("check_inputs", "affine", "preprocess", "predict", "optimise", "to_world", "write"):
        assert report["timings_s"][step] >= 0, step
    assert report["instance_optimisation"]["iterations"] == [2, 2]
    assert math.isfinite(report["instance_optimisation"]["loss_last"])
    assert report["warnings"] == []  # a good pair: nothing to warn about
    # folding is counted inside the fixed image's foreground
    jac = np.asarray(nib.load(str(out / "jacobian.nii.gz")).dataobj)
    mask = foreground_mask(np.asarray(ref.dataobj))
    assert report["field"]["non_positive_jacobian_count"] == int(((jac <= 0) & mask).sum())
    percent = 100 * ((jac <= 0) & mask).sum() / mask.sum()
    assert math.isclose(report["field"]["non_positive_jacobian_percent"], percent, rel_tol=1e-6)
    assert report["field"]["sdlogj"] > 0 and report["field"]["foreground_overlap_after_affine"] > 0.8
    dice = report["field"]["dice"]
    assert set(dice["labels"]) == {"1", "2"}
    assert 0.5 < dice["mean_affine"] < 0.8 and 0.5 < dice["mean_registered"] < 0.9
    # Dice recomputed from the written files
    fl = np.asarray(nib.load(str(oasis["fixed_label"])).dataobj)
    wl = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    d1 = 2 * ((fl == 1) & (wl == 1)).sum() / ((fl == 1).sum() + (wl == 1).sum())
    assert math.isclose(dice["labels"]["1"]["registered"], d1, rel_tol=1e-9)


@pytest.fixture(scope="module")
def inside(oasis, registered) -> np.ndarray:
    """Fixed voxels whose point, mapped by ddf.nii.gz, lies inside the moving image (voxel centres of its edges
    included): outside that ITK extends the border voxel over the outer half voxel, ``grid_sample`` fades to 0."""
    out, _ = registered
    fixed, moving = sitk.ReadImage(str(oasis["fixed"])), sitk.ReadImage(str(oasis["moving"]))
    vec = itk_array(sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64))  # (X, Y, Z, 3) LPS mm
    shape = vec.shape[:3]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    lin = np.reshape(fixed.GetDirection(), (3, 3)) * np.asarray(fixed.GetSpacing())
    pts = idx @ lin.T + np.asarray(fixed.GetOrigin())
    lin_m = np.reshape(moving.GetDirection(), (3, 3)) * np.asarray(moving.GetSpacing())
    cidx = (pts + vec.reshape(-1, 3) - np.asarray(moving.GetOrigin())) @ np.linalg.inv(lin_m).T
    mask = ((cidx >= 0) & (cidx <= np.asarray(moving.GetSize()) - 1)).all(1).reshape(shape)
    assert mask.mean() > 0.8
    return mask


def test_simpleitk_resample_with_the_field_reproduces_warped(oasis, registered, inside):
    """``sitk.Resample(moving, fixed, DisplacementFieldTransform(ddf))`` == warped.nii.gz (ddf.nii.gz alone holds the
    whole mapping, affine included).

    Tolerance: 1e-4 (intensities in [0, 1]) on every voxel whose mapped point lies inside the moving image
    (``inside``); 99.9 % of the warped labels there equal ITK's nearest-neighbour resampling.
    """
    out, _ = registered
    moving = sitk.ReadImage(str(oasis["moving"]), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(oasis["fixed"]), sitk.sitkFloat32)

    def transform(sign: float = 1.0) -> sitk.DisplacementFieldTransform:
        # DisplacementFieldTransform takes over its image's buffer: read the file each time
        img = sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)
        if sign != 1.0:
            flipped = sitk.GetImageFromArray(sign * sitk.GetArrayFromImage(img), isVector=True)
            flipped.CopyInformation(img)
            img = flipped
        return sitk.DisplacementFieldTransform(img)

    itk = itk_array(sitk.Resample(moving, fixed, transform(), sitk.sitkLinear, 0.0))
    ours = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    err = np.abs(itk - ours)
    assert err[inside].max() < 1e-4, err[inside].max()
    resampled = itk_array(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.abs(ours - resampled)[inside].mean() > 0.01  # the field moves the image
    bad = itk_array(sitk.Resample(moving, fixed, transform(-1.0), sitk.sitkLinear, 0.0))
    assert np.abs(bad - ours)[inside].mean() > 100 * err[inside].mean() + 1e-3  # the other direction does not

    moving_label = sitk.ReadImage(str(oasis["moving_label"]))
    lab_itk = itk_array(sitk.Resample(moving_label, fixed, transform(), sitk.sitkNearestNeighbor, 0))
    lab_ours = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    assert (lab_itk == lab_ours)[inside].mean() > 0.999


def _write_points(path: Path, pts_ras: np.ndarray) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "z", "id"])
        for i, p in enumerate(pts_ras @ LPS):
            w.writerow([f"{c:.6f}" for c in p] + [i])
    return path


def _read_points(path: Path) -> tuple[list[int], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["id"]) for r in rows], np.array([[float(r[k]) for k in "xyz"] for r in rows]) @ LPS


def _labels_at(points_ras: np.ndarray, label_img) -> np.ndarray:
    lab = np.asarray(label_img.dataobj)
    idx = np.rint((points_ras - label_img.affine[:3, 3]) @ np.linalg.inv(label_img.affine[:3, :3]).T)
    idx = np.clip(idx.astype(int), 0, np.asarray(lab.shape) - 1)
    return lab[idx[:, 0], idx[:, 1], idx[:, 2]]


@pytest.fixture(scope="module")
def sample_points(oasis, registered) -> tuple[np.ndarray, np.ndarray]:
    """2,000 fixed voxel centres inside the warped labels: (voxel indices, RAS points)."""
    out, _ = registered
    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    fixed_aff = nib.load(str(oasis["fixed"])).affine
    cand = np.argwhere(warped_label > 0)
    vox = cand[np.random.default_rng(0).choice(len(cand), 2000, replace=False)]
    return vox, vox @ fixed_aff[:3, :3].T + fixed_aff[:3, 3]


def test_points_agree_with_the_label_warp(oasis, registered, sample_points, tmp_path: Path, capsys):
    """Fixed-space points mapped by ``ran-warp --points`` land in the label the warped label map says.

    The moving label map's label at each mapped point (nearest voxel) must equal the warped label at the fixed
    voxel for >= 99 % of the points; mapping the other way (``p - w(p)``) must do clearly worse.
    """
    out, _ = registered
    vox, pts_ras = sample_points
    csv_in, csv_out = _write_points(tmp_path / "fixed_points.csv", pts_ras), tmp_path / "moving_points.csv"
    warp(capsys, "--field", out / "ddf.nii.gz", "--points", csv_in, "--out", csv_out)
    ids, mapped_ras = _read_points(csv_out)
    assert ids == list(range(2000))
    assert np.linalg.norm(mapped_ras - pts_ras, axis=1).mean() > 0.5  # the points really move
    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)[tuple(vox.T)]
    moving_label = nib.load(str(oasis["moving_label"]))
    agree = (_labels_at(mapped_ras, moving_label) == warped_label).mean()
    assert agree >= 0.99, agree
    assert (_labels_at(2 * pts_ras - mapped_ras, moving_label) == warped_label).mean() < agree - 0.05


def test_inverse_field_maps_the_points_back(registered, sample_points, tmp_path: Path, capsys):
    """``inverse_ddf.nii.gz`` (moving -> fixed points) undoes ``ddf.nii.gz`` on the brain: half of the points come
    back within 0.2 mm, 90 % within 0.5 mm (a quarter voxel; the rest lie where the field is far from invertible)."""
    out, _ = registered
    _, pts_ras = sample_points
    forward, back = tmp_path / "forward.csv", tmp_path / "back.csv"
    warp(
        capsys, "--field", out / "ddf.nii.gz", "--points", _write_points(tmp_path / "p.csv", pts_ras), "--out", forward
    )
    warp(capsys, "--field", out / "inverse_ddf.nii.gz", "--points", forward, "--out", back)
    _, returned = _read_points(back)
    error = np.linalg.norm(returned - pts_ras, axis=1)
    percentiles = np.percentile(error, [50, 90, 99, 100])
    print("round trip ddf then inverse_ddf, error (mm) percentiles 50/90/99/100:", percentiles)
    assert percentiles[0] < 0.2 and percentiles[1] < 0.5, percentiles


def test_ran_warp_images_and_labels_reproduce_ran_register(oasis, registered, inside, tmp_path: Path, capsys):
    out, _ = registered
    warp(capsys, "--field", out / "ddf.nii.gz", "--image", oasis["moving"], "--out", tmp_path / "w.nii.gz")
    warp(capsys, "--field", out / "ddf.nii.gz", "--image", oasis["moving_label"], "--label",
         "--out", tmp_path / "l.nii.gz")  # fmt: skip
    w, ref = nib.load(str(tmp_path / "w.nii.gz")), nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(w.affine, ref.affine, atol=1e-4)
    diff = np.abs(np.asarray(w.dataobj) - np.asarray(ref.dataobj))
    assert diff[inside].max() < 1e-4, diff[inside].max()
    lab, lab_ref = nib.load(str(tmp_path / "l.nii.gz")), nib.load(str(out / "warped_label.nii.gz"))
    assert np.issubdtype(lab.get_data_dtype(), np.integer)
    assert (np.asarray(lab.dataobj) == np.asarray(lab_ref.dataobj))[inside].mean() > 0.999


def test_instance_optimisation_raises_dice(oasis, registered, tmp_path: Path):
    """Even 2 + 2 iterations of instance optimisation beat the network's field alone (mean Dice of grey and white
    matter), with less folding."""
    _, report = registered
    register("--fixed", oasis["fixed"], "--moving", oasis["moving"], "--fixed-label", oasis["fixed_label"],
             "--moving-label", oasis["moving_label"], "--out", tmp_path / "no_io", "--no-io", "--device", "cpu",
             "--quiet")  # fmt: skip
    base = json.loads((tmp_path / "no_io" / "report.json").read_text())
    without, with_io = base["field"]["dice"]["mean_registered"], report["field"]["dice"]["mean_registered"]
    print(f"OASIS B->A at 2 mm: mean Dice affine {report['field']['dice']['mean_affine']:.4f}, RAN {without:.4f}, "
          f"RAN + 2+2 io iterations {with_io:.4f}")  # fmt: skip
    assert base["instance_optimisation"]["iterations"] == [0, 0] and "optimise" not in base["timings_s"]
    assert with_io > without + 0.01
    assert report["field"]["non_positive_jacobian_percent"] <= base["field"]["non_positive_jacobian_percent"]
