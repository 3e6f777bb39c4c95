"""Command-line entry points ``ran-register`` and ``ran-warp`` (``python -m ran_bundle [register|warp]``).

``argparse`` front ends over :class:`ran_bundle.pipeline.RegistrationPipeline` and :mod:`ran_bundle.apply`.
Every argument is checked before any work, and so are the input files, the weights and the output folder:
a problem gives ONE line on stderr (``ran-register: error: ...``) and exit status 2. Ctrl-C gives one line
and exit status 130; nothing half-written is left behind. Progress goes to stderr (``--quiet`` keeps only
warnings). See ``docs/register.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ran_bundle.defaults import PIPELINE_DEFAULTS

__all__ = [
    "LONGITUDINAL",
    "available_cpus",
    "default_threads",
    "set_threads",
    "add_pipeline_options",
    "add_run_options",
    "pipeline_options",
    "register_parser",
    "warp_parser",
    "register_main",
    "warp_main",
    "main",
]

_LOGGERS = ("ran_bundle",)

#: what ``--longitudinal`` sets (a follow-up scan of the same subject), unless the user gives it otherwise;
#: chosen by measurement on same-subject pairs with known fields (docs/register.md)
LONGITUDINAL = {"affine": "rigid", "io_start": "zero"}
LONGITUDINAL_FLAGS = ("--affine rigid", "--no-network")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (with a pointer to ``--help``) and exit status 2."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, **kwargs)  # a misspelt flag is an error, never a guess

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(name: str, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    for logger_name in _LOGGERS:
        log = logging.getLogger(logger_name)
        log.handlers[:] = [handler]
        log.setLevel(logging.WARNING if quiet else logging.INFO)
        log.propagate = False


def _fail(name: str, message: str, status: int = 2) -> NoReturn:
    print(f"{name}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _cgroup_cpu_quota() -> float | None:
    """CPUs of this process's cgroup CPU quota (v2 ``cpu.max`` along its cgroup path, or v1 ``cpu.cfs_quota_us``);
    ``None`` without a quota."""
    quotas = []
    root = Path("/sys/fs/cgroup")
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers == "":  # v2: the limit of any ancestor applies
            folder = root / path.lstrip("/")
            for candidate in (folder, *folder.parents):
                if candidate == root.parent:
                    break
                try:
                    quota, period = (candidate / "cpu.max").read_text().split()
                except (OSError, ValueError):
                    continue
                if quota != "max":
                    quotas.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):  # v1
            folder = root / "cpu" / path.lstrip("/")
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity (``os.sched_getaffinity``), capped by its cgroup's CPU quota
    (rounded down, at least 1); not the machine's count, which over-subscribes a pinned or limited process."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(count, math.floor(quota))) if quota else count


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when it is set to a positive integer (the user's choice), else :func:`available_cpus`."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else available_cpus()


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads everywhere a registration computes: PyTorch (network, instance optimisation,
    warping), SimpleITK (affine stage, resampling) and the writer (:meth:`RegistrationPipeline.write` writes its
    files on ``torch.get_num_threads()`` threads)."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _words(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """The registration options every front end of the pipeline takes (``ran-register``, the MONAI Deploy app),
    with one set of names and defaults (:data:`ran_bundle.defaults.PIPELINE_DEFAULTS`, the pipeline's own; the
    options that ``--longitudinal`` may set default to ``None``, to tell them apart from given values);
    :func:`pipeline_options` turns them into pipeline arguments."""
    d = PIPELINE_DEFAULTS
    p.add_argument("--affine", choices=("affine", "rigid", "none"), help=f"affine stage (default {d.affine})")
    p.add_argument("--no-io", action="store_true", help="switch off the instance optimisation of the field")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--no-network",
        dest="io_start",
        action="store_const",
        const="zero",
        help="start the instance optimisation from the affine stage alone (the default; no weights are read)",
    )
    start.add_argument(
        "--network-start",
        dest="io_start",
        action="store_const",
        const="network",
        help="start it from the network's field (default: from the affine stage alone, which scored higher on "
        "held-out brains; with --no-io the network's field is the result)",
    )
    p.add_argument(
        "--io-iterations",
        nargs=2,
        type=int,
        default=None,
        metavar=("HALF", "FULL"),
        help="instance-optimisation iterations at half and at full network resolution "
        f"(default: {_words(d.io_iterations)})",
    )
    p.add_argument(
        "--io-weight",
        type=float,
        help=f"weight of its diffusion regulariser (default {d.io_weight:g} with ncc, 1 with mind)",
    )
    p.add_argument(
        "--io-fold-weight",
        type=float,
        default=d.io_fold_weight,
        help="weight of its folding penalty (default %(default)g)",
    )
    p.add_argument(
        "--spacing",
        nargs="+",
        default=[f"{d.spacing:g}"],
        help=f"network grid spacing in mm: one or three numbers (default {d.spacing:g})",
    )
    p.add_argument(
        "--intensity", choices=("ct", "mr", "none"), default=d.intensity, help="intensity scaling (default %(default)s)"
    )
    p.add_argument(
        "--ct-window",
        nargs=2,
        type=float,
        default=d.ct_window,
        metavar=("LOW", "HIGH"),
        help=f"HU window mapped to [0, 1] with --intensity ct, as at training (default: {_words(d.ct_window)}, the "
        "abdomen's; lungs: -1000 300)",
    )
    p.add_argument(
        "--similarity",
        choices=("ncc", "mind"),
        default="ncc",
        help="similarity of the instance optimisation: ncc (same contrast) or mind (MIND-SSC, another contrast)",
    )
    p.add_argument("--fixed-mask", help="mask on the fixed image's grid: non-zero voxels are used by the similarity")
    p.add_argument("--moving-mask", help="mask on the moving image's grid: non-zero voxels are used by the similarity")
    p.add_argument(
        "--longitudinal",
        action="store_true",
        help=f"a follow-up scan of the same subject: {' '.join(LONGITUDINAL_FLAGS)} unless given otherwise",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--inverse", action="store_true", help="also write inverse_ddf.nii.gz")


def pipeline_options(args: argparse.Namespace) -> dict:
    """:class:`~ran_bundle.pipeline.RegistrationPipeline` keyword arguments from the options of
    :func:`add_pipeline_options` and ``--quiet`` (the device is left to the caller). ``--longitudinal`` fills
    the options the user left out with :data:`LONGITUDINAL`."""
    preset = LONGITUDINAL if args.longitudinal else {}
    # io_weight (per similarity) and io_start (by what is asked for): the pipeline's own
    defaults = {"affine": PIPELINE_DEFAULTS.affine, "io_iterations": PIPELINE_DEFAULTS.io_iterations}

    def value(name: str):
        given = getattr(args, name)
        return given if given is not None else preset.get(name, defaults.get(name))

    return {
        "spacing": " ".join(args.spacing),
        "intensity": args.intensity,
        "ct_window": tuple(args.ct_window),
        "affine": value("affine"),
        "io_iterations": (0, 0) if args.no_io else tuple(value("io_iterations")),
        "io_weight": value("io_weight"),
        "io_fold_weight": args.io_fold_weight,
        "similarity": args.similarity,
        "io_start": value("io_start"),
        "fixed_mask": args.fixed_mask,
        "moving_mask": args.moving_mask,
        "inverse": args.inverse,
        "progress": not args.quiet,
    }


def register_parser() -> argparse.ArgumentParser:
    """The ``ran-register`` argument parser."""
    p = _Parser(
        prog="ran-register",
        description=(
            "Register a moving 3D image to a fixed one: affine stage (SimpleITK), then instance optimisation of "
            "a displacement field, from the affine stage alone or (--network-start) from the Residual Aligner "
            "Network's field. Writes into OUT, on the fixed image's grid: warped.nii.gz, "
            "ddf.nii.gz (ONE ITK displacement field holding the whole mapping, affine included: it maps a "
            "FIXED-space point p to the MOVING-space point p + w(p), so warped(p) = moving(p + w(p)); "
            "sitk.DisplacementFieldTransform, antsApplyTransforms -t ddf.nii.gz and Slicer apply it alone), "
            "affine.tfm (the affine stage alone, ITK transform), jacobian.nii.gz, report.json; with "
            "--moving-label warped_label.nii.gz, with --inverse inverse_ddf.nii.gz (on the moving grid, "
            "moving -> fixed points), with --png overview.png. To map fixed-space landmarks to moving space: "
            "ran-warp --field OUT/ddf.nii.gz --points in.csv --out out.csv."
        ),
    )
    p.add_argument("--fixed", required=True, help="fixed (reference) image; the outputs live on its grid")
    p.add_argument("--moving", required=True, help="moving image, registered onto the fixed one")
    p.add_argument("--out", required=True, help="output folder (created; only this run's outputs remain in it)")
    p.add_argument("--moving-label", help="label map of the moving image (its grid), warped by nearest neighbour")
    p.add_argument("--fixed-label", help="label map of the fixed image; with --moving-label the report gives Dice")
    add_pipeline_options(p)
    p.add_argument("--initial-transform", help="ITK transform file (fixed -> moving points) to start the affine from")
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=PIPELINE_DEFAULTS.finetune_steps,
        help="fine-tune a copy of the network first (GPU option)",
    )
    p.add_argument("--finetune-lr", type=float, default=PIPELINE_DEFAULTS.finetune_lr, help="its Adam learning rate")
    add_run_options(
        p,
        threads_help="CPU threads of PyTorch, SimpleITK and the writer (default: OMP_NUM_THREADS if set, else the "
        "CPUs this process may use: its affinity and cgroup quota)",
    )
    return p


def add_run_options(p: argparse.ArgumentParser, threads_help: str) -> None:
    """The weights and run options of ``ran-register`` and ``ran-register-batch``: ``--weights``, ``--preset``,
    ``--amp``, ``--threads`` (``threads_help`` says how each command chooses it), ``--png``, ``--quiet``."""
    p.add_argument("--weights", help="network checkpoint (default: the bundle's models/model.pt, brain MR)")
    p.add_argument("--preset", default=PIPELINE_DEFAULTS.preset, help="RAN preset of the weights (default %(default)s)")
    p.add_argument("--amp", action="store_true", help="mixed precision for the network")
    p.add_argument("--threads", type=int, help=threads_help)
    p.add_argument("--png", action="store_true", help="also write overview.png (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr (and no progress bar)")


def warp_parser() -> argparse.ArgumentParser:
    """The ``ran-warp`` argument parser."""
    p = _Parser(
        prog="ran-warp",
        description=(
            "Apply a displacement field written by ran-register (ddf.nii.gz or inverse_ddf.nii.gz) to an image, "
            "a label map or points. Images: out(p) = image(p + v(p)) on the field's grid (the fixed grid for "
            "ddf.nii.gz). Points: p -> p + v(p); ddf.nii.gz maps FIXED-space points to MOVING space (the image "
            "warp carries moving content into fixed space; the field maps points the other way), "
            "inverse_ddf.nii.gz maps moving-space points to fixed space. Points outside the field's grid are "
            "left unmoved (as ITK does), with a warning."
        ),
    )
    p.add_argument("--field", required=True, help="displacement field file (ITK convention)")
    p.add_argument("--out", required=True, help="output image (.nii/.nii.gz) or, with --points, CSV file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="image or label map to warp")
    source.add_argument("--points", help="CSV file of points with a header holding x, y, z (mm)")
    p.add_argument("--label", action="store_true", help="the image is a label map: nearest neighbour")
    p.add_argument("--frame", choices=("lps", "ras"), default="lps", help="world frame of the points (default lps)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def _register(args: argparse.Namespace) -> None:
    from ran_bundle.inputs import InputError
    from ran_bundle.outputs import OutputFolder, write_json
    from ran_bundle.pipeline import RegistrationPipeline

    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: expected a positive integer.")
    set_threads(args.threads or default_threads())
    if args.png:
        from ran_bundle.figures import require_matplotlib

        require_matplotlib()
    folder = OutputFolder(args.out, tool="ran-register")
    folder.acquire()  # refuses an unwritable or busy folder before any work
    try:
        pipeline = RegistrationPipeline(
            weights=args.weights,
            preset=args.preset,
            device=args.device,
            amp=args.amp,
            initial_transform=args.initial_transform,
            finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr,
            **pipeline_options(args),
        )
        registration = pipeline.register(args.fixed, args.moving, args.fixed_label, args.moving_label)
        with folder.stage() as staging:
            outputs = pipeline.write(registration, staging, png=args.png)
            report = pipeline.report(registration, outputs, vars(args))
            write_json(staging / outputs["report"], report)
    finally:
        folder.release()
    dice = registration.stats.get("dice")
    if dice:
        logging.getLogger("ran_bundle").info(
            "mean Dice (labels of >= 100 voxels): %.4f affine only, %.4f registered",
            dice["mean_affine_100"],
            dice["mean_registered_100"],
        )
    logging.getLogger("ran_bundle").info("done in %.1f s: %s", sum(pipeline.timings.values()), args.out)


def _warp(args: argparse.Namespace) -> None:
    from ran_bundle.apply import warp_image_file, warp_points_file

    log = logging.getLogger("ran_bundle")
    if args.points is not None:
        path, outside = warp_points_file(args.field, args.points, args.out, frame=args.frame)
        if outside:
            log.warning("warning: %d point(s) outside the field's grid were left unmoved", outside)
    else:
        path = warp_image_file(args.field, args.image, args.out, label=args.label)
    log.info("wrote %s", path)


def _run(name: str, parser: argparse.ArgumentParser, command, argv: Sequence[str] | None) -> None:
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging(name, args.quiet)
    from ran_bundle.inputs import InputError

    try:
        command(args)
    except InputError as e:
        _fail(name, str(e))
    except KeyboardInterrupt:
        _fail(name, "interrupted; nothing was written", status=130)


def register_main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ran-register``."""
    _run("ran-register", register_parser(), _register, argv)


def warp_main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ran-warp``."""
    _run("ran-warp", warp_parser(), _warp, argv)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ran_bundle [register|warp] ...``: ``register`` is the default command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "warp":
        warp_main(args[1:])
    else:
        register_main(args[1:] if args and args[0] == "register" else args)
