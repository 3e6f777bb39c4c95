"""Reading user input (image files, label maps, datalists, weights, the device) that fails early and says why.

:func:`load_volume` reads an image or label map into a :class:`Volume`, :func:`read_state_dict` is the one reader
of weight files and :func:`load_network` builds the network from them, :func:`resolve_device` picks the device.
Every check raises :class:`InputError` (a ``ValueError``) whose message names the file or entry and the problem,
before any long work starts. Both front ends use them: the bundle configs (through
:func:`ran_bundle.data.load_datalist` with ``check_images=True`` and
:func:`ran_bundle.engines.check_checkpoint`) and the ``ran-register``/``ran-warp`` commands
(:mod:`ran_bundle.pipeline`, :mod:`ran_bundle.cli`).
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ran_bundle.defaults import PRESET_NAMES
from ran_bundle.flow import spacing_of

if TYPE_CHECKING:
    from ran_bundle.networks import ResidualAlignerNetwork

__all__ = [
    "InputError",
    "Volume",
    "check_complete_file",
    "load_volume",
    "check_same_grid",
    "check_label_not_empty",
    "check_subject_files",
    "read_state_dict",
    "check_preset",
    "check_state_dict_fits",
    "parse_spacing",
    "resolve_device",
    "load_network",
]


class InputError(ValueError):
    """A problem with the user's input (files, their contents, arguments); the message says which and why."""


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20


def _gzip_size(path: str) -> int:
    """Decompress the whole gzip stream of ``path`` (1 MiB at a time) and return its length; raises
    ``EOFError``/``gzip.BadGzipFile``/``zlib.error`` on a truncated or damaged stream (CRC and length
    of every member are checked at its end)."""
    size = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
    return size


def _nifti_size(path: str) -> int | None:
    """Bytes a NIfTI file must hold by its header (``vox_offset`` + data bytes); ``None`` when the header
    holds no data size (a header-only file). Raises what nibabel raises on a bad header."""
    import nibabel as nib

    img = nib.load(path)
    proxy = getattr(img, "dataobj", None)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or not hasattr(proxy, "offset"):
        return None
    n_voxels = int(np.prod(proxy.shape, dtype=np.int64))
    return int(proxy.offset) + n_voxels * np.dtype(proxy.dtype).itemsize


def _zip_problem(path: str) -> str | None:
    """``None`` when ``path`` is a complete zip archive whose members match their CRC-32 (members stored
    without a CRC, as ``torch.serialization.set_crc32_options(False)`` writes them, are skipped), else
    what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as e:
        return f"a zip archive without its end, the central directory: {_first_line(e)}"
    with archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size:
                continue  # written without a CRC: nothing to compare with
            try:
                with archive.open(info) as member:
                    while member.read(_CHUNK):  # the CRC-32 is compared at the member's end
                        pass
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                return f"zip member {info.filename}: {_first_line(e)}"
    return None


def check_complete_file(path: str | os.PathLike, role: str) -> None:
    """Refuse a truncated or damaged file before a reader that would not notice reads it: SimpleITK reads a
    cut-off ``.nii.gz`` without error (the missing voxels become zeros), ``torch.load`` a checkpoint whose
    tensor bytes are damaged.

    What is checked (other files are left to their readers):

    * gzip files (``.nii.gz``, or any file starting with the gzip magic): the whole stream is decompressed,
      1 MiB at a time (no large memory); a missing end, broken deflate data or a wrong CRC/length is refused.
    * NIfTI (``.nii``, ``.nii.gz``): the (decompressed) file must hold ``vox_offset`` + the data bytes the
      header announces (its shape times its voxel size).
    * zip archives (PyTorch checkpoints since 1.6): the central directory must be there (it is at the end
      of the file, so any truncation loses it) and every member must match its CRC-32.

    Args:
        path: an existing file.
        role: how messages name the file (``"fixed image"``, ``"field"``, ``"weights"``).

    Raises:
        InputError: ``"<role> <path>: truncated or corrupt file (<what>)."``, or the file cannot be read.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
        file_size = os.path.getsize(p)
    except OSError as e:
        raise InputError(f"{role} {p}: cannot read the file ({e.strerror or type(e).__name__}).") from None

    def corrupt(what: str) -> InputError:
        return InputError(f"{role} {p}: truncated or corrupt file ({what}).")

    if file_size == 0:
        raise corrupt("empty file")
    name = p.lower()
    size = file_size
    is_gzip = magic.startswith(_GZIP_MAGIC)
    if is_gzip:
        try:
            size = _gzip_size(p)
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise corrupt(f"gzip stream: {_first_line(e)}") from None
    elif magic == _ZIP_MAGIC:
        problem = _zip_problem(p)
        if problem is not None:
            raise corrupt(problem)
    if (name.endswith(".nii") and not is_gzip) or (name.endswith(".nii.gz") and is_gzip):
        try:
            expected = _nifti_size(p)
        except Exception as e:  # noqa: BLE001 - nibabel's many header errors
            raise corrupt(f"NIfTI header: {_first_line(e)[:200]}") from None
        if expected is not None and size < expected:
            unit = "decompressed bytes" if name.endswith(".gz") else "bytes"
            raise corrupt(f"{size} of the {expected} {unit} its NIfTI header announces")


@dataclass
class Volume:
    """A 3D image or label map as read from a file.

    Attributes:
        array: ``(X, Y, Z)`` numpy array in the file's voxel order, the file's dtype.
        affine: ``(4, 4)`` float64 voxel-to-world matrix, RAS frame (as MONAI/nibabel give it).
        path: the file.
        role: how the user named it (``"fixed image"``, ``"moving label"``, ...), for messages.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    role: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm per array axis."""
        return spacing_of(self.affine)  # type: ignore[return-value]

    def tensor(self) -> torch.Tensor:
        """``(1, 1, X, Y, Z)`` float32 tensor of the array."""
        return torch.from_numpy(np.ascontiguousarray(self.array, dtype=np.float32))[None, None]

    def label_tensor(self) -> torch.Tensor:
        """``(1, 1, X, Y, Z)`` int32 tensor of a label map (float labels rounded)."""
        arr = self.array
        arr = arr.astype(np.int32) if arr.dtype.kind in "iub" else np.rint(arr).astype(np.int32)
        return torch.from_numpy(np.ascontiguousarray(arr))[None, None]


def load_volume(
    path: str | os.PathLike, role: str, reader: str | None = None, require_contrast: bool = False
) -> Volume:
    """Read a 3D image as MONAI's ``LoadImage`` (the reader of the bundle's preprocessing) reads it, and check it.

    Trailing singleton axes (e.g. NIfTI ``(X, Y, Z, 1)``) are dropped.

    Args:
        path: image file (NIfTI, or any format MONAI's ITK reader opens).
        role: the name used in error messages, e.g. ``"fixed image"``.
        reader: optional MONAI reader name (``"NibabelReader"``, ``"ITKReader"``).
        require_contrast: reject a constant image (nothing to register).

    Raises:
        InputError: file missing, unreadable, truncated or corrupt (:func:`check_complete_file`), not 3D,
            holding NaN/infinite values, or constant (with ``require_contrast``).
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"{role} {p}: file not found.")
    if not os.path.isfile(p):
        raise InputError(f"{role} {p}: not a file.")
    check_complete_file(p, role)
    try:
        arr, affine = _read_image(p, reader)
    except Exception as e:  # noqa: BLE001 - any reader failure is a user input problem here
        raise InputError(f"{role} {p}: cannot read the image ({_first_line(e)}).") from None
    shape = arr.shape
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"{role} {p}: not a 3D image (array shape {tuple(shape)}).")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            raise InputError(
                f"{role} {p}: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxel values; "
                "replace them (e.g. by 0) before registering."
            )
    elif arr.dtype.kind not in "iub":
        raise InputError(f"{role} {p}: unsupported voxel type {arr.dtype}.")
    if require_contrast and arr.size and arr.min() == arr.max():
        raise InputError(f"{role} {p}: every voxel has the same value ({arr.flat[0]}); nothing to register.")
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{role} {p}: invalid voxel-to-world matrix {affine.tolist()}.")
    return Volume(arr, affine, p, role)


def _read_image(path: str, reader: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The array (the file's voxel order and dtype) and the ``(4, 4)`` float64 RAS affine of an image file.

    A NIfTI file whose voxel sizes agree with its affine is read with nibabel, as MONAI's ``NibabelReader`` reads
    it (``np.asanyarray(dataobj)`` and the affine), without importing MONAI: its import loads all of MONAI's
    submodules, about 4 s of a registration's start-up on 2 cores (``docs/benchmark.md``). Any other file, a
    NIfTI header that MONAI would rectify, or an explicit ``reader`` goes through MONAI's ``LoadImage``.
    """
    if reader is None and path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        zooms = img.header.get_zooms()
        if len(zooms) == 3 and np.allclose(zooms, spacing_of(img.affine)):
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True, dtype=None, reader=reader)(path)
    arr = np.asarray(img.array if hasattr(img, "array") else img)
    return arr, np.asarray(img.affine.cpu().numpy() if hasattr(img, "affine") else np.eye(4), dtype=np.float64)


def check_same_grid(label: Volume, image: Volume, atol_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` unless ``label`` lies on ``image``'s voxel grid and holds integers.

    Args:
        label: the label map.
        image: the image it belongs to.
        atol_mm: tolerance on the affines' entries (mm; NIfTI stores them as float32).
    """
    if label.array.shape != image.array.shape:
        raise InputError(
            f"{label.role} {label.path}: shape {label.array.shape} does not match the {image.role} "
            f"{image.path} shape {image.array.shape}; the label map must be on its image's voxel grid."
        )
    diff = float(np.abs(label.affine - image.affine).max())
    if diff > atol_mm:
        raise InputError(
            f"{label.role} {label.path}: voxel-to-world affine differs from the {image.role} {image.path} "
            f"(max difference {diff:.4g}); the label map must be on its image's voxel grid."
        )
    if label.array.dtype.kind == "f" and not np.allclose(label.array, np.rint(label.array), atol=1e-3):
        raise InputError(f"{label.role} {label.path}: holds non-integer values; a label map must hold integers.")


def check_label_not_empty(label: Volume) -> None:
    """Raise :class:`InputError` when a label map has no foreground voxel (nothing to score or propagate)."""
    if not np.any(label.array):
        raise InputError(f"{label.role} {label.path}: the label map is empty (no non-zero voxel).")


def check_subject_files(subjects: Iterable[Mapping[str, str]], where: str) -> None:
    """Read every subject's image (and label) of a datalist and check them (:func:`load_volume`,
    :func:`check_same_grid`, :func:`check_label_not_empty`); each file is read once.

    Args:
        subjects: dicts with ``"image"`` and optional ``"label"`` paths.
        where: prefix of the messages, e.g. ``"datalist /data/list.json"``.
    """
    seen: set[str] = set()
    for subject in subjects:
        if subject["image"] in seen:
            continue
        seen.add(subject["image"])
        image = load_volume(subject["image"], f"{where}: image", require_contrast=True)
        if subject.get("label") is not None:
            label = load_volume(subject["label"], f"{where}: label")
            check_same_grid(label, image)
            check_label_not_empty(label)


def read_state_dict(path: str | os.PathLike, key: str = "model") -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint file (CPU tensors).

    Args:
        path: a bundle checkpoint (dict whose ``key`` entry is the state dict, as the training writes)
            or a plain state dict; a DDP ``"module."`` prefix is removed.
        key: the checkpoint entry holding the weights.

    Raises:
        InputError: file missing, unreadable, truncated or corrupt (:func:`check_complete_file`: a zip
            checkpoint's members are checked against their CRC-32), or not a state dict.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"weights {p}: file not found.")
    check_complete_file(p, "weights")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        text = _first_line(e)[:200].rstrip(".")
        if isinstance(e, EOFError) or "EOF" in text:  # a cut-off legacy (pickle) file
            raise InputError(f"weights {p}: truncated or corrupt file ({text}).") from None
        raise InputError(f"weights {p}: cannot read it as a PyTorch checkpoint ({text}).") from None
    state = ckpt.get(key, ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(
            f"weights {p}: not a state dict (expected a dict of tensors, or a checkpoint with a {key!r} entry)."
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def check_state_dict_fits(
    state: Mapping[str, torch.Tensor], network: nn.Module, path: str, target: str = "the network", advice: str = ""
) -> None:
    """Raise :class:`InputError` naming the first mismatches unless ``state`` loads into ``network`` strictly.

    Args:
        state: weights from :func:`read_state_dict`.
        network: the network they are meant for.
        path: the weights file, for the message.
        target: how the message names the network (``"weights P do not fit <target>"``).
        advice: what the user should do, appended to the message.
    """
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    if parts:
        raise InputError(f"weights {path} do not fit {target}: {', '.join(parts)}; {advice}".rstrip("; "))


def parse_spacing(spacing: Any) -> tuple[float, float, float]:
    """Normalise a spacing value: one number (isotropic) or three, as numbers, a sequence or a string
    (``"2"``, ``"2,2,3"``, ``"2 2 3"``, ``"[2, 2, 3]"``).

    Raises:
        InputError: not 1 or 3 positive finite numbers.
    """
    raw = spacing
    if isinstance(spacing, str):
        spacing = [s for s in spacing.strip("[]() ").replace(",", " ").split() if s]
    if isinstance(spacing, (int, float)):
        spacing = [spacing]
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise InputError(f"--spacing {raw!r}: expected one number or three numbers (mm).") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--spacing {raw!r}: expected one number or three positive numbers (mm).")
    return (values[0], values[1], values[2])


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise ``device`` checked for availability.

    Raises:
        InputError: an unknown device string, or CUDA requested where it is not available.
    """
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (use --device cpu).")
    return dev


def check_preset(preset: str) -> None:
    """Raise :class:`InputError` unless ``preset`` names a RAN preset (:data:`ran_bundle.defaults.PRESET_NAMES`),
    without importing the network."""
    if preset not in PRESET_NAMES:
        raise InputError(f"--preset {preset!r}: unknown; choose one of {sorted(PRESET_NAMES)}.")


def load_network(
    weights: str | os.PathLike, preset: str = "ref", device: torch.device | str = "cpu"
) -> ResidualAlignerNetwork:
    """Build ``ResidualAlignerNetwork(3, preset)`` and load ``weights`` into it, in eval mode.

    Args:
        weights: a bundle checkpoint (dict whose ``"model"`` entry is the state dict) or a plain state dict;
            a DDP ``"module."`` prefix is removed.
        preset: the preset the weights were trained with (:data:`ran_bundle.networks.PRESETS`).
        device: where to put the network.

    Raises:
        InputError: unknown preset, file missing, truncated or unreadable, not a state dict, or not fitting
            the preset (missing/unexpected keys or shape mismatches, the first few named).
    """
    check_preset(preset)
    # imported here: the network's blocks pull in MONAI, whose import (about 4 s) a run without it skips
    from ran_bundle.networks import ResidualAlignerNetwork

    state = read_state_dict(weights)
    net = ResidualAlignerNetwork(spatial_dims=3, preset=preset)
    check_state_dict_fits(
        state, net, os.fspath(weights), f"the RAN preset {preset!r}", "pass the --preset the weights were trained with."
    )
    net.load_state_dict(state)
    return net.to(device).eval()
