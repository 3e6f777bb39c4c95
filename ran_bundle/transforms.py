"""MONAI dictionary pipelines for registration pairs.

Keys: ``"moving_image"``, ``"fixed_image"``, ``"moving_label"``, ``"fixed_label"`` (see
:mod:`ran_bundle.data`). Every output is a ``MetaTensor`` ``(1, *spatial)`` whose ``.affine`` (RAS,
voxel-to-world) follows every spatial step (reorientation, resampling, padding, cropping), so the
predicted DDF can be written in world space with :mod:`ran_bundle.fields`.

Pipeline of :func:`registration_transforms`:

1. ``LoadImaged`` (any ITK/NIfTI file) + ``EnsureChannelFirstd``.
2. ``Orientationd("RAS")``.
3. ``Spacingd(spacing)`` when ``spacing`` is given: bilinear for images, nearest for labels.
4. Intensity (images only): ``"ct"``: window [-100, 300] HU -> [0, 1], clipped (the paper);
   ``"mr"``: percentiles 0.5..99.5 of each image -> [0, 1], clipped; ``"none"``: unchanged.
5. One common shape for moving and fixed (the network needs identical, divisible sizes):

   * ``spatial_size`` given: centre pad/crop every key to it (``ResizeWithPadOrCropd``);
   * otherwise (:class:`PadToCommonShaped`): every key is centre-padded with zeros to the
     element-wise maximum of the moving and fixed shapes (and of ``roi_size`` in train mode),
     rounded up to a multiple of ``divisible_k``. Nothing is cropped away.

6. Train mode only: a random crop of ``roi_size`` at the **same** location in all four keys
   (one ``RandSpatialCropd`` over all keys draws one location), then the pair intensity scaling
   of the authors' released code (``utils.real_data_generator``, not described in the paper
   text): both images of a pair are multiplied by one shared random factor ``1 + s``,
   ``s ~ U(-intensity_scale, intensity_scale)`` (default 0.2, so train intensities lie in
   [0, 1.2]; ``intensity_scale=0`` disables it).
7. ``EnsureTyped``: images float32; labels float32 holding integer values (nearest neighbour is
   used for labels everywhere, so no new label values appear).

The network does not read affines: it aligns the voxel arrays, so moving and fixed are expected
to be roughly aligned in array space (same orientation after step 2; Learn2Reg data are
pre-aligned and share one grid).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    Orientationd,
    Pad,
    RandScaleIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.transforms.inverse import InvertibleTransform

from ran_bundle.affine import AFFINE_STAGES, read_transform, register_affine, write_transform
from ran_bundle.defaults import CT_WINDOW
from ran_bundle.fields import atomic_write
from ran_bundle.intensity import INTENSITIES, MR_PERCENTILES
from ran_bundle.keys import IMAGE_KEYS, LABEL_KEYS, PAIR_KEYS, TEACHER_DDF
from ran_bundle.spatial import Grid, foreground_grid, resample_to_grid

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "PAIR_KEYS",
    "CT_WINDOW",
    "RequireKeysd",
    "PadToCommonShaped",
    "AlignToReferenced",
    "registration_transforms",
]

_MODES = ("train", "eval", "infer")


class RequireKeysd(MapTransform):
    """Raise a clear ``KeyError`` when a required key is missing from the data dict (identity otherwise)."""

    def __init__(self, keys: KeysCollection, hint: str = "") -> None:
        super().__init__(keys)
        self.hint = hint

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        missing = [k for k in self.keys if k not in data or data[k] is None]
        if missing:
            raise KeyError(f"pair dict is missing {missing} (has {sorted(map(str, data))}). {self.hint}".strip())
        return data


class PadToCommonShaped(MapTransform, InvertibleTransform):
    """Zero-pad all keys (centred) to one common spatial shape divisible by ``k``.

    Target shape = ceil(max over keys of each spatial size, and of ``min_size``, / k) * k.
    Padding uses :class:`monai.transforms.Pad` (zeros), so ``MetaTensor`` affines are updated and the
    operation is invertible (``Invertd``).

    Args:
        keys: keys to pad (missing keys are skipped with ``allow_missing_keys``).
        k: divisor of every output spatial size.
        min_size: optional minimal spatial size (e.g. the train crop size).
        allow_missing_keys: skip keys that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        k: int | Sequence[int] = 16,
        min_size: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.k = k
        self.min_size = None if min_size is None else tuple(int(s) for s in min_size)
        self.padder = Pad(mode="constant")  # one instance: MONAI's inverse checks the transform's id

    def target_shape(self, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """Common padded shape of the given spatial shapes."""
        nd = len(shapes[0])
        if any(len(s) != nd for s in shapes):
            raise ValueError(f"images have different numbers of spatial dims: {shapes}.")
        mx = np.max(np.asarray(shapes), axis=0)
        if self.min_size is not None:
            mx = np.maximum(mx, np.asarray(self.min_size))
        ks = np.broadcast_to(np.asarray(self.k), (nd,))
        return tuple(int(v) for v in np.ceil(mx / ks).astype(int) * ks)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        target = self.target_shape([tuple(d[key].shape[1:]) for key in keys])
        for key in keys:
            diff = [t - s for t, s in zip(target, d[key].shape[1:], strict=True)]
            # centred, like SpatialPad(method="symmetric"): the odd voxel goes to the end
            to_pad = [(0, 0)] + [(v // 2, v - v // 2) for v in diff]
            d[key] = self.padder(d[key], to_pad=to_pad)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.padder.inverse(d[key])
        return d


class AlignToReferenced(MapTransform):
    """Load the images (and labels) of a pair, each aligned affinely to one reference image, on one grid.

    The data pipeline's form of the affine stage (:mod:`ran_bundle.affine`) for datasets of native-space
    scans: every subject's image is registered (rigid, then affine) to ``reference`` **once** (the matrix
    is kept in memory and, with ``cache_dir``, as an ITK transform file that later runs and other
    workers read), and every image and label of the pair is resampled through it onto the reference's
    foreground grid (:func:`ran_bundle.spatial.foreground_grid`: RAS axes, ``spacing`` mm, sizes
    divisible by ``divisible_k``). Images are linear, labels nearest neighbour. It replaces loading,
    reorientation and resampling in :func:`registration_transforms`.

    Output per key: ``MetaTensor`` ``(1, X, Y, Z)`` float32 whose ``.affine`` is the grid's (RAS).

    Args:
        reference: the reference image file (e.g. one training subject or a template).
        spacing: voxel size (mm) of the grid.
        stage: ``"affine"``, ``"rigid"`` or ``"none"`` (:data:`ran_bundle.affine.AFFINE_STAGES`).
        cache_dir: folder for the per-subject transform files (``None``: memory only).
        divisible_k: every grid size is a multiple of it.
        margin_mm: margin of the grid around the reference's foreground.
        label_keys: keys resampled with nearest neighbour through their image's matrix.
        allow_missing_keys: skip absent keys (labels in inference).
        keep_arrays: keep every resampled image and label in memory, so that a training run reads each file
            once instead of at every draw (about 5 MB per subject at 2 mm); the outputs are copies.
    """

    def __init__(
        self,
        reference: str | os.PathLike,
        spacing: Sequence[float] = (2.0, 2.0, 2.0),
        stage: str = "affine",
        cache_dir: str | os.PathLike | None = None,
        divisible_k: int = 16,
        margin_mm: float = 4.0,
        image_keys: KeysCollection = IMAGE_KEYS,
        label_keys: KeysCollection = LABEL_KEYS,
        allow_missing_keys: bool = False,
        keep_arrays: bool = True,
    ) -> None:
        image_keys, label_keys = list(image_keys), list(label_keys)  # type: ignore[arg-type]
        super().__init__(image_keys + label_keys, allow_missing_keys)
        if stage not in AFFINE_STAGES:
            raise ValueError(f"stage must be one of {AFFINE_STAGES}, got {stage!r}.")
        if not os.path.isfile(reference):
            raise ValueError(f"reference image {reference}: file not found.")
        self.reference_path = os.path.abspath(reference)
        self.stage = stage
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.image_keys, self.label_keys = image_keys, label_keys
        self.reference = sitk.ReadImage(self.reference_path, sitk.sitkFloat32)
        self.grid: Grid = foreground_grid(self.reference, spacing, divisible_k, margin_mm)
        self._matrices: dict[str, np.ndarray] = {}
        self.keep_arrays = bool(keep_arrays)
        self._arrays: dict[tuple[str, bool], np.ndarray] = {}

    def _cache_file(self, image_path: str) -> Path | None:
        if self.cache_dir is None:
            return None
        stat = os.stat(image_path)
        key = f"{os.path.abspath(image_path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.reference_path}|{self.stage}"
        return (
            self.cache_dir / f"{Path(image_path).name.split('.')[0]}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.tfm"
        )

    def matrix(self, image_path: str, image: sitk.Image | None = None) -> np.ndarray:
        """The ``(4, 4)`` RAS map of reference points to points of ``image_path`` (computed once, then cached)."""
        if image_path in self._matrices:
            return self._matrices[image_path]
        cached = self._cache_file(image_path)
        if cached is not None and cached.is_file():
            matrix = read_transform(cached)
        else:
            image = sitk.ReadImage(image_path, sitk.sitkFloat32) if image is None else image
            matrix = register_affine(self.reference, image, stage=self.stage).matrix
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cached, lambda tmp: write_transform(matrix, tmp))
        self._matrices[image_path] = matrix
        return matrix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for image_key, label_key in zip_longest(self.image_keys, self.label_keys):
            if image_key not in d and self.allow_missing_keys:
                continue
            path = os.fspath(d[image_key])
            d[image_key] = self._on_grid(self._resampled(path, path, label=False), path)
            if d.get(label_key) is not None:
                label_path = os.fspath(d[label_key])
                d[label_key] = self._on_grid(self._resampled(label_path, path, label=True), label_path)
        return d

    def _resampled(self, path: str, image_path: str, label: bool) -> np.ndarray:
        """``path`` on the grid through the matrix of its subject's image ``image_path``; with ``keep_arrays``
        each file is read and resampled once per process (a few MB per subject at 2 mm)."""
        key = (path, label)
        if key in self._arrays:
            return self._arrays[key]
        image = sitk.ReadImage(path, sitk.sitkFloat32)
        matrix = self.matrix(image_path, None if label else image)
        array = resample_to_grid(image, self.grid, matrix, label=label)
        if self.keep_arrays:
            self._arrays[key] = array
        return array

    def _on_grid(self, array: np.ndarray, path: str) -> MetaTensor:
        return MetaTensor(
            torch.from_numpy(array.copy())[None],
            affine=torch.as_tensor(self.grid.affine),
            meta={"filename_or_obj": path},
        )


def _check_size(name: str, size: Sequence[int] | None, k: int) -> tuple[int, ...] | None:
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if any(s <= 0 or s % k for s in size):
        raise ValueError(f"{name}={size}: every entry must be a positive multiple of divisible_k={k}.")
    return size


def registration_transforms(
    mode: str = "train",
    spacing: Sequence[float] | None = (2.0, 2.0, 2.0),
    intensity: str = "ct",
    spatial_size: Sequence[int] | None = None,
    roi_size: Sequence[int] | None = (128, 128, 128),
    divisible_k: int = 16,
    with_labels: bool = True,
    intensity_scale: float = 0.2,
    ct_window: Sequence[float] = CT_WINDOW,
    mr_percentiles: Sequence[float] = MR_PERCENTILES,
    reader: str | None = None,
    align_to: str | os.PathLike | None = None,
    align_stage: str = "affine",
    align_cache: str | os.PathLike | None = None,
    labels_optional: bool | None = None,
    label_values: Sequence[int] | None = None,
    before_crop: MapTransform | None = None,
) -> Compose:
    """Preprocessing of a (moving, fixed[, labels]) pair dict, as a MONAI ``Compose``.

    Steps and the shape rule are in the module docstring. Output: ``(1, *spatial)`` float32
    ``MetaTensor`` per key, moving and fixed of identical spatial shape, each size divisible by
    ``divisible_k`` (train: exactly ``roi_size``; with ``spatial_size``: exactly it).

    Args:
        mode: ``"train"`` (random shared crop + pair intensity scaling), ``"eval"`` (full images,
            labels required when ``with_labels``) or ``"infer"`` (full images, labels loaded only
            when present in the dict).
        spacing: target voxel size in mm (e.g. ``(2, 2, 2)`` like Learn2Reg abdomen CT), or None
            to keep each image's grid.
        intensity: ``"ct"``, ``"mr"`` or ``"none"``.
        spatial_size: fixed output size (centre pad/crop) instead of the common-shape rule.
        roi_size: train crop size (ignored in eval/infer); None = no crop.
        divisible_k: every output size is a multiple of it (16 for RAN's 4 poolings).
        with_labels: also load and transform ``moving_label``/``fixed_label`` (nearest neighbour).
        intensity_scale: half-width of the shared multiplicative intensity augmentation (train).
        ct_window: HU window mapped to [0, 1] for ``intensity="ct"``.
        mr_percentiles: lower/upper percentiles mapped to [0, 1] for ``intensity="mr"``.
        reader: optional MONAI reader name for ``LoadImaged`` (e.g. ``"ITKReader"``, ``"NibabelReader"``).
        align_to: a reference image: load every subject through :class:`AlignToReferenced` (affine stage
            once per subject, all keys on the reference's foreground grid at ``spacing``, default 2 mm)
            instead of loading, reorienting and resampling. For native-space datasets.
        align_stage: the affine stage of ``align_to`` (``"affine"``, ``"rigid"``, ``"none"``).
        align_cache: folder where ``align_to`` keeps each subject's transform across runs.
        labels_optional: pairs may come without labels (``None``: only in ``"infer"`` mode); training
            with a mix of labelled and unlabelled subjects needs it.
        label_values: label values mapped to ``1..N`` in this order (MONAI's ``MapLabelValued``), so that
            one-hot label maps of the training Dice have ``N + 1`` channels; ``None`` keeps the values.
        before_crop: a transform applied to the full, scaled pair just before the train crop, which adds the
            teacher field :data:`ran_bundle.data.TEACHER_DDF` (:class:`ran_bundle.distillation.TeacherFieldd`);
            that key is cropped with the images. Train mode only.

    Raises:
        ValueError: bad ``mode``/``intensity``/sizes (before any data is read).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}.")
    if int(divisible_k) < 1:
        raise ValueError(f"divisible_k must be >= 1, got {divisible_k}.")
    k = int(divisible_k)
    spatial_size = _check_size("spatial_size", spatial_size, k)
    roi = _check_size("roi_size", roi_size, k) if mode == "train" else None
    if spacing is not None and any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}.")
    if intensity_scale < 0:
        raise ValueError(f"intensity_scale must be >= 0, got {intensity_scale}.")
    if len(ct_window) != 2 or ct_window[0] >= ct_window[1]:
        raise ValueError(f"ct_window must be (low, high) with low < high, got {ct_window}.")

    if align_stage not in AFFINE_STAGES:
        raise ValueError(f"align_stage must be one of {AFFINE_STAGES}, got {align_stage!r}.")
    labels = list(LABEL_KEYS) if with_labels else []
    lab_missing_ok = mode == "infer" if labels_optional is None else bool(labels_optional)
    keys = list(IMAGE_KEYS) + labels
    img = list(IMAGE_KEYS)

    def opt(transform_cls, **kw):  # label transforms tolerate missing labels in infer mode
        return transform_cls(keys=keys, allow_missing_keys=lab_missing_ok, **kw)

    xforms: list = [
        RequireKeysd(
            img + ([] if lab_missing_ok else labels),
            hint="Set with_labels=False to register images only." if labels else "",
        ),
    ]
    if align_to is not None:
        xforms.append(
            AlignToReferenced(
                align_to,
                spacing=(2.0, 2.0, 2.0) if spacing is None else tuple(float(s) for s in spacing),
                stage=align_stage,
                cache_dir=align_cache,
                divisible_k=k,
                label_keys=labels,
                image_keys=img,
                allow_missing_keys=lab_missing_ok,
            )
        )
    else:
        xforms += [
            opt(LoadImaged, image_only=True, reader=reader),
            opt(EnsureChannelFirstd),
            # explicit labels: axcodes are read against the RAS affine (MONAI's future default reads meta "space")
            opt(Orientationd, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
        if spacing is not None:
            modes = ["bilinear"] * len(img) + ["nearest"] * len(labels)
            xforms.append(opt(Spacingd, pixdim=tuple(float(s) for s in spacing), mode=modes))
    if labels and label_values is not None:
        values = [float(v) for v in label_values]
        targets = [float(i) for i in range(1, len(values) + 1)]
        xforms.append(MapLabelValued(keys=labels, orig_labels=values, target_labels=targets, allow_missing_keys=True))
    if intensity == "ct":
        xforms.append(
            ScaleIntensityRanged(
                keys=img, a_min=float(ct_window[0]), a_max=float(ct_window[1]), b_min=0.0, b_max=1.0, clip=True
            )
        )
    elif intensity == "mr":
        xforms.append(
            ScaleIntensityRangePercentilesd(
                keys=img,
                lower=float(mr_percentiles[0]),
                upper=float(mr_percentiles[1]),
                b_min=0.0,
                b_max=1.0,
                clip=True,
            )
        )
    if spatial_size is not None:
        xforms.append(opt(ResizeWithPadOrCropd, spatial_size=spatial_size))
    else:
        xforms.append(opt(PadToCommonShaped, k=k, min_size=roi))
    if mode == "train":
        crop_keys = list(keys)
        if before_crop is not None:
            xforms.append(before_crop)
            crop_keys.append(TEACHER_DDF)
        if roi is not None:
            # one randomizable transform over all keys: one crop location shared by the pair
            xforms.append(
                RandSpatialCropd(keys=crop_keys, allow_missing_keys=lab_missing_ok, roi_size=roi, random_size=False)
            )
        if intensity_scale > 0:
            # one factor per call, shared by both images (the released code's augmentation)
            xforms.append(RandScaleIntensityd(keys=img, factors=float(intensity_scale), prob=1.0))
    xforms.append(EnsureTyped(keys=img, dtype=torch.float32))
    if labels:
        xforms.append(EnsureTyped(keys=labels, dtype=torch.float32, allow_missing_keys=lab_missing_ok))
    return Compose(xforms)
