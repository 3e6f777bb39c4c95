"""MONAI Label app: atlas-based label propagation with the RAN registration bundle, as a segmentation task.

The app registers one infer task, ``ran_atlas``: MONAI Label's own
:class:`monailabel.tasks.infer.bundle.BundleInferTask` on this repository's bundle, pointed at
``configs/atlas_inference.json`` and ``configs/atlas_metadata.json`` instead of the registration
bundle's ``inference.json`` and ``metadata.json``. For an image of the studies folder it registers the
atlas to that image with the bundle's registration pipeline (``ran_bundle.atlas``: affine stage, the
network, which MONAI Label runs, instance optimisation) and returns the warped atlas labels on the image's
grid, named by the atlas's label-names file. See ``apps/monailabel/README.md`` for the commands.

Options (``--conf KEY VALUE`` of ``monailabel start_server``):

- ``bundle``: the bundle root (default: the repository root, two folders above this file);
- ``preload``: ``true`` to build the network on every device at start-up (default ``false``);
- the keys of ``configs/atlas_inference.json`` in :data:`CONFIG_KEYS` (``atlas_image``, ``atlas_label``,
  ``atlas_label_names`` as file paths; ``intensity``, ``ct_window``, ``spacing``, ``affine_stage``,
  ``io_iterations``, ``io_weight``, ``io_fold_weight``, ``similarity``, ``io_start`` as JSON or text;
  ``moving_mask``, a mask of the atlas on its grid, and ``fixed_mask``, for studies that share one grid, as file
  paths), to serve another atlas or other settings.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

#: the name of the infer task (the ``model`` of MONAI Label's ``/infer/{model}`` request)
TASK_NAME = "ran_atlas"
#: keys of ``configs/atlas_inference.json`` that ``--conf`` may set
CONFIG_KEYS = (
    "atlas_image",
    "atlas_label",
    "atlas_label_names",
    "intensity",
    "ct_window",
    "spacing",
    "affine_stage",
    "io_iterations",
    "io_weight",
    "io_fold_weight",
    "similarity",
    "io_start",
    "fixed_mask",
    "moving_mask",
)
_PATH_KEYS = ("atlas_image", "atlas_label", "atlas_label_names", "fixed_mask", "moving_mask")


class AtlasBundleConstants(BundleConstants):
    """The file names ``BundleInferTask`` reads for the atlas task (under ``<bundle>/configs``)."""

    def configs(self) -> list[str]:
        """The atlas label-propagation config, not the registration ``inference.json``."""
        return ["atlas_inference.json"]

    def metadata_json(self) -> str:
        """The task's metadata: first input = the user's image, first output = the label map."""
        return "atlas_metadata.json"


def config_overrides(conf: Mapping[str, str]) -> dict[str, Any]:
    """The :data:`CONFIG_KEYS` of ``conf``: paths made absolute, other values parsed as JSON when they are."""
    out: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        if key not in conf:
            continue
        value = conf[key]
        if key in _PATH_KEYS:
            out[key] = os.path.realpath(value)
            continue
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def atlas_infer_task(bundle_root: str, conf: Mapping[str, str]) -> BundleInferTask:
    """MONAI Label's bundle infer task for atlas label propagation of the bundle at ``bundle_root``.

    The :data:`CONFIG_KEYS` of ``conf`` override the config; the task's label names are those of the
    config's ``label_names`` (read from the ``atlas_label_names`` file).

    Raises:
        RuntimeError: ``BundleInferTask`` rejected the bundle (it logs why: a config, ``models/model.pt``
            or the metadata file is missing).
    """
    task = BundleInferTask(bundle_root, dict(conf), const=AtlasBundleConstants(), type=InferType.SEGMENTATION)
    if not task.is_valid():
        raise RuntimeError(f"{bundle_root} is not a valid RAN bundle for the atlas task (see the log above).")
    for key, value in config_overrides(conf).items():
        task.bundle_config[key] = value
    sys.path.insert(0, bundle_root)  # the config imports ran_bundle (BundleInferTask does the same around parsing)
    try:
        names = task.bundle_config.get_parsed_content("label_names")
    finally:
        sys.path.remove(bundle_root)
    task.labels = {name: int(value) for value, name in names.items()}
    return task


class RanAtlasApp(MONAILabelApp):
    """MONAI Label app serving the ``ran_atlas`` segmentation task of the RAN bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_root = os.path.realpath(conf.get("bundle", os.path.join(app_dir, os.pardir, os.pardir)))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="RAN atlas label propagation",
            description="The atlas labels of the RAN bundle, registered and warped onto each image",
        )

    def init_infers(self) -> dict[str, InferTask]:
        """One task: ``ran_atlas`` (segmentation)."""
        return {TASK_NAME: atlas_infer_task(self.bundle_root, self.conf)}
