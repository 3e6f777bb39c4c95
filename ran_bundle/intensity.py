"""Intensity scaling of one array, as the training transforms scale it (:mod:`ran_bundle.transforms`).

``ran-register`` scales its network grid with :func:`scale_intensity`. It is written with numpy rather than with
MONAI's ``ScaleIntensityRange`` and ``ScaleIntensityRangePercentiles``, which give the same values
(``tests/test_pipeline.py`` checks both): importing MONAI loads all of its submodules, about 4 s on 2 cores, a
sixth of a whole 1 mm brain registration that otherwise never uses MONAI (``docs/benchmark.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ran_bundle.defaults import CT_WINDOW

__all__ = ["INTENSITIES", "MR_PERCENTILES", "scale_intensity"]

#: ``"ct"``: a HU window -> [0, 1]; ``"mr"``: percentiles :data:`MR_PERCENTILES` -> [0, 1]; ``"none"``: unchanged
INTENSITIES = ("ct", "mr", "none")
#: the percentiles that ``"mr"`` maps to 0 and 1
MR_PERCENTILES = (0.5, 99.5)


def scale_intensity(array: np.ndarray, intensity: str, ct_window: Sequence[float] = CT_WINDOW) -> np.ndarray:
    """The intensity scaling of :func:`~ran_bundle.transforms.registration_transforms` for one array.

    ``"ct"``: the HU window ``ct_window`` (default [-100, 300], the abdomen's; [-1000, 300] keeps the lung
    parenchyma) -> [0, 1]; ``"mr"``: percentiles 0.5 and 99.5 -> [0, 1]; both clipped; ``"none"``: unchanged.
    A constant array (nothing in view) gives zeros.

    Args:
        array: ``(*spatial)`` image.
        intensity: one of :data:`INTENSITIES`.
        ct_window: ``(low, high)`` HU of ``"ct"``.

    Returns:
        ``(*spatial)`` float32.
    """
    if intensity not in INTENSITIES:
        raise ValueError(f"intensity must be one of {INTENSITIES}, got {intensity!r}.")
    x = np.asarray(array, dtype=np.float32)
    if intensity == "none":
        return x
    if float(x.max()) == float(x.min()):
        return np.zeros(x.shape, np.float32)  # nothing here (e.g. no overlap): the range would divide by zero
    if intensity == "ct":
        low, high = (float(v) for v in ct_window)
    else:
        low, high = (float(v) for v in np.percentile(x, MR_PERCENTILES))
    scaled = (x - low) / (high - low) if high > low else x - low  # MONAI's ScaleIntensityRange does the same
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
