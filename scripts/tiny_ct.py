"""The known smooth random fields of ``data/tiny_ct`` (numpy and scipy, voxel units).

A field ``u`` is ``(3, *S)`` in voxels of the image grid, channel ``i`` along array axis ``i``, and a warped image
is ``volume(x + u(x))``, the convention of :mod:`ran_bundle.flow`. :func:`random_field` is the field that
``scripts/make_tiny_dataset.py`` warps the real scan with; ``scripts/paper_figures.py`` makes its known-field pair
with it too. Needs scipy, which the package does not depend on.

:func:`warp_volume` samples with scipy in float64 rather than with the package's one warp
(:func:`ran_bundle.flow.warp`, float32 ``grid_sample``): it is what built the committed
``data/tiny_ct``, and rebuilding the data set must give the same files.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

__all__ = ["jacobian_det", "rotation", "random_field", "warp_volume"]


def jacobian_det(u: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a voxel displacement ``u`` of shape (3, X, Y, Z) (central differences)."""
    grads = np.stack([np.stack(np.gradient(u[i]), 0) for i in range(3)], 0)  # (3, 3, X, Y, Z)
    jac = grads + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx about array axes (angles about axes 0, 1, 2)."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_field(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Smooth random voxel displacement (3, *shape) without folding, and its parameters."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), 0)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    # rotation: +-2 deg about array axes 0 and 1, +-6 deg in-plane (about axis 2, the slice axis)
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * np.array([2.0, 2.0, 6.0]))
    trans = rng.uniform(-1, 1, 3) * np.array([3.0, 3.0, 1.0])
    rot = rotation(angles)
    x = grid - centre[:, None, None, None]
    u_rigid = np.einsum("ij,j...->i...", rot - np.eye(3), x) + trans[:, None, None, None]
    amp = np.array([3.0, 3.0, 1.0])  # max smooth displacement (voxels) per axis
    noise = np.stack([gaussian_filter(rng.standard_normal(shape), sigma=5.0, mode="nearest") for _ in range(3)])
    noise /= np.abs(noise).reshape(3, -1).max(1)[:, None, None, None]
    u_smooth = noise * amp[:, None, None, None]
    scale = 1.0
    for _ in range(20):
        u = u_rigid + scale * u_smooth
        det = jacobian_det(u)
        if det.min() >= 0.5:
            break
        scale *= 0.8
    else:
        raise RuntimeError("could not make a folding-free field")
    params = {
        "rotation_deg": np.rad2deg(angles).round(3).tolist(),
        "translation_vox": trans.round(3).tolist(),
        "smooth_amplitude_vox": (amp * scale).round(3).tolist(),
        "min_detJ": float(det.min().round(4)),
        "max_abs_disp_vox": float(np.abs(u).max().round(3)),
    }
    return u, params


def warp_volume(volume: np.ndarray, u: np.ndarray, order: int) -> np.ndarray:
    """``volume(x + u(x))`` with scipy (order 1 = trilinear, 0 = nearest), border replicated."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in volume.shape], indexing="ij"), 0)
    return map_coordinates(volume, grid + u, order=order, mode="nearest")
