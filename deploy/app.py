"""MONAI Deploy application: register a moving NIfTI image to a fixed one with the RAN bundle.

Operators (a Holoscan graph, run on CPU or GPU)::

    PairLoaderOperator --image--> RegistrationBundleInferenceOperator --pred--> RegistrationWriterOperator
            \\-----------------------------------pair---------------------------------------/

1. :class:`PairLoaderOperator` reads ``fixed.nii[.gz]`` and ``moving.nii[.gz]`` from the input folder and
   applies the bundle's own ``preprocessing`` item, parsed from the ``inference.json`` embedded in the
   exported model (``models/model.ts``), so the pair is prepared exactly as
   ``python -m monai.bundle run inference --config_file configs/inference.json`` prepares it. It sends the
   network input ``image`` ``(2, *S)`` (moving and fixed stacked as channels) and the pair itself.
2. :class:`RegistrationBundleInferenceOperator` is MONAI Deploy's ``MonaiBundleInferenceOperator`` running
   the exported bundle (the TorchScript ``model.ts`` with its embedded ``metadata.json``): it feeds the
   metadata input ``image`` to the network and sends the metadata output ``pred``, the DDF ``(3, *S)``.
3. :class:`RegistrationWriterOperator` writes, on the preprocessed fixed grid and with its affine (what
   ``inference.json`` writes): ``warped.nii.gz`` (moving image warped onto the fixed grid, float32) and
   ``ddf.nii.gz`` (displacement field in mm, ITK's convention, see :mod:`ran_bundle.fields`).

Run (in the environment made by ``scripts/make_deploy_env.sh``)::

    python deploy/app.py -i INPUT_DIR -o OUTPUT_DIR -m models/model.ts [--intensity mr] [--spacing 2]

``-i``/``-o``/``-m`` are the MONAI Deploy App SDK's options (also ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``); ``--intensity`` and ``--spacing`` override the
bundle config keys of the same names (default: the values in the embedded ``inference.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    IOMapping,
    MonaiBundleInferenceOperator,
    get_bundle_config,
)

from ran_bundle.data import PAIR_KEYS
from ran_bundle.fields import warp_image, write_displacement_nifti, write_image_atomic
from ran_bundle.register import INTENSITIES, parse_spacing

MOVING, FIXED = PAIR_KEYS[:2]
NIFTI_SUFFIXES = (".nii.gz", ".nii")

logger = logging.getLogger(__name__)


def find_nifti(folder: Path, stem: str) -> Path:
    """``folder/<stem>.nii.gz`` or ``folder/<stem>.nii``.

    Raises:
        FileNotFoundError: neither exists (the message names both).
    """
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"input folder {folder} has no {stem}.nii.gz or {stem}.nii.")


class PairLoaderOperator(Operator):
    """Read the fixed and moving NIfTI files and preprocess them with the bundle's ``preprocessing``.

    Named outputs:
        image: ``(2, *S)`` float32 ``MetaTensor``, channel 0 = moving, channel 1 = fixed (the network input
            ``network_data_format.inputs.image``), every size of ``S`` a multiple of 16.
        pair: ``{"moving_image": (1, *S), "fixed_image": (1, *S)}`` preprocessed ``MetaTensor`` s; the
            fixed one's ``.affine`` is the RAS voxel-to-world matrix of the output grid.

    Args:
        fragment: the application.
        app_context: gives the input folder (``-i``) and the bundle (``-m``).
        overrides: bundle config values to set before parsing ``preprocessing`` (e.g. ``{"intensity": "mr"}``).
    """

    def __init__(
        self, fragment: Fragment, *args: Any, app_context: AppContext, overrides: dict[str, Any], **kwargs: Any
    ) -> None:
        self.app_context = app_context
        self.overrides = overrides
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("pair")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        folder = Path(self.app_context.input_path)
        files = {MOVING: str(find_nifti(folder, "moving")), FIXED: str(find_nifti(folder, "fixed"))}
        parser = get_bundle_config(self.app_context.model_path, "inference")
        for key, value in self.overrides.items():
            parser[key] = value
        pair = parser.get_parsed_content("preprocessing")(files)
        pair = {key: pair[key] for key in (MOVING, FIXED)}
        logger.info("preprocessed %s -> %s: shape %s", files[MOVING], files[FIXED], tuple(pair[FIXED].shape[1:]))
        # "PyObject": send the MetaTensors as they are (Holoscan would convert tensors to its own type)
        op_output.emit(torch.cat([pair[MOVING], pair[FIXED]], dim=0), "image", "PyObject")
        op_output.emit(pair, "pair", "PyObject")


class RegistrationBundleInferenceOperator(MonaiBundleInferenceOperator):
    """``MonaiBundleInferenceOperator`` exchanging tensors with the operators of this app.

    The stock operator maps the metadata type ``image`` to the SDK's ``Image``: inputs are converted from
    it and outputs become single-channel ``uint8`` ``(D, H, W)`` volumes for DICOM SEG writers, which would
    destroy a float32 3-channel displacement field. Here ``image`` maps to ``torch.Tensor``: the input
    ``image`` is used as received and the output ``pred`` is sent as a float32 numpy array ``(3, *S)``.

    The pair arrives already preprocessed by the bundle's own ``preprocessing`` (:class:`PairLoaderOperator`;
    that pipeline reads two images, the network takes their stack), so :meth:`pre_process` passes it on.
    """

    known_io_data_types = {**MonaiBundleInferenceOperator.known_io_data_types, "image": torch.Tensor}

    def pre_process(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Return ``data`` (``{"image": (2, *S)}``) unchanged."""
        return data


class RegistrationWriterOperator(Operator):
    """Write the warped moving image and the displacement field as NIfTI on the fixed grid.

    Named inputs:
        pred: ``(3, *S)`` float32 DDF in voxels of the preprocessed fixed grid
            (``warped(x) = moving(x + pred(x))``).
        pair: the preprocessed pair of :class:`PairLoaderOperator`.

    Files (in the output folder ``-o``): ``warped.nii.gz`` and ``ddf.nii.gz``, as the bundle's
    ``RegistrationWriter`` writes ``<pair>_warped.nii.gz`` and ``<pair>_ddf.nii.gz``.
    """

    def __init__(self, fragment: Fragment, *args: Any, app_context: AppContext, **kwargs: Any) -> None:
        self.app_context = app_context
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("pair")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        ddf = torch.as_tensor(np.asarray(op_input.receive("pred")), dtype=torch.float32)[None]  # (1, 3, *S)
        pair = op_input.receive("pair")
        affine = pair[FIXED].affine
        out = Path(self.app_context.output_path)
        out.mkdir(parents=True, exist_ok=True)
        warped = warp_image(pair[MOVING][None].float(), ddf)  # (1, 1, *S)
        write_image_atomic(warped[0, 0].numpy(), affine, out / "warped.nii.gz", "float32")
        write_displacement_nifti(ddf.numpy(), affine, out / "ddf.nii.gz")
        logger.info("wrote %s and %s", out / "warped.nii.gz", out / "ddf.nii.gz")


class RegistrationApp(Application):
    """Deformable registration of a moving to a fixed NIfTI image with the RAN bundle.

    Args:
        argv: the script and the MONAI Deploy App SDK's options (``-i``, ``-o``, ``-m``, ``-l``, ...).
        overrides: bundle config values for the preprocessing (keys ``intensity``, ``spacing``).
    """

    def __init__(self, argv: Sequence[str], overrides: dict[str, Any]) -> None:
        self.overrides = overrides
        super().__init__([sys.executable, *argv])  # Holoscan drops the interpreter: ``self.argv`` is ``argv``

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        if not Path(app_context.model_path).is_file():
            raise ValueError(f"-m {app_context.model_path}: expected the exported bundle, e.g. models/model.ts.")
        loader = PairLoaderOperator(
            self, CountCondition(self, 1), app_context=app_context, overrides=self.overrides, name="pair_loader"
        )
        infer = RegistrationBundleInferenceOperator(
            self,
            app_context=app_context,
            input_mapping=[IOMapping("image", torch.Tensor, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", torch.Tensor, IOType.IN_MEMORY)],
            name="bundle_inference",
        )
        writer = RegistrationWriterOperator(self, app_context=app_context, name="writer")
        self.add_flow(loader, infer, {("image", "image")})
        self.add_flow(infer, writer, {("pred", "pred")})
        self.add_flow(loader, writer, {("pair", "pair")})


def main(argv: Sequence[str] | None = None) -> None:
    """Parse this app's options (``--intensity``, ``--spacing``), hand the rest to the SDK and run."""
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--intensity", choices=INTENSITIES, help="bundle key 'intensity' (default: the config's)")
    parser.add_argument("--spacing", nargs="+", help="bundle key 'spacing' in mm: 'none', 1 or 3 numbers")
    own, rest = parser.parse_known_args(argv[1:])
    overrides: dict[str, Any] = {}
    if own.intensity is not None:
        overrides["intensity"] = own.intensity
    if own.spacing is not None:
        spacing = parse_spacing(" ".join(own.spacing))
        overrides["spacing"] = None if spacing is None else list(spacing)
    RegistrationApp([argv[0], *rest], overrides).run()


if __name__ == "__main__":
    main()
