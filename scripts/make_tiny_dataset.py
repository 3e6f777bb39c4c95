"""Build ``data/tiny_ct``: a tiny abdominal CT registration set from one real, Apache-2.0 scan.

Source: TotalSegmentator's example CT and its reference segmentation (``wasserth/TotalSegmentator``,
Apache-2.0), copied in ``<shared>/totalseg_example_ct/ts_example/`` (122 x 101 x 30 voxels, 3 mm,
RAS, int16 HU). Steps (deterministic for a given ``--seed``):

1. Crop to the abdomen block ``[4:116, 8:88, :]`` (112 x 80 x 30 voxels; every kept organ inside;
   the affine's origin is shifted accordingly, spacing and direction unchanged).
2. Keep 10 abdominal organs relabelled 1..10 (:data:`LABEL_MAP`), everything else 0.
3. Subject 0 = the real (cropped) scan. Subjects 1..N-1 = the real scan warped by a known smooth
   random field on the same grid, ``subject_k(x) = real(x + u_k(x))`` (voxel units, same convention
   as :mod:`ran_bundle.flow`): a small rigid motion about the volume centre (rotation mostly
   in-plane) plus a Gaussian-smoothed random displacement of a few voxels; the smooth part is
   shrunk until ``min det(I + grad u) >= 0.5`` (no folding). Images: trilinear, rounded to int16;
   labels: nearest neighbour, uint8; outside the volume the border is replicated.
4. Write ``images/subject_XX.nii.gz``, ``labels/subject_XX.nii.gz``, ``datalist.json`` (training:
   subjects 0-3, validation: 4-5) and ``README.md``.

Usage::

    python scripts/make_tiny_dataset.py [--source DIR] [--out data/tiny_ct] [--num-subjects 6] [--seed 20240]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.tiny_ct import random_field, warp_volume

REPO = Path(__file__).resolve().parents[1]

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "totalseg_example_ct" / "ts_example"
DEFAULT_OUT = REPO / "data" / "tiny_ct"
CROP = (slice(4, 116), slice(8, 88), slice(0, 30))

#: new label -> (TotalSegmentator v2 label, name); order of Learn2Reg AbdomenCTCT without the
#: esophagus (absent from the scan) and the adrenal glands.
LABEL_MAP: dict[int, tuple[int, str]] = {
    1: (1, "spleen"),
    2: (2, "kidney_right"),
    3: (3, "kidney_left"),
    4: (4, "gallbladder"),
    5: (5, "liver"),
    6: (6, "stomach"),
    7: (52, "aorta"),
    8: (63, "inferior_vena_cava"),
    9: (64, "portal_vein_and_splenic_vein"),
    10: (7, "pancreas"),
}


def save(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"ran-bundle tiny_ct"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    old_level = nib.openers.Opener.default_compresslevel
    nib.openers.Opener.default_compresslevel = 9  # smallest files (nibabel's default is 1)
    try:
        nib.save(img, tmp)
    finally:
        nib.openers.Opener.default_compresslevel = old_level
    os.replace(tmp, path)


README = """# tiny_ct: a tiny abdominal CT registration set (ran-bundle default data)

**Subjects 1-5 are synthetic deformations of one real scan (subject 0), not real inter-subject
data.** Use this set for smoke tests, CI and examples, never for reporting registration accuracy.

## Source, licence, attribution
- Image: `tests/reference_files/example_ct_sm.nii.gz` of TotalSegmentator (GitHub
  `wasserth/TotalSegmentator`, commit `e09dde7dd0067187c99536ccd1dd51e5c8a17926`): the project's
  real example abdominal CT, resampled by them to 3 mm and cropped to 30 slices.
- Labels: `tests/reference_files/example_seg.nii.gz` (commit `c78d8800af7fe05b8efb3c4ed939db16b6c0be62`),
  TotalSegmentator model output (task `total`, v2 class map), **not manual annotations**.
- Licence: Apache License 2.0 (TotalSegmentator). Attribution: Wasserthal J. et al.,
  "TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT Images",
  Radiology: Artificial Intelligence 2023. The derived files here (cropped, relabelled, deformed)
  are distributed under the same licence; changes are listed below.

## How it was made (`scripts/make_tiny_dataset.py --seed {seed}`, deterministic)
1. Crop voxels `[4:116, 8:88, 0:30]` of the 122 x 101 x 30 source: 112 x 80 x 30 voxels, 3 mm
   isotropic, RAS; the affine's origin is shifted by the crop, all subjects share one affine.
2. Keep 10 abdominal organs, relabelled 1..10 (table below); all other labels set to 0.
3. Subject 0 = the real scan. Subject k = 1..{last} = the real scan warped on the same grid by a known
   smooth random field, `subject_k(x) = real(x + u_k(x))` (voxel units): rigid motion about the volume
   centre (rotation up to 2 deg about the first two array axes and 6 deg in-plane, translation up to
   3/3/1 voxels) plus a Gaussian-smoothed (sigma 5 voxels) random displacement of at most 3/3/1
   voxels, shrunk until min det(Jacobian) >= 0.5 (no folding). Images trilinear (rounded to int16 HU),
   labels nearest neighbour (uint8); the border is replicated outside the volume. The true fields are
   not stored (rerun the script to get them).

## Label map (value: name, TotalSegmentator v2 value)
{label_table}

The paper's 9 abdominal organs are 1, 2, 3, 5, 7, 8, 9, 10 and the esophagus, which is not in this scan.

## Files
- `images/subject_XX.nii.gz` (int16 HU), `labels/subject_XX.nii.gz` (uint8), same affine.
- `datalist.json` (schema in `ran_bundle/data.py`): training = subjects 00-03, validation = 04-05
  (validation pairs = both ordered pairs).

## Subjects
| subject | kind | rotation (deg, axes 0/1/2) | translation (vox) | smooth amplitude (vox) | min detJ |
|---|---|---|---|---|---|
{subject_table}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with image.nii.gz, label.nii.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--num-subjects", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20240)
    args = parser.parse_args(argv)

    img_path, lab_path = args.source / "image.nii.gz", args.source / "label.nii.gz"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise SystemExit(f"source file not found: {p} (set --source to the totalseg_example_ct/ts_example folder)")
    if args.num_subjects < 6:
        raise SystemExit(f"--num-subjects must be >= 6 (4 training + 2 validation), got {args.num_subjects}")

    src = nib.load(str(img_path))
    lab_src = nib.load(str(lab_path))
    if not np.allclose(src.affine, lab_src.affine) or src.shape != lab_src.shape:
        raise SystemExit(f"image and label grids differ: {img_path} vs {lab_path}")
    image = np.asarray(src.dataobj, dtype=np.float64)[CROP]
    label_ts = np.asarray(lab_src.dataobj)[CROP]
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([c.start for c in CROP]) + src.affine[:3, 3]

    label = np.zeros(label_ts.shape, np.uint8)
    for new, (old, name) in LABEL_MAP.items():
        n_src = int((np.asarray(lab_src.dataobj) == old).sum())
        n_kept = int((label_ts == old).sum())
        if n_kept == 0:
            raise SystemExit(f"label {old} ({name}) not found in the cropped scan")
        if n_kept != n_src:
            raise SystemExit(f"crop cuts label {old} ({name}): {n_kept} of {n_src} voxels kept")
        label[label_ts == old] = new

    rng = np.random.default_rng(args.seed)
    out = args.out
    rows = []
    subjects = []
    for k in range(args.num_subjects):
        if k == 0:
            img_k, lab_k = image, label
            rows.append("| subject_00 | real scan | - | - | - | 1 |")
        else:
            u, prm = random_field(image.shape, rng)
            img_k = np.round(warp_volume(image, u, order=1))
            lab_k = warp_volume(label, u, order=0)
            rows.append(
                f"| subject_{k:02d} | synthetic deformation of subject_00 | {prm['rotation_deg']} | "
                f"{prm['translation_vox']} | {prm['smooth_amplitude_vox']} | {prm['min_detJ']} |"
            )
        name = f"subject_{k:02d}.nii.gz"
        save(img_k, affine, out / "images" / name, np.int16)
        save(lab_k, affine, out / "labels" / name, np.uint8)
        subjects.append({"image": f"images/{name}", "label": f"labels/{name}"})

    datalist = {
        "name": "tiny_ct",
        "description": "1 real abdominal CT (TotalSegmentator example, Apache-2.0) + synthetic deformations of it",
        "labels": {str(k): v[1] for k, v in LABEL_MAP.items()},
        "training": subjects[:4],
        "validation": subjects[4:6],
    }
    if len(subjects) > 6:
        datalist["test"] = subjects[6:]
    (out / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
    label_table = "\n".join(f"- {k}: {name} ({old})" for k, (old, name) in LABEL_MAP.items())
    readme = README.replace("{seed}", str(args.seed)).replace("{last}", str(args.num_subjects - 1))
    readme = readme.replace("{label_table}", label_table).replace("{subject_table}", "\n".join(rows))
    (out / "README.md").write_text(readme)
    print(f"wrote {args.num_subjects} subjects to {out}")


if __name__ == "__main__":
    main()
