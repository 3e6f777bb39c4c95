"""The registration pipeline's default settings, defined once.

:class:`ran_bundle.pipeline.RegistrationPipeline` takes its keyword defaults from :data:`PIPELINE_DEFAULTS`; so
do the options of ``ran-register`` and the MONAI Deploy app (:func:`ran_bundle.cli.add_pipeline_options`) and
the inference configs (``configs/inference.json``, ``configs/atlas_inference.json``:
``"$from ran_bundle.defaults import PIPELINE_DEFAULTS"`` in ``imports``, then ``"$PIPELINE_DEFAULTS.io_weight"``).
They fit the shipped brain MR weights (``models/model.pt``: MR percentile scaling at 2 mm). Plain Python,
without torch or MONAI, so that the command line's ``--help`` and its one-line errors do not wait for them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CT_WINDOW", "PRESET_NAMES", "PipelineDefaults", "PIPELINE_DEFAULTS"]

#: the HU window that intensity ``"ct"`` maps to [0, 1] unless told otherwise: the abdomen's (the paper's);
#: the lungs need [-1000, 300] (``configs/lung_ct.json``)
CT_WINDOW = (-100.0, 300.0)


#: the names of :data:`ran_bundle.networks.PRESETS` (a test keeps them equal), so that a wrong ``--preset`` is refused
#: without importing the network, which a run from the affine stage alone never builds
PRESET_NAMES = ("ref", "RAn0", "RAn3", "RAn4", "RAn4+")


@dataclass(frozen=True)
class PipelineDefaults:
    """Default arguments of :class:`~ran_bundle.pipeline.RegistrationPipeline` (see it for their meaning)."""

    preset: str = "ref"
    spacing: float = 2.0
    intensity: str = "mr"
    ct_window: tuple[float, float] = CT_WINDOW
    affine: str = "affine"
    #: instance optimisation from the affine stage alone, not from the network's field: on the 6 held-out 1 mm
    #: brain pairs it scored Dice 0.635 against 0.626 in 16.7 s against 23.3 s (docs/results/brain_040), on 3
    #: validation pairs 0.640 against 0.633, and across a synthetic contrast (MIND) 0.527 against 0.526
    io_start: str = "zero"
    #: from zero on 6 validation brain pairs at 1 mm: (8, 10) 0.620, (12, 16) 0.626, (15, 20) 0.628,
    #: (20, 25) 0.630, (30, 40) 0.633 at about twice (20, 25)'s time (docs/benchmark.md)
    io_iterations: tuple[int, int] = (20, 25)
    io_weight: float = 10.0
    io_fold_weight: float = 50.0
    finetune_steps: int = 0
    finetune_lr: float = 1e-4


#: the defaults, for the shipped brain MR weights
PIPELINE_DEFAULTS = PipelineDefaults()
