"""The affine stage: rigid, then affine, multi-resolution registration with SimpleITK.

Native-space scans (what users bring) differ by position, orientation and size; the RAN is trained on
pairs that an affine already brought together. This stage finds that affine before the network runs,
in the way SimpleITK users know: ``CenteredTransformInitializer`` (centres of mass), then
``ImageRegistrationMethod`` with Mattes mutual information, a regular-step gradient descent, physical
shift scales and a shrink/smoothing pyramid, once for a rigid (6 parameters) and once for a full
affine (12 parameters) transform started from the rigid one.

Convention: the transform maps a **fixed** physical point to the **moving** physical point that
should land on it (ITK's resampling convention, so ``sitk.Resample(moving, fixed, transform)`` gives the
moving image on the fixed grid). :func:`ras_matrix` turns it into the package's convention, a ``(4, 4)``
matrix acting on RAS world points (:mod:`ran_bundle.spatial`); :func:`write_transform` writes the ITK
transform file (``.tfm``/``.txt``/``.mat``/``.h5``) that SimpleITK, ITK, ANTs and 3D Slicer read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ran_bundle.inputs import InputError
from ran_bundle.spatial import ras_matrix, sitk_affine

__all__ = [
    "AFFINE_STAGES",
    "AffineResult",
    "register_affine",
    "ras_matrix",
    "sitk_affine",
    "read_transform",
    "write_transform",
]

AFFINE_STAGES = ("affine", "rigid", "none")
"""``"affine"``: rigid, then affine; ``"rigid"``: rigid only; ``"none"``: identity (or the initial transform)."""
#: the fewest voxels per axis the working grid keeps: coarser, a small image leaves too few metric samples at the
#: pyramid's coarse level
MIN_WORKING_VOXELS = 32


@dataclass
class AffineResult:
    """What the affine stage found.

    Attributes:
        matrix: ``(4, 4)`` map of fixed RAS world points (mm) to moving RAS world points.
        transform: the same as a SimpleITK ``AffineTransform`` (LPS, ITK's convention).
        stage: the stage run (:data:`AFFINE_STAGES`).
        metric: final Mattes mutual information of each level run (lower is better), by stage name.
        seconds: wall time.
    """

    matrix: np.ndarray
    transform: sitk.AffineTransform
    stage: str
    metric: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def read_transform(path: str | os.PathLike) -> np.ndarray:
    """Read a linear ITK transform file (``.tfm``, ``.txt``, ``.mat``, ``.h5``; ANTs' ``*GenericAffine.mat``
    included) as a ``(4, 4)`` RAS matrix (fixed point -> moving point).

    Raises:
        InputError: missing, unreadable, not 3-D, or not linear (a displacement field, a B-spline).
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"initial transform {p}: file not found.")
    try:
        transform = sitk.ReadTransform(p)
    except RuntimeError as e:
        last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else "unknown error"
        raise InputError(f"initial transform {p}: cannot read it as an ITK transform ({last}).") from None
    if transform.GetDimension() != 3:
        raise InputError(f"initial transform {p}: a {transform.GetDimension()}-D transform; expected 3-D.")
    if not transform.IsLinear():
        raise InputError(
            f"initial transform {p}: {transform.GetName()} is not linear; give an affine or rigid transform."
        )
    matrix = ras_matrix(transform)
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
        raise InputError(f"initial transform {p}: its matrix is singular or not finite.")
    return matrix


def write_transform(matrix: np.ndarray, path: str | os.PathLike) -> None:
    """Write a ``(4, 4)`` RAS matrix as an ITK ``AffineTransform`` file (format by suffix: ``.tfm``,
    ``.txt``, ``.mat``, ``.h5``). ``sitk.ReadTransform(path)`` gives the fixed -> moving point map back."""
    sitk.WriteTransform(sitk_affine(matrix), os.fspath(path))


def _method(
    shrink_factors: Sequence[int],
    smoothing_mm: Sequence[float],
    iterations: int,
    sampling: float,
    seed: int,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    stage: str = "affine",
    initial: np.ndarray | None = None,
    working_spacing: float = 3.0,
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_mm: Sequence[float] = (2.0, 1.0),
    iterations: int = 100,
    sampling: float = 0.1,
    seed: int = 1,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
) -> AffineResult:
    """Find the affine that maps ``fixed`` points to ``moving`` points (rigid, then affine).

    Both images are first block-averaged (``BinShrink``) to about ``working_spacing`` mm: with the default 3 mm
    and levels at 6 and 3 mm, a 1 mm brain takes 2.7 s on 2 cores against 10.5 s at 2 mm, for the same Dice after
    the deformable stage (6 validation pairs of Mindboggle, ``docs/benchmark.md``). One level alone diverged on most
    of those pairs: keep a coarser level first. Optional metric masks (SimpleITK's ``SetMetricFixedMask`` /
    ``SetMetricMovingMask``) leave voxels out of the metric: a lesion, a resection cavity, an artefact, the part a
    short field of view lacks; the centre-of-mass start then uses the masked images too. With no
    ``initial`` matrix the rigid stage starts from the centre-of-mass alignment
    (``CenteredTransformInitializer`` with ``MOMENTS``); the affine stage starts from the rigid result.
    The random metric sampling is seeded, so a run is repeatable for a given number of threads.

    Args:
        fixed: the fixed image (3-D SimpleITK image with its physical geometry).
        moving: the moving image.
        stage: ``"affine"`` (rigid then affine), ``"rigid"``, or ``"none"`` (return ``initial`` or the
            identity without optimising).
        initial: optional ``(4, 4)`` RAS matrix to start from (e.g. :func:`read_transform` of a user's file).
        working_spacing: voxel size (mm) the images are block-averaged to first (by an integer factor per
            axis; finer images only).
        shrink_factors: pyramid levels (coarse to fine) of each stage, relative to the working grid.
        smoothing_mm: Gaussian sigma (mm) of each level.
        iterations: maximum optimiser iterations per level.
        sampling: fraction of the fixed voxels sampled by the metric at each level.
        seed: seed of the metric sampling (not 0, which SimpleITK takes as "seed from the clock").
        fixed_mask: voxels of the fixed image the metric uses (non-zero = use), on the fixed image's grid.
        moving_mask: the same for the moving image, on its grid.

    Returns:
        :class:`AffineResult`.

    Raises:
        ValueError: unknown ``stage``, mismatched pyramid settings, or a mask on another grid than its image.
    """
    if stage not in AFFINE_STAGES:
        raise ValueError(f"stage must be one of {AFFINE_STAGES}, got {stage!r}.")
    if seed == 0:
        raise ValueError("seed 0 makes SimpleITK seed from the clock (not repeatable); use another value.")
    if len(shrink_factors) != len(smoothing_mm):
        raise ValueError(f"shrink_factors {shrink_factors} and smoothing_mm {smoothing_mm} differ in length.")
    start = time.perf_counter()
    if stage == "none":
        matrix = np.eye(4) if initial is None else np.asarray(initial, dtype=np.float64)
        return AffineResult(matrix, sitk_affine(matrix), stage, {}, time.perf_counter() - start)

    fixed_f = _block_average(sitk.Cast(fixed, sitk.sitkFloat32), working_spacing)
    moving_f = _block_average(sitk.Cast(moving, sitk.sitkFloat32), working_spacing)
    masks = {
        role: None if mask is None else _metric_mask(mask, image, working_spacing, role)
        for role, mask, image in (("fixed", fixed_mask, fixed), ("moving", moving_mask, moving))
    }
    if initial is None:
        rigid = sitk.CenteredTransformInitializer(
            _masked(fixed_f, masks["fixed"]),
            _masked(moving_f, masks["moving"]),
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        rigid = sitk.Euler3DTransform(rigid)
    else:
        # start from the user's matrix: rigid parameters on top of it, about the fixed image's centre
        rigid = sitk.Euler3DTransform()
        rigid.SetCenter(_centre(fixed_f))
    metric: dict[str, float] = {}
    moving_initial = None if initial is None else sitk_affine(initial)

    method = _method(shrink_factors, smoothing_mm, iterations, sampling, seed, masks["fixed"], masks["moving"])
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed_f, moving_f)
    metric["rigid"] = float(method.GetMetricValue())
    result: sitk.Transform = _compose(moving_initial, rigid)

    if stage == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        method = _method(shrink_factors, smoothing_mm, iterations, sampling, seed, masks["fixed"], masks["moving"])
        if moving_initial is not None:
            method.SetMovingInitialTransform(moving_initial)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed_f, moving_f)
        metric["affine"] = float(method.GetMetricValue())
        result = _compose(moving_initial, affine)
    matrix = ras_matrix(result)
    return AffineResult(matrix, sitk_affine(matrix), stage, metric, time.perf_counter() - start)


def _block_average(image: sitk.Image, spacing: float) -> sitk.Image:
    """``image`` block-averaged by the integer factor per axis that brings its voxels closest to ``spacing`` mm,
    keeping at least :data:`MIN_WORKING_VOXELS` voxels along each axis (a small image stays as it is)."""
    factors = [
        max(1, min(int(round(spacing / s)), n // MIN_WORKING_VOXELS))
        for s, n in zip(image.GetSpacing(), image.GetSize(), strict=True)
    ]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _metric_mask(mask: sitk.Image, image: sitk.Image, spacing: float, role: str) -> sitk.Image:
    """A metric mask (``sitkUInt8``, 1 = use) on the block-averaged grid of its ``image``: the mask is averaged
    like the image and a working voxel is used when at least half of it was.

    Raises:
        ValueError: the mask is not on ``image``'s grid.
    """
    same = mask.GetSize() == image.GetSize() and all(
        np.allclose(a, b, atol=1e-4)
        for a, b in (
            (mask.GetSpacing(), image.GetSpacing()),
            (mask.GetOrigin(), image.GetOrigin()),
            (mask.GetDirection(), image.GetDirection()),
        )
    )
    if not same:
        raise ValueError(f"the {role} mask is not on the {role} image's grid (size, spacing, origin, direction).")
    use = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32)
    return sitk.Cast(sitk.GreaterEqual(_block_average(use, spacing), 0.5), sitk.sitkUInt8)


def _masked(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """``image`` set to 0 outside ``mask`` (same grid), or ``image`` itself without a mask."""
    return image if mask is None else sitk.Mask(image, mask)


def _centre(image: sitk.Image) -> tuple[float, float, float]:
    """Physical centre (LPS) of an image's grid."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    return tuple(float(v) for v in image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))


def _compose(outer: sitk.Transform | None, inner: sitk.Transform) -> sitk.Transform:
    """The point map ``p -> outer(inner(p))``: ITK applies a moving initial transform after the optimised one,
    and a ``CompositeTransform`` applies the transform added last first."""
    if outer is None:
        return inner
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(outer)
    composite.AddTransform(inner)
    return composite
