"""The dictionary keys of ran-bundle's data, in one place (as MONAI keeps its keys in ``monai.utils.enums``).

A registration pair is a dict of MONAI arrays under :data:`PAIR_KEYS`; the training targets that some recipes add
to it are :data:`TRUE_DDF` (synthetic pretraining) and :data:`TEACHER_DDF` (distillation); a single volume before
it is deformed into a synthetic pair sits under :data:`IMAGE` and :data:`LABEL`.
"""

from __future__ import annotations

__all__ = [
    "MOVING_IMAGE",
    "FIXED_IMAGE",
    "MOVING_LABEL",
    "FIXED_LABEL",
    "PAIR_KEYS",
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "TRUE_DDF",
    "TEACHER_DDF",
    "IMAGE",
    "LABEL",
]

MOVING_IMAGE = "moving_image"
FIXED_IMAGE = "fixed_image"
MOVING_LABEL = "moving_label"
FIXED_LABEL = "fixed_label"
#: a pair's images and labels, moving before fixed
PAIR_KEYS = (MOVING_IMAGE, FIXED_IMAGE, MOVING_LABEL, FIXED_LABEL)
IMAGE_KEYS = PAIR_KEYS[:2]
LABEL_KEYS = PAIR_KEYS[2:]
TRUE_DDF = "true_ddf"
"""Key of a synthetic pair's true field ``(d, *S)``, voxels (:mod:`ran_bundle.synthetic`)."""
TEACHER_DDF = "teacher_ddf"
"""Key of a pair's teacher field ``(d, *S)``, voxels (:mod:`ran_bundle.distillation`)."""
IMAGE = "image"
"""Key of the single volume that :mod:`ran_bundle.synthetic` deforms into a pair."""
LABEL = "label"
"""Key of that volume's label map."""
