"""Register one pair of 3-D images: the pipeline behind ``ran-register``, the MONAI Deploy app and the
MONAI Label atlas transform.

A registration is a short list of named steps, each a method of :class:`RegistrationPipeline`:

1. :meth:`~RegistrationPipeline.check_inputs`: read and check the images, labels and weights before any
   long work (:class:`~ran_bundle.inputs.InputError` names the file and the problem).
2. :meth:`~RegistrationPipeline.run_affine`: rigid, then affine registration (:mod:`ran_bundle.affine`),
   or a user's initial transform, or none.
3. :meth:`~RegistrationPipeline.preprocess`: the network grid, the fixed image's foreground at ``spacing``
   (:func:`~ran_bundle.spatial.foreground_grid`), with the fixed image and the affinely mapped moving image
   resampled onto it and their intensities scaled as at training.
4. :meth:`~RegistrationPipeline.predict`: the network's displacement on that grid (optionally after
   fine-tuning a copy of the network on the pair, :func:`~ran_bundle.optimise.finetune_network`).
5. :meth:`~RegistrationPipeline.optimise`: instance optimisation of the field itself
   (:func:`~ran_bundle.optimise.optimise_field`), seconds on a CPU.
6. :meth:`~RegistrationPipeline.to_world`: the whole mapping on the original fixed grid, affine included:
   a fixed-space point ``p`` maps to the moving-space point ``A(p + v(p))`` (``A`` the affine, ``v`` the
   deformable displacement in mm), written as ONE displacement field ``w(p) = A(p + v(p)) - p`` that
   ``sitk.DisplacementFieldTransform`` (ANTs, Slicer) applies alone; warped images and labels, the
   Jacobian determinant, folding, Dice, warnings.
7. :meth:`~RegistrationPipeline.write` and the report: the output folder (:mod:`ran_bundle.outputs`).

Conventions: those of :mod:`ran_bundle.flow` (RAS affines, fields in mm mapping fixed points to moving points)
and :mod:`ran_bundle.fields` (ITK's LPS convention in the files).

About 500 lines because the steps are kept in one object on purpose: the CLI, the Deploy operator and the
MONAI Label transform call the same steps, and each step's work lives in its own module (above).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch

from ran_bundle.affine import AFFINE_STAGES, AffineResult, read_transform, register_affine, write_transform
from ran_bundle.defaults import PIPELINE_DEFAULTS
from ran_bundle.fields import write_displacement_nifti, write_image_atomic
from ran_bundle.flow import (
    apply_matrix,
    ddf_voxel_to_mm,
    field_to_voxel_ddf,
    invert_field,
    map_grid,
    resample_field,
    sample_voxels,
    voxel_grid,
    voxel_to_world,
    world_to_voxel,
)
from ran_bundle.inputs import (
    InputError,
    Volume,
    check_preset,
    check_same_grid,
    load_network,
    load_volume,
    parse_spacing,
    resolve_device,
)
from ran_bundle.intensity import INTENSITIES, scale_intensity
from ran_bundle.metrics import jacobian_determinant
from ran_bundle.optimise import SIMILARITIES, finetune_network, optimise_field
from ran_bundle.quality import affine_and_registered_dice, registration_quality
from ran_bundle.spatial import Grid, foreground_grid, resample_to_grid, to_sitk_image
from ran_bundle.tensors import autocast_if

if TYPE_CHECKING:  # the network pulls in MONAI: imported only where it runs (ran_bundle.inputs.load_network)
    from ran_bundle.networks import ResidualAlignerNetwork

__all__ = [
    "DEFAULT_WEIGHTS",
    "STEPS",
    "PairInputs",
    "NetworkPair",
    "Registration",
    "RegistrationPipeline",
]

logger = logging.getLogger(__name__)

#: where the instance optimisation starts: the network's field, or the affine stage alone
IO_STARTS = ("network", "zero")
#: the regulariser weight per similarity. MIND's SSD is smaller than NCC's term: with the moving image in a synthetic
#: other contrast (Mindboggle 14 -> 13 at 3 mm) it scored Dice 0.473 with weight 1 against 0.438-0.444 with NCC's 10
IO_WEIGHT = {"ncc": PIPELINE_DEFAULTS.io_weight, "mind": 1.0}
STEPS = ("check_inputs", "affine", "preprocess", "predict", "optimise", "to_world", "write")
#: the shipped brain MR weights (``models/model.pt`` of the bundle root)
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "model.pt"
#: the smallest network grid that gives a meaningful field: below it the pipeline refuses
MIN_GRID_VOXELS = 8


# --------------------------------------------------------------------------------------------------
# what the steps pass on
# --------------------------------------------------------------------------------------------------


@dataclass
class PairInputs:
    """The checked inputs of one pair (step 1)."""

    fixed: Volume
    moving: Volume
    fixed_label: Volume | None = None
    moving_label: Volume | None = None
    fixed_mask: Volume | None = None
    moving_mask: Volume | None = None

    def sitk(self, which: str) -> sitk.Image:
        """``"fixed"`` or ``"moving"`` as a SimpleITK image (float32) with its physical geometry."""
        volume = self.fixed if which == "fixed" else self.moving
        return to_sitk_image(volume.array.astype(np.float32), volume.affine)

    def sitk_mask(self, which: str) -> sitk.Image | None:
        """The ``"fixed"`` or ``"moving"`` mask (1 = use, float32) on its image's geometry, or ``None``."""
        mask = self.fixed_mask if which == "fixed" else self.moving_mask
        image = self.fixed if which == "fixed" else self.moving
        return None if mask is None else to_sitk_image((mask.array != 0).astype(np.float32), image.affine)

    def mask_counts(self) -> dict[str, dict[str, Any]]:
        """For each mask given: its file, its voxels and how many of them it removes (zero voxels)."""
        return {
            role: {"path": mask.path, "voxels": int(mask.array.size), "voxels_removed": int((mask.array == 0).sum())}
            for role, mask in (("fixed_mask", self.fixed_mask), ("moving_mask", self.moving_mask))
            if mask is not None
        }


@dataclass
class NetworkPair:
    """The pair on the network grid (step 3): ``moving`` and ``fixed`` ``(1, 1, *S)`` float32 in [0, 1]; the masks
    ``(1, 1, *S)`` (1 = use; the moving one mapped like the moving image) when given."""

    moving: torch.Tensor
    fixed: torch.Tensor
    grid: Grid
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None


@dataclass
class Registration:
    """The result of :meth:`RegistrationPipeline.register` (everything but the files).

    Attributes:
        inputs: the checked inputs.
        affine: the affine stage's result.
        pair: the pair on the network grid.
        ddf_network: ``(1, 3, *S)`` the network's displacement (voxels of the grid).
        ddf: ``(1, 3, *S)`` after instance optimisation (the same tensor when it is off).
        field: ``(1, 3, *F)`` world displacement (mm, RAS) of the whole mapping on the fixed image's grid.
        jacobian: ``(*F)`` determinant of the whole mapping's Jacobian.
        warped: ``(*F)`` the moving image on the fixed grid (original intensities).
        warped_label: ``(*F)`` the moving label map on the fixed grid (nearest neighbour), or ``None``.
        inverse_field: ``(1, 3, *M)`` world displacement of the inverse mapping on the moving grid, or ``None``.
        stats: folding, displacement and Dice figures.
        warnings: what makes the result doubtful, in words.
        timings: seconds per step.
        io_losses: instance-optimisation losses.
    """

    inputs: PairInputs
    affine: AffineResult
    pair: NetworkPair
    ddf_network: torch.Tensor
    ddf: torch.Tensor
    field: torch.Tensor
    jacobian: torch.Tensor
    warped: torch.Tensor
    warped_label: torch.Tensor | None
    inverse_field: torch.Tensor | None
    stats: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    io_losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------


class RegistrationPipeline:
    """Affine stage, RAN, instance optimisation and world-space outputs for one pair at a time.

    The defaults (:data:`ran_bundle.defaults.PIPELINE_DEFAULTS`, which the command line and the configs read too)
    fit the shipped brain MR weights.

    Args:
        weights: checkpoint of the network; default: the bundle's ``models/model.pt``.
        preset: RAN preset of the weights.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None``: CUDA when available.
        amp: mixed precision for the network.
        spacing: voxel size (mm) of the network grid (the weights' training resolution).
        intensity: ``"ct"``, ``"mr"`` or ``"none"`` (as at training).
        ct_window: the HU window ``(low, high)`` mapped to [0, 1] with ``intensity="ct"`` (as at training):
            the abdomen's [-100, 300] by default; [-1000, 300] for the lungs (``configs/lung_ct.json``).
        affine: ``"affine"`` (rigid then affine), ``"rigid"`` or ``"none"``.
        initial_transform: an ITK transform file (affine/rigid, fixed -> moving points) to start from; with
            ``affine="none"`` it is used as the affine stage's result.
        io_iterations: instance-optimisation iterations ``(half resolution, full resolution)``; ``(0, 0)`` off.
        io_weight: weight of its diffusion regulariser; ``None``: :data:`IO_WEIGHT` of ``similarity``.
        io_fold_weight: weight of its folding penalty.
        similarity: similarity of the instance optimisation: ``"ncc"`` (local NCC, same contrast) or ``"mind"``
            (SSD of MIND-SSC descriptors, another contrast).
        io_start: where the instance optimisation starts: ``"network"`` (``--network-start``: the network's
            field) or ``"zero"`` (``--no-network``: the affine stage alone; no weights are read, the network is not
            run); ``None``: ``"network"`` where the network is asked for (``weights`` or ``network`` given, or
            ``io_iterations`` ``(0, 0)``, where its field is the result), else
            :data:`~ran_bundle.defaults.PIPELINE_DEFAULTS` ``io_start`` (``"zero"``, as measured).
        fixed_mask: default fixed-image mask file (non-zero = use) of :meth:`register`, on the fixed image's grid:
            the voxels the affine metric and the instance optimisation's similarity use. The network's input is
            not masked.
        moving_mask: the same for the moving image, on its grid.
        finetune_steps: fine-tune a copy of the network on the pair first (slow on a CPU; 0 = off).
        finetune_lr: its Adam learning rate.
        inverse: also compute the inverse mapping.
        progress: progress bars on stderr.
        network: an already loaded network (then ``weights`` only names it in the report).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        preset: str = PIPELINE_DEFAULTS.preset,
        device: str | None = None,
        amp: bool = False,
        spacing: Any = PIPELINE_DEFAULTS.spacing,
        intensity: str = PIPELINE_DEFAULTS.intensity,
        ct_window: Sequence[float] = PIPELINE_DEFAULTS.ct_window,
        affine: str = PIPELINE_DEFAULTS.affine,
        initial_transform: str | os.PathLike | None = None,
        io_iterations: Sequence[int] = PIPELINE_DEFAULTS.io_iterations,
        io_weight: float | None = None,
        io_fold_weight: float = PIPELINE_DEFAULTS.io_fold_weight,
        similarity: str = "ncc",
        io_start: str | None = None,
        fixed_mask: str | os.PathLike | None = None,
        moving_mask: str | os.PathLike | None = None,
        finetune_steps: int = PIPELINE_DEFAULTS.finetune_steps,
        finetune_lr: float = PIPELINE_DEFAULTS.finetune_lr,
        inverse: bool = False,
        progress: bool = True,
        network: ResidualAlignerNetwork | None = None,
    ) -> None:
        self.spacing = parse_spacing(spacing)
        if intensity not in INTENSITIES:
            raise InputError(f"--intensity {intensity!r}: expected one of {INTENSITIES}.")
        try:
            window = [float(v) for v in ct_window]
        except (TypeError, ValueError):
            window = []
        if len(window) != 2 or not all(np.isfinite(window)) or window[0] >= window[1]:
            raise InputError(f"--ct-window {ct_window!r}: expected two numbers LOW HIGH (HU) with LOW < HIGH.")
        check_preset(preset)
        if affine not in AFFINE_STAGES:
            raise InputError(f"--affine {affine!r}: expected one of {AFFINE_STAGES}.")
        if similarity not in SIMILARITIES:
            raise InputError(f"--similarity {similarity!r}: expected one of {SIMILARITIES}.")
        iterations = [int(n) for n in io_iterations]
        if io_start is None:  # the network runs where it is asked for: weights or a network given, or no IO
            asked = weights is not None or network is not None or not sum(iterations)
            io_start = "network" if asked else PIPELINE_DEFAULTS.io_start
        io_weight = IO_WEIGHT[similarity] if io_weight is None else io_weight
        if io_start not in IO_STARTS:
            raise InputError(f"io_start {io_start!r}: expected one of {IO_STARTS} ('zero' is --no-network).")
        if len(iterations) != 2 or any(n < 0 for n in iterations):
            raise InputError(f"--io-iterations {io_iterations!r}: expected two non-negative integers.")
        if not (isinstance(finetune_steps, int) and not isinstance(finetune_steps, bool) and finetune_steps >= 0):
            raise InputError(f"--finetune-steps {finetune_steps!r}: expected a non-negative integer.")
        if finetune_steps and io_start == "zero":
            raise InputError(
                "--finetune-steps fine-tunes the network: it needs the network's start, which the default start (the "
                "affine stage alone) and --no-network leave out; add --network-start."
            )
        if not (isinstance(finetune_lr, (int, float)) and finetune_lr > 0):
            raise InputError(f"--finetune-lr {finetune_lr!r}: expected a positive number.")
        for flag, value in (("--io-weight", io_weight), ("--io-fold-weight", io_fold_weight)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise InputError(f"{flag} {value!r}: expected a non-negative number.")
        self.device = resolve_device(device)
        self.amp = bool(amp)
        self.intensity = intensity
        self.ct_window = (window[0], window[1])
        self.affine_stage = affine
        self.initial = None if initial_transform is None else read_transform(initial_transform)
        self.initial_transform = initial_transform
        self.io_iterations = (iterations[0], iterations[1])
        self.io_weight = float(io_weight)
        self.io_fold_weight = float(io_fold_weight)
        self.similarity = similarity
        self.io_start = io_start
        self.fixed_mask = fixed_mask
        self.moving_mask = moving_mask
        self.finetune_steps = int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.inverse = bool(inverse)
        self.progress = bool(progress)
        self.preset = preset
        self.weights = Path(weights) if weights is not None else DEFAULT_WEIGHTS
        if io_start == "zero":
            self.network = None  # --no-network: no weights are read
        else:
            self.network = network if network is not None else load_network(self.weights, preset, self.device)
        self.timings: dict[str, float] = {}

    @contextmanager
    def _step(self, name: str, message: str):
        logger.info(message)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)

    # ---- 1 ----
    def check_inputs(
        self,
        fixed: str | os.PathLike,
        moving: str | os.PathLike,
        fixed_label: str | os.PathLike | None = None,
        moving_label: str | os.PathLike | None = None,
        fixed_mask: str | os.PathLike | None = None,
        moving_mask: str | os.PathLike | None = None,
    ) -> PairInputs:
        """Read and check the files (nothing is computed or written before this passes). The masks default to
        the pipeline's ``fixed_mask`` and ``moving_mask``.

        Raises:
            InputError: missing/unreadable/non-3-D/NaN/constant images, labels or masks on another grid,
                labels holding non-integer values, a mask that removes every voxel, or images too small for the
                network at ``spacing``.
        """
        fixed_mask = self.fixed_mask if fixed_mask is None else fixed_mask
        moving_mask = self.moving_mask if moving_mask is None else moving_mask
        with self._step("check_inputs", "checking the inputs"):
            inputs = PairInputs(
                load_volume(fixed, "fixed image", require_contrast=True),
                load_volume(moving, "moving image", require_contrast=True),
            )
            for role, path in (("fixed label", fixed_label), ("moving label", moving_label)):
                if path is None:
                    continue
                label = load_volume(path, role)
                check_same_grid(label, inputs.fixed if role == "fixed label" else inputs.moving)
                if label.array.dtype.kind == "f" and not np.allclose(label.array, np.rint(label.array), atol=1e-3):
                    raise InputError(f"{role} {label.path}: holds non-integer values; is it an image?")
                setattr(inputs, role.replace(" ", "_"), label)
            for role, path in (("fixed mask", fixed_mask), ("moving mask", moving_mask)):
                if path is None:
                    continue
                mask = load_volume(path, role)
                check_same_grid(mask, inputs.fixed if role == "fixed mask" else inputs.moving)
                if not np.any(mask.array):
                    raise InputError(f"{role} {mask.path}: holds only zeros; it would remove every voxel.")
                setattr(inputs, role.replace(" ", "_"), mask)
            for volume in (inputs.fixed, inputs.moving):
                extent = np.asarray(volume.array.shape) * np.asarray(volume.spacing)
                voxels = extent / np.asarray(self.spacing)
                if voxels.min() < MIN_GRID_VOXELS:
                    raise InputError(
                        f"{volume.role} {volume.path}: {np.round(extent, 1).tolist()} mm is under "
                        f"{MIN_GRID_VOXELS} voxels of {self.spacing[0]:g} mm along an axis; too small to register."
                    )
        return inputs

    # ---- 2 ----
    def run_affine(self, inputs: PairInputs) -> AffineResult:
        """The affine stage: a ``(4, 4)`` RAS map of fixed points to moving points."""
        with self._step("affine", f"affine stage: {self.affine_stage}"):
            return register_affine(
                inputs.sitk("fixed"),
                inputs.sitk("moving"),
                stage=self.affine_stage,
                initial=self.initial,
                fixed_mask=inputs.sitk_mask("fixed"),
                moving_mask=inputs.sitk_mask("moving"),
            )

    # ---- 3 ----
    def preprocess(self, inputs: PairInputs, affine: AffineResult) -> NetworkPair:
        """Both images on the network grid: the fixed image's foreground at ``spacing`` mm."""
        with self._step("preprocess", f"resampling onto the network grid ({self.spacing[0]:g} mm)"):
            fixed_image = inputs.sitk("fixed")
            grid = foreground_grid(fixed_image, self.spacing)
            fixed = resample_to_grid(fixed_image, grid)
            moving = resample_to_grid(inputs.sitk("moving"), grid, affine.matrix)
            fixed, moving = (scale_intensity(x, self.intensity, self.ct_window) for x in (fixed, moving))
            masks = {}
            for which, matrix in (("fixed", None), ("moving", affine.matrix)):
                mask = inputs.sitk_mask(which)
                if mask is not None:  # a grid voxel is used when at least half of it was
                    masks[which] = torch.from_numpy(resample_to_grid(mask, grid, matrix) >= 0.5)[None, None].float()
        logger.info("network grid %s at %s mm", grid.shape, tuple(round(s, 3) for s in grid.spacing))
        return NetworkPair(
            torch.from_numpy(moving)[None, None],
            torch.from_numpy(fixed)[None, None],
            grid,
            masks.get("fixed"),
            masks.get("moving"),
        )

    # ---- 4 ----
    def predict(self, pair: NetworkPair) -> torch.Tensor:
        """The network's DDF ``(1, 3, *S)`` (voxels of the grid), float32 on the CPU; zeros without the network."""
        net = self.network
        if net is None:
            return torch.zeros(1, pair.fixed.ndim - 2, *pair.fixed.shape[2:])
        if self.finetune_steps:
            with self._step("finetune", f"fine-tuning the network on the pair: {self.finetune_steps} steps"):
                net, _ = finetune_network(
                    net,
                    pair.moving,
                    pair.fixed,
                    self.finetune_steps,
                    self.finetune_lr,
                    amp=self.amp,
                    progress=self.progress,
                )
        with self._step("predict", "predicting the displacement field"), torch.no_grad():
            x = torch.cat([pair.moving, pair.fixed], dim=1).to(self.device)
            with autocast_if(self.amp, self.device):
                ddf = net(x)
            return ddf.float().cpu()

    # ---- 5 ----
    def optimise(self, pair: NetworkPair, ddf: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Instance optimisation of the field (:func:`~ran_bundle.optimise.optimise_field`), from ``ddf`` or, with
        ``io_start="zero"``, from no deformation; with the pair's masks and the pipeline's similarity."""
        if self.io_start == "zero":
            ddf = torch.zeros_like(ddf)
        if sum(self.io_iterations) == 0:
            return ddf, []
        masks = [None if m is None else m.to(self.device) for m in (pair.fixed_mask, pair.moving_mask)]
        message = f"instance optimisation: {self.io_iterations} iterations, {self.similarity}, from {self.io_start}"
        with self._step("optimise", message):
            result = optimise_field(
                pair.moving.to(self.device),
                pair.fixed.to(self.device),
                ddf.to(self.device),
                iterations=self.io_iterations,
                weight=self.io_weight,
                fold_weight=self.io_fold_weight,
                progress=self.progress,
                fixed_mask=masks[0],
                moving_mask=masks[1],
                similarity=self.similarity,
            )
        return result.ddf.cpu(), result.losses

    # ---- 6 ----
    def to_world(self, inputs: PairInputs, affine: AffineResult, grid: Grid, v_grid: torch.Tensor) -> dict[str, Any]:
        """The whole mapping on the original fixed grid and what follows from it (see the module docstring).

        Args:
            inputs: the checked inputs.
            affine: the affine stage.
            grid: the grid of the deformable displacement (the network grid, or any grid in fixed space).
            v_grid: ``(1, 3, *S)`` deformable displacement on ``grid`` in mm (RAS): after the affine stage, the
                fixed point ``p`` maps to the moving point ``A(p + v(p))``
                (:func:`ran_bundle.flow.ddf_voxel_to_mm` of a DDF).
        """
        with self._step("to_world", "mapping the field onto the fixed image grid and warping"):
            v_grid = v_grid.float()
            fixed, moving = inputs.fixed, inputs.moving
            shape_f = fixed.array.shape
            v = resample_field(v_grid, grid.affine, shape_f, fixed.affine)  # (1, 3, *F) float32 on the fixed grid
            points, mapped = map_grid(v, fixed.affine, affine.matrix)  # (3, *F) each: p and A(p + v(p))
            total = (mapped - points)[None]  # (1, 3, *F): w(p) = A(p + v(p)) - p
            coords = world_to_voxel(mapped, moving.affine)
            warped = sample_voxels(moving.tensor(), coords)[0, 0]
            warped_label = None
            if inputs.moving_label is not None:
                warped_label = sample_voxels(inputs.moving_label.label_tensor(), coords, mode="nearest")[0, 0]
            jacobian = jacobian_determinant(field_to_voxel_ddf(total, fixed.affine)[0], dtype=torch.float32)
            inverse = self._inverse(inputs, affine, grid, v_grid) if self.inverse else None
            stats, warnings = registration_quality(
                fixed, moving, affine.matrix, jacobian, total, grid.shape, self.spacing[0]
            )
            if warped_label is not None and inputs.fixed_label is not None and inputs.moving_label is not None:
                stats["dice"] = affine_and_registered_dice(
                    inputs.fixed_label, inputs.moving_label, affine.matrix, warped_label
                )
        return {
            "field": total.float(),
            "jacobian": jacobian.float(),
            "warped": warped,
            "warped_label": warped_label,
            "inverse_field": inverse,
            "stats": stats,
            "warnings": warnings,
        }

    def _inverse(self, inputs: PairInputs, affine: AffineResult, grid: Grid, v_grid: torch.Tensor) -> torch.Tensor:
        """World displacement of the inverse mapping on the moving grid: ``q -> (id + v)^-1 (A^-1 q) - q``.

        ``(id + v)^-1`` on the network grid (:func:`~ran_bundle.flow.invert_field`), sampled at ``A^-1 q``."""
        w = invert_field(v_grid, grid.affine)
        moving = inputs.moving
        q = voxel_to_world(voxel_grid(moving.array.shape), moving.affine)
        x = apply_matrix(np.linalg.inv(affine.matrix), q)
        w_x = sample_voxels(w[None].float(), world_to_voxel(x, grid.affine), "bilinear", "border")[0].double()
        return (x + w_x - q)[None].float()

    # ---- all but writing ----
    def register(
        self,
        fixed: str | os.PathLike,
        moving: str | os.PathLike,
        fixed_label: str | os.PathLike | None = None,
        moving_label: str | os.PathLike | None = None,
        fixed_mask: str | os.PathLike | None = None,
        moving_mask: str | os.PathLike | None = None,
    ) -> Registration:
        """Run steps 1-6 on one pair of files (masks: default the pipeline's; the network is not run with
        ``io_start="zero"``)."""
        self.timings = {}
        inputs = self.check_inputs(fixed, moving, fixed_label, moving_label, fixed_mask, moving_mask)
        affine = self.run_affine(inputs)
        pair = self.preprocess(inputs, affine)
        if self.io_start == "zero":
            ddf_network = torch.zeros(1, 3, *pair.grid.shape)
        else:
            ddf_network = self.predict(pair)
        ddf, losses = self.optimise(pair, ddf_network)
        world = self.to_world(inputs, affine, pair.grid, ddf_voxel_to_mm(ddf, pair.grid.affine))
        for warning in world["warnings"]:
            logger.warning("warning: %s", warning)
        return Registration(
            inputs, affine, pair, ddf_network, ddf, world["field"], world["jacobian"], world["warped"],
            world["warped_label"], world["inverse_field"], world["stats"], world["warnings"], dict(self.timings),
            losses,
        )  # fmt: skip

    # ---- 7 ----
    def files(self, registration: Registration, png: bool = False) -> dict[str, str]:
        """The output names this registration writes (what :meth:`write` puts into the folder)."""
        names = {"warped": "warped.nii.gz", "ddf": "ddf.nii.gz", "affine": "affine.tfm", "jacobian": "jacobian.nii.gz"}
        if registration.warped_label is not None:
            names["warped_label"] = "warped_label.nii.gz"
        if registration.inverse_field is not None:
            names["inverse_ddf"] = "inverse_ddf.nii.gz"
        if png:
            names["overview_png"] = "overview.png"
        names["report"] = "report.json"
        return names

    def write(self, registration: Registration, folder: str | os.PathLike, png: bool = False) -> dict[str, str]:
        """Write every output of ``registration`` into ``folder`` (an existing, empty staging folder)."""
        folder = Path(folder)
        names = self.files(registration, png)
        inputs = registration.inputs
        fixed, moving = inputs.fixed, inputs.moving
        with self._step("write", f"writing {len(names)} files"):
            jobs = [  # the largest first, each on one of torch.get_num_threads() threads
                lambda: write_displacement_nifti(
                    field_to_voxel_ddf(registration.field, fixed.affine), fixed.affine, folder / names["ddf"]
                ),
                lambda: write_image_atomic(
                    registration.jacobian.numpy(), fixed.affine, folder / names["jacobian"], "float32"
                ),
                lambda: write_image_atomic(
                    registration.warped.numpy(), fixed.affine, folder / names["warped"], "float32"
                ),
                lambda: write_transform(registration.affine.matrix, folder / names["affine"]),
            ]
            if registration.warped_label is not None:
                dtype = inputs.moving_label.array.dtype  # type: ignore[union-attr]
                dtype = dtype if dtype.kind in "iu" else np.int32
                jobs.append(
                    lambda: write_image_atomic(
                        registration.warped_label.numpy(), fixed.affine, folder / names["warped_label"], dtype
                    )
                )
            if registration.inverse_field is not None:
                jobs.insert(
                    1,
                    lambda: write_displacement_nifti(
                        field_to_voxel_ddf(registration.inverse_field, moving.affine), moving.affine,
                        folder / names["inverse_ddf"],
                    ),
                )  # fmt: skip
            with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
                for done in [pool.submit(job) for job in jobs]:
                    done.result()  # a failed write raises here (the staging folder is then discarded)
            if png:
                from ran_bundle.figures import overview_png

                overview_png(folder / names["overview_png"], registration)
        return names

    def report(self, registration: Registration, outputs: Mapping[str, str], arguments: Mapping[str, Any]) -> dict:
        """The JSON report of a run (arguments, inputs, stages, timings, figures, warnings, conventions)."""
        from ran_bundle import __version__

        inputs = registration.inputs
        return {
            "tool": "ran-register",
            "version": __version__,
            "command": list(sys.argv),
            "arguments": dict(arguments),
            "inputs": {
                name: {"path": vol.path, "shape": list(vol.array.shape), "spacing_mm": list(vol.spacing)}
                for name, vol in (
                    ("fixed", inputs.fixed),
                    ("moving", inputs.moving),
                    ("fixed_label", inputs.fixed_label),
                    ("moving_label", inputs.moving_label),
                )
                if vol is not None
            },
            "affine": {
                "stage": registration.affine.stage,
                "initial_transform": None if self.initial_transform is None else os.fspath(self.initial_transform),
                "matrix_ras": registration.affine.matrix.tolist(),
                "mattes_mi": registration.affine.metric,
            },
            "network": {
                "weights": str(self.weights) if self.network is not None else None,
                "preset": self.preset,
                "device": str(self.device),
                "amp": self.amp,
                "grid_shape": list(registration.pair.grid.shape),
                "grid_spacing_mm": list(registration.pair.grid.spacing),
                "intensity": self.intensity,
                "ct_window": list(self.ct_window),
                "finetune_steps": self.finetune_steps,
                "run": self.io_start == "network",
            },
            "masks": inputs.mask_counts(),
            "instance_optimisation": {
                "similarity": self.similarity,
                "start": self.io_start,
                "iterations": list(self.io_iterations),
                "weight": self.io_weight,
                "fold_weight": self.io_fold_weight,
                "loss_first": registration.io_losses[0] if registration.io_losses else None,
                "loss_last": registration.io_losses[-1] if registration.io_losses else None,
            },
            "field": registration.stats,
            "warnings": registration.warnings,
            "outputs": dict(outputs),
            "timings_s": dict(self.timings),
            "conventions": (
                "ddf.nii.gz: ONE ITK displacement field on the fixed image grid (vectors in mm, LPS frame) holding the "
                "whole mapping, affine stage included: it maps a fixed-space point p to the moving-space point "
                "p + w(p) = A(p + v(p)), so sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field)) or "
                "antsApplyTransforms -t ddf.nii.gz reproduces warped.nii.gz. affine.tfm: the affine stage A alone "
                "(ITK AffineTransform, fixed -> moving points). jacobian.nii.gz: det of the whole mapping's Jacobian. "
                "Folding (% det J <= 0) is counted inside the fixed image's foreground. inverse_ddf.nii.gz: the "
                "inverse mapping on the moving grid (moving -> fixed points)."
            ),
            "system": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "threads": torch.get_num_threads(),
            },
        }
