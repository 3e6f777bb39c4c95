"""MONAI Label app: atlas-based label propagation with the RAN registration bundle, as a segmentation task.

The app registers one infer task, ``ran_atlas``: MONAI Label's own
:class:`monailabel.tasks.infer.bundle.BundleInferTask` on this repository's bundle, pointed at
``configs/atlas_inference.json`` and ``configs/atlas_metadata.json`` instead of the registration
bundle's ``inference.json`` and ``metadata.json``. For an image of the studies folder it registers the
bundle's atlas to that image and returns the warped atlas labels (10 abdominal organs) on the image's
grid. See ``apps/monailabel/README.md`` for the commands.

Options (``--conf KEY VALUE`` of ``monailabel start_server``):

- ``bundle``: the bundle root (default: the repository root, two folders above this file);
- ``preload``: ``true`` to build the network on every device at start-up (default ``false``).
"""

from __future__ import annotations

import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

#: the name of the infer task (the ``model`` of MONAI Label's ``/infer/{model}`` request)
TASK_NAME = "ran_atlas"


class AtlasBundleConstants(BundleConstants):
    """The file names ``BundleInferTask`` reads for the atlas task (under ``<bundle>/configs``)."""

    def configs(self) -> list[str]:
        """The atlas label-propagation config, not the registration ``inference.json``."""
        return ["atlas_inference.json"]

    def metadata_json(self) -> str:
        """The task's metadata: first input = the user's CT, first output = the label map and its label names."""
        return "atlas_metadata.json"


def atlas_infer_task(bundle_root: str, conf: dict[str, str]) -> BundleInferTask:
    """MONAI Label's bundle infer task for atlas label propagation of the bundle at ``bundle_root``.

    Raises:
        RuntimeError: ``BundleInferTask`` rejected the bundle (it logs why: a config, ``models/model.pt``
            or the metadata file is missing).
    """
    task = BundleInferTask(bundle_root, conf, const=AtlasBundleConstants(), type=InferType.SEGMENTATION)
    if not task.is_valid():
        raise RuntimeError(f"{bundle_root} is not a valid RAN bundle for the atlas task (see the log above).")
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
            description="Abdominal organ labels of the RAN bundle's atlas, registered and warped onto each image",
        )

    def init_infers(self) -> dict[str, InferTask]:
        """One task: ``ran_atlas`` (segmentation)."""
        return {TASK_NAME: atlas_infer_task(self.bundle_root, self.conf)}
