"""Field algebra and warping of ran-bundle: the one functional home of sampling, grids, world <-> voxel maps,
composition, exponentiation and inversion of displacement fields (torch and numpy alone, like deepali's
``core/flow.py``, voxelmorph's ``nn/functional.py`` and MONAI's :class:`monai.networks.blocks.Warp`).

Conventions (used by the network, the losses, the metrics, the pipeline and every reader and writer):

* A dense displacement field (DDF) is a tensor ``(B, d, *spatial)`` (``d`` = number of spatial dims) in
  **voxel units** of the grid it lives on (the fixed grid): channel ``i`` is the displacement along array
  axis ``i``.
* Warping pulls the moving image onto the fixed grid: ``warped(x) = moving(x + u(x))`` for every fixed voxel
  index ``x`` (trilinear or nearest interpolation, zero outside the moving image), exactly as
  :class:`monai.networks.blocks.Warp` does (``grid_sample(..., align_corners=True)``: index ``i`` is the centre
  of voxel ``i``): :func:`warp`, and :func:`warp_image` for MetaTensors and label maps. The network aligns voxel
  arrays, so ``x + u(x)`` is a voxel index of the moving array; when the moving image sits on the fixed grid
  (the usual case after preprocessing), this is also the world-space relation.
* Affines are ``(d + 1, d + 1)`` voxel-to-world matrices in the **RAS** world frame, as MONAI's
  ``MetaTensor.affine`` and nibabel give them (first array axis = first affine column): :func:`as_affine`.
* A world field ``v`` ``(3, *S)`` in mm (RAS) on a grid with affine ``A`` maps the point ``p = A y`` (voxel
  ``y``) to ``p + v(p)``; :func:`ddf_voxel_to_mm` and :func:`field_to_voxel_ddf` convert between the two forms.
  ITK's LPS frame and the files are :mod:`ran_bundle.fields`' business.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ran_bundle.tensors import as_plain_tensor

__all__ = [
    "shape_tensor",
    "warp",
    "voxel_grid",
    "as_affine",
    "spacing_of",
    "apply_matrix",
    "world_to_voxel",
    "voxel_to_world",
    "sample_voxels",
    "sample_affine",
    "warp_image",
    "spatial_dims_of",
    "ddf_voxel_to_mm",
    "field_to_voxel_ddf",
    "resample_field",
    "map_grid",
    "warp_to_grid",
    "map_points",
    "compose",
    "exponentiate",
    "invert_field",
]

ArrayLike = torch.Tensor | np.ndarray


# --------------------------------------------------------------------------------------------------
# sampling with a voxel DDF (traced into the network: keep every op a function of the input's shape)
# --------------------------------------------------------------------------------------------------


def shape_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x.shape`` as a tensor: traced as a function of the input (so a traced model runs at other sizes), and
    as plain numbers otherwise (``torch.compile`` cannot trace ``torch._shape_as_tensor``)."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(x)
    return torch.tensor(x.shape, device=x.device)


def _identity_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates ``(1, d, *spatial)`` of the grid of ``ddf`` ``(B, d, *spatial)``."""
    axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in ddf.shape[2:]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def warp(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Warp ``image`` by a voxel DDF: ``out(x) = image(x + ddf(x))``, the package's one sampling function.

    The same convention as MONAI's :class:`monai.networks.blocks.Warp` (``grid_sample`` with
    ``align_corners=True``: index ``i`` is the centre of voxel ``i``), written so that it traces for any input
    size. ``ddf`` lives on the output grid and ``x + ddf(x)`` are voxel indices of ``image``'s grid, which may
    differ in size from the output grid (resampling between grids: :func:`sample_voxels`).

    Args:
        image: ``(B, C, *spatial_in)``.
        ddf: ``(B, spatial_dims, *spatial_out)`` displacement in voxels on the output grid.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (label maps).
        padding_mode: ``grid_sample`` padding outside the image: ``"zeros"`` (default) or ``"border"``.

    Returns:
        ``(B, C, *spatial_out)``.
    """
    spatial_dims = ddf.shape[1]
    if not torch.jit.is_tracing() and (image.shape[0] != ddf.shape[0] or image.ndim != ddf.ndim):
        raise ValueError(f"warp: image {tuple(image.shape)} and ddf {tuple(ddf.shape)} do not match")
    sizes = shape_tensor(image)[2:].to(ddf)
    scale = (2.0 / (sizes - 1).clamp(min=1)).view(1, -1, *([1] * spatial_dims))
    grid = (_identity_grid(ddf) + ddf) * scale - 1.0
    grid = grid.permute(0, *range(2, spatial_dims + 2), 1).flip(-1)  # (B, *spatial, d), x-y-z order
    # autocast runs grid_sample in float32; give the result back in the image's dtype
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True).to(image.dtype)


# --------------------------------------------------------------------------------------------------
# grids and world <-> voxel maps
# --------------------------------------------------------------------------------------------------


def voxel_grid(shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Voxel indices ``(d, *shape)`` of a grid (channel ``i`` = index along axis ``i``)."""
    axes = [torch.arange(int(n), dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _float64_array(x: ArrayLike | Sequence) -> np.ndarray:
    """A float64 numpy copy of a tensor, array or nested sequence."""
    return np.array(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def as_affine(affine: ArrayLike | Sequence, spatial_dims: int = 3) -> np.ndarray:
    """Return ``affine`` as a float64 ``(d+1, d+1)`` numpy array, checking its shape.

    Args:
        affine: voxel-to-world (RAS) matrix, ``(d+1, d+1)``; a batch ``(1, d+1, d+1)`` is squeezed.
        spatial_dims: ``d``.

    Raises:
        ValueError: when the shape is wrong or the linear part is singular.
    """
    a = _float64_array(affine)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    n = spatial_dims + 1
    if a.shape != (n, n):
        raise ValueError(f"affine must have shape ({n}, {n}) for a {spatial_dims}-D field, got {a.shape}.")
    if abs(np.linalg.det(a[:spatial_dims, :spatial_dims])) < 1e-12:
        raise ValueError(f"affine has a singular linear part: {a.tolist()}.")
    return a


def spacing_of(affine: ArrayLike | Sequence) -> tuple[float, ...]:
    """Voxel size in mm per array axis of a ``(d + 1, d + 1)`` voxel-to-world affine: the column norms of its
    linear part."""
    a = _float64_array(affine)
    d = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:d, :d], axis=0))


def apply_matrix(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A ``(4, 4)`` matrix applied to points ``(3, *S)``, in the points' dtype: the one homogeneous point map
    behind :func:`world_to_voxel`, :func:`voxel_to_world` and the affine stage's fixed -> moving RAS map."""
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=points.dtype)
    return torch.einsum("ij,j...->i...", a[:3, :3], points) + a[:3, 3].reshape(3, *([1] * (points.ndim - 1)))


def world_to_voxel(points: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Map world points ``(3, *S)`` (RAS mm) to continuous voxel indices ``(3, *S)`` of a grid with ``affine``."""
    return apply_matrix(np.linalg.inv(as_affine(affine)), points)


def voxel_to_world(index: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Map voxel indices ``(3, *S)`` of a grid with ``affine`` to world points ``(3, *S)`` (RAS mm)."""
    return apply_matrix(as_affine(affine), index)


# --------------------------------------------------------------------------------------------------
# sampling and warping images
# --------------------------------------------------------------------------------------------------


def sample_voxels(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``image`` at continuous voxel indices: ``out(y) = image(coords(y))``.

    :func:`warp`'s convention (``grid_sample`` with ``align_corners=True``) with the indices given directly, so
    the output grid may differ from the input grid. The indices are normalised in one pass, without building and
    subtracting the output grid (a 1 mm brain's ten million points: a third of the time of the DDF route).

    Args:
        image: ``(1, C, *S_in)`` (integer dtypes allowed with ``mode="nearest"``).
        coords: ``(3, *S_out)`` or ``(1, 3, *S_out)`` voxel indices of ``image`` (float).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"`` (outside is 0) or ``"border"`` (outside takes the nearest edge value).

    Returns:
        ``(1, C, *S_out)``, ``image``'s dtype for ``mode="nearest"``, float32 otherwise.
    """
    coords = coords[0] if coords.ndim == 5 else coords
    dims = coords.shape[0]
    scale = [2.0 / max(int(n) - 1, 1) for n in image.shape[2:]]
    # grid_sample's last axis runs x-y-z: the array axes reversed
    grid = torch.stack([coords[i].float() * scale[i] - 1.0 for i in reversed(range(dims))], dim=-1)[None]
    return _grid_sample(image, grid, mode, padding_mode)


def sample_affine(
    image: torch.Tensor,
    index_map: np.ndarray,
    shape: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` at an affine map of the voxel indices of another grid: ``out(y) = image(M y)``.

    :func:`sample_voxels` of ``apply_matrix(index_map, voxel_grid(shape))``, with the sampling grid built by
    ``F.affine_grid`` in one pass (resampling a field or a label map by the affine stage onto a 1 mm grid).

    Args:
        image: ``(1, C, *S_in)`` (integer dtypes allowed with ``mode="nearest"``).
        index_map: ``(4, 4)`` map of output voxel indices to ``image``'s voxel indices.
        shape: the output grid's shape ``S_out``.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"`` or ``"border"``.

    Returns:
        ``(1, C, *S_out)``, as :func:`sample_voxels`.
    """
    m = np.asarray(index_map, dtype=np.float64)
    out_half = np.array([max(int(n) - 1, 1) / 2.0 for n in shape])  # normalised -> index: (n + 1) * half
    in_scale = np.array([2.0 / max(int(n) - 1, 1) for n in image.shape[2:]])  # index -> normalised: i * scale - 1
    linear = in_scale[:, None] * m[:3, :3] * out_half[None, :]
    shift = in_scale * (m[:3, :3] @ out_half + m[:3, 3]) - 1.0
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)  # x-y-z order of grid_sample
    size = [1, 1, *[int(n) for n in shape]]
    grid = F.affine_grid(torch.as_tensor(theta[None].copy(), dtype=torch.float32), size, align_corners=True)
    return _grid_sample(image, grid, mode, padding_mode)


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``grid_sample`` of ``image`` (float32, integer labels cast back with ``mode="nearest"``)."""
    out = F.grid_sample(image.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    if mode == "nearest" and not image.dtype.is_floating_point:
        out = out.round().to(image.dtype)
    return out


def warp_image(moving: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``moving`` onto the fixed grid with a voxel DDF: ``warped(x) = moving(x + u(x))``.

    :func:`warp` (zero padding) with its inputs checked, accepting MetaTensors and integer label maps.

    Args:
        moving: ``(B, C, *spatial)`` image; integer/bool dtypes are accepted (warped as float,
            with ``mode="nearest"`` cast back to the input dtype).
        ddf: ``(B, d, *spatial)`` voxel DDF on the fixed grid, same batch and spatial size.
        mode: ``"bilinear"`` (trilinear in 3-D) for images, ``"nearest"`` for labels.

    Returns:
        ``(B, C, *spatial)`` plain ``torch.Tensor`` (metadata is dropped: the result lives on the
        fixed grid, not the moving one).
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
    if moving.ndim not in (4, 5):
        raise ValueError(f"moving must be (B, C, H, W[, D]), got shape {tuple(moving.shape)}.")
    d = moving.ndim - 2
    if tuple(ddf.shape) != (moving.shape[0], d, *moving.shape[2:]):
        raise ValueError(
            f"ddf shape {tuple(ddf.shape)} does not match moving {tuple(moving.shape)}: "
            f"expected {(moving.shape[0], d, *moving.shape[2:])}."
        )
    in_dtype = moving.dtype
    img = as_plain_tensor(moving)
    u = as_plain_tensor(ddf)
    if not img.is_floating_point():
        img = img.float()
    u = u.to(img.dtype)
    out = warp(img, u, mode=mode)
    if mode == "nearest" and out.dtype != in_dtype:
        out = out.round().to(in_dtype) if not in_dtype.is_floating_point else out.to(in_dtype)
    return out


# --------------------------------------------------------------------------------------------------
# voxel DDFs <-> world fields, and world fields between grids
# --------------------------------------------------------------------------------------------------


def spatial_dims_of(ddf: ArrayLike) -> int:
    """``d`` of a DDF ``(B, d, *spatial)``, checking that it has ``d`` spatial dims.

    Raises:
        ValueError: when the shape is not ``(B, d, *spatial)`` with ``len(spatial) == d``.
    """
    if ddf.ndim < 3 or ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(
            f"ddf must have shape (B, d, *spatial) with d = number of spatial dims, got {tuple(ddf.shape)}."
        )
    return ddf.ndim - 2


def ddf_voxel_to_mm(
    ddf: ArrayLike,
    affine: ArrayLike | Sequence,
    moving_affine: ArrayLike | Sequence | None = None,
) -> ArrayLike:
    """Convert a voxel DDF on the fixed grid to world displacements in mm (RAS frame).

    ``v(x) = A_m[:d, :d] (x + u(x)) + t_m - (A_f[:d, :d] x + t_f)``; with ``moving_affine=None``
    (moving on the fixed grid) this is simply ``A_f[:d, :d] u(x)``.

    Args:
        ddf: ``(B, d, *spatial)`` displacement in voxels along the array axes (torch or numpy).
        affine: ``(d+1, d+1)`` voxel-to-world RAS affine of the fixed grid.
        moving_affine: affine of the moving array when it differs from the fixed one.

    Returns:
        ``(B, d, *spatial)`` displacement in mm along the RAS world axes (x, y, z), same type
        (torch tensor or numpy array) as ``ddf``; torch output keeps ``ddf``'s dtype and device.
    """
    d = spatial_dims_of(ddf)
    a_f = as_affine(affine, d)
    a_m = a_f if moving_affine is None else as_affine(moving_affine, d)
    is_torch = isinstance(ddf, torch.Tensor)
    u = ddf if is_torch else torch.as_tensor(np.asarray(ddf))
    dtype = u.dtype if u.is_floating_point() else torch.float32
    lin_m = torch.as_tensor(a_m[:d, :d], dtype=torch.float64, device=u.device)
    out = torch.einsum("ij,bj...->bi...", lin_m, u.to(torch.float64))
    if moving_affine is not None:
        x = voxel_grid(u.shape[2:]).to(u.device)  # (d, *spatial)
        lin_diff = torch.as_tensor(a_m[:d, :d] - a_f[:d, :d], dtype=torch.float64, device=u.device)
        shift = torch.as_tensor(a_m[:d, d] - a_f[:d, d], dtype=torch.float64, device=u.device)
        extra = torch.einsum("ij,j...->i...", lin_diff, x) + shift.reshape((d,) + (1,) * d)
        out = out + extra.unsqueeze(0)
    out = out.to(dtype)
    return out if is_torch else out.numpy()


def field_to_voxel_ddf(field: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """World displacement (mm, RAS) -> voxel DDF of the same grid: ``u = L^-1 v`` (``L`` = linear part of ``affine``).

    The inverse of :func:`ddf_voxel_to_mm` without moving affine, so
    :func:`~ran_bundle.fields.write_displacement_nifti` and :mod:`ran_bundle.metrics` can be used
    on fields that live on the original image grids. ``det(I + grad u)`` is the Jacobian determinant
    of the world mapping ``p -> p + v(p)``.

    Args:
        field: ``(1, 3, *S)`` or ``(3, *S)``.
        affine: ``(4, 4)`` RAS affine of the grid.

    Returns:
        ``(1, 3, *S)`` float32.
    """
    field = field[None] if field.ndim == 4 else field
    field = field if field.dtype in (torch.float32, torch.float64) else field.float()
    inv = torch.as_tensor(np.linalg.inv(as_affine(affine)[:3, :3]), dtype=field.dtype)
    return torch.einsum("ij,bj...->bi...", inv, field).float()  # in the field's precision: float32 on a 1 mm grid


def resample_field(
    field: torch.Tensor, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray
) -> torch.Tensor:
    """Resample a world displacement field onto another grid (trilinear, edge values outside).

    Args:
        field: ``(1, 3, *S)`` or ``(3, *S)`` displacement in mm (RAS) on the grid ``affine``.
        affine: ``(4, 4)`` RAS affine of ``field``'s grid.
        shape: spatial shape of the target grid.
        target_affine: its ``(4, 4)`` RAS affine.

    Returns:
        ``(1, 3, *shape)`` float32: ``v`` at the target voxel centres.
    """
    field = field[None] if field.ndim == 4 else field
    target_to_source = np.linalg.inv(as_affine(affine)) @ as_affine(target_affine)  # one map of voxel indices
    return sample_affine(field.float(), target_to_source, shape, mode="bilinear", padding_mode="border")


def map_grid(
    field: torch.Tensor, field_affine: np.ndarray, matrix: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxel centres ``p`` of a field's grid and the points the mapping sends them to, ``A(p + v(p))``.

    Computed in the field's dtype (the pipeline's float32 on the fixed grid, float64 in :func:`warp_to_grid`).

    Args:
        field: ``(1, 3, *S)`` or ``(3, *S)`` world displacement ``v`` (mm, RAS) on the grid ``field_affine``.
        field_affine: ``(4, 4)`` RAS affine of the field's grid.
        matrix: ``(4, 4)`` RAS map ``A`` applied after the field (the affine stage); ``None``: the identity.

    Returns:
        ``(points, mapped)``, each ``(3, *S)`` world points (RAS mm).
    """
    field = field[0] if field.ndim == 5 else field
    points = voxel_to_world(voxel_grid(field.shape[1:], field.dtype), field_affine)
    mapped = points + field
    return points, mapped if matrix is None else apply_matrix(matrix, mapped)


def warp_to_grid(
    image: torch.Tensor,
    image_affine: np.ndarray,
    field: torch.Tensor,
    field_affine: np.ndarray,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Pull ``image`` onto a field's grid: ``out(p) = image(p + v(p))`` for every voxel centre ``p``.

    Equivalent to ``sitk.Resample(image, reference, sitk.DisplacementFieldTransform(field))`` with
    zero outside the image.

    Args:
        image: ``(1, C, *S_in)`` on the grid ``image_affine`` (RAS).
        image_affine: ``(4, 4)`` RAS affine of ``image``.
        field: ``(1, 3, *S)`` or ``(3, *S)`` world displacement (mm, RAS) on the grid ``field_affine``.
        field_affine: ``(4, 4)`` RAS affine of the output grid.
        mode: ``"bilinear"`` for images, ``"nearest"`` for label maps (dtype kept).

    Returns:
        ``(1, C, *S)`` on the field's grid.
    """
    _, mapped = map_grid(field.to(torch.float64), field_affine)
    return sample_voxels(image, world_to_voxel(mapped, image_affine), mode=mode, padding_mode="zeros")


def map_points(points: np.ndarray, field: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map world points by a displacement field: ``p -> p + v(p)`` (ITK's ``TransformPoint``).

    ``v`` is interpolated trilinearly (edge values in the outer half voxel). Points outside the
    field's grid (beyond half a voxel from the edge centres) keep ``v = 0``, as ITK does.

    Args:
        points: ``(N, 3)`` RAS mm.
        field: ``(1, 3, *S)`` or ``(3, *S)`` displacement (mm, RAS) on the grid ``affine``.
        affine: ``(4, 4)`` RAS affine.

    Returns:
        ``(mapped, inside)``: ``(N, 3)`` float64 RAS mm and an ``(N,)`` bool array.
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    if pts.shape[0] == 0:
        return pts.numpy().copy(), np.zeros(0, dtype=bool)
    field = field[None] if field.ndim == 4 else field
    idx = world_to_voxel(pts.T.contiguous(), affine)  # (3, N)
    sizes = torch.tensor(field.shape[2:], dtype=torch.float64)[:, None]
    inside = ((idx >= -0.5) & (idx <= sizes - 0.5)).all(0)
    v = sample_voxels(field.float(), idx[None, :, :, None, None], "bilinear", "border")
    v = v[0, :, :, 0, 0].to(torch.float64)  # (3, N)
    v[:, ~inside] = 0.0
    return (pts + v.T).numpy(), inside.numpy()


# --------------------------------------------------------------------------------------------------
# composition, exponentiation, inversion
# --------------------------------------------------------------------------------------------------


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Voxel DDF ``(B, d, *S)`` of ``(id + outer) o (id + inner)``: ``inner + outer o (id + inner)``, ``outer``
    sampled with edge values outside its grid. Both ``(B, d, *S)`` on the same grid."""
    return inner + warp(outer, inner, padding_mode="border")


def exponentiate(velocity: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Displacement ``(B, d, *S)`` of the exponential of a stationary velocity field ``(B, d, *S)`` (voxels), by
    scaling and squaring: ``u <- v / 2**steps``, then ``steps`` times ``u <- u o u`` (:func:`compose`). The result
    is the displacement of a diffeomorphism when the scaled velocity is small."""
    u = velocity / 2**steps
    for _ in range(steps):
        u = compose(u, u)
    return u


def invert_field(field: torch.Tensor, affine: np.ndarray, iterations: int = 30) -> torch.Tensor:
    """World displacement ``w`` of the inverse mapping ``(id + v)^-1`` on the grid of ``v``, by the fixed-point
    iteration ``w <- -v(p + w(p))`` (it converges where ``|grad v| < 1``).

    Args:
        field: ``(1, 3, *S)`` world displacement ``v`` (mm, RAS).
        affine: ``(4, 4)`` RAS affine of its grid.
        iterations: rounds of the iteration.

    Returns:
        ``(3, *S)`` float64 ``w``: ``p + w(p)`` is the point that ``p -> p + v(p)`` sends to ``p``.
    """
    grid_points = voxel_to_world(voxel_grid(field.shape[2:]), affine)
    w = torch.zeros_like(field[0])
    for _ in range(iterations):
        w = -sample_voxels(field.float(), world_to_voxel(grid_points + w, affine), "bilinear", "border")[0]
        w = w.double()
    return w
