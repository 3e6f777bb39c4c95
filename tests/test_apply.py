"""World-space geometry (:mod:`ran_bundle.spatial`) and ``ran-warp`` (:mod:`ran_bundle.apply`) against SimpleITK.

No network runs here: fields are smooth random ones on small grids whose headers are not RAS (axes permuted and
flipped, anisotropic voxels, offset origins), so any mix-up of axis order, frame (RAS/LPS) or direction shows.
``ran-warp`` runs in-process (:func:`ran_bundle.cli.warp_main`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.apply import read_points_csv, warp_image_file, warp_points_file, write_points_csv
from ran_bundle.cli import warp_main, warp_parser
from ran_bundle.fields import write_displacement_nifti, write_image_atomic
from ran_bundle.flow import (
    apply_matrix,
    ddf_voxel_to_mm,
    field_to_voxel_ddf,
    map_points,
    sample_affine,
    sample_voxels,
    voxel_grid,
    warp_image,
    warp_to_grid,
)
from ran_bundle.inputs import InputError
from ran_bundle.spatial import read_displacement_field, to_sitk_image

LPS = np.diag([-1.0, -1.0, 1.0])
#: a non-RAS header: file axes point P, S and L (not R, A, S), voxels 1.5 x 2.5 x 2 mm, origin off zero
OBLIQUE = np.array([[0, 0, -2.0, 5], [-1.5, 0, 0, 6], [0, 2.5, 0, 7], [0, 0, 0, 1]])


def smooth_field(shape, seed=0, amp=3.0) -> torch.Tensor:
    """``(1, 3, *shape)`` smooth random voxel DDF with maximum ``amp``."""
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(3)])
    u *= amp / np.abs(u).max()
    return torch.tensor(u[None], dtype=torch.float32)


def itk_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in ITK index order (= our array axis order)."""
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def inside_moving(d: dict, v: torch.Tensor, affine: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Fixed voxels whose mapped point lies at least ``margin`` voxels inside the moving image (where ITK and
    ``grid_sample`` agree by construction: ITK extends the border voxel over the outer half voxel)."""
    points = np.stack(np.meshgrid(*[np.arange(n) for n in d["shape"]], indexing="ij"), -1).reshape(-1, 3)
    world = points @ affine[:3, :3].T + affine[:3, 3] + v[0].numpy().reshape(3, -1).T
    index = (world - d["moving_affine"][:3, 3]) @ np.linalg.inv(d["moving_affine"][:3, :3]).T
    inside = ((index >= margin) & (index <= np.asarray(d["moving"].shape) - 1 - margin)).all(1)
    return inside.reshape(d["shape"])


def run_warp(capsys, *argv) -> tuple[int, str]:
    """``ran-warp`` in-process: (exit status, stderr)."""
    try:
        warp_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_lines(stderr: str, prog: str = "ran-warp") -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}: error:")]


@pytest.fixture
def field_and_image(tmp_path: Path) -> dict:
    """A random field (fixed grid, oblique header) and a moving image on another oblique, offset grid."""
    shape = (16, 14, 18)
    u = smooth_field(shape, seed=4, amp=2.5)
    ddf = write_displacement_nifti(u, OBLIQUE, tmp_path / "ddf.nii.gz", dtype="float64")
    moving_affine = OBLIQUE.copy()
    moving_affine[:3, 3] += [3.0, -4.5, 5.0]  # not a whole voxel
    rng = np.random.default_rng(1)
    moving = gaussian_filter(rng.random((18, 15, 20)), 2).astype(np.float32)
    labels = (moving > np.median(moving)).astype(np.int16) + (moving > np.percentile(moving, 80)).astype(np.int16)
    return {
        "shape": shape,
        "u": u,
        "ddf": ddf,
        "moving_affine": moving_affine,
        "moving": moving,
        "labels": labels,
        "moving_path": write_image_atomic(moving, moving_affine, tmp_path / "moving.nii.gz"),
        "label_path": write_image_atomic(labels, moving_affine, tmp_path / "labels.nii.gz"),
    }


# ------------------------------------------------------------------------------------------------
# spatial: the package's own warps
# ------------------------------------------------------------------------------------------------


def test_sample_voxels_is_the_package_warp_on_other_grids():
    img = torch.rand(1, 2, 12, 10, 9)
    ddf = smooth_field((12, 10, 9), seed=2)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (12, 10, 9)], indexing="ij")).double()
    coords = grid[None] + ddf.double()
    same = sample_voxels(img, coords)  # indices on the same grid: the warp of their displacement
    assert torch.allclose(same, warp_image(img, ddf), atol=1e-6)
    # a smaller output grid: the same values where the grids overlap
    other = sample_voxels(img, coords[..., :-2])
    assert other.shape == (1, 2, 12, 10, 7)
    assert torch.allclose(other, same[..., :-2], atol=1e-5)
    lab = torch.randint(0, 5, (1, 1, 12, 10, 9), dtype=torch.int16)
    near = sample_voxels(lab, coords[..., :-2], mode="nearest")
    assert near.dtype == torch.int16
    assert torch.equal(near, warp_image(lab, ddf, mode="nearest")[..., :-2])


def test_sample_affine_equals_sample_voxels_of_the_mapped_grid():
    """``sample_affine`` builds its sampling grid with ``F.affine_grid``; it must sample where ``sample_voxels`` of
    the mapped voxel indices does, on another grid size, for an oblique map, in both modes."""
    rng = np.random.default_rng(4)
    img = torch.rand(1, 3, 14, 11, 9)
    index_map = np.eye(4)
    index_map[:3, :3] += 0.15 * rng.standard_normal((3, 3))
    index_map[:3, 3] = [1.3, -0.7, 0.4]
    shape = (10, 12, 7)
    coords = apply_matrix(index_map, voxel_grid(shape))
    for padding in ("zeros", "border"):
        ours = sample_affine(img, index_map, shape, padding_mode=padding)
        assert ours.shape == (1, 3, *shape)
        assert torch.allclose(ours, sample_voxels(img, coords, padding_mode=padding), atol=1e-5)
    lab = torch.randint(0, 5, (1, 1, 14, 11, 9), dtype=torch.int16)
    near = sample_affine(lab, index_map, shape, mode="nearest")
    assert near.dtype == torch.int16
    assert (near != sample_voxels(lab, coords, mode="nearest")).float().mean() < 0.01  # float32 ties aside


def test_read_displacement_field_inverts_the_writer(tmp_path: Path):
    u = smooth_field((7, 8, 9), seed=3)
    path = write_displacement_nifti(u, OBLIQUE, tmp_path / "ddf.nii.gz", dtype="float64")
    v, affine = read_displacement_field(path)
    np.testing.assert_allclose(affine, OBLIQUE, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), ddf_voxel_to_mm(u.double(), OBLIQUE).numpy(), atol=1e-6)
    np.testing.assert_allclose(field_to_voxel_ddf(v, affine).numpy(), u.numpy(), atol=1e-5)
    with pytest.raises(InputError, match="not a 3D displacement field"):
        read_displacement_field(
            write_image_atomic(np.zeros((4, 4, 4), np.float32), OBLIQUE, tmp_path / "scalar.nii.gz")
        )
    with pytest.raises(InputError, match="file not found"):
        read_displacement_field(tmp_path / "absent.nii.gz")


def test_warp_to_grid_equals_simpleitk_resample(field_and_image):
    """Our torch warp (``flow.warp_to_grid``, whose mapping the pipeline uses) and ``sitk.Resample`` with the written
    field (what ``ran-warp`` and every ITK tool use) agree on oblique, offset grids."""
    d = field_and_image
    v, affine = read_displacement_field(d["ddf"])
    ours = warp_to_grid(torch.from_numpy(d["moving"])[None, None], d["moving_affine"], v, affine)[0, 0].numpy()
    moving = to_sitk_image(d["moving"], d["moving_affine"])
    field = sitk.ReadImage(str(d["ddf"]), sitk.sitkVectorFloat64)
    reference = sitk.Image(field.GetSize(), sitk.sitkFloat32)
    reference.CopyInformation(field)
    itk = itk_array(sitk.Resample(moving, reference, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0))
    inside = inside_moving(d, v, affine)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], itk[inside], atol=1e-5)
    # sensitivity: the field the other way round, or the moving grid's offset ignored, would be far off
    flipped = warp_to_grid(torch.from_numpy(d["moving"])[None, None], d["moving_affine"], -v, affine)[0, 0].numpy()
    no_offset = warp_to_grid(torch.from_numpy(d["moving"])[None, None], OBLIQUE, v, affine)[0, 0].numpy()
    for bad in (flipped, no_offset):
        assert np.abs(bad - itk)[inside].mean() > 100 * np.abs(ours - itk)[inside].mean() + 1e-3


def test_map_points_matches_itk_transform_point(tmp_path: Path):
    shape = (10, 12, 9)
    u = smooth_field(shape, seed=4, amp=2.0)
    path = write_displacement_nifti(u, OBLIQUE, tmp_path / "ddf.nii.gz", dtype="float64")
    v, affine = read_displacement_field(path)
    rng = np.random.default_rng(5)
    idx = rng.uniform(-0.4, np.asarray(shape) - 0.6, size=(200, 3))
    idx = np.vstack([idx, [[-3.0, 2.0, 2.0], [2.0, 40.0, 1.0]]])  # two points outside the grid
    pts_ras = (OBLIQUE[:3, :3] @ idx.T).T + OBLIQUE[:3, 3]
    mapped, inside = map_points(pts_ras, v, affine)
    assert inside[:200].all() and not inside[200:].any()
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    itk = np.array([transform.TransformPoint(tuple(float(c) for c in LPS @ p)) for p in pts_ras]) @ LPS
    np.testing.assert_allclose(mapped, itk, atol=1e-4)
    np.testing.assert_allclose(mapped[200:], pts_ras[200:])  # outside: unmoved, as ITK
    assert np.abs(mapped - pts_ras).max() > 1.0


def test_points_csv_round_trip(tmp_path: Path):
    pts_ras = np.array([[1.0, -2.0, 3.5], [-10.25, 4.0, 0.0], [7.0, 8.0, -9.0]])
    csv_in = tmp_path / "pts.csv"
    with open(csv_in, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["X", "y", "z", "name"])
        for i, p in enumerate(pts_ras @ LPS):
            w.writerow([*p, f"p{i}"])
    rows, names, pts = read_points_csv(csv_in, frame="lps")
    np.testing.assert_allclose(pts, pts_ras)
    out = write_points_csv(tmp_path / "o.csv", rows, names, pts, frame="ras")
    rows2, names2, back = read_points_csv(out, frame="ras")
    assert names2 == ["X", "y", "z", "name"] and [r["name"] for r in rows2] == ["p0", "p1", "p2"]
    np.testing.assert_allclose(back, pts_ras, atol=1e-5)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="x, y, z"):
        read_points_csv(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("x,y,z\n1,2,abc\n")
    with pytest.raises(InputError, match="row 2 has a non-numeric coordinate"):
        read_points_csv(tmp_path / "nan.csv")


# ------------------------------------------------------------------------------------------------
# ran-warp
# ------------------------------------------------------------------------------------------------


def test_ran_warp_image_and_label_equal_our_warp(field_and_image, tmp_path: Path, capsys):
    d = field_and_image
    code, err = run_warp(capsys, "--field", d["ddf"], "--image", d["moving_path"], "--out", tmp_path / "w.nii.gz")
    assert code == 0, err
    code, err = run_warp(
        capsys, "--field", d["ddf"], "--image", d["label_path"], "--label", "--out", tmp_path / "l.nii.gz"
    )
    assert code == 0, err
    v, affine = read_displacement_field(d["ddf"])
    warped, labels = nib.load(str(tmp_path / "w.nii.gz")), nib.load(str(tmp_path / "l.nii.gz"))
    np.testing.assert_allclose(warped.affine, affine, atol=1e-4)  # on the field's grid
    assert warped.shape == labels.shape == d["shape"]
    ours = warp_to_grid(torch.from_numpy(d["moving"])[None, None], d["moving_affine"], v, affine)[0, 0].numpy()
    inside = inside_moving(d, v, affine)
    np.testing.assert_allclose(np.asarray(warped.dataobj)[inside], ours[inside], atol=1e-5)
    # the Python function writes the same file
    again = warp_image_file(d["ddf"], d["moving_path"], tmp_path / "again.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(again)).dataobj), np.asarray(warped.dataobj))
    assert np.issubdtype(labels.get_data_dtype(), np.integer)
    labels_in = torch.from_numpy(d["labels"])[None, None]
    lab_ours = warp_to_grid(labels_in, d["moving_affine"], v, affine, mode="nearest")[0, 0].numpy()
    assert (np.asarray(labels.dataobj) == lab_ours)[inside_moving(d, v, affine, 0.5)].mean() > 0.999
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}


def test_ran_warp_points_equal_map_points(field_and_image, tmp_path: Path, capsys):
    d = field_and_image
    v, affine = read_displacement_field(d["ddf"])
    rng = np.random.default_rng(7)
    idx = rng.uniform(0, np.asarray(d["shape"]) - 1, size=(50, 3))
    idx = np.vstack([idx, [[-5.0, 0.0, 0.0]]])  # outside the field's grid
    pts_ras = idx @ affine[:3, :3].T + affine[:3, 3]
    for frame, flip in (("lps", LPS), ("ras", np.eye(3))):
        csv_in, csv_out = tmp_path / f"in_{frame}.csv", tmp_path / f"out_{frame}.csv"
        with open(csv_in, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y", "z", "id"])
            for i, p in enumerate(pts_ras @ flip):
                w.writerow([*p, i])
        code, err = run_warp(capsys, "--field", d["ddf"], "--points", csv_in, "--out", csv_out, "--frame", frame)
        assert code == 0, err
        assert "1 point(s) outside the field's grid were left unmoved" in err
        _, _, mapped = read_points_csv(csv_out, frame=frame)
        expected, inside = map_points(pts_ras, v, affine)
        np.testing.assert_allclose(mapped, expected, atol=1e-4)
        assert inside.sum() == 50
        path, outside = warp_points_file(d["ddf"], csv_in, tmp_path / "again.csv", frame=frame)
        assert outside == 1


def test_ran_warp_bad_field_and_output_fail_cleanly(field_and_image, tmp_path: Path, capsys):
    d = field_and_image
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["--field", d["moving_path"], "--image", d["moving_path"], "--out", out / "o.nii.gz"],
         "moving.nii.gz: not a 3D displacement field"),
        (["--field", tmp_path / "missing.nii.gz", "--points", d["moving_path"], "--out", out / "o.csv"],
         "missing.nii.gz: file not found"),
        (["--field", d["ddf"], "--image", d["moving_path"], "--out", out / "o.png"], "must be a .nii or .nii.gz"),
        (["--field", d["ddf"], "--image", d["moving_path"]], "the following arguments are required: --out"),
        (["--field", d["ddf"], "--image", d["moving_path"], "--points", "p.csv", "--out", out / "o.nii.gz"],
         "not allowed with argument"),
        (["--field", d["ddf"], "--image", d["moving_path"], "--out", out / "o.nii.gz", "--frame", "xyz"],
         "invalid choice: 'xyz'"),
    ]  # fmt: skip
    for argv, expected in cases:
        code, err = run_warp(capsys, *argv)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and len(error_lines(err)) == 1, err
        assert expected in err, (expected, err)
    assert list(out.iterdir()) == []


def test_ran_warp_refuses_a_truncated_field(field_and_image, tmp_path: Path, capsys):
    """User study: a ``ddf.nii.gz`` cut off by a full disk was applied without a word (SimpleITK reads the missing
    voxels as zeros). Now: exit 2, one line naming the file, nothing written."""
    d = field_and_image
    data = Path(d["ddf"]).read_bytes()
    Path(d["ddf"]).write_bytes(data[: len(data) // 2])
    out = tmp_path / "warped.nii.gz"
    code, err = run_warp(capsys, "--field", d["ddf"], "--image", d["moving_path"], "--out", out, "--quiet")
    assert code == 2
    assert err.splitlines() == error_lines(err) and len(error_lines(err)) == 1, err
    assert f"field {d['ddf']}: truncated or corrupt file" in err
    assert not out.exists()


def test_help_states_the_point_direction():
    text = " ".join(warp_parser().format_help().split())
    assert "ddf.nii.gz maps FIXED-space points to MOVING space" in text
    assert "inverse_ddf.nii.gz maps moving-space points to fixed space" in text and "lps" in text
