"""Iterative registration tools that users would otherwise pick, as peers of the RAN in the comparison run
(``scripts/compare_brain.py``): SimpleITK's multi-resolution demons and ANTs SyN through ``antspyx`` (an
optional extra: ``pip install 'ran-bundle[compare]'``).

Both take the pair AFTER the package's affine stage: the fixed image and the moving image already resampled
through the affine onto the fixed grid, as SimpleITK images. Both return the deformable displacement on the
fixed grid as a world field ``(1, 3, *S)`` in mm (RAS, :mod:`ran_bundle.spatial`): the fixed point ``p`` maps
to the point ``p + v(p)`` of the affinely resampled moving image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import SimpleITK as sitk
import torch

from ran_bundle.spatial import read_displacement_field

__all__ = ["demons", "ants_available", "ants_syn"]


def _field_of(displacement: sitk.Image) -> torch.Tensor:
    """``(1, 3, *S)`` RAS mm world field of a SimpleITK displacement field image (LPS vectors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "field.nii.gz")
        sitk.WriteImage(sitk.Cast(displacement, sitk.sitkVectorFloat32), path)
        field, _ = read_displacement_field(path)
    return field.float()


def demons(
    fixed: sitk.Image,
    moving: sitk.Image,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_mm: Sequence[float] = (2.0, 1.0, 0.0),
    iterations: Sequence[int] = (60, 30, 10),
    field_sigma: float = 1.5,
) -> torch.Tensor:
    """SimpleITK multi-resolution demons (fast symmetric forces, the intensities of ``moving`` histogram-matched
    to ``fixed`` first): at each level, coarse to fine, both images are smoothed and shrunk and the field of the
    previous level, resampled onto the level's grid, is refined by ``iterations`` demons steps with a Gaussian
    smoothing of the field (``field_sigma`` voxels) after each step.

    Returns:
        ``(1, 3, *S)`` world displacement (mm, RAS) on the fixed grid.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.HistogramMatching(sitk.Cast(moving, sitk.sitkFloat32), fixed, 256, 15, True)
    field = None
    for shrink, sigma, n in zip(shrink_factors, smoothing_mm, iterations, strict=True):
        f, m = fixed, moving
        if sigma > 0:
            f, m = sitk.SmoothingRecursiveGaussian(f, sigma), sitk.SmoothingRecursiveGaussian(m, sigma)
        if shrink > 1:
            f, m = sitk.Shrink(f, [shrink] * 3), sitk.Shrink(m, [shrink] * 3)
        if field is None:
            field = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, 3)
            field.CopyInformation(f)
        else:  # the previous level's field on this level's grid
            field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        step = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        step.SetNumberOfIterations(int(n))
        step.SetSmoothDisplacementField(True)
        step.SetStandardDeviations(float(field_sigma))
        field = step.Execute(f, m, field)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return _field_of(field)


def ants_available() -> bool:
    """Whether ``antspyx`` can be imported."""
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def ants_syn(fixed: sitk.Image, moving: sitk.Image, type_of_transform: str = "SyNOnly", **options) -> torch.Tensor:
    """ANTs SyN with antspyx's defaults (``ants.registration``; ``"SyNOnly"``: no affine of its own, the pair
    is already affinely aligned). Threads: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``. ``options`` go to
    ``ants.registration`` (e.g. ``syn_metric="mattes"``: mutual information, for another contrast).

    Returns:
        ``(1, 3, *S)`` world displacement (mm, RAS) on the fixed grid.

    Raises:
        ImportError: antspyx is not installed.
    """
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in ("fixed.nii.gz", "moving.nii.gz")]
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), paths[0])
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), paths[1])
        result = ants.registration(
            ants.image_read(paths[0]),
            ants.image_read(paths[1]),
            type_of_transform=type_of_transform,
            outprefix=tmp + "/",
            **options,
        )
        warp = [t for t in result["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
        field, _ = read_displacement_field(warp[0])
    return field.float()
