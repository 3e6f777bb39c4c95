"""Apply a written displacement field to images, label maps and points: the functions behind ``ran-warp``.

The field files are ITK displacement fields (what ``ran-register`` writes as ``ddf.nii.gz`` and
``inverse_ddf.nii.gz``), so SimpleITK does the work itself: ``sitk.Resample`` with a
``DisplacementFieldTransform`` for images (``out(p) = image(p + v(p))`` on the field's grid, zero outside)
and ``TransformPoint`` for points (``p -> p + v(p)``; points outside the field's grid keep ``v = 0``, as ITK
does). Points are read from and written to CSV files with ``x, y, z`` columns in the LPS (ITK, ANTs,
Slicer) or RAS (nibabel, MONAI) frame.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ran_bundle.fields import RAS_TO_LPS, atomic_write, write_image_atomic
from ran_bundle.inputs import InputError, load_volume
from ran_bundle.spatial import ras_affine_of, read_displacement_field, to_sitk_image

__all__ = [
    "POINT_FRAMES",
    "read_field_transform",
    "read_points_csv",
    "write_points_csv",
    "warp_image_file",
    "warp_points_file",
]

POINT_FRAMES = ("lps", "ras")


def read_field_transform(path: str | os.PathLike) -> tuple[sitk.DisplacementFieldTransform, sitk.Image]:
    """Read a displacement field file as a SimpleITK transform and an empty image on the field's grid.

    Raises:
        InputError: missing, truncated or corrupt file, or not a 3-D field of 3-vectors with finite values
            (:func:`ran_bundle.spatial.read_displacement_field` checks it first).
    """
    read_displacement_field(path)  # the checks, with their messages
    field = sitk.ReadImage(os.fspath(path), sitk.sitkVectorFloat64)
    reference = sitk.Image(field.GetSize(), sitk.sitkUInt8)
    reference.CopyInformation(field)
    return sitk.DisplacementFieldTransform(field), reference


def _frame_matrix(frame: str) -> np.ndarray:
    if frame not in POINT_FRAMES:
        raise InputError(f"--frame {frame!r}: expected one of {POINT_FRAMES}.")
    return RAS_TO_LPS[:3, :3] if frame == "lps" else np.eye(3)


def read_points_csv(path: str | os.PathLike, frame: str = "lps") -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """Read landmarks from a CSV file with a header holding columns ``x``, ``y``, ``z`` (mm).

    Args:
        path: the CSV file; other columns are kept (e.g. ANTs' ``t,label,comment``).
        frame: world frame of the coordinates, ``"lps"`` or ``"ras"``.

    Returns:
        ``(rows, fieldnames, points)``: the rows as dicts, the header, ``(N, 3)`` points in **RAS**.

    Raises:
        InputError: file missing, no ``x,y,z`` header, or a non-numeric coordinate (row named).
    """
    flip = _frame_matrix(frame)
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"points {p}: file not found.")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        keys = {n.strip().lower(): n for n in names}
        if not all(k in keys for k in "xyz"):
            raise InputError(f"points {p}: needs a header row with columns x, y, z (got {names}).")
        rows = list(reader)
    pts = np.zeros((len(rows), 3))
    for i, row in enumerate(rows):
        try:
            pts[i] = [float(row[keys[k]]) for k in "xyz"]
        except (TypeError, ValueError):
            raise InputError(f"points {p}: row {i + 2} has a non-numeric coordinate: {row}.") from None
        if not np.isfinite(pts[i]).all():
            raise InputError(f"points {p}: row {i + 2} has a non-finite coordinate: {row}.")
    return rows, names, pts @ flip.T


def write_points_csv(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, str]],
    fieldnames: Sequence[str],
    points: np.ndarray,
    frame: str = "lps",
) -> Path:
    """Write ``rows`` with their ``x,y,z`` columns replaced by ``points`` (RAS, written in ``frame``), atomically."""
    flip = _frame_matrix(frame)
    keys = {n.strip().lower(): n for n in fieldnames}
    out = np.asarray(points, dtype=np.float64) @ flip.T

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames))
            writer.writeheader()
            for row, pt in zip(rows, out, strict=True):
                new = dict(row)
                for k, value in zip("xyz", pt, strict=True):
                    new[keys[k]] = f"{value:.6f}"
                writer.writerow(new)

    return atomic_write(path, write)


def warp_image_file(
    field: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, label: bool = False
) -> Path:
    """Apply a saved displacement field to an image or label map; the output lies on the field's grid.

    ``out(p) = image(p + v(p))`` for every voxel centre ``p`` of the field's grid (zero outside the image):
    ``sitk.Resample(image, field_grid, sitk.DisplacementFieldTransform(field))``. With ``ran-register``'s
    ``ddf.nii.gz``, ``image`` lives in the moving image's space and the output on the fixed grid.

    Args:
        field: ITK displacement field file.
        image: the image (linear, float32 output) or, with ``label``, the label map (nearest neighbour,
            integer values and dtype kept; float maps holding integers are written as int32).
        out: output ``.nii``/``.nii.gz`` file, written atomically.
        label: nearest-neighbour interpolation for label maps.

    Raises:
        InputError: bad field or image file, a label map with non-integer values, or a bad output name.
    """
    if not str(out).endswith((".nii", ".nii.gz")):
        raise InputError(f"--out {out}: the output image must be a .nii or .nii.gz file.")
    transform, reference = read_field_transform(field)
    vol = load_volume(image, "label map" if label else "image")
    arr = vol.array
    if label:
        if arr.dtype.kind == "f" and not np.allclose(arr, np.rint(arr), atol=1e-3):
            raise InputError(f"label map {vol.path}: holds non-integer values; drop --label for images.")
        arr = arr if arr.dtype.kind in "iu" else np.rint(arr).astype(np.int32)
        arr = arr.astype(np.int64) if arr.dtype == np.uint16 else arr
    else:
        arr = arr.astype(np.float32)
    source = to_sitk_image(arr, vol.affine)
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    result = sitk.Resample(source, reference, transform, interpolator, 0, source.GetPixelID())
    values = np.transpose(sitk.GetArrayFromImage(result), (2, 1, 0))
    return write_image_atomic(values, ras_affine_of(reference), out, arr.dtype)


def warp_points_file(
    field: str | os.PathLike, points: str | os.PathLike, out: str | os.PathLike, frame: str = "lps"
) -> tuple[Path, int]:
    """Map the landmarks of a CSV file by a saved field: ``p -> p + v(p)`` (mm), with ITK's ``TransformPoint``.

    With ``ran-register``'s ``ddf.nii.gz`` (defined on the fixed grid) this maps **fixed-space** points to
    moving space; with ``inverse_ddf.nii.gz`` it maps moving-space points to fixed space.

    Returns:
        ``(out, n_outside)``: the file written and the number of points outside the field's grid (left
        unmoved, as ITK does).
    """
    _frame_matrix(frame)
    if not str(out).lower().endswith(".csv"):
        raise InputError(f"--out {out}: the output of --points must be a .csv file.")
    transform, reference = read_field_transform(field)
    rows, names, pts = read_points_csv(points, frame)
    lps = RAS_TO_LPS[:3, :3]
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in lps @ p)) for p in pts]).reshape(-1, 3)
    mapped = mapped @ lps.T
    size = np.asarray(reference.GetSize())
    index = np.array(
        [reference.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in lps @ p)) for p in pts]
    ).reshape(-1, 3)
    outside = int((~((index >= -0.5) & (index <= size - 0.5)).all(1)).sum())
    return write_points_csv(out, rows, names, mapped, frame), outside
