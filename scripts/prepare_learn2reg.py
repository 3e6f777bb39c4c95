"""Turn a local copy of a Learn2Reg release into a ran_bundle datalist (the paper's splits and labels).

Nothing is downloaded: get the data yourself (licences and registration on the sites below), unpack it, and
point ``--root`` at the unpacked folder.

* ``abdomen``: Learn2Reg **AbdomenCTCT** (2020 task 3 / 2021+ release, 30 labelled CTs at 2 mm,
  192 x 160 x 256, 13 organs), https://learn2reg.grand-challenge.org/Datasets/. Read from
  ``<root>/AbdomenCTCT_dataset.json`` (``--dataset-json`` for another name): its ``"training"`` entries
  (``{"image": "./imagesTr/...", "label": "./labelsTr/...", "mask": ...}``) and its ``"labels"`` names.
  Paper split (Sec. 4.1): 23 training and 7 test subjects, all 42 ordered test pairs, scored on 9 organs
  (spleen, right kidney, left kidney, esophagus, liver, aorta, inferior vena cava, portal & splenic vein,
  pancreas); the labels are matched by name in the release's ``"labels"`` table.
* ``lung``: inter-subject lung CT with lung masks as labels, one scan per subject (the paper used the
  scans of one breathing phase). Either a release with a dataset JSON (``LungCT_dataset.json`` or
  ``NLST_dataset.json``: ``"training"`` entries with ``"image"`` and ``"mask"``, file names
  ``<Task>_<case>_<phase>.nii.gz``; ``--phase 0000`` picks the phase), or the 2020 task 2 training data
  (Hering et al., zenodo 3835682: ``<root>/scans/case_XXX_<phase>.nii.gz`` and
  ``<root>/lungMasks/case_XXX_<phase>.nii.gz``, ``--phase exp`` or ``insp``). Paper split: 12 training and 8
  test subjects, all 56 ordered test pairs, scored on the lung mask (label 1).

Output (schema in ``ran_bundle/data.py``): absolute image/label paths (or relative to the output file with
``--relative``), ``"training"``, ``"validation"`` (``--num-val`` subjects taken from the end of the training
subjects, for checkpoint selection; 0 keeps exactly the paper's training set but then the training workflow has
no validation pairs), ``"test"`` and explicit ``"test_pairs"`` (and ``"validation_pairs"``) as index pairs, and
``"labels"`` ``{value: name}`` of the evaluated labels. Subjects are sorted by case id; the last ``--num-test``
are the test subjects. ``--split learn2reg`` instead uses the release's own ``"registration_val"`` pairs as
test pairs (their subjects leave the training set).

Preprocessing is not done here: it is recorded in ``configs/abdomen_ct.json`` (2 mm; ``--resolution_mm 4``
for the released model's 4 mm) and ``configs/lung_ct.json`` (1 mm), merged over ``configs/train.json``.

Usage::

    python scripts/prepare_learn2reg.py abdomen --root /data/AbdomenCTCT --out configs/datalists/abdomen_ct.json
    python scripts/prepare_learn2reg.py lung --root /data/NLST --phase 0000 --out configs/datalists/lung_ct.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RELEASE_HINT = {
    "abdomen": "the Learn2Reg AbdomenCTCT release (https://learn2reg.grand-challenge.org/Datasets/)",
    "lung": "a Learn2Reg lung CT release: LungCT/NLST (https://learn2reg.grand-challenge.org/Datasets/) or the "
    "2020 task 2 training data (https://doi.org/10.5281/zenodo.3835682)",
}
DEFAULT_JSON = {"abdomen": ("AbdomenCTCT_dataset.json",), "lung": ("LungCT_dataset.json", "NLST_dataset.json")}
#: paper split sizes (Sec. 4.1): (training, test) subjects
PAPER_SPLIT = {"abdomen": (23, 7), "lung": (12, 8)}
#: the paper's 9 abdominal organs, with the Learn2Reg/BTCV label values used when a release has no label table
PAPER_ORGANS = {
    "spleen": 1,
    "right kidney": 2,
    "left kidney": 3,
    "esophagus": 5,
    "liver": 6,
    "aorta": 8,
    "inferior vena cava": 9,
    "portal and splenic vein": 10,
    "pancreas": 11,
}


class PrepareError(RuntimeError):
    """A missing file or an unexpected release layout; the message says which and what to do."""


def _norm(name: str) -> str:
    """Label name comparison key: lower case, letters only, '&' read as 'and' (``"Portal & Splenic_Vein"``)."""
    return re.sub(r"[^a-z]", "", name.lower().replace("&", "and"))


def _case_and_phase(path: str) -> tuple[str, str]:
    """``"AbdomenCTCT_0001_0000.nii.gz"`` -> ``("0001", "0000")``, ``"case_001_exp.nii.gz"`` -> ``("001", "exp")``."""
    stem = Path(path).name.split(".")[0]
    parts = stem.split("_")
    if len(parts) >= 3:
        return parts[-2], parts[-1]
    return stem, ""


def _existing(root: Path, rel: str | None, what: str, hint: str) -> str | None:
    """Absolute path of ``rel`` under ``root``; raises naming the file when it does not exist."""
    if rel is None:
        return None
    path = Path(os.path.abspath(root / rel))  # symbolic links kept: the user's own paths
    if not path.is_file():
        raise PrepareError(f"{what} not found: {path}. Is --root the unpacked folder of {hint}?")
    return str(path)


def find_dataset_json(task: str, root: Path, dataset_json: str | None) -> Path | None:
    """The release's dataset JSON under ``root`` (``None`` when a lung release has the 2020 folder layout)."""
    names = (dataset_json,) if dataset_json else DEFAULT_JSON[task]
    for name in names:
        if (root / name).is_file():
            return root / name
    if task == "lung" and not dataset_json and (root / "scans").is_dir():
        return None
    missing = " or ".join(str(root / n) for n in names)
    extra = " (or the 2020 layout scans/ + lungMasks/)" if task == "lung" and not dataset_json else ""
    raise PrepareError(
        f"missing file: {missing}{extra}. Download {RELEASE_HINT[task]}, unpack it and pass its folder as --root; "
        "nothing is downloaded by this script."
    )


def organ_labels(task: str, table: dict[str, str] | None) -> dict[int, str]:
    """``{label value: name}`` of the labels the paper scores, read from the release's ``"labels"`` table."""
    if task == "lung":
        return {1: "lung"}
    if not table:
        return {v: k for k, v in PAPER_ORGANS.items()}
    by_name = {_norm(name): int(value) for value, name in table.items()}
    aliases = {"portal and splenic vein": ("portalvein", "portalveinandsplenicvein", "portalandsplenicveins")}
    out = {}
    for organ in PAPER_ORGANS:
        keys = (_norm(organ), *aliases.get(organ, ()))
        value = next((by_name[k] for k in keys if k in by_name), None)
        if value is None:
            raise PrepareError(f"organ {organ!r} not in the release's label table {table}; cannot map the 9 organs.")
        out[value] = organ
    return dict(sorted(out.items()))


def subjects_from_json(task: str, path: Path, phase: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Subjects ``{"case", "image", "label"}`` (labelled training entries, one per case) and the raw JSON."""
    root = path.parent
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path} is not valid JSON ({e}).") from e
    entries = raw.get("training")
    if not isinstance(entries, list) or not entries:
        raise PrepareError(f"{path} has no 'training' list of subjects.")
    label_key = "label" if task == "abdomen" else "mask"
    by_case: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            raise PrepareError(f"{path}: training[{i}] has no 'image'.")
        lab = entry.get(label_key) or (entry.get("label") if task == "lung" else None)
        if lab is None:
            continue  # unlabelled subjects cannot be scored; the paper used the labelled ones
        case, ph = _case_and_phase(entry["image"])
        if task == "lung":
            if phase is None:
                phase = ph  # the first phase listed
            if ph != phase:
                continue
        elif case in by_case:
            continue
        hint = RELEASE_HINT[task]
        image = _existing(root, entry["image"], f"image of training[{i}]", hint)
        label = _existing(root, lab, f"{label_key} of training[{i}]", hint)
        by_case[case] = {"case": case, "image": image, "label": label}
    if not by_case:
        raise PrepareError(f"{path}: no labelled training subject found (key {label_key!r}, phase {phase!r}).")
    return [by_case[c] for c in sorted(by_case)], raw


def subjects_from_2020_lung(root: Path, phase: str | None) -> list[dict[str, Any]]:
    """Subjects of the 2020 task 2 layout ``scans/case_XXX_<phase>.nii.gz`` + ``lungMasks/`` (same names)."""
    phase = phase or "exp"
    scans = sorted((root / "scans").glob(f"*_{phase}.nii.gz"))
    if not scans:
        raise PrepareError(f"no scans/*_{phase}.nii.gz under {root}; choose --phase exp or insp.")
    out = []
    for scan in scans:
        mask = root / "lungMasks" / scan.name
        if not mask.is_file():
            raise PrepareError(f"missing file: {mask} (the lung mask of {scan.name}).")
        out.append(
            {"case": _case_and_phase(scan.name)[0], "image": os.path.abspath(scan), "label": os.path.abspath(mask)}
        )
    return out


def paper_split(
    subjects: Sequence[dict[str, Any]], num_test: int, num_val: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """``(training, validation, test)``: the last ``num_test`` subjects test, the ``num_val`` before them validation."""
    n = len(subjects)
    if num_test < 2 or num_test > n - 2:
        raise PrepareError(f"--num-test must be in [2, {n - 2}] for {n} subjects, got {num_test}.")
    n_train = n - num_test - num_val
    if num_val < 0 or n_train < 2 or num_val == 1:
        raise PrepareError(
            f"--num-val {num_val} with --num-test {num_test} leaves {n_train} training subjects of {n}: "
            "need >= 2 training and 0 or >= 2 validation subjects."
        )
    return list(subjects[:n_train]), list(subjects[n_train : n - num_test]), list(subjects[n - num_test :])


def index_pairs(n: int) -> list[list[int]]:
    """All ordered ``[moving, fixed]`` index pairs of ``n`` subjects (``n (n - 1)``, moving-major)."""
    return [[m, f] for m in range(n) for f in range(n) if m != f]


def learn2reg_split(
    subjects: Sequence[dict[str, Any]], raw: dict[str, Any], num_val: int
) -> tuple[list[dict], list[dict], list[dict], list[list[int]]]:
    """Split on the release's ``"registration_val"`` pairs: their subjects are the test subjects."""
    pairs = raw.get("registration_val") or []
    if not pairs:
        raise PrepareError("--split learn2reg: the dataset JSON has no 'registration_val' pairs; use --split paper.")
    by_case = {s["case"]: s for s in subjects}
    test_cases: list[str] = []
    case_pairs = []
    for i, p in enumerate(pairs):
        mc, fc = _case_and_phase(p["moving"])[0], _case_and_phase(p["fixed"])[0]
        for c in (mc, fc):
            if c not in by_case:
                raise PrepareError(f"registration_val[{i}]: case {c} has no labelled image of the chosen phase.")
            if c not in test_cases:
                test_cases.append(c)
        case_pairs.append((mc, fc))
    rest = [s for s in subjects if s["case"] not in test_cases]
    n_train = len(rest) - num_val
    if num_val < 0 or num_val == 1 or n_train < 2:
        raise PrepareError(
            f"--num-val {num_val} leaves {n_train} training subjects of the {len(rest)} outside registration_val: "
            "need >= 2 training and 0 or >= 2 validation subjects."
        )
    training, validation = rest[:n_train], rest[n_train:]
    test = [by_case[c] for c in test_cases]
    return training, validation, test, [[test_cases.index(m), test_cases.index(f)] for m, f in case_pairs]


def build_datalist(args: argparse.Namespace) -> dict[str, Any]:
    """The datalist dict for ``args`` (see the module docstring)."""
    root = Path(os.path.abspath(Path(args.root).expanduser()))
    if not root.is_dir():
        raise PrepareError(f"--root {root} is not a folder. Download {RELEASE_HINT[args.task]} and unpack it there.")
    json_path = find_dataset_json(args.task, root, args.dataset_json)
    if json_path is None:
        subjects, raw = subjects_from_2020_lung(root, args.phase), {"name": "Learn2Reg 2020 task 2 lung CT"}
    else:
        subjects, raw = subjects_from_json(args.task, json_path, args.phase)
    labels = organ_labels(args.task, raw.get("labels"))
    n_train, n_test = PAPER_SPLIT[args.task]
    if args.split == "learn2reg":
        training, validation, test, test_pairs = learn2reg_split(subjects, raw, args.num_val)
    else:
        num_test = args.num_test if args.num_test is not None else n_test
        training, validation, test = paper_split(subjects, num_test, args.num_val)
        test_pairs = index_pairs(len(test))
    source = str(json_path or root)
    out: dict[str, Any] = {
        "name": f"learn2reg_{args.task}",
        "description": (
            f"Made by scripts/prepare_learn2reg.py from {raw.get('name', '?')} release {raw.get('release', '?')} "
            f"({source}); split '{args.split}': {len(training)} training, {len(validation)} validation, "
            f"{len(test)} test subjects (paper: {n_train} training, {n_test} test); subjects sorted by case id."
        ),
        "labels": {str(k): v for k, v in labels.items()},
    }
    for key, split in (("training", training), ("validation", validation), ("test", test)):
        if split:
            out[key] = [{"image": s["image"], "label": s["label"]} for s in split]
    if validation:
        out["validation_pairs"] = index_pairs(len(validation))
    out["test_pairs"] = test_pairs
    return out


def _relative(datalist: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Paths relative to ``folder`` (where the datalist lives)."""
    for key in ("training", "validation", "test"):
        for s in datalist.get(key, []):
            s["image"], s["label"] = (os.path.relpath(s[k], folder) for k in ("image", "label"))
    return datalist


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("task", choices=("abdomen", "lung"), help="which release")
    p.add_argument("--root", required=True, help="the unpacked release folder")
    p.add_argument("--out", required=True, type=Path, help="datalist JSON to write")
    p.add_argument("--dataset-json", default=None, help="name of the release's dataset JSON inside --root")
    p.add_argument("--phase", default=None, help="lung: breathing phase / time point suffix (e.g. 0000, exp)")
    p.add_argument("--split", choices=("paper", "learn2reg"), default="paper")
    p.add_argument("--num-test", type=int, default=None, help="test subjects (default: the paper's, 7 or 8)")
    p.add_argument("--num-val", type=int, default=2, help="validation subjects taken from the training subjects")
    p.add_argument("--relative", action="store_true", help="write paths relative to the output file's folder")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        datalist = build_datalist(args)
    except PrepareError as e:
        print(f"prepare_learn2reg: error: {e}", file=sys.stderr)
        return 2
    out = Path(os.path.abspath(args.out.expanduser()))
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.relative:
        datalist = _relative(datalist, out.parent)
    out.write_text(json.dumps(datalist, indent=1) + "\n")
    sizes = {k: len(datalist.get(k, [])) for k in ("training", "validation", "test", "test_pairs")}
    print(f"wrote {out}: {sizes}, labels {datalist['labels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
