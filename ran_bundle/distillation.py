"""Distillation of instance optimisation into the network: teacher fields for the training pairs.

Instance optimisation (:func:`ran_bundle.optimise.optimise_field`) from a zero field registers a brain pair
better than the network alone, at about 20 s per pair on one CPU thread. Its field is a target the network can
regress directly, a far denser signal than the image similarity alone: the teacher field of each ordered
training pair is computed once, on the training grid (the pair after :class:`~ran_bundle.transforms.
AlignToReferenced` and the intensity scaling, before the random crop), kept on disk as ``float16``
(``<teacher_dir>/<moving>_to_<fixed>.pt``, a few MB each), and cropped with the images, so that the loss
(:class:`~ran_bundle.losses.RegistrationLoss` with ``field_weight > 0``) can add the end-point error between
the network's field and the teacher's.

:class:`TeacherFieldd` is the data-pipeline form: a pair whose teacher field is missing gets it computed on
first use (so an interrupted run resumes where it stopped, and a new training pair needs no extra command);
``python -m ran_bundle.distillation`` computes them ahead, in shards for several processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ran_bundle.data import load_datalist, ordered_pairs
from ran_bundle.defaults import PIPELINE_DEFAULTS
from ran_bundle.engines import pair_name
from ran_bundle.fields import atomic_write
from ran_bundle.keys import TEACHER_DDF
from ran_bundle.optimise import optimise_field
from ran_bundle.tensors import as_plain_tensor

__all__ = ["TeacherFieldd", "teacher_file", "teacher_field", "main"]

_FORMAT = 1


def teacher_file(teacher_dir: str | os.PathLike, moving: Any, fixed: Any) -> Path:
    """Where the teacher field of the pair (moving, fixed) is kept: ``<teacher_dir>/<moving>_to_<fixed>.pt``."""
    return Path(teacher_dir) / f"{pair_name(moving, fixed)}.pt"


def teacher_field(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    iterations: Sequence[int] = PIPELINE_DEFAULTS.io_iterations,
    progress: bool = False,
) -> torch.Tensor:
    """The teacher of one pair: instance optimisation from a zero field with the pipeline's defaults.

    Args:
        moving: ``(1, *S)`` preprocessed moving image (channel first, as the data pipeline gives it).
        fixed: ``(1, *S)`` the fixed image.
        iterations: instance-optimisation iterations (coarse, fine).
        progress: tqdm bar.

    Returns:
        ``(d, *S)`` float32 displacement (voxels of the grid).
    """
    m, f = (as_plain_tensor(x).float()[None] for x in (moving, fixed))
    zero = torch.zeros(1, m.ndim - 2, *m.shape[2:])
    return optimise_field(m, f, zero, iterations=iterations, progress=progress).ddf[0]


class TeacherFieldd(MapTransform):
    """Add the teacher field of a pair as ``TEACHER_DDF``, reading it from ``teacher_dir`` or computing it.

    Place it after the intensity scaling and the padding of :func:`ran_bundle.transforms.registration_transforms`
    and before its random crop (its ``before_crop`` argument, which crops this key with the images). The pair is
    named from the images' ``filename_or_obj`` (:func:`ran_bundle.engines.pair_name`).

    Output: ``MetaTensor`` ``(d, *S)`` float32 with the fixed image's affine.

    Args:
        teacher_dir: folder of the teacher fields.
        iterations: instance-optimisation iterations of a field computed here.
        compute_missing: compute and keep a missing field (``False``: raise).

    Raises:
        FileNotFoundError: a field is missing and ``compute_missing`` is ``False``.
        ValueError: a kept field does not fit the pair's grid (made on another grid: remove ``teacher_dir``).
    """

    def __init__(
        self,
        teacher_dir: str | os.PathLike,
        iterations: Sequence[int] = PIPELINE_DEFAULTS.io_iterations,
        compute_missing: bool = True,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
    ) -> None:
        super().__init__([moving_key, fixed_key])
        self.teacher_dir = Path(teacher_dir)
        self.iterations = tuple(int(n) for n in iterations)
        self.compute_missing = bool(compute_missing)
        self.moving_key, self.fixed_key = moving_key, fixed_key

    def path(self, data: Mapping[Hashable, Any]) -> Path:
        """The teacher file of the pair ``data``."""
        names = [getattr(data[k], "meta", {}).get("filename_or_obj") for k in (self.moving_key, self.fixed_key)]
        if any(n is None for n in names):
            raise ValueError("TeacherFieldd: the images carry no 'filename_or_obj' to name the pair by.")
        return teacher_file(self.teacher_dir, *names)

    def field(self, data: Mapping[Hashable, Any]) -> torch.Tensor:
        """The ``(d, *S)`` float32 teacher field of the pair ``data`` (read, or computed and kept)."""
        path = self.path(data)
        shape = tuple(data[self.fixed_key].shape[1:])
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            ddf = stored["ddf"].float()
            if tuple(ddf.shape[1:]) != shape:
                raise ValueError(
                    f"teacher field {path} is on a {tuple(ddf.shape[1:])} grid, the pair on {shape}: it was made "
                    f"for another grid; remove {self.teacher_dir} to recompute."
                )
            return ddf
        if not self.compute_missing:
            raise FileNotFoundError(f"teacher field {path} is missing (python -m ran_bundle.distillation makes it).")
        ddf = teacher_field(data[self.moving_key], data[self.fixed_key], self.iterations)
        record = {"ddf": as_plain_tensor(ddf).half(), "iterations": list(self.iterations), "format": _FORMAT}
        atomic_write(path, lambda tmp: torch.save(record, tmp))
        return ddf

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        fixed = d[self.fixed_key]
        d[TEACHER_DDF] = MetaTensor(self.field(d), affine=getattr(fixed, "affine", None))
        return d


def main(argv: Sequence[str] | None = None) -> int:
    """Compute the teacher fields of every ordered pair of a datalist's training subjects ahead of training.

    ``python -m ran_bundle.distillation --datalist D --teacher-dir T [--shard I N]``: the pairs are split into
    ``N`` shards by their index, so that ``N`` processes (one per core) share the work; fields already kept are
    skipped. The preprocessing is the training run's (``configs/brain_mindboggle.json``: affine stage to the
    datalist's reference, 2 mm, MR percentiles).
    """
    from tqdm import tqdm

    from ran_bundle.transforms import registration_transforms

    p = argparse.ArgumentParser(prog="python -m ran_bundle.distillation", description=main.__doc__.split("\n")[0])
    p.add_argument("--datalist", required=True, help="datalist JSON (its 'training' subjects and 'reference')")
    p.add_argument("--base-dir", default=os.environ.get("RAN_SHARED_DATA", "../shared/data"))
    p.add_argument("--teacher-dir", required=True, help="folder of the teacher fields")
    p.add_argument("--align-cache", default="runs/affine_cache", help="the training run's affine cache folder")
    p.add_argument("--spacing", type=float, default=2.0, help="grid spacing (mm)")
    p.add_argument("--intensity", default="mr", choices=("mr", "ct", "none"))
    p.add_argument("--iterations", type=int, nargs=2, default=PIPELINE_DEFAULTS.io_iterations, metavar=("HALF", "FULL"))
    p.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"), help="this process's share")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    index, count = args.shard
    if not 0 <= index < count:
        p.error(f"--shard I N needs 0 <= I < N, got {index} {count}")
    torch.set_num_threads(args.threads)
    data = load_datalist(args.datalist, base_dir=args.base_dir)
    subjects = data["training"]
    pairs = ordered_pairs(subjects)[index::count]
    transform = registration_transforms(
        "train",
        spacing=(args.spacing,) * 3,
        intensity=args.intensity,
        roi_size=None,
        with_labels=False,
        intensity_scale=0.0,
        align_to=data["reference"],
        align_cache=args.align_cache,
        before_crop=TeacherFieldd(args.teacher_dir, iterations=args.iterations),
    )
    for pair in tqdm(pairs, desc=f"teacher fields (shard {index + 1}/{count})", file=sys.stderr):
        transform(pair)
    return 0


if __name__ == "__main__":
    sys.exit(main())
