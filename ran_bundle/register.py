"""Register one pair of 3D images from files, the way users of registration tools expect.

This module is the pipeline behind the ``ran-register`` and ``ran-warp`` commands
(:mod:`ran_bundle.cli`); every step is an importable function.

``ran-register`` (:func:`register_files`):

1. **Check the inputs** before any network work (:func:`load_volume`, :func:`check_same_grid`,
   :func:`load_network`): missing or unreadable files, images that are not 3D, NaN/infinite values,
   label maps whose grid (shape or affine) differs from their image's, weights that cannot be read
   or do not fit the preset. Each raises :class:`InputError` naming the file and the problem.
2. **Preprocess** exactly like the bundle: :func:`ran_bundle.transforms.registration_transforms`
   (``mode="infer"``): RAS orientation, resampling to ``spacing``, intensity scaling, zero padding
   of both images to one shape divisible by 16 (:func:`preprocess_pair`).
3. Optionally **fine-tune** a copy of the network on this pair (instance optimisation,
   :func:`instance_optimise`) with the training loss :class:`ran_bundle.losses.RegistrationLoss`.
4. **Predict** the voxel DDF ``u`` ``(1, 3, *S)`` on the preprocessed fixed grid (and, with
   ``inverse``, the backward DDF on the preprocessed moving grid) (:func:`predict`).
5. Turn ``u`` into the world displacement ``v(p)`` (mm, RAS) of the network's warp
   (:func:`ran_bundle.fields.ddf_voxel_to_mm`, moving affine included) and resample it onto the
   **original fixed image grid** (:func:`resample_field`). Every output lives on that grid, in the
   fixed image's physical space, with the original intensities of the moving image.
6. **Write** (:mod:`ran_bundle.fields` writers) into a temporary folder next to ``out`` that is
   renamed (or whose files are moved) into place at the end, so a failed run leaves nothing.

Conventions (those of :mod:`ran_bundle.fields`): affines are 4x4 voxel-to-world matrices in the
**RAS** frame; a world field ``v`` ``(3, *S)`` on a grid with affine ``A`` maps the point
``p = A y`` (voxel ``y``) to ``p + v(p)``. The forward field ``ddf.nii.gz`` is defined on the fixed
grid and maps **fixed-space points to moving space**, so warping pulls the moving image:
``warped(p) = moving(p + v(p))``. Written fields follow ITK's displacement-field convention
(vectors in mm in the **LPS** frame), which SimpleITK, ITK, ANTs and 3D Slicer read.

``ran-warp`` (:func:`warp_image_file`, :func:`warp_points_file`): applies such a field file to
another image (linear) or label map (nearest neighbour), output on the field's grid, or maps
points ``p -> p + v(p)`` (fixed-space landmarks to moving space).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ran_bundle.checks import (
    InputError,
    Volume,
    check_same_grid,
    check_state_dict_fits,
    load_volume,
    read_state_dict,
)
from ran_bundle.data import PAIR_KEYS
from ran_bundle.fields import (
    as_affine,
    atomic_write,
    ddf_voxel_to_mm,
    spacing_of,
    write_displacement_nifti,
    write_image_atomic,
)
from ran_bundle.losses import RegistrationLoss
from ran_bundle.metrics import dice, jacobian_determinant
from ran_bundle.networks import PRESETS, ResidualAlignerNetwork
from ran_bundle.networks.blocks import warp
from ran_bundle.spatial import (
    field_to_voxel_ddf,
    map_points,
    read_displacement_field,
    resample_field,
    sample_voxels,
    voxel_grid,
    voxel_to_world,
    warp_to_grid,
    world_to_voxel,
)
from ran_bundle.tensors import as_plain_tensor, autocast_if
from ran_bundle.transforms import registration_transforms

__all__ = [
    "InputError",
    "Volume",
    "DEFAULT_WEIGHTS",
    "INTENSITIES",
    "parse_spacing",
    "resolve_device",
    "load_volume",
    "check_same_grid",
    "load_network",
    "preprocess_pair",
    "predict",
    "instance_optimise",
    "read_points_csv",
    "write_points_csv",
    "overview_png",
    "register_files",
    "warp_image_file",
    "warp_points_file",
]

logger = logging.getLogger(__name__)

MOVING, FIXED = PAIR_KEYS[:2]
INTENSITIES = ("ct", "mr", "none")
POINT_FRAMES = ("lps", "ras")
#: the shipped brain MR weights (``models/model.pt`` of the bundle root)
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "model.pt"


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def parse_spacing(spacing: Any) -> tuple[float, float, float] | None:
    """Normalise a ``--spacing`` value: ``None``/``"none"`` (keep each grid), one number (isotropic) or three.

    Accepts numbers, sequences and strings such as ``"2"``, ``"2,2,3"``, ``"2 2 3"``, ``"[2, 2, 3]"``.

    Raises:
        InputError: not 1 or 3 positive finite numbers.
    """
    if spacing is None or (isinstance(spacing, str) and spacing.strip().lower() in ("none", "null", "")):
        return None
    raw = spacing
    if isinstance(spacing, str):
        spacing = [s for s in spacing.strip("[]() ").replace(",", " ").split() if s]
    if isinstance(spacing, (int, float)):
        spacing = [spacing]
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise InputError(f"--spacing {raw!r}: expected 'none', one number or three numbers (mm).") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--spacing {raw!r}: expected 'none', one number or three positive numbers (mm).")
    return (values[0], values[1], values[2])


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise ``device`` checked for availability.

    Raises:
        InputError: an unknown device string, or CUDA requested where it is not available.
    """
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu).")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'.")
    return dev


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------


def load_network(
    weights: str | os.PathLike, preset: str = "ref", device: torch.device | str = "cpu"
) -> ResidualAlignerNetwork:
    """Build ``ResidualAlignerNetwork(3, preset)`` and load ``weights`` into it, in eval mode.

    Args:
        weights: a bundle checkpoint (dict whose ``"model"`` entry is the state dict, as the bundle's
            training writes) or a plain state dict; a DDP ``"module."`` prefix is removed.
        preset: the preset the weights were trained with (see :data:`ran_bundle.networks.PRESETS`).
        device: where to put the network.

    Raises:
        InputError: unknown preset, file missing or unreadable, not a state dict, or not fitting the
            preset (missing/unexpected keys or shape mismatches, the first few named).
    """
    if preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: unknown; choose one of {sorted(PRESETS)}.")
    state = read_state_dict(weights)
    net = ResidualAlignerNetwork(spatial_dims=3, preset=preset)
    check_state_dict_fits(
        state,
        net,
        os.fspath(weights),
        f"the RAN preset {preset!r}",
        "pass the --preset the weights were trained with.",
    )
    net.load_state_dict(state)
    return net.to(device).eval()


# --------------------------------------------------------------------------------------------------
# network steps
# --------------------------------------------------------------------------------------------------


def preprocess_pair(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    spacing: Sequence[float] | None = (2.0, 2.0, 2.0),
    intensity: str = "mr",
    reader: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundle's inference preprocessing of one pair (:func:`~ran_bundle.transforms.registration_transforms`).

    Returns:
        ``(moving, fixed)``: two ``MetaTensor`` ``(1, *S)`` float32 on their preprocessed grids (one
        shape ``S`` divisible by 16; ``.affine`` RAS, possibly different for the two).
    """
    xform = registration_transforms(
        mode="infer", spacing=spacing, intensity=intensity, with_labels=False, reader=reader
    )
    data = xform({MOVING: os.fspath(moving), FIXED: os.fspath(fixed)})
    return data[MOVING], data[FIXED]


def predict(
    net: ResidualAlignerNetwork,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    backward: bool = False,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the network on one preprocessed pair.

    Args:
        net: the network (its device is used).
        moving: ``(1, *S)`` or ``(1, 1, *S)`` preprocessed moving image.
        fixed: the same for the fixed image.
        backward: also return the backward DDF (:meth:`ResidualAlignerNetwork.register`).
        amp: run under ``torch.autocast`` on the network's device.

    Returns:
        ``(ddf, backward_ddf)``: ``(1, 3, *S)`` float32 CPU tensors in voxels. ``ddf`` lives on the
        fixed grid (``warped(x) = moving(x + ddf(x))``); ``backward_ddf`` (``None`` unless
        ``backward``) lives on the moving grid and warps the fixed image onto it.
    """
    device = next(net.parameters()).device
    m, f = (as_plain_tensor(t).float() for t in (moving, fixed))
    m, f = (t[None] if t.ndim == 4 else t for t in (m, f))
    x = torch.cat([m, f], dim=1).to(device)
    net.eval()
    with torch.no_grad(), autocast_if(amp, device):
        if backward:
            out = net.register(x)
            return out.ddf.float().cpu(), out.backward_ddf.float().cpu()
        return net(x).float().cpu(), None


def instance_optimise(
    net: ResidualAlignerNetwork,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    loss: Callable[..., torch.Tensor] | None = None,
    amp: bool = False,
    progress: bool = True,
) -> tuple[ResidualAlignerNetwork, list[float]]:
    """Fine-tune a **copy** of ``net`` on one pair (instance optimisation) and return it in eval mode.

    Each of ``steps`` Adam steps is the bundle's training step on the whole preprocessed pair
    (:class:`~ran_bundle.engines.RegistrationTrainStep`): ``ddf = net(cat[moving, fixed])``,
    ``warped = warp(moving, ddf)``, ``loss(warped, fixed, ddf)``, backward, step.

    Args:
        net: the trained network (left unchanged).
        moving: ``(1, *S)`` or ``(1, 1, *S)`` preprocessed moving image.
        fixed: the same for the fixed image.
        steps: number of Adam steps (0 returns a copy unchanged).
        lr: Adam learning rate.
        loss: called as ``loss(warped, fixed, ddf)``; default ``RegistrationLoss(3)``, the defaults of
            ``configs/train.json`` (``2 * -NCC(window 8, mask > 0.1) + 0.5 * edge-aware smoothness``).
        amp: mixed precision (``torch.autocast``, with a gradient scaler on CUDA).
        progress: show a tqdm bar on stderr.

    Returns:
        ``(network, losses)``: the fine-tuned copy and the loss of each step.

    Raises:
        RuntimeError: a non-finite loss (names the step).
    """
    from tqdm import tqdm

    device = next(net.parameters()).device
    tuned = copy.deepcopy(net).to(device)
    m, f = (as_plain_tensor(t).float() for t in (moving, fixed))
    m, f = (t[None] if t.ndim == 4 else t for t in (m, f))
    m, f = m.to(device), f.to(device)
    x = torch.cat([m, f], dim=1)
    loss_fn = loss if loss is not None else RegistrationLoss(spatial_dims=3)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=float(lr))
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    history: list[float] = []
    tuned.train()
    bar = tqdm(range(int(steps)), desc="instance optimisation", file=sys.stderr, disable=not progress, leave=True)
    for step in bar:
        optimiser.zero_grad(set_to_none=True)
        with autocast_if(amp, device):
            ddf = tuned(x)
        ddf = ddf.float()  # the loss (local NCC sums) in float32
        value = loss_fn(warp(m, ddf), f, ddf)
        if not torch.isfinite(value):
            raise RuntimeError(
                f"instance optimisation: non-finite loss at step {step}; lower --io-lr or disable --amp."
            )
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(optimiser)
            scaler.update()
        else:
            value.backward()
            optimiser.step()
        history.append(float(value.detach()))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    return tuned.eval(), history


def _frame_matrix(frame: str) -> np.ndarray:
    if frame not in POINT_FRAMES:
        raise InputError(f"--frame {frame!r}: expected one of {POINT_FRAMES}.")
    return np.diag([-1.0, -1.0, 1.0]) if frame == "lps" else np.eye(3)


def read_points_csv(path: str | os.PathLike, frame: str = "lps") -> tuple[list[dict[str, str]], list[str], np.ndarray]:
    """Read landmarks from a CSV file with a header holding columns ``x``, ``y``, ``z`` (mm).

    Args:
        path: the CSV file; other columns are kept (e.g. ANTs' ``t,label,comment``).
        frame: world frame of the coordinates, ``"lps"`` (ITK, ANTs, Slicer files) or ``"ras"``
            (nibabel, MONAI).

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


# --------------------------------------------------------------------------------------------------
# quick-look figure
# --------------------------------------------------------------------------------------------------


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(255.0 * (x - lo) / max(hi - lo, 1e-12), 0, 255).astype(np.uint8)


def _stretch(n: int, factor: float) -> np.ndarray:
    """Indices that repeat ``n`` voxels of relative size ``factor >= 1`` over ``round(n * factor)`` pixels."""
    return np.minimum((np.arange(max(1, round(n * factor))) / factor).astype(int), n - 1)


def _window(x: np.ndarray) -> tuple[float, float]:
    vals = x[np.isfinite(x)]
    lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def overview_png(
    path: str | os.PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    mapped_points: np.ndarray,
    affine: np.ndarray,
    grid_mm: float = 8.0,
) -> Path:
    """Write a quick-look PNG (SimpleITK): orthogonal mid slices of the fixed grid.

    Rows: fixed, moving (resampled onto the fixed grid, not deformed), warped moving,
    checkerboard of fixed and warped, deformation grid (lines every ``grid_mm`` of the moving space
    drawn where they land on the fixed grid). Columns: sagittal, coronal, axial. Volumes are shown
    in the closest RAS orientation (superior and anterior up; patient's right on the right in coronal
    and axial views) with voxels stretched to their physical aspect.

    Args:
        path: the ``.png`` file.
        fixed: ``(X, Y, Z)`` fixed image.
        moving: ``(X, Y, Z)`` moving image on the fixed grid (identity resampling).
        warped: ``(X, Y, Z)`` registered moving image on the fixed grid.
        mapped_points: ``(3, X, Y, Z)`` world points ``p + v(p)`` (RAS mm) of the fixed voxels.
        affine: ``(4, 4)`` RAS affine of the fixed grid.
        grid_mm: line spacing of the deformation grid.
    """
    import nibabel as nib
    import SimpleITK as sitk

    ornt = nib.orientations.io_orientation(affine)
    canon = [nib.orientations.apply_orientation(a, ornt) for a in (fixed, moving, warped)]
    q = np.stack([nib.orientations.apply_orientation(c, ornt) for c in mapped_points])
    sp = np.asarray([np.linalg.norm(affine[:3, int(i)]) for i in np.argsort(ornt[:, 0])])  # canonical axis sizes
    f_lo, f_hi = _window(canon[0])
    m_lo, m_hi = _window(canon[1])

    def grid_lines(qa: np.ndarray, qb: np.ndarray) -> np.ndarray:
        def near(v: np.ndarray) -> np.ndarray:
            d = np.abs(v / grid_mm - np.round(v / grid_mm)) * grid_mm
            return np.exp(-((d / (0.6 * float(sp.min()))) ** 2))

        return (255 * np.maximum(near(qa), near(qb))).astype(np.uint8)

    columns = []
    for axis in range(3):  # sagittal (x fixed), coronal (y fixed), axial (z fixed)
        mid = canon[0].shape[axis] // 2
        inplane = [a for a in range(3) if a != axis]

        def cut(a: np.ndarray, axis: int = axis, mid: int = mid) -> np.ndarray:
            return np.take(a, mid, axis=axis)  # (in-plane a0, in-plane a1)

        f, m, w = (cut(c) for c in canon)
        f8, m8, w8 = _to_uint8(f, f_lo, f_hi), _to_uint8(m, m_lo, m_hi), _to_uint8(w, m_lo, m_hi)
        block = max(4, max(f.shape) // 8)
        ii, jj = np.meshgrid(np.arange(f.shape[0]) // block, np.arange(f.shape[1]) // block, indexing="ij")
        checker = np.where((ii + jj) % 2 == 0, f8, w8)
        grid = grid_lines(cut(q[inplane[0]]), cut(q[inplane[1]]))
        tiles = []
        for t in (f8, m8, w8, checker, grid):
            # physical aspect: repeat rows/columns by the voxel size relative to the finest one
            reps = [_stretch(n, sp[a] / sp.min()) for n, a in zip(t.shape, inplane, strict=True)]
            t = t[np.ix_(reps[0], reps[1])]
            tiles.append(np.flipud(t.T))  # rows: second in-plane axis, upwards; columns: first axis
        columns.append(tiles)
    sep = 2
    heights = [max(col[r].shape[0] for col in columns) for r in range(5)]
    widths = [max(t.shape[1] for t in col) for col in columns]
    canvas = np.zeros((sum(heights) + sep * 4, sum(widths) + sep * 2), dtype=np.uint8)
    y = 0
    for r in range(5):
        x = 0
        for c, col in enumerate(columns):
            t = col[r]
            canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
            x += widths[c] + sep
        y += heights[r] + sep
    path = Path(path)
    sitk.WriteImage(sitk.GetImageFromArray(canvas), str(path))
    return path


# --------------------------------------------------------------------------------------------------
# output folder
# --------------------------------------------------------------------------------------------------


@contextmanager
def _staging_dir(out: Path):
    """Yield a temporary folder next to ``out``; on success move its files into ``out``, else remove it all.

    ``out`` is created by a single rename when it does not exist yet (so it appears complete or not at
    all); into an existing folder each file is moved with ``os.replace``. Parent folders created here
    are removed again on failure.
    """
    out = Path(out).absolute()
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for d in reversed(created):
        d.mkdir()
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        # mkdtemp creates a private (0700) folder: give it the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
    except BaseException:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _check_out_dir(out: str | os.PathLike) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder.")
    return p


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return np.asarray(o).tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    def clean(o: Any) -> Any:  # JSON has no NaN: write null
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(data), indent=2, default=default) + "\n")


# --------------------------------------------------------------------------------------------------
# the two commands
# --------------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, message: str | None = None):
        if message:
            logger.info(message)
        t = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def _dice_table(warped_label: np.ndarray, moving_label_id: np.ndarray, fixed_label: np.ndarray) -> dict[str, Any]:
    """Dice per non-zero fixed label, before (identity) and after registration, and the means."""
    labels = [int(v) for v in np.unique(fixed_label) if v != 0]
    per = {
        str(lab): {
            "before": dice(moving_label_id == lab, fixed_label == lab),
            "after": dice(warped_label == lab, fixed_label == lab),
        }
        for lab in labels
    }
    mean = {k: float(np.mean([v[k] for v in per.values()])) if per else math.nan for k in ("before", "after")}
    return {"labels": per, "mean_before": mean["before"], "mean_after": mean["after"]}


def register_files(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    out: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    preset: str = "ref",
    device: str | None = None,
    amp: bool = False,
    spacing: Any = (2.0, 2.0, 2.0),
    intensity: str = "mr",
    io_steps: int = 0,
    io_lr: float = 1e-3,
    inverse: bool = False,
    png: bool = False,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` and write the results into the folder ``out``.

    Outputs, all on the **original fixed image grid** (its shape and affine) unless stated:

    - ``warped.nii.gz``: the moving image (original intensities, float32) pulled onto the fixed grid;
    - ``warped_label.nii.gz``: the moving label map, nearest neighbour (with ``moving_label``);
    - ``ddf.nii.gz``: the displacement field, ITK convention (vectors in mm, LPS frame); it maps a
      fixed-space point ``p`` to the moving-space point ``p + v(p)``;
    - ``jacobian.nii.gz``: determinant of the Jacobian of ``p -> p + v(p)`` (float32);
    - ``inverse_ddf.nii.gz`` (``inverse``): the backward field, on the **original moving grid**, ITK
      convention; it maps a moving-space point ``q`` to the fixed-space point ``q + w(q)``;
    - ``overview.png`` (``png``): orthogonal slices (see :func:`overview_png`);
    - ``report.json``: arguments, timings per stage, folding statistics, Dice before/after (with both
      label maps), network grid, instance-optimisation losses.

    Args:
        fixed: fixed image file.
        moving: moving image file.
        out: output folder (created; existing files of the same names are replaced).
        moving_label: optional moving label map, on the moving image's grid.
        fixed_label: optional fixed label map, on the fixed image's grid (Dice needs both labels).
        weights: checkpoint; default: the bundle's ``models/model.pt`` (brain MR, 2 mm, ``mr``).
        preset: RAN preset of the weights.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``: CUDA when available.
        amp: mixed precision on the device.
        spacing: resampling of the preprocessing (mm), see :func:`parse_spacing`; must match the
            weights' training (2 mm for the shipped model).
        intensity: ``"ct"``, ``"mr"`` or ``"none"`` (as at training).
        io_steps: instance-optimisation steps (0 = off).
        io_lr: their Adam learning rate.
        inverse: also write ``inverse_ddf.nii.gz``.
        png: also write ``overview.png``.
        progress: tqdm bar for the instance optimisation.
        arguments: the command's arguments, copied into the report (default: these arguments).

    Returns:
        The report (also written as ``report.json``).

    Raises:
        InputError: any problem with the inputs, raised before the network runs and before anything is
            written.
    """
    timer = _Timer()
    args = (
        dict(arguments)
        if arguments is not None
        else {
            "fixed": os.fspath(fixed),
            "moving": os.fspath(moving),
            "out": os.fspath(out),
            "moving_label": moving_label,
            "fixed_label": fixed_label,
            "weights": weights,
            "preset": preset,
            "device": device,
            "amp": amp,
            "spacing": spacing,
            "intensity": intensity,
            "io_steps": io_steps,
            "io_lr": io_lr,
            "inverse": inverse,
            "png": png,
        }
    )

    # ---- 1. checks (no network work, nothing written) ----
    with timer.stage("check_inputs", "checking the inputs"):
        spacing_mm = parse_spacing(spacing)
        if intensity not in INTENSITIES:
            raise InputError(f"--intensity {intensity!r}: expected one of {INTENSITIES}.")
        if isinstance(io_steps, bool) or not isinstance(io_steps, int) or io_steps < 0:
            raise InputError(f"--io-steps {io_steps!r}: expected a non-negative integer.")
        if isinstance(io_lr, bool) or not isinstance(io_lr, (int, float)) or not io_lr > 0:
            raise InputError(f"--io-lr {io_lr!r}: expected a positive number.")
        dev = resolve_device(device)
        out_dir = _check_out_dir(out)
        fixed_v = load_volume(fixed, "fixed image", require_contrast=True)
        moving_v = load_volume(moving, "moving image", require_contrast=True)
        fixed_l = moving_l = None
        if fixed_label is not None:
            fixed_l = load_volume(fixed_label, "fixed label")
            check_same_grid(fixed_l, fixed_v)
        if moving_label is not None:
            moving_l = load_volume(moving_label, "moving label")
            check_same_grid(moving_l, moving_v)
        weights_path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    with timer.stage("load_weights", f"loading {weights_path} (preset {preset!r}) on {dev}"):
        net = load_network(weights_path, preset, dev)

    # ---- 2. preprocessing and network ----
    with timer.stage("preprocess", f"preprocessing (spacing {spacing_mm}, intensity {intensity!r})"):
        moving_p, fixed_p = preprocess_pair(fixed_v.path, moving_v.path, spacing_mm, intensity)
        a_fp, a_mp = (as_affine(t.affine) for t in (fixed_p, moving_p))
    logger.info("network grid %s at %s mm", tuple(fixed_p.shape[1:]), tuple(round(s, 3) for s in spacing_of(a_fp)))
    io_losses: list[float] = []
    if io_steps:
        with timer.stage("instance_optimisation", f"instance optimisation: {int(io_steps)} Adam steps, lr {io_lr}"):
            net, io_losses = instance_optimise(net, moving_p, fixed_p, int(io_steps), io_lr, amp=amp, progress=progress)
    with timer.stage("predict", "predicting the displacement field"):
        ddf, backward_ddf = predict(net, moving_p, fixed_p, backward=inverse, amp=amp)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ---- 3. world fields on the original grids, warps ----
    with timer.stage("resample", "resampling the field onto the fixed image grid and warping"):
        shape_f = fixed_v.array.shape
        v_net = ddf_voxel_to_mm(ddf, a_fp, moving_affine=a_mp)  # (1, 3, *S) mm RAS on the network grid
        v = resample_field(v_net, a_fp, shape_f, fixed_v.affine)  # (1, 3, *shape_f)
        u = field_to_voxel_ddf(v, fixed_v.affine)
        zero = torch.zeros_like(v)
        warped = warp_to_grid(moving_v.tensor(), moving_v.affine, v, fixed_v.affine)[0, 0]
        warped_label = moving_label_id = None
        if moving_l is not None:
            lab = torch.from_numpy(np.ascontiguousarray(moving_l.array))[None, None]
            lab = lab if lab.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8) else lab.round().int()
            warped_label = warp_to_grid(lab, moving_v.affine, v, fixed_v.affine, mode="nearest")[0, 0]
            if fixed_l is not None:
                moving_label_id = warp_to_grid(lab, moving_v.affine, zero, fixed_v.affine, mode="nearest")[0, 0]
        v_inv = None
        if backward_ddf is not None:
            w_net = ddf_voxel_to_mm(backward_ddf, a_mp, moving_affine=a_fp)  # on the moving network grid
            v_inv = resample_field(w_net, a_mp, moving_v.array.shape, moving_v.affine)

    # ---- 4. metrics ----
    with timer.stage("metrics", "computing the metrics"):
        jac = jacobian_determinant(u[0])  # (*shape_f) float64
        # the definitions of metrics.non_positive_jacobian and metrics.sdlogj, on the determinant computed once
        count = int((jac <= 0).sum())
        report_field = {
            "grid": "fixed image",
            "non_positive_jacobian_count": count,
            "non_positive_jacobian_percent": 100.0 * count / jac.numel(),
            "sdlogj": float(jac.clamp(1e-9, 1e9).log().std(correction=0)),
            "displacement_mm_max": float(v.norm(dim=1).max()),
            "displacement_mm_mean": float(v.norm(dim=1).mean()),
        }
        dice_report = None
        if warped_label is not None and fixed_l is not None and moving_label_id is not None:
            fl = np.rint(fixed_l.array).astype(np.int64)
            dice_report = _dice_table(warped_label.numpy(), moving_label_id.numpy(), fl)
            logger.info(
                "mean Dice %.4f before, %.4f after registration", dice_report["mean_before"], dice_report["mean_after"]
            )
        consistency = None
        if v_inv is not None:
            # q = p + v(p) in moving space; p' = q + w(q) should return to p
            idx = voxel_grid(shape_f)
            p = voxel_to_world(idx, fixed_v.affine)
            q = p + v[0].to(torch.float64)
            w_q = sample_voxels(v_inv.float(), world_to_voxel(q, moving_v.affine), "bilinear", "border")[0]
            err = (q + w_q.to(torch.float64) - p).norm(dim=0)
            mask = torch.from_numpy(fixed_v.array > np.percentile(fixed_v.array, 50))
            sel = err[mask] if mask.any() else err.flatten()
            consistency = {
                "mean_mm": float(sel.mean()),
                "p95_mm": float(torch.quantile(sel.float()[:: max(1, sel.numel() // 1_000_000)], 0.95)),
                "region": "fixed voxels above the median intensity",
            }

    # ---- 5. write (staging folder, renamed at the end) ----
    outputs = {"warped": "warped.nii.gz", "ddf": "ddf.nii.gz", "jacobian": "jacobian.nii.gz"}
    if warped_label is not None:
        outputs["warped_label"] = "warped_label.nii.gz"
    if v_inv is not None:
        outputs["inverse_ddf"] = "inverse_ddf.nii.gz"
    if png:
        outputs["overview_png"] = "overview.png"
    outputs["report"] = "report.json"
    report: dict[str, Any] = {
        "tool": "ran-register",
        "version": _version(),
        "command": list(sys.argv),
        "arguments": args,
        "inputs": {
            name: {"path": vol.path, "shape": list(vol.array.shape), "spacing_mm": list(vol.spacing)}
            for name, vol in (
                ("fixed", fixed_v),
                ("moving", moving_v),
                ("fixed_label", fixed_l),
                ("moving_label", moving_l),
            )
            if vol is not None
        },
        "network": {
            "weights": str(weights_path),
            "preset": preset,
            "device": str(dev),
            "amp": bool(amp),
            "grid_shape": list(fixed_p.shape[1:]),
            "grid_spacing_mm": list(spacing_of(a_fp)),
            "intensity": intensity,
            "io_steps": int(io_steps),
            "io_lr": float(io_lr),
            "io_loss_first": io_losses[0] if io_losses else None,
            "io_loss_last": io_losses[-1] if io_losses else None,
        },
        "field": report_field,
        "dice": dice_report,
        "inverse_consistency": consistency,
        "outputs": outputs,
        "conventions": (
            "ddf.nii.gz: ITK displacement field on the fixed image grid, vectors in mm in the LPS frame; it maps a "
            "fixed-space point p to the moving-space point p + v(p), so warped(p) = moving(p + v(p)). "
            "inverse_ddf.nii.gz: the same convention on the moving image grid, mapping moving-space points to "
            "fixed space. Jacobian statistics count det J <= 0 over the whole fixed grid."
        ),
        "system": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    with timer.stage("write", f"writing {out_dir}"):
        with _staging_dir(out_dir) as tmp:
            write_image_atomic(warped.numpy(), fixed_v.affine, tmp / outputs["warped"], "float32")
            write_displacement_nifti(u, fixed_v.affine, tmp / outputs["ddf"])
            write_image_atomic(np.asarray(jac, dtype=np.float32), fixed_v.affine, tmp / outputs["jacobian"], "float32")
            if warped_label is not None:
                lab_dtype = moving_l.array.dtype if moving_l.array.dtype.kind in "iu" else np.int32
                write_image_atomic(warped_label.numpy(), fixed_v.affine, tmp / outputs["warped_label"], lab_dtype)
            if v_inv is not None:
                u_inv = field_to_voxel_ddf(v_inv, moving_v.affine)
                write_displacement_nifti(u_inv, moving_v.affine, tmp / outputs["inverse_ddf"])
            if png:
                moving_id = warp_to_grid(moving_v.tensor(), moving_v.affine, zero, fixed_v.affine)[0, 0]
                mapped = voxel_to_world(voxel_grid(shape_f), fixed_v.affine) + v[0].to(torch.float64)
                overview_png(
                    tmp / outputs["overview_png"],
                    fixed_v.array.astype(np.float32),
                    moving_id.numpy(),
                    warped.numpy(),
                    mapped.numpy(),
                    fixed_v.affine,
                )
            report["timings_s"] = {**timer.times, "write": None, "total": None}
            _write_json(tmp / outputs["report"], report)
    report["timings_s"] = {**timer.times, "total": timer.total()}
    # the final timings (write, total) are known only now: update the report in place, atomically
    final = out_dir / outputs["report"]
    staged = final.with_name(f".{final.name}.tmp")
    _write_json(staged, report)
    os.replace(staged, final)
    logger.info("done in %.1f s: %s", report["timings_s"]["total"], out_dir)
    return report


def _version() -> str:
    from ran_bundle import __version__

    return __version__


def warp_image_file(
    field: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, label: bool = False
) -> Path:
    """Apply a saved displacement field to an image or label map; the output lies on the field's grid.

    ``out(p) = image(p + v(p))`` for every voxel centre ``p`` of the field's grid (zero outside the
    image): the same as ``sitk.Resample(image, field_grid, sitk.DisplacementFieldTransform(field))``.
    With the ``ddf.nii.gz`` of ``ran-register``, ``image`` lives in the moving image's space and the
    output on the fixed grid.

    Args:
        field: ITK displacement field file (:func:`read_displacement_field`).
        image: the image (trilinear, float32 output) or, with ``label``, the label map (nearest
            neighbour, integer dtype kept).
        out: output ``.nii``/``.nii.gz`` file, written atomically.
        label: nearest-neighbour interpolation for label maps.

    Raises:
        InputError: bad field or image file, or a bad output name.
    """
    if not str(out).endswith((".nii", ".nii.gz")):
        raise InputError(f"--out {out}: the output image must be a .nii or .nii.gz file.")
    v, affine = read_displacement_field(field)
    vol = load_volume(image, "label map" if label else "image")
    if label:
        if vol.array.dtype.kind == "f" and not np.allclose(vol.array, np.rint(vol.array), atol=1e-3):
            raise InputError(f"label map {vol.path}: holds non-integer values; drop --label for images.")
        arr = vol.array if vol.array.dtype.kind in "iu" else np.rint(vol.array).astype(np.int32)
        src = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64) if arr.dtype == np.uint16 else arr))
        res = warp_to_grid(src[None, None], vol.affine, v, affine, mode="nearest")[0, 0]
        return write_image_atomic(res.numpy(), affine, out, arr.dtype)
    res = warp_to_grid(vol.tensor(), vol.affine, v, affine)[0, 0]
    return write_image_atomic(res.numpy(), affine, out, "float32")


def warp_points_file(
    field: str | os.PathLike, points: str | os.PathLike, out: str | os.PathLike, frame: str = "lps"
) -> tuple[Path, int]:
    """Map the landmarks of a CSV file by a saved field: ``p -> p + v(p)`` (mm).

    With ``ran-register``'s ``ddf.nii.gz`` (defined on the fixed grid) this maps **fixed-space**
    points to moving space; with ``inverse_ddf.nii.gz`` it maps moving-space points to fixed space.

    Args:
        field: ITK displacement field file.
        points: CSV with a header holding ``x,y,z`` (other columns are copied).
        out: output CSV (same columns, same ``frame``), written atomically.
        frame: ``"lps"`` (ITK/ANTs/Slicer files; default) or ``"ras"`` (nibabel/MONAI world).

    Returns:
        ``(out, n_outside)``: the file written and the number of points outside the field's grid
        (left unmoved, as ITK does).
    """
    _frame_matrix(frame)
    if not str(out).lower().endswith(".csv"):
        raise InputError(f"--out {out}: the output of --points must be a .csv file.")
    v, affine = read_displacement_field(field)
    rows, names, pts = read_points_csv(points, frame)
    mapped, inside = map_points(pts, v, affine)
    path = write_points_csv(out, rows, names, mapped, frame)
    return path, int((~inside).sum())
