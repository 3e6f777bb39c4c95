"""Datalists and pair datasets for inter-subject registration.

Datalist schema (JSON, Learn2Reg-like)::

    {
      "name": "free text (optional, ignored)",
      "training":   [{"image": "images/s0.nii.gz", "label": "labels/s0.nii.gz"}, ...],
      "validation": [{"image": ...,                "label": ...}, ...],
      "test":       [{"image": ...}, ...],
      "validation_pairs": [[0, 1], ["images/s5.nii.gz", "images/s4.nii.gz"],
                           {"moving": 1, "fixed": 0},
                           {"moving_image": ..., "fixed_image": ..., "moving_label": ..., "fixed_label": ...}],
      "test_pairs": [...],
      "atlas": {"image": "images/atlas.nii.gz", "label": "labels/atlas.nii.gz"},
      "reference": "images/s0.nii.gz",
      "label_values": [4, 5, 1002, ...]
    }

* A *subject* is a dict with ``"image"`` (required) and ``"label"`` (optional) file paths; other keys
  are kept. Relative paths are resolved against ``base_dir`` (default: the datalist's folder).
* At least one of ``"training"``, ``"validation"``, ``"test"`` must be present. ``"training"`` needs
  at least 2 subjects (random pairs are drawn between different subjects).
* Pairs of a split (``validation_pairs``, ``test_pairs``): if given explicitly, each entry is
  ``[moving, fixed]`` or ``{"moving": m, "fixed": f}`` (Learn2Reg's form), where ``m``/``f`` are an
  index into that split's subject list or an image path (its label is looked up among all
  subjects of the datalist), or a full pair dict with ``moving_image``/``fixed_image`` (+ labels).
  Otherwise they are all ordered pairs of distinct subjects of the split (:func:`ordered_pairs`),
  which needs at least 2 subjects in a non-empty split.
* ``"atlas"`` (optional): one subject that is the fixed image of every pair (atlas/template
  registration, e.g. label propagation from one annotated scan). Training then pairs each training
  subject with the atlas (1 training subject is enough), and the default pairs of a split are
  ``subject -> atlas`` for each of its subjects. The atlas must not also be a training subject.
* ``"reference"`` (optional): an image that every subject is affinely aligned to once, for datasets of
  native-space scans (:class:`ran_bundle.transforms.AlignToReferenced`).
* ``"label_values"`` (optional): the label values, in the order of the one-hot channels ``1..N`` of a
  training Dice term (:func:`ran_bundle.transforms.registration_transforms`).
* A pair is a dict with keys ``"moving_image"``, ``"fixed_image"`` and, only when both subjects
  have one, ``"moving_label"``, ``"fixed_label"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset

from ran_bundle.inputs import check_subject_files
from ran_bundle.keys import PAIR_KEYS

__all__ = [
    "SPLITS",
    "load_datalist",
    "ordered_pairs",
    "make_pair",
    "RandomPairDataset",
]

SPLITS = ("training", "validation", "test")
_PAIR_SPLITS = {"validation": "validation_pairs", "test": "test_pairs"}


def make_pair(moving: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Pair dict of two subject dicts (labels only when both subjects have one).

    Args:
        moving: subject dict with ``"image"`` and optionally ``"label"``.
        fixed: subject dict with ``"image"`` and optionally ``"label"``.

    Returns:
        ``{"moving_image", "fixed_image"[, "moving_label", "fixed_label"]}``.
    """
    pair = {"moving_image": moving["image"], "fixed_image": fixed["image"]}
    if moving.get("label") is not None and fixed.get("label") is not None:
        pair["moving_label"] = moving["label"]
        pair["fixed_label"] = fixed["label"]
    return pair


def ordered_pairs(subjects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """All ordered pairs of distinct subjects, in a fixed order.

    The order is moving-major: ``(0->1), (0->2), ..., (0->n-1), (1->0), (1->2), ...``, where
    ``(m->f)`` is moving subject ``m`` registered to fixed subject ``f``; ``n (n - 1)`` pairs.

    Args:
        subjects: list of subject dicts (``"image"``, optional ``"label"``).

    Returns:
        list of pair dicts (see :func:`make_pair`).

    Raises:
        ValueError: fewer than 2 subjects.
    """
    if len(subjects) < 2:
        raise ValueError(f"ordered_pairs needs at least 2 subjects, got {len(subjects)}.")
    return [make_pair(m, f) for i, m in enumerate(subjects) for j, f in enumerate(subjects) if i != j]


def _resolve(p: Any, base: Path, where: str, check_files: bool) -> str:
    if not isinstance(p, (str, os.PathLike)) or str(p) == "":
        raise ValueError(f"{where}: expected a file path string, got {p!r}.")
    path = Path(os.path.expanduser(str(p)))
    if not path.is_absolute():
        path = base / path
    path = Path(os.path.normpath(path))
    if check_files and not path.is_file():
        raise ValueError(f"{where}: file not found: {path}")
    return str(path)


def _subjects(items: Any, split: str, base: Path, src: str, check_files: bool) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise ValueError(f"datalist {src}: '{split}' must be a list of subjects, got {type(items).__name__}.")
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"datalist {src}: {split}[{i}]"
        if isinstance(item, str):  # a bare image path is allowed
            item = {"image": item}
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be a dict with an 'image' key, got {type(item).__name__}.")
        if "image" not in item:
            raise ValueError(f"{where} is missing the required key 'image' (keys: {sorted(item)}).")
        subj = dict(item)
        subj["image"] = _resolve(item["image"], base, f"{where}['image']", check_files)
        if item.get("label") is not None:
            subj["label"] = _resolve(item["label"], base, f"{where}['label']", check_files)
        if subj["image"] in seen:
            raise ValueError(
                f"{where}: image {subj['image']} is listed twice in '{split}' "
                f"(also {split}[{seen[subj['image']]}]); a subject would be paired with itself."
            )
        seen[subj["image"]] = i
        out.append(subj)
    return out


def _pair_entry(
    entry: Any,
    subjects: list[dict[str, Any]],
    by_image: dict[str, dict[str, Any]],
    base: Path,
    where: str,
    check_files: bool,
) -> dict[str, Any]:
    def subject_of(ref: Any, role: str) -> dict[str, Any]:
        if isinstance(ref, bool) or not isinstance(ref, (int, str, os.PathLike)):
            raise ValueError(f"{where}: {role} must be a subject index or an image path, got {ref!r}.")
        if isinstance(ref, int):
            if not 0 <= ref < len(subjects):
                raise ValueError(f"{where}: {role} index {ref} out of range (split has {len(subjects)} subjects).")
            return subjects[ref]
        path = _resolve(ref, base, f"{where} {role}", check_files)
        return by_image.get(path, {"image": path})

    if isinstance(entry, Mapping) and "moving_image" in entry:
        if "fixed_image" not in entry:
            raise ValueError(f"{where} is missing the required key 'fixed_image'.")
        pair = {}
        for k in PAIR_KEYS:
            if entry.get(k) is not None:
                pair[k] = _resolve(entry[k], base, f"{where}['{k}']", check_files)
        if ("moving_label" in pair) != ("fixed_label" in pair):
            raise ValueError(f"{where}: give both 'moving_label' and 'fixed_label' or neither.")
        mov, fix = pair["moving_image"], pair["fixed_image"]
    else:
        if isinstance(entry, Mapping):
            if "moving" not in entry or "fixed" not in entry:
                raise ValueError(
                    f"{where} must have keys 'moving' and 'fixed' (or 'moving_image' and 'fixed_image'), "
                    f"got {sorted(entry)}."
                )
            m, f = entry["moving"], entry["fixed"]
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            m, f = entry
        else:
            raise ValueError(f"{where} must be [moving, fixed] or a dict, got {entry!r}.")
        pair = make_pair(subject_of(m, "moving"), subject_of(f, "fixed"))
        mov, fix = pair["moving_image"], pair["fixed_image"]
    if mov == fix:
        raise ValueError(f"{where}: moving and fixed are the same image ({mov}).")
    return pair


def load_datalist(
    path: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    check_images: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Read and validate a registration datalist (schema in the module docstring).

    All checks run before any image is read, and every error names the datalist and the entry.

    Args:
        path: the JSON file.
        base_dir: folder that relative paths are resolved against (default: the JSON file's folder).
        check_files: check that every referenced image/label file exists.
        check_images: also read every image and label once and check them
            (:func:`ran_bundle.inputs.check_subject_files`: readable, 3D, finite, not constant; labels
            on their image's grid, integer, not empty), so that a bad file stops a workflow before
            training or inference starts.

    Returns:
        ``{"training", "validation", "test"}``: lists of subject dicts with absolute paths (empty
        when the split is absent), ``"atlas"``: a list of zero or one subject dict, and
        ``{"validation_pairs", "test_pairs"}``: lists of pair dicts (explicit pairs when given, else
        ``subject -> atlas`` pairs with an atlas, else :func:`ordered_pairs` of the split; empty for
        an empty split), ``"reference"``: the reference image path or ``None``, ``"label_values"``: a
        list of ints or ``None``.

    Raises:
        FileNotFoundError: the datalist file does not exist.
        ValueError: invalid JSON, a missing required key, a missing referenced file, too few subjects
            for pairs, a bad pair entry; with ``check_images``, a bad image or label
            (:class:`~ran_bundle.inputs.InputError`, a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path}: invalid JSON ({e}).") from e
    if not isinstance(raw, Mapping):
        raise ValueError(f"datalist {path}: top level must be a JSON object, got {type(raw).__name__}.")
    if not any(k in raw for k in SPLITS):
        raise ValueError(
            f"datalist {path}: missing required key: needs at least one of {list(SPLITS)}, got {sorted(raw)}."
        )
    base = Path(base_dir) if base_dir is not None else path.parent
    base = base.resolve()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        out[split] = _subjects(raw.get(split, []), split, base, str(path), check_files)
    out["atlas"] = [] if raw.get("atlas") is None else _subjects([raw["atlas"]], "atlas", base, str(path), check_files)
    atlas = out["atlas"][0] if out["atlas"] else None
    if atlas is not None and any(s["image"] == atlas["image"] for s in out["training"]):
        raise ValueError(f"datalist {path}: the atlas {atlas['image']} is also a training subject; remove it there.")
    if "training" in raw and atlas is None and len(out["training"]) < 2:
        raise ValueError(
            f"datalist {path}: 'training' has {len(out['training'])} subject(s); random pairs of different "
            "subjects need at least 2 (or give an 'atlas' to register every training subject to)."
        )
    if "training" in raw and len(out["training"]) < 1:
        raise ValueError(f"datalist {path}: 'training' is empty.")
    out["reference"] = None  # type: ignore[assignment]
    if raw.get("reference") is not None:
        out["reference"] = _resolve(raw["reference"], base, f"datalist {path}: reference", check_files)  # type: ignore[assignment]
    out["label_values"] = None  # type: ignore[assignment]
    if raw.get("label_values") is not None:
        values = raw["label_values"]
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"datalist {path}: 'label_values' must be a list of integers, got {values!r}.")
        if len(set(values)) != len(values) or 0 in values:
            raise ValueError(f"datalist {path}: 'label_values' must be distinct non-zero integers.")
        out["label_values"] = values  # type: ignore[assignment]
    by_image = {s["image"]: s for split in SPLITS for s in out[split]}
    for split, key in _PAIR_SPLITS.items():
        if key in raw:
            entries = raw[key]
            if not isinstance(entries, list):
                raise ValueError(f"datalist {path}: '{key}' must be a list of pairs, got {type(entries).__name__}.")
            out[key] = [
                _pair_entry(e, out[split], by_image, base, f"datalist {path}: {key}[{i}]", check_files)
                for i, e in enumerate(entries)
            ]
        elif len(out[split]) == 0:
            out[key] = []
        elif atlas is not None:
            out[key] = [make_pair(subj, atlas) for subj in out[split] if subj["image"] != atlas["image"]]
        elif len(out[split]) < 2:
            raise ValueError(
                f"datalist {path}: '{split}' has 1 subject; pairs need at least 2 (or list explicit '{key}')."
            )
        else:
            out[key] = ordered_pairs(out[split])
    if check_images:
        pair_subjects = [
            {"image": pair[f"{role}_image"], "label": pair.get(f"{role}_label")}
            for key in _PAIR_SPLITS.values()
            for pair in out[key]
            for role in ("moving", "fixed")
        ]
        subjects = [s for split in (*SPLITS, "atlas") for s in out[split]]
        check_subject_files([*subjects, *pair_subjects], f"datalist {path}")
    return out


class RandomPairDataset(Randomizable, Dataset):
    """Random (moving, fixed) pairs of *different* subjects, for training.

    Item ``i`` of epoch ``e`` draws a moving subject and a different fixed subject uniformly at
    random, builds the pair dict (:func:`make_pair`) and applies ``transform``. With
    ``fixed_subjects`` (e.g. an atlas), the moving subject is drawn from ``subjects`` and the fixed
    one from ``fixed_subjects``.

    Every random choice of an item (the pair and, through ``transform.set_random_state``, its
    random crop and intensity factor) comes from a generator seeded with ``(seed, epoch, i)`` only.
    So an item is the same whichever process, worker or rank loads it and in whatever order: a
    ``DistributedSampler`` splits one epoch's pairs between ranks exactly as one process with the
    total batch would see them, and a run resumed at epoch ``e`` draws what the uninterrupted run
    drew. :meth:`set_epoch` (called by :class:`ran_bundle.engines.DatasetEpochHandler` at the start
    of every epoch) moves to the next epoch's draws; ``set_random_state`` (which MONAI's
    ``DataLoader`` calls per worker) does not change the draws.

    Args:
        subjects: subject dicts (``"image"``, optional ``"label"``), at least 2 (at least 1 with
            ``fixed_subjects``).
        transform: callable on the pair dict (e.g. ``registration_transforms("train")``), or None.
        num_pairs_per_epoch: dataset length.
        seed: base seed of all draws.
        fixed_subjects: the subjects the fixed image is drawn from (none of them in ``subjects``);
            ``None`` or empty: fixed images are drawn from ``subjects`` too.

    Item:
        dict with ``"moving_image"``, ``"fixed_image"`` (+ ``"moving_label"``, ``"fixed_label"``
        when both subjects have labels), transformed.
    """

    def __init__(
        self,
        subjects: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        num_pairs_per_epoch: int = 100,
        seed: int = 0,
        fixed_subjects: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self.fixed_subjects = [dict(s) for s in fixed_subjects or []]
        if len(subjects) < (1 if self.fixed_subjects else 2):
            raise ValueError(
                f"RandomPairDataset needs at least {1 if self.fixed_subjects else 2} subjects, got {len(subjects)}."
            )
        if int(num_pairs_per_epoch) < 1:
            raise ValueError(f"num_pairs_per_epoch must be >= 1, got {num_pairs_per_epoch}.")
        for i, s in enumerate([*subjects, *self.fixed_subjects]):
            if "image" not in s:
                raise ValueError(f"RandomPairDataset: subject {i} has no 'image' key (keys: {sorted(s)}).")
        shared = {s["image"] for s in subjects} & {s["image"] for s in self.fixed_subjects}
        if shared:
            raise ValueError(f"RandomPairDataset: {sorted(shared)} are both moving and fixed subjects.")
        self.subjects = [dict(s) for s in subjects]
        self.transform = transform
        self.num_pairs_per_epoch = int(num_pairs_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self._pair: tuple[int, int] = (0, 1)
        self.set_random_state(seed=self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (any integer; the trainer's 1-based epoch number)."""
        self.epoch = int(epoch)

    def _seed_item(self, index: int) -> None:
        """Seed the pair draw and the transform from ``(seed, epoch, index)`` alone."""
        pair_seed, transform_seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
        self.R = np.random.RandomState(int(pair_seed))
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(transform_seed))

    def randomize(self, data: Any = None) -> None:
        """Draw a (moving, fixed) index pair of two different subjects from ``self.R``."""
        n = len(self.subjects)
        m = int(self.R.randint(n))
        if self.fixed_subjects:
            self._pair = (m, int(self.R.randint(len(self.fixed_subjects))))
            return
        f = int(self.R.randint(n - 1))
        self._pair = (m, f + 1 if f >= m else f)

    def __len__(self) -> int:
        return self.num_pairs_per_epoch

    def draw_pair(self, index: int) -> dict[str, Any]:
        """The untransformed pair dict of item ``index`` of the current epoch."""
        self._seed_item(index)
        self.randomize()
        m, f = self._pair
        return make_pair(self.subjects[m], (self.fixed_subjects or self.subjects)[f])

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs.")
        index = int(index) % len(self)
        pair = self.draw_pair(index)
        return apply_transform(self.transform, pair) if self.transform is not None else pair
