"""Synthetic deformations with a known field, for the pretraining stage of the RAN paper.

The paper (Sec. 4.2 and appendix) pretrains the network on image pairs made from ONE image and a
random known displacement field "combining rigid spatial transformation and deformation", with the
supervised loss of :class:`~ran_bundle.losses.SyntheticFieldLoss` (0.1 image MSE + 1 field MSE +
1 smoothness), before the unsupervised training on real pairs. This module builds such pairs.

Field convention (that of :mod:`ran_bundle.flow`): a DDF ``u`` is ``(d, *S)`` (or ``(B, d, *S)``)
in **voxel** units on the image grid, channel ``i`` along array axis ``i``, and

    ``fixed(x) = moving(x + u(x))``

(trilinear for images, nearest neighbour for labels, :func:`ran_bundle.flow.warp`). The
moving image is the input image; the fixed image is the input warped by the field, so the network,
given ``cat[moving, fixed]``, must predict exactly ``u``.

One random field (:class:`RandSyntheticDeformationd`, :func:`synthetic_field`) is the composition

    ``x + u(x) = T(x + s(x))``,   ``T(y) = c + R' (y - c) + t``

of a smooth non-rigid part ``s`` applied first (:func:`bspline_field`: a uniform cubic B-spline
free-form deformation of random control-point displacements, Rueckert et al. 1999) and a rigid motion
``T`` (:func:`rigid_field`): a rotation ``R`` by ``U(-rotation_range, rotation_range)`` radians about
a uniformly random axis through the image centre ``c`` (the paper's appendix: +-pi/4; the released
code: +-pi), made a voxel-space matrix ``R' = D^-1 R D`` with the voxel size ``D`` so that it is a
true rotation in mm, plus a translation ``t ~ U(-translation_range, translation_range)`` voxels per
axis (released code: 8). So ``u(x) = T(x + s(x)) - x = rigid(x) + R' s(x)`` and
``det(I + grad u) = det(I + grad s)``: the field folds only if its smooth part does.

No folding by construction: with ``fold_free=True`` (default) each component ``i`` of the control
displacements is capped at ``0.4 * delta_i`` (``delta_i`` the control-point spacing along axis ``i``
in voxels), the sufficient injectivity bound of uniform cubic B-splines in 3D (Choi & Lee 2000:
``delta / 2.48``; ``delta / 2.05`` in 2D, we use 0.48). :func:`field_statistics` reports the maximum
and mean displacement and the fraction of voxels with a non-positive Jacobian determinant.

Pieces:

- fields: :func:`rotation_matrix`, :func:`random_rotation`, :func:`rigid_field`,
  :func:`control_grid_shape`, :func:`bspline_field`, :func:`synthetic_field`, :func:`field_statistics`;
- transforms: :class:`RandSyntheticDeformationd` (one image [+ label] -> a pair dict with the true
  field under :data:`~ran_bundle.keys.TRUE_DDF`) and :func:`synthetic_pair_transforms` (load, orient, resample,
  intensity, crop/pad, deform);
- data: :class:`SyntheticPairDataset` (random samples for training, seeded fixed samples for
  validation);
- another contrast: :func:`synthetic_contrast` (random per-structure intensities, bias and noise from a label
  map, as SynthSeg), for tests of cross-contrast registration; the images it makes are synthetic;
- evaluation: :func:`end_point_error`, :class:`EndPointError` (a MONAI metric) and
  :func:`load_pretrained` (model-only, strict weight loading of a pretraining checkpoint, through
  :func:`ran_bundle.inputs.read_state_dict`); the trainer
  and evaluator steps of the pretraining are :class:`ran_bundle.engines.SyntheticTrainStep` and
  :class:`ran_bundle.engines.SyntheticEvalStep`.

Over 500 lines because the field generator, its MONAI transform, its dataset and its end-point error share one
field convention and one random-state contract (the tests pin them together); each part is small.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    apply_transform,
)
from monai.utils import MetricReduction
from torch.utils.data import Dataset

from ran_bundle.flow import spacing_of, warp
from ran_bundle.inputs import InputError, check_state_dict_fits, read_state_dict
from ran_bundle.keys import FIXED_IMAGE, FIXED_LABEL, IMAGE, LABEL, MOVING_IMAGE, MOVING_LABEL, TRUE_DDF
from ran_bundle.metrics import jacobian_determinant, non_positive_jacobian
from ran_bundle.transforms import CT_WINDOW

__all__ = [
    "IMAGE",
    "LABEL",
    "FOLD_FREE_FACTOR",
    "rotation_matrix",
    "random_rotation",
    "rigid_field",
    "control_grid_shape",
    "bspline_field",
    "synthetic_field",
    "field_statistics",
    "RandSyntheticDeformationd",
    "synthetic_pair_transforms",
    "SyntheticPairDataset",
    "end_point_error",
    "EndPointError",
    "load_pretrained",
    "synthetic_contrast",
]

# sufficient injectivity bound of uniform cubic B-splines (Choi & Lee 2000): |c_i| < delta_i / K,
# K = 2.479 in 3D and 2.046 in 2D; our caps stay just below 1 / K
FOLD_FREE_FACTOR = {2: 0.48, 3: 0.4}

ArrayLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------
# fields
# ----------------------------------------------------------------------------------------------
def rotation_matrix(angle: float, axis: Sequence[float] | None = None) -> np.ndarray:
    """Rotation by ``angle`` radians: 2x2 when ``axis`` is None, else 3x3 about ``axis`` (Rodrigues).

    The 3D rotation is right-handed about ``axis`` (normalised) in array-axis coordinates; the 2D one
    turns axis 0 towards axis 1.

    Returns:
        float64 ``(d, d)`` orthogonal matrix with determinant 1.
    """
    c, s = math.cos(angle), math.sin(angle)
    if axis is None:
        return np.array([[c, -s], [s, c]], dtype=np.float64)
    k = np.asarray(axis, dtype=np.float64)
    if k.shape != (3,) or not np.linalg.norm(k) > 0:
        raise ValueError(f"axis must be a non-zero 3-vector, got {axis}.")
    k = k / np.linalg.norm(k)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


def random_rotation(
    rng: np.random.RandomState, max_angle: float, spatial_dims: int = 3
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Random rotation: angle ``U(-max_angle, max_angle)``, axis uniform on the sphere (3D).

    Args:
        rng: the random state to draw from (``Randomizable.R``).
        max_angle: largest rotation angle in radians (>= 0).
        spatial_dims: 2 or 3.

    Returns:
        ``(matrix, angle, axis)``; ``axis`` is None in 2D.
    """
    axis = None
    if spatial_dims == 3:
        axis = rng.normal(size=3)
        while np.linalg.norm(axis) < 1e-8:  # pragma: no cover - measure-zero event
            axis = rng.normal(size=3)
        axis = axis / np.linalg.norm(axis)
    angle = float(rng.uniform(-max_angle, max_angle)) if max_angle > 0 else 0.0
    return rotation_matrix(angle, axis), angle, axis


def _grid(shape: Sequence[int], dtype=torch.float64) -> torch.Tensor:
    """Voxel index grid ``(d, *shape)``."""
    return torch.stack(torch.meshgrid(*[torch.arange(int(s), dtype=dtype) for s in shape], indexing="ij"), 0)


def _voxel_matrix(matrix: ArrayLike, spacing: Sequence[float] | None) -> np.ndarray:
    """``D^-1 M D``: a matrix acting on mm (``D`` = diag(spacing)) written for voxel indices."""
    m = np.asarray(matrix.detach().cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    if spacing is None:
        return m
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (m.shape[0],) or np.any(sp <= 0):
        raise ValueError(f"spacing must be {m.shape[0]} positive values, got {spacing}.")
    return (m * sp[None, :]) / sp[:, None]


def rigid_field(
    shape: Sequence[int],
    matrix: ArrayLike,
    translation: Sequence[float] | None = None,
    centre: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """DDF of the rigid motion ``x -> c + R' (x - c) + t`` on a grid of ``shape``.

    ``u(x) = c + R' (x - c) + t - x`` in voxels, with ``R' = D^-1 R D`` (``D = diag(spacing)``), so that
    ``matrix`` is a rotation in mm when the voxels are anisotropic.

    Args:
        shape: spatial shape ``S`` (2 or 3 dims).
        matrix: ``(d, d)`` rotation (any linear map) in mm coordinates along the array axes.
        translation: ``d`` voxels (default 0).
        centre: rotation centre in voxel indices (default the image centre ``(S - 1) / 2``).
        spacing: voxel size per axis (default isotropic).

    Returns:
        float64 ``(d, *S)`` tensor.
    """
    d = len(shape)
    m = _voxel_matrix(matrix, spacing)
    if m.shape != (d, d):
        raise ValueError(f"matrix must be ({d}, {d}) for a {d}-D shape, got {m.shape}.")
    c = np.asarray([(s - 1) / 2.0 for s in shape] if centre is None else centre, dtype=np.float64)
    t = np.zeros(d) if translation is None else np.asarray(translation, dtype=np.float64)
    if c.shape != (d,) or t.shape != (d,):
        raise ValueError(f"centre and translation need {d} values, got {centre} and {translation}.")
    x = _grid(shape)
    view = (d,) + (1,) * d
    c_t = torch.as_tensor(c).view(view)
    rel = x - c_t
    out = torch.einsum("ij,j...->i...", torch.as_tensor(m - np.eye(d)), rel)
    return out + torch.as_tensor(t).view(view)


def control_grid_shape(shape: Sequence[int], control_spacing: float | Sequence[float]) -> tuple[int, ...]:
    """Number of B-spline control points per axis for a grid of ``shape``.

    The image axis of ``S`` voxels is covered by ``n = ceil((S - 1) / spacing)`` intervals (at least 1)
    and needs ``n + 3`` control points (one before and two after, cubic support); the actual spacing
    is ``(S - 1) / n`` voxels, at most ``control_spacing``.
    """
    sp = np.broadcast_to(np.asarray(control_spacing, dtype=np.float64), (len(shape),))
    if np.any(sp <= 0):
        raise ValueError(f"control_spacing must be positive, got {control_spacing}.")
    return tuple(int(max(1, math.ceil((s - 1) / p - 1e-9))) + 3 for s, p in zip(shape, sp, strict=True))


def _bspline_weights(size: int, n_ctrl: int) -> torch.Tensor:
    """``(size, n_ctrl)`` cubic B-spline weights of control point ``k`` at voxel ``x``."""
    if n_ctrl < 4:
        raise ValueError(f"a cubic B-spline needs at least 4 control points per axis, got {n_ctrl}.")
    delta = (size - 1) / (n_ctrl - 3) if size > 1 else 1.0
    t = torch.arange(size, dtype=torch.float64) / delta + 1.0  # control point k sits at voxel (k - 1) delta
    r = (t[:, None] - torch.arange(n_ctrl, dtype=torch.float64)[None, :]).abs()
    inner = 2.0 / 3.0 - r**2 + 0.5 * r**3
    outer = (2.0 - r).clamp_min(0) ** 3 / 6.0
    return torch.where(r < 1, inner, outer)


def control_spacing_of(shape: Sequence[int], control_shape: Sequence[int]) -> tuple[float, ...]:
    """Actual control-point spacing in voxels per axis, ``(S - 1) / (C - 3)``."""
    return tuple((s - 1) / (c - 3) if s > 1 else 1.0 for s, c in zip(shape, control_shape, strict=True))


def bspline_field(shape: Sequence[int], control: ArrayLike) -> torch.Tensor:
    """Smooth DDF on a grid of ``shape`` from control-point displacements (uniform cubic B-spline FFD).

    Control point ``k`` of axis ``i`` sits at voxel ``(k - 1) * delta_i``, ``delta_i = (S_i - 1) / (C_i - 3)``,
    so the image spans the inner knot interval: the weights sum to one at every voxel (a constant
    control field gives that constant displacement) and linear control fields are reproduced exactly
    (control ``a * position`` gives ``u(x) = a * x``). The field is ``C^2`` and its largest
    displacement is at most the largest control displacement (a convex combination).

    Args:
        shape: spatial shape ``S``.
        control: ``(d, *C)`` displacements (voxels) of the control points, ``C_i >= 4``.

    Returns:
        float64 ``(d, *S)`` tensor.
    """
    c = torch.as_tensor(np.asarray(control) if not isinstance(control, torch.Tensor) else control)
    c = c.detach().to(torch.float64)
    d = len(shape)
    if c.ndim != d + 1:
        raise ValueError(f"control must be (d, *C) with {d} spatial dims, got shape {tuple(c.shape)}.")
    out = c
    for axis, size in enumerate(shape):
        w = _bspline_weights(int(size), int(c.shape[axis + 1]))  # (S_i, C_i)
        out = torch.movedim(torch.tensordot(out, w, dims=([axis + 1], [1])), -1, axis + 1)
    return out


def synthetic_field(
    shape: Sequence[int],
    matrix: ArrayLike | None = None,
    translation: Sequence[float] | None = None,
    control: ArrayLike | None = None,
    spacing: Sequence[float] | None = None,
    centre: Sequence[float] | None = None,
) -> torch.Tensor:
    """One DDF: the smooth part first, then the rigid motion, ``x + u(x) = T(x + s(x))``.

    ``u(x) = rigid(x) + R' s(x)`` (see the module docstring), so ``det(I + grad u) = det(I + grad s)``.

    Args:
        shape: spatial shape ``S``.
        matrix: ``(d, d)`` rotation in mm coordinates (default identity).
        translation: ``d`` voxels (default 0).
        control: ``(d, *C)`` B-spline control displacements in voxels, or None (no smooth part).
        spacing: voxel size per axis (default isotropic).
        centre: rotation centre (default the image centre).

    Returns:
        float64 ``(d, *S)`` tensor, voxels.
    """
    d = len(shape)
    m = np.eye(d) if matrix is None else matrix
    u = rigid_field(shape, m, translation, centre, spacing)
    if control is not None:
        s = bspline_field(shape, control)
        u = u + torch.einsum("ij,j...->i...", torch.as_tensor(_voxel_matrix(m, spacing)), s)
    return u


def field_statistics(
    ddf: ArrayLike, spacing: Sequence[float] | None = None, mask: ArrayLike | None = None
) -> dict[str, float]:
    """Statistics of a DDF that a user can check before training on it.

    Args:
        ddf: ``(d, *S)`` or ``(B, d, *S)`` in voxels (all batch items pooled).
        spacing: voxel size in mm per axis; adds the ``_mm`` magnitudes.
        mask: optional region ``(*S)`` / ``(B, *S)`` / ``(B, 1, *S)`` for the Jacobian counts.

    Returns:
        ``{"max_displacement", "mean_displacement"}`` (voxels, Euclidean norm per voxel),
        ``{"max_displacement_mm", "mean_displacement_mm"}`` with ``spacing``, ``"min_jacobian"``
        (smallest ``det(I + grad u)``, :func:`~ran_bundle.metrics.jacobian_determinant`) and
        ``"non_positive_jacobian_fraction"`` (fraction of voxels with ``det <= 0``, in the mask when
        given, averaged over batch items; :func:`~ran_bundle.metrics.non_positive_jacobian`; 0 means
        no folding).
    """
    u = ddf.detach().cpu().to(torch.float64) if isinstance(ddf, torch.Tensor) else torch.as_tensor(np.asarray(ddf))
    u = u.to(torch.float64)
    if u.ndim >= 3 and u.shape[0] == u.ndim - 1:
        u = u[None]
    if u.shape[1] != u.ndim - 2:
        raise ValueError(f"ddf must be (d, *S) or (B, d, *S), got shape {tuple(u.shape)}.")
    norm = u.norm(dim=1)
    out = {"max_displacement": float(norm.max()), "mean_displacement": float(norm.mean())}
    if spacing is not None:
        sp = torch.as_tensor([float(s) for s in spacing], dtype=torch.float64).view(1, -1, *([1] * (u.ndim - 2)))
        mm = (u * sp).norm(dim=1)
        out.update(max_displacement_mm=float(mm.max()), mean_displacement_mm=float(mm.mean()))
    det = jacobian_determinant(u)
    _, percent = non_positive_jacobian(u, mask)
    out["min_jacobian"] = float(det.min())
    out["non_positive_jacobian_fraction"] = float(np.nanmean(percent)) / 100.0
    return out


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
def _spacing_of(x: Any, d: int) -> tuple[float, ...] | None:
    affine = getattr(x, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.ndim == 3:
        a = a[0]
    if a.shape != (d + 1, d + 1):
        return None
    return spacing_of(a)


def _per_axis(value: float | Sequence[float], d: int, name: str) -> np.ndarray:
    v = np.broadcast_to(np.asarray(value, dtype=np.float64), (d,)).copy()
    if np.any(v < 0):
        raise ValueError(f"{name} must be non-negative, got {value}.")
    return v


class RandSyntheticDeformationd(RandomizableTransform, MapTransform):
    """Make a registration pair with a known field from ONE image (and optional label).

    Draws one random field (module docstring: random rotation about a random axis through the
    centre, translation, cubic B-spline deformation; composed into one DDF ``u`` in voxels on the
    image grid) and returns the pair dict of :mod:`ran_bundle.data` plus the true field:

    - ``"moving_image"``: the input image ``(C, *S)`` (unchanged, metadata kept);
    - ``"fixed_image"``: ``moving(x + u(x))``, trilinear, same metadata (same grid);
    - ``"moving_label"`` / ``"fixed_label"``: the label and its nearest-neighbour warp (only values of
      the input label appear), when the label key is present;
    - ``ddf_key`` (``"true_ddf"``): ``u``, float32 ``(d, *S)``, voxels: ``fixed(x) = moving(x + u(x))``.

    The source keys are removed (``remove_source=True``). With probability ``1 - prob`` the field is
    zero (fixed = a copy of moving). Seed it with ``set_random_state(seed)`` (a ``Compose`` seeds it
    too); the same seed gives the same field. The last draw is in :attr:`last_params`.

    Args:
        image_key: key of the image ``(C, *S)`` (``MetaTensor``, tensor or array), 2D or 3D.
        label_key: key of the integer label ``(1, *S)``; None, or absent from the dict: no labels.
        prob: probability of deforming.
        rotation_range: largest rotation angle in radians (paper appendix pi/4; 0 = no rotation).
        translation_range: largest translation per axis in voxels (one value or one per axis;
            released code 8).
        control_spacing: B-spline control-point spacing in voxels (one value or one per axis).
        magnitude: largest control-point displacement per component in voxels (bounds the
            smooth part's displacement); 0 = no smooth part.
        fold_free: cap component ``i`` at ``FOLD_FREE_FACTOR * delta_i`` (``delta_i`` the actual
            control spacing), which guarantees no folding (module docstring).
        physical_rotation: rotate in mm using the voxel size of the image's affine (a
            ``MetaTensor``); False rotates voxel indices.
        padding_mode: ``grid_sample`` padding where ``x + u(x)`` leaves the image: ``"border"``
            (default, replicates the edge, as the tiny dataset's generator) or ``"zeros"``.
        ddf_key: output key of the true field.
        remove_source: drop ``image_key`` and ``label_key`` from the output.
    """

    def __init__(
        self,
        image_key: str = IMAGE,
        label_key: str | None = LABEL,
        prob: float = 1.0,
        rotation_range: float = math.pi / 4,
        translation_range: float | Sequence[float] = 8.0,
        control_spacing: float | Sequence[float] = 16.0,
        magnitude: float = 4.0,
        fold_free: bool = True,
        physical_rotation: bool = True,
        padding_mode: str = "border",
        ddf_key: str = TRUE_DDF,
        remove_source: bool = True,
    ) -> None:
        keys: KeysCollection = [image_key] + ([label_key] if label_key else [])
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob=prob)
        if rotation_range < 0 or magnitude < 0:
            raise ValueError(
                f"rotation_range and magnitude must be non-negative, got {rotation_range} and {magnitude}."
            )
        if padding_mode not in ("border", "zeros", "reflection"):
            raise ValueError(f"padding_mode must be 'border', 'zeros' or 'reflection', got {padding_mode!r}.")
        np.asarray(control_spacing, dtype=np.float64)  # validated per image in control_grid_shape
        self.image_key, self.label_key = image_key, label_key
        self.rotation_range = float(rotation_range)
        self.translation_range = translation_range
        self.control_spacing = control_spacing
        self.magnitude = float(magnitude)
        self.fold_free = bool(fold_free)
        self.physical_rotation = bool(physical_rotation)
        self.padding_mode = padding_mode
        self.ddf_key = ddf_key
        self.remove_source = bool(remove_source)
        self.last_params: dict[str, Any] = {}
        self._field: torch.Tensor | None = None

    def smooth_caps(self, shape: Sequence[int]) -> np.ndarray:
        """Largest control displacement per component for an image of ``shape`` (voxels)."""
        d = len(shape)
        caps = np.full(d, self.magnitude)
        if self.fold_free:
            delta = np.asarray(control_spacing_of(shape, control_grid_shape(shape, self.control_spacing)))
            caps = np.minimum(caps, FOLD_FREE_FACTOR[d] * delta)
        return caps

    def randomize(self, shape: Sequence[int], spacing: Sequence[float] | None = None) -> None:  # type: ignore[override]
        """Draw a field for an image of spatial ``shape`` (voxel size ``spacing``) into :attr:`last_params`."""
        super().randomize(None)
        d = len(shape)
        if d not in (2, 3):
            raise ValueError(f"RandSyntheticDeformationd supports 2D and 3D images, got spatial shape {shape}.")
        if not self._do_transform:
            self.last_params = {"applied": False}
            self._field = torch.zeros((d, *shape), dtype=torch.float64)
            return
        matrix, angle, axis = random_rotation(self.R, self.rotation_range, d)
        tr = _per_axis(self.translation_range, d, "translation_range")
        translation = self.R.uniform(-1.0, 1.0, size=d) * tr
        control = None
        caps = self.smooth_caps(shape)
        if self.magnitude > 0:
            cshape = control_grid_shape(shape, self.control_spacing)
            control = self.R.uniform(-1.0, 1.0, size=(d, *cshape)) * caps.reshape((d,) + (1,) * d)
        self.last_params = {
            "applied": True,
            "angle": angle,
            "axis": None if axis is None else axis.tolist(),
            "matrix": matrix,
            "translation": translation.tolist(),
            "control": control,
            "caps": caps.tolist(),
            "spacing": None if spacing is None else list(spacing),
        }
        self._field = synthetic_field(shape, matrix, translation, control, spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(
                f"RandSyntheticDeformationd: missing image key {self.image_key!r} (has {sorted(map(str, d))})."
            )
        image = d[self.image_key]
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(np.asarray(image))
        sdims = image.ndim - 1
        shape = tuple(int(s) for s in image.shape[1:])
        spacing = _spacing_of(image, sdims) if self.physical_rotation else None
        self.randomize(shape, spacing)
        field = self._field.to(torch.float32)
        fixed = self._warp(image, field, "bilinear")
        d[MOVING_IMAGE], d[FIXED_IMAGE] = image, fixed
        label = d.get(self.label_key) if self.label_key else None
        if label is not None:
            if not isinstance(label, torch.Tensor):
                label = torch.as_tensor(np.asarray(label))
            if tuple(label.shape[1:]) != shape:
                raise ValueError(f"label shape {tuple(label.shape)} does not match image shape {tuple(image.shape)}.")
            d[MOVING_LABEL], d[FIXED_LABEL] = label, self._warp(label, field, "nearest")
        d[self.ddf_key] = field
        if self.remove_source:
            for key in (self.image_key, self.label_key):
                if key is not None and key not in (MOVING_IMAGE, FIXED_IMAGE, MOVING_LABEL, FIXED_LABEL, self.ddf_key):
                    d.pop(key, None)
        return d

    def _warp(self, x: torch.Tensor, field: torch.Tensor, mode: str) -> torch.Tensor:
        if not self.last_params.get("applied", True):  # identity: an exact copy
            return x.clone()
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x
        src = plain if plain.is_floating_point() else plain.to(torch.float32)
        out = warp(src[None], field[None].to(src.dtype), mode=mode, padding_mode=self.padding_mode)[0]
        if mode == "nearest" and out.dtype != plain.dtype:
            out = out.round().to(plain.dtype)
        if isinstance(x, MetaTensor):
            meta = {k: v for k, v in x.meta.items() if k != "affine"}
            out = MetaTensor(out, affine=x.affine.clone(), meta=meta)
        return out


def synthetic_pair_transforms(
    mode: str = "train",
    spacing: Sequence[float] | None = None,
    intensity: str = "ct",
    roi_size: Sequence[int] | None = (128, 128, 128),
    spatial_size: Sequence[int] | None = None,
    divisible_k: int = 16,
    with_labels: bool = False,
    intensity_scale: float = 0.0,
    ct_window: Sequence[float] = CT_WINDOW,
    mr_percentiles: Sequence[float] = (0.5, 99.5),
    reader: str | None = None,
    **deformation: Any,
) -> Compose:
    """Preprocessing of ONE subject dict (``"image"``[, ``"label"``]) into a synthetic pair.

    Steps (the single-image counterpart of :func:`ran_bundle.transforms.registration_transforms`):
    load + channel first, RAS orientation, optional resampling to ``spacing`` (nearest for labels),
    intensity (``"ct"``: window -> [0, 1] clipped; ``"mr"``: percentiles -> [0, 1]; ``"none"``), then

    - ``"train"``: zero-pad to at least ``roi_size`` and take a random ``roi_size`` crop;
    - ``"eval"``: centre pad/crop to ``spatial_size`` when given, else zero-pad each axis to a
      multiple of ``divisible_k``;

    then :class:`RandSyntheticDeformationd` (``**deformation`` are its arguments), then in train
    mode the shared pair intensity scaling ``1 + U(-intensity_scale, intensity_scale)`` of both
    images (0 = off), and float32 outputs (labels float32 holding integer values).

    Output keys: ``moving_image``, ``fixed_image``, ``true_ddf`` (+ ``moving_label``,
    ``fixed_label`` with labels).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
    if intensity not in ("ct", "mr", "none"):
        raise ValueError(f"intensity must be 'ct', 'mr' or 'none', got {intensity!r}.")
    keys = [IMAGE, LABEL] if with_labels else [IMAGE]
    xforms: list[Callable] = [
        LoadImaged(keys=keys, image_only=True, reader=reader),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        xforms.append(
            Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=["bilinear", "nearest"][: len(keys)])
        )
    if intensity == "ct":
        lo, hi = (float(v) for v in ct_window)
        xforms.append(ScaleIntensityRanged(keys=IMAGE, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    elif intensity == "mr":
        lo, hi = (float(v) for v in mr_percentiles)
        xforms.append(ScaleIntensityRangePercentilesd(keys=IMAGE, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True))
    if mode == "train" and roi_size is not None:
        roi = tuple(int(s) for s in roi_size)
        xforms += [
            SpatialPadd(keys=keys, spatial_size=roi),
            RandSpatialCropd(keys=keys, roi_size=roi, random_size=False),
        ]
    elif spatial_size is not None:
        xforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(int(s) for s in spatial_size)))
    else:
        xforms.append(DivisiblePadd(keys=keys, k=int(divisible_k)))
    deformation.setdefault("label_key", LABEL if with_labels else None)
    xforms.append(RandSyntheticDeformationd(image_key=IMAGE, **deformation))
    if mode == "train" and intensity_scale > 0:
        xforms.append(RandScaleIntensityd(keys=[MOVING_IMAGE, FIXED_IMAGE], factors=float(intensity_scale), prob=1.0))
    ddf_key = deformation.get("ddf_key", TRUE_DDF)
    xforms.append(EnsureTyped(keys=[MOVING_IMAGE, FIXED_IMAGE, ddf_key], dtype=torch.float32))
    if with_labels:
        xforms.append(EnsureTyped(keys=[MOVING_LABEL, FIXED_LABEL], dtype=torch.float32))
    return Compose(xforms)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class SyntheticPairDataset(Randomizable, Dataset):
    """Synthetic pairs from single subjects (``{"image"[, "label"]}``), for pretraining.

    Every random choice of item ``i`` (its subject and, through ``transform.set_random_state``, its
    crop, field and intensity factor) comes from a generator seeded with ``(seed, epoch, i)`` only,
    as in :class:`ran_bundle.data.RandomPairDataset`: an item is the same in whatever process, worker
    or order it is loaded, and a resumed run draws what the uninterrupted run drew.

    - ``fixed_samples=False`` (training): the subject is drawn at random; :meth:`set_epoch` (called
      by :class:`ran_bundle.handlers.DatasetEpochHandler`) moves to the next epoch's draws.
    - ``fixed_samples=True`` (validation, held-out tests): item ``i`` is subject ``i % n`` and the
      draws ignore the epoch, so the samples are the same on every epoch; give it a ``seed`` other
      than the training one for fields the training never saw.

    Args:
        subjects: subject dicts with an ``"image"`` (and optionally ``"label"``) path.
        transform: e.g. :func:`synthetic_pair_transforms` (anything with ``set_random_state``
            is seeded per item).
        num_samples: dataset length.
        seed: base seed of all draws.
        fixed_samples: see above.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any]],
        transform: Callable,
        num_samples: int = 100,
        seed: int = 0,
        fixed_samples: bool = False,
    ) -> None:
        if len(subjects) < 1:
            raise ValueError("SyntheticPairDataset needs at least 1 subject.")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        for i, s in enumerate(subjects):
            if IMAGE not in s:
                raise ValueError(f"SyntheticPairDataset: subject {i} has no 'image' key (keys: {sorted(s)}).")
        self.subjects = [dict(s) for s in subjects]
        self.transform = transform
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.fixed_samples = bool(fixed_samples)
        self.epoch = 0
        self._index = 0
        self.set_random_state(seed=self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (no effect with ``fixed_samples``)."""
        self.epoch = int(epoch)

    def _seed_item(self, index: int) -> None:
        epoch = 0 if self.fixed_samples else self.epoch
        subject_seed, transform_seed = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        self.R = np.random.RandomState(int(subject_seed))
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(transform_seed))

    def randomize(self, data: Any = None) -> None:
        """Draw the subject index from ``self.R``."""
        self._index = int(self.R.randint(len(self.subjects)))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples.")
        index %= len(self)
        self._seed_item(index)
        if self.fixed_samples:
            self._index = index % len(self.subjects)
        else:
            self.randomize()
        return apply_transform(self.transform, dict(self.subjects[self._index]))


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
def end_point_error(
    ddf: ArrayLike, true_ddf: ArrayLike, spacing: Sequence[float] | None = None, mask: ArrayLike | None = None
) -> torch.Tensor:
    """Mean end-point error ``|u_pred(x) - u_true(x)|`` per batch item.

    Args:
        ddf: ``(B, d, *S)`` predicted field, voxels.
        true_ddf: ``(B, d, *S)`` true field, voxels.
        spacing: voxel size per axis; the error is then in mm, else in voxels.
        mask: optional ``(B, 1, *S)`` / ``(B, *S)`` region to average over.

    Returns:
        ``(B,)`` float64 tensor (nan for an empty mask).
    """
    u = torch.as_tensor(ddf).detach().to(torch.float64)
    v = torch.as_tensor(true_ddf).detach().to(device=u.device, dtype=torch.float64)
    if u.shape != v.shape:
        raise ValueError(f"ddf and true_ddf shapes differ: {tuple(u.shape)}, {tuple(v.shape)}.")
    diff = u - v
    if spacing is not None:
        sp = torch.as_tensor([float(s) for s in spacing], dtype=torch.float64, device=u.device)
        diff = diff * sp.view(1, -1, *([1] * (u.ndim - 2)))
    err = diff.norm(dim=1)  # (B, *S)
    if mask is None:
        return err.flatten(1).mean(1)
    m = torch.as_tensor(mask).to(u.device).bool()
    if m.ndim == err.ndim + 1:
        m = m[:, 0]
    m = m.expand_as(err).flatten(1).to(torch.float64)
    return (err.flatten(1) * m).sum(1) / m.sum(1).where(m.sum(1) > 0, torch.tensor(float("nan"), dtype=torch.float64))


class EndPointError(CumulativeIterationMetric):
    """Mean end-point error (voxels) between predicted and true DDFs, for MONAI/ignite evaluators.

    Lower is better: give the evaluator ``metric_cmp_fn=lambda current, best: current < best`` and
    the best-model ``CheckpointSaver`` ``key_metric_negative_sign=True`` (as ``configs/pretrain.json``).
    Use it through :class:`monai.handlers.IgniteMetricHandler` with
    ``output_transform=from_engine(["ddf", "true_ddf"])`` on :class:`~ran_bundle.engines.SyntheticEvalStep` outputs.

    Args:
        reduction: MONAI reduction of the buffered ``(N, 1)`` values (default mean).
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` predicted and ``y`` true DDF, ``(B, d, *S)`` -> ``(B, 1)`` float32 mean EPE."""
        if y is None:
            raise ValueError("y (the true DDF) is required.")
        return end_point_error(y_pred, y).to(torch.float32).unsqueeze(1)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        from monai.metrics.utils import do_metric_reduction

        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, _ = do_metric_reduction(data, reduction or self.reduction)
        return f


def load_pretrained(
    network: torch.nn.Module,
    ckpt: str | None,
    device: torch.device | str | None = None,
    key: str = "model",
    strict: bool = True,
) -> torch.nn.Module:
    """Load the ``key`` weights of a checkpoint into ``network`` (strict) and return it, on ``device``.

    The Python counterpart of ``configs/train.json``'s ``--pretrained_ckpt``: start from a pretraining
    checkpoint (``runs/pretrain/model.pt`` holds ``{"model", "optimizer", "lr_scheduler"}``; only the
    model is taken) or a plain state dict, read as every weight file is (:func:`ran_bundle.inputs.read_state_dict`:
    a DDP ``"module."`` prefix is removed). ``ckpt=None`` returns ``network`` unchanged.

    Raises:
        InputError: ``ckpt`` is missing, truncated or unreadable, holds no ``key`` weights, or (``strict``) its
            weights do not fit ``network`` (the first mismatches named); one line each.
    """
    if ckpt is not None and str(ckpt) not in ("", "None", "null"):
        if not os.path.isfile(ckpt):
            raise InputError(
                f"pretrained checkpoint {os.fspath(ckpt)}: file not found; run the pretraining first "
                "(python -m monai.bundle run training --config_file configs/pretrain.json)."
            )
        state = read_state_dict(ckpt, key)
        if strict:
            check_state_dict_fits(state, network, os.fspath(ckpt), "the network", "start from weights of its preset.")
        network.load_state_dict(state, strict=strict)
        logging.getLogger(__name__).info("loaded pretrained weights %r of %s", key, os.fspath(ckpt))
    return network if device is None else network.to(device)


# ----------------------------------------------------------------------------------------------
# synthetic contrasts (another modality made from a label map, for tests of cross-contrast registration)
# ----------------------------------------------------------------------------------------------
def synthetic_contrast(
    label: np.ndarray,
    brain: np.ndarray,
    seed: int,
    blur_voxels: float = 0.7,
    bias: float = 0.3,
    noise: float = 0.03,
) -> np.ndarray:
    """A **synthetic** image of another contrast drawn from a label map, as SynthSeg does (Billot et al., Medical
    Image Analysis 2023): one random mean intensity per structure, a little texture within it, partial-volume blur,
    a smooth multiplicative bias field and noise. Every structure gets its own random intensity, so the contrast is
    not a monotonic function of a T1's (dark can become bright and the other way round).

    ``brain`` splits the label map's 0 into background (outside, kept at 0 as in a skull-stripped scan) and an
    unlabelled brain class of its own (the cerebral white matter of the Mindboggle label maps).

    Args:
        label: ``(X, Y, Z)`` integer label map.
        brain: ``(X, Y, Z)`` bool, the brain (e.g. :func:`ran_bundle.spatial.foreground_mask` of the T1).
        seed: seed of every random choice (one image per seed).
        blur_voxels: Gaussian sigma (voxels) of the partial-volume blur.
        bias: amplitude of the log bias field (the field lies in ``[exp(-bias), exp(bias)]``).
        noise: Gaussian noise sigma, relative to the brightest structure.

    Returns:
        ``(X, Y, Z)`` float32 in ``[0, 1]``, 0 outside ``brain``.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    label = np.asarray(label)
    brain = np.asarray(brain, dtype=bool)
    classes = np.where(brain, np.rint(label).astype(np.int64) + 1, 0)  # 0: background, 1: unlabelled brain
    values, index = np.unique(classes, return_inverse=True)
    means = rng.uniform(0.1, 1.0, size=len(values))
    texture = rng.uniform(0.0, 0.05, size=len(values))
    means[values == 0], texture[values == 0] = 0.0, 0.0
    image = means[index] + texture[index] * rng.standard_normal(index.shape)
    image = image.reshape(label.shape).astype(np.float32)
    image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image), blur_voxels))
    control = rng.uniform(-bias, bias, size=(1, 4, 4, 4))  # a 4x4x4 B-spline control grid: a bump or two
    log_bias = bspline_field(label.shape, control)[0].numpy()
    image = image * np.exp(log_bias) + noise * rng.standard_normal(label.shape)
    image = np.where(brain, np.clip(image, 0.0, None), 0.0)
    return (image / max(float(image.max()), 1e-6)).astype(np.float32)
