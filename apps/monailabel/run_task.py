"""Run the app's ``ran_atlas`` task once, without the server, the way ``monailabel start_server`` would.

Usage (in the MONAI Label environment, from the repository root)::

    .venv-monailabel/bin/python apps/monailabel/run_task.py --studies <folder of images> --image <image id> \\
        --out label.nii.gz [--device cpu] [--conf KEY VALUE ...]

It builds the app from ``apps/monailabel/main.py`` with MONAI Label's own loader
(``monailabel.interfaces.utils.app.app_instance``), checks that the task is MONAI Label's
``BundleInferTask``, runs ``app.infer({"model": "ran_atlas", "image": <id>})``, moves the label map
MONAI Label wrote (a temporary file) to ``--out`` and prints a JSON summary on stdout: the task class,
the label names, MONAI Label's latencies, the registration's figures and warnings (the ``result`` of
``ran_bundle.atlas.PropagateAtlasLabelsd``), and the written file's shape, affine (RAS) and label values.
``--conf KEY VALUE`` is the app's ``--conf`` (e.g. ``--conf atlas_image PATH --conf spacing 3``; see
``main.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import torch
from monailabel.interfaces.utils.app import app_instance
from monailabel.tasks.infer.bundle import BundleInferTask

APP_DIR = os.path.dirname(os.path.realpath(__file__))


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, run the task, write ``--out`` and return (and print) the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", required=True, help="folder of images (MONAI Label's local datastore)")
    parser.add_argument("--image", required=True, help="image id in the studies folder (file name without extension)")
    parser.add_argument("--out", required=True, help="where to copy the label map (.nii.gz)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bundle", default=None, help="bundle root (default: the repository root)")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app option (see main.py)"
    )
    args = parser.parse_args(argv)

    conf = dict(args.conf)
    if args.bundle:
        conf["bundle"] = args.bundle
    app = app_instance(app_dir=APP_DIR, studies=os.path.realpath(args.studies), conf=conf)
    task = app._infers["ran_atlas"]
    if not isinstance(task, BundleInferTask):
        raise TypeError(f"expected MONAI Label's BundleInferTask, got {type(task).__name__}")
    result = app.infer({"model": "ran_atlas", "image": args.image, "device": args.device})
    shutil.move(result["file"], args.out)  # MONAI Label's temporary result file
    img = nib.load(args.out)
    summary = {
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
        "config": task.bundle_config_path,
        "label_names": result["params"]["label_names"],
        "latencies": result["params"]["latencies"],
        "result": {k: v for k, v in result["params"].items() if k not in ("label_names", "latencies", "centroids")},
        "label_file": os.path.realpath(args.out),
        "shape": list(img.shape),
        "affine": img.affine.tolist(),
        "dtype": str(img.get_data_dtype()),
        "values": np.unique(np.asarray(img.dataobj)).tolist(),
    }
    print(json.dumps(summary, default=float))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
