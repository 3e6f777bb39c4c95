"""The quick-look figure of a registration (``overview.png`` of ``ran-register --png``), drawn with matplotlib.

matplotlib is an optional extra (``pip install 'ran-bundle[figures]'``): it is imported inside the
functions, and :func:`require_matplotlib` lets a command refuse ``--png`` before any work when it is missing.

The figure: one column per mid slice of the fixed image's grid (sagittal, coronal, axial), one row per view
(fixed; moving after the affine stage only; warped; checkerboard of fixed and warped; the deformation grid;
the Jacobian determinant). Slices are shown in the RAS display convention: the arrays are brought to the
closest RAS orientation (:mod:`nibabel.orientations`), the patient's right (R), anterior (A) and superior (S)
point right or up, and voxels keep their physical aspect. Letters on the panel edges name the directions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ran_bundle.affine import AffineResult
from ran_bundle.flow import apply_matrix, sample_voxels, voxel_to_world, world_to_voxel
from ran_bundle.inputs import InputError, Volume

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ROWS", "COLUMNS", "Overview", "require_matplotlib", "overview_figure", "overview_png"]


class _Pair(Protocol):
    fixed: Volume
    moving: Volume


class Overview(Protocol):
    """What the overview draws, as a :class:`ran_bundle.pipeline.Registration` holds it (the pipeline, above this
    module, passes one in): ``inputs.fixed`` / ``inputs.moving``, ``affine.matrix``, and on the fixed grid
    ``warped`` ``(X, Y, Z)``, ``field`` ``(1, 3, X, Y, Z)`` and ``jacobian`` ``(X, Y, Z)``."""

    inputs: _Pair
    affine: AffineResult
    field: torch.Tensor
    warped: torch.Tensor
    jacobian: torch.Tensor


#: row titles of the overview, top to bottom
ROWS = (
    "fixed",
    "moving (affine only)",
    "warped",
    "checkerboard fixed / warped",
    "deformation grid",
    "Jacobian determinant",
)
#: column titles: the mid slice across RAS axis 0 (sagittal), 1 (coronal), 2 (axial)
COLUMNS = ("sagittal", "coronal", "axial")
#: (negative, positive) end of each RAS axis
AXIS_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))
#: in-plane RAS axes (horizontal, vertical) of each column
IN_PLANE = ((1, 2), (0, 2), (0, 1))
#: det J colour scale (diverging, centred on 1); values <= 0 (folding) are painted FOLD_COLOUR on top
JACOBIAN_RANGE = (0.0, 2.0)
FOLD_COLOUR = "lime"
MATPLOTLIB_MISSING = "--png needs matplotlib: pip install 'ran-bundle[figures]'"


def require_matplotlib() -> None:
    """Raise :class:`~ran_bundle.inputs.InputError` when matplotlib cannot be imported (check it before work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(MATPLOTLIB_MISSING) from None


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _window(array: np.ndarray) -> tuple[float, float]:
    """Display range: percentiles 1 and 99 (of at most ~1e6 voxels)."""
    values = np.asarray(array).ravel()[:: max(1, np.asarray(array).size // 1_000_000)]
    values = values[np.isfinite(values)]
    lo, hi = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)).tolist()
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


class _Canonical:
    """The fixed grid in the closest RAS orientation: array views, slices and their world points.

    Args:
        shape: ``(X, Y, Z)`` of the fixed image (file voxel order).
        affine: its ``(4, 4)`` RAS affine.
    """

    def __init__(self, shape: tuple[int, ...], affine: np.ndarray) -> None:
        import nibabel as nib

        self.ornt = nib.orientations.io_orientation(affine)
        self.affine = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(self.ornt, shape)
        self.shape = tuple(int(shape[int(i)]) for i in np.argsort(self.ornt[:, 0]))
        self.spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        self.mid = tuple(n // 2 for n in self.shape)

    def slice(self, array: np.ndarray, column: int) -> np.ndarray:
        """``(H, V)`` mid slice across RAS axis ``column`` of a file-ordered ``(X, Y, Z)`` array."""
        import nibabel as nib

        canon = nib.orientations.apply_orientation(np.asarray(array), self.ornt)
        return np.take(canon, self.mid[column], axis=column)

    def points(self, column: int) -> torch.Tensor:
        """World points ``(3, H, V, 1)`` (RAS mm, float64) of the voxel centres of that slice."""
        h, v = IN_PLANE[column]
        index = torch.zeros((3, self.shape[h], self.shape[v], 1), dtype=torch.float64)
        index[column] = self.mid[column]
        index[h] = torch.arange(self.shape[h], dtype=torch.float64)[:, None, None]
        index[v] = torch.arange(self.shape[v], dtype=torch.float64)[None, :, None]
        return voxel_to_world(index, self.affine)

    def extent(self, column: int) -> tuple[float, float, float, float]:
        """``imshow`` extent (mm from the first voxel centre) of that slice, transposed, origin lower."""
        h, v = IN_PLANE[column]
        sh, sv = self.spacing[h], self.spacing[v]
        return (-0.5 * sh, (self.shape[h] - 0.5) * sh, -0.5 * sv, (self.shape[v] - 0.5) * sv)

    def coordinates(self, column: int) -> tuple[np.ndarray, np.ndarray]:
        """In-plane voxel-centre positions (mm) along the horizontal and the vertical axis."""
        h, v = IN_PLANE[column]
        return np.arange(self.shape[h]) * self.spacing[h], np.arange(self.shape[v]) * self.spacing[v]


def _affine_only(registration: Overview, canon: _Canonical, column: int) -> np.ndarray:
    """``(H, V)`` the moving image at ``matrix @ p`` for the slice's fixed points ``p`` (affine stage only)."""
    moving = registration.inputs.moving
    mapped = apply_matrix(registration.affine.matrix, canon.points(column))
    coords = world_to_voxel(mapped, moving.affine)
    return sample_voxels(moving.tensor(), coords)[0, 0, :, :, 0].numpy()


def overview_figure(registration: Overview, grid_mm: float = 8.0) -> Figure:
    """The overview as a matplotlib ``Figure`` (not drawn to a file; :func:`overview_png` saves it).

    Args:
        registration: an :class:`Overview` (a :class:`~ran_bundle.pipeline.Registration`): ``inputs.fixed`` /
            ``inputs.moving`` (``(X, Y, Z)`` arrays in file voxel order, ``(4, 4)`` RAS affines), ``affine.matrix``
            (``(4, 4)`` RAS, fixed point -> moving point), ``warped`` ``(X, Y, Z)``, ``field`` ``(1, 3, X, Y, Z)`` (mm,
            RAS; fixed point ``p`` maps to ``p + field(p)``) and ``jacobian`` ``(X, Y, Z)``, all on the fixed grid.
        grid_mm: spacing of the deformation grid's lines: the lines where a moving-space coordinate of
            ``p + field(p)`` is a multiple of ``grid_mm``.

    Returns:
        The figure: 6 x 3 image panels (:data:`ROWS` x :data:`COLUMNS`; each panel's ``get_label()`` is
        ``"<row> / <column>"``) and the Jacobian's colour bar.
    """
    require_matplotlib()
    from matplotlib.colors import ListedColormap, TwoSlopeNorm
    from matplotlib.figure import Figure

    fixed, moving = registration.inputs.fixed, registration.inputs.moving
    canon = _Canonical(fixed.array.shape, fixed.affine)
    f_lo, f_hi = _window(fixed.array)
    m_lo, m_hi = _window(moving.array)
    field = _numpy(registration.field)[0]
    extent_mm = np.asarray(canon.shape) * canon.spacing

    widths = [extent_mm[IN_PLANE[c][0]] for c in range(3)]
    row_height = max(extent_mm[IN_PLANE[c][1]] / widths[c] for c in range(3)) * 7.2 / 3
    fig = Figure(figsize=(8.4, min(6 * row_height + 0.9, 22.0)), layout="constrained")
    axes = fig.subplots(len(ROWS), 3, gridspec_kw={"width_ratios": widths}, squeeze=False)
    fig.suptitle(f"ran-register   fixed: {Path(fixed.path).name}   moving: {Path(moving.path).name}", fontsize=10)
    grey = {"cmap": "gray", "origin": "lower", "interpolation": "nearest"}
    jacobian_image = None
    for column in range(3):
        h, v = IN_PLANE[column]
        extent = canon.extent(column)
        f = canon.slice(fixed.array, column).astype(np.float32)
        w = canon.slice(_numpy(registration.warped), column).astype(np.float32)
        xs, ys = canon.coordinates(column)
        # checkerboard in squares of an eighth of the largest in-plane extent
        block = max(extent_mm[h], extent_mm[v]) / 8
        tiles = ((xs[:, None] // block) + (ys[None, :] // block)) % 2 == 0
        f01 = np.clip((f - f_lo) / (f_hi - f_lo), 0, 1)
        w01 = np.clip((w - m_lo) / (m_hi - m_lo), 0, 1)
        panels = [
            (f, f_lo, f_hi),
            (_affine_only(registration, canon, column), m_lo, m_hi),
            (w, m_lo, m_hi),
            (np.where(tiles, f01, w01), 0.0, 1.0),
        ]
        for row, (image, lo, hi) in enumerate(panels):
            axes[row, column].imshow(image.T, vmin=lo, vmax=hi, extent=extent, **grey)
        # the deformation grid over the fixed image: lines of constant moving-space coordinate
        ax = axes[4, column]
        ax.imshow(f.T, vmin=f_lo, vmax=f_hi, extent=extent, alpha=0.5, **grey)
        for axis in (h, v):
            q = canon.slice(field[axis], column) + canon.points(column)[axis, :, :, 0].numpy()
            levels = np.arange(np.ceil(q.min() / grid_mm), np.floor(q.max() / grid_mm) + 1) * grid_mm
            if levels.size:
                ax.contour(xs, ys, q.T, levels=levels, colors="gold", linewidths=0.7, linestyles="solid")
        # det J on a diverging scale centred on 1, folding painted on top
        ax = axes[5, column]
        jac = canon.slice(_numpy(registration.jacobian), column).astype(np.float32)
        jacobian_image = ax.imshow(
            jac.T,
            cmap="RdBu_r",
            norm=TwoSlopeNorm(vcenter=1.0, vmin=JACOBIAN_RANGE[0], vmax=JACOBIAN_RANGE[1]),
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
        folded = np.ma.masked_where(~(jac.T <= 0), np.ones_like(jac.T))
        ax.imshow(folded, cmap=ListedColormap([FOLD_COLOUR]), origin="lower", extent=extent, interpolation="nearest")
        centre = canon.points(column)[:, canon.shape[h] // 2, canon.shape[v] // 2, 0].numpy()
        axes[0, column].set_title(f"{COLUMNS[column]} ({'xyz'[column]} = {centre[column]:.1f} mm)", fontsize=10)
        for row in range(len(ROWS)):
            _decorate(axes[row, column], column, f"{ROWS[row]} / {COLUMNS[column]}")
    for row, title in enumerate(ROWS):
        axes[row, 0].set_ylabel(title, fontsize=10)
    bar = fig.colorbar(jacobian_image, ax=list(axes[5]), location="bottom", extend="both", shrink=0.6, aspect=40)
    bar.set_label(f"Jacobian determinant det J (blue < 1 < red; {FOLD_COLOUR}: <= 0, folding)", fontsize=8)
    return fig


def _decorate(ax: Any, column: int, label: str) -> None:
    """No ticks, black background, the RAS letters of the four edges (yellow on a dark box)."""
    ax.set_label(label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    h, v = IN_PLANE[column]
    box = {"facecolor": "black", "alpha": 0.6, "pad": 0.8, "linewidth": 0}
    style = {"transform": ax.transAxes, "color": "yellow", "fontsize": 8, "fontweight": "bold", "bbox": box}
    ax.text(0.02, 0.5, AXIS_LETTERS[h][0], ha="left", va="center", **style)
    ax.text(0.98, 0.5, AXIS_LETTERS[h][1], ha="right", va="center", **style)
    ax.text(0.5, 0.02, AXIS_LETTERS[v][0], ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, AXIS_LETTERS[v][1], ha="center", va="top", **style)


def overview_png(path: str | os.PathLike, registration: Overview, grid_mm: float = 8.0, dpi: int = 100) -> Path:
    """Write :func:`overview_figure` as one PNG (about 840 pixels wide at ``dpi=100``).

    Args:
        path: the ``.png`` file.
        registration: see :func:`overview_figure`.
        grid_mm: line spacing of the deformation grid (mm).
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        InputError: matplotlib is missing.
    """
    figure = overview_figure(registration, grid_mm)
    path = Path(path)
    figure.savefig(path, dpi=dpi, format="png", facecolor="white")
    return path
