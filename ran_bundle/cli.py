"""Command-line entry points ``ran-register`` and ``ran-warp`` (``python -m ran_bundle [register|warp]``).

Thin `fire <https://github.com/google/python-fire>`_ wrappers over :mod:`ran_bundle.register`:
they configure logging to stderr, turn :class:`~ran_bundle.register.InputError` into a one-line
message and exit status 2, and accept ``--spacing 2 2 2`` (three separate numbers) as well as
``--spacing 2,2,2``, ``--spacing 2`` and ``--spacing none``. See ``docs/register.md``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

__all__ = ["register", "warp", "register_main", "warp_main", "main"]

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _setup_logging(name: str, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{name}] %(message)s"))
    log = logging.getLogger("ran_bundle.register")
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _fail(name: str, error: Exception) -> None:
    message = " ".join(str(error).split())
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def register(
    fixed: str,
    moving: str,
    out: str,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    weights: str | None = None,
    preset: str = "ref",
    device: str | None = None,
    amp: bool = False,
    spacing: str | float | Sequence[float] | None = "2",
    intensity: str = "mr",
    io_steps: int = 0,
    io_lr: float = 1e-3,
    inverse: bool = False,
    png: bool = False,
    quiet: bool = False,
) -> None:
    """Register a moving 3D image to a fixed one with the Residual Aligner Network.

    Writes into OUT, on the fixed image's grid (shape and affine): warped.nii.gz (moving image,
    original intensities), warped_label.nii.gz (with --moving-label, nearest neighbour), ddf.nii.gz,
    jacobian.nii.gz (det of the Jacobian), report.json (timings, folding, Dice before/after when both
    labels are given), and with --inverse inverse_ddf.nii.gz (on the moving grid), with --png overview.png.
    OUT is filled atomically: a failed run leaves nothing behind.

    Direction: ddf.nii.gz is an ITK displacement field (vectors in mm, LPS frame) that maps a
    FIXED-space point p to the MOVING-space point p + v(p): warped(p) = moving(p + v(p)). Use it as is
    with sitk.DisplacementFieldTransform, antsApplyTransforms -t ddf.nii.gz, or Slicer. To map
    fixed-space landmarks to moving space: ran-warp --field ddf.nii.gz --points in.csv --out out.csv.
    inverse_ddf.nii.gz maps moving-space points to fixed space.

    Args:
        fixed: fixed (reference) image file; the outputs live on its grid.
        moving: moving image file, registered onto the fixed one.
        out: output folder (created; files of the same names are replaced).
        moving_label: label map of the moving image (its grid), warped with nearest neighbour.
        fixed_label: label map of the fixed image (its grid); with --moving-label gives Dice before/after.
        weights: checkpoint (a bundle checkpoint with a "model" entry, or a state dict); default: the
            bundle's models/model.pt (brain MR, trained at 2 mm with --intensity mr).
        preset: RAN preset of the weights (ref, RAn0, RAn3, RAn4, RAn4+).
        device: cpu, cuda or cuda:N; default: cuda when available.
        amp: mixed precision.
        spacing: resampling before the network in mm: three numbers (--spacing 2 2 2), one (isotropic) or
            none (keep the grids); use the spacing the weights were trained at.
        intensity: intensity scaling as at training: ct (window -100..300 HU), mr (percentiles 0.5-99.5), none.
        io_steps: instance optimisation: fine-tune a copy of the network on this pair for N Adam steps of the
            training loss before predicting (0 = off).
        io_lr: learning rate of the instance optimisation.
        inverse: also write inverse_ddf.nii.gz (the backward field).
        png: also write overview.png (rows: fixed, moving, warped, checkerboard, deformation grid).
        quiet: only warnings and errors on stderr.
    """
    from ran_bundle.register import InputError, register_files

    _setup_logging("ran-register", quiet)
    arguments = {k: v for k, v in locals().items() if k not in ("InputError", "register_files")}
    try:
        register_files(
            fixed=str(fixed),
            moving=str(moving),
            out=str(out),
            moving_label=None if moving_label is None else str(moving_label),
            fixed_label=None if fixed_label is None else str(fixed_label),
            weights=None if weights is None else str(weights),
            preset=str(preset),
            device=None if device is None else str(device),
            amp=bool(amp),
            spacing=spacing,
            intensity=str(intensity),
            io_steps=io_steps,
            io_lr=io_lr,
            inverse=bool(inverse),
            png=bool(png),
            progress=not quiet,
            arguments=arguments,
        )
    except InputError as e:
        _fail("ran-register", e)


def warp(
    field: str,
    out: str,
    image: str | None = None,
    points: str | None = None,
    label: bool = False,
    frame: str = "lps",
    quiet: bool = False,
) -> None:
    """Apply a displacement field written by ran-register to an image, a label map or points.

    Images: ran-warp --field ddf.nii.gz --image img.nii.gz --out warped.nii.gz [--label]
    gives out(p) = img(p + v(p)) on the field's grid (the fixed grid for ddf.nii.gz); trilinear, or
    nearest neighbour with --label for label maps.

    Points: ran-warp --field ddf.nii.gz --points in.csv --out out.csv [--frame lps|ras]
    maps each point p to p + v(p). ddf.nii.gz maps FIXED-space points to MOVING space (the image warp
    carries moving-image content into fixed space; the field maps points the other way), so landmarks
    placed on the fixed image go to the moving image; inverse_ddf.nii.gz maps moving-space points to
    fixed space. The CSV needs a header with columns x, y, z in mm (other columns are copied); --frame says
    which world frame they use: lps (ITK, ANTs, Slicer files; default) or ras (nibabel, MONAI).
    Points outside the field's grid are left unmoved (as ITK does) with a warning.

    Args:
        field: displacement field file (ITK convention, e.g. ddf.nii.gz or inverse_ddf.nii.gz).
        out: output image (.nii/.nii.gz) or, with --points, output CSV.
        image: image or label map to warp.
        points: CSV file of points (header x,y,z) to map instead of an image.
        label: the image is a label map: nearest-neighbour interpolation, integer type kept.
        frame: world frame of the point coordinates: lps or ras.
        quiet: no progress messages.
    """
    from ran_bundle.register import InputError, warp_image_file, warp_points_file

    _setup_logging("ran-warp", quiet)
    log = logging.getLogger("ran_bundle.register")
    try:
        if (image is None) == (points is None):
            raise InputError("give exactly one of --image and --points.")
        if points is not None:
            path, outside = warp_points_file(str(field), str(points), str(out), frame=str(frame))
            if outside:
                log.warning("warning: %d point(s) outside the field's grid were left unmoved", outside)
        else:
            path = warp_image_file(str(field), str(image), str(out), label=bool(label))
        log.info("wrote %s", path)
    except InputError as e:
        _fail("ran-warp", e)


def _join_spacing(argv: list[str]) -> list[str]:
    """``--spacing 2 2 2`` -> ``--spacing=2,2,2`` (fire reads one value per flag)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--spacing":
            values = []
            j = i + 1
            while j < len(argv) and len(values) < 3 and _NUMBER.match(argv[j]):
                values.append(argv[j])
                j += 1
            if len(values) > 1:
                out.append("--spacing=" + ",".join(values))
                i = j
                continue
        out.append(arg)
        i += 1
    return out


def register_main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ran-register``."""
    import fire

    args = _join_spacing(list(sys.argv[1:] if argv is None else argv))
    fire.Fire(register, command=args, name="ran-register")


def warp_main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ran-warp``."""
    import fire

    fire.Fire(warp, command=list(sys.argv[1:] if argv is None else argv), name="ran-warp")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ran_bundle [register|warp] ...``: ``register`` is the default command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "warp":
        warp_main(args[1:])
    else:
        register_main(args[1:] if args and args[0] == "register" else args)
