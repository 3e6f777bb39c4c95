"""MONAI Deploy application: register a moving NIfTI image to a fixed one with the RAN bundle's pipeline.

Operators (a Holoscan graph, run on CPU or GPU)::

    PairInputOperator --pair--> RegistrationOperator --registration--> RegistrationWriterOperator

1. :class:`PairInputOperator` finds ``fixed.nii[.gz]`` and ``moving.nii[.gz]`` (and, when present,
   ``fixed_label.nii[.gz]`` and ``moving_label.nii[.gz]``) in the input folder and sends their paths.
2. :class:`RegistrationOperator` runs :meth:`ran_bundle.pipeline.RegistrationPipeline.register` on them,
   the same steps as ``ran-register`` and ``configs/inference.json``: check the inputs, affine stage
   (SimpleITK), resampling onto the network grid (the fixed image's foreground at ``--spacing`` mm),
   the network, instance optimisation of the field, and the whole mapping on the fixed image's grid.
   The network is the exported TorchScript bundle ``models/model.ts`` (``-m``), loaded with
   ``torch.jit.load``: no ``ran_bundle`` network code runs at inference; the pipeline itself comes from the
   ``ran_bundle`` package installed in the app's environment.
3. :class:`RegistrationWriterOperator` writes the pipeline's outputs into the output folder, as
   ``ran-register --out`` does (:class:`ran_bundle.outputs.OutputFolder`: checked before any work, locked,
   only this run's files): ``warped.nii.gz``, ``ddf.nii.gz`` (ONE ITK displacement field, the whole
   mapping, affine included), ``affine.tfm``, ``jacobian.nii.gz``, ``warped_label.nii.gz`` with a moving
   label, ``inverse_ddf.nii.gz`` with ``--inverse``, and ``report.json``.

Run (in the environment made by ``scripts/make_deploy_env.sh``)::

    python deploy/app.py -i INPUT_DIR -o OUTPUT_DIR -m models/model.ts [--intensity mr] [--spacing 2] ...

``-i``/``-o``/``-m`` are the MONAI Deploy App SDK's options (also ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH``). This app's own options (defaults: those of
:class:`~ran_bundle.pipeline.RegistrationPipeline`, which match the shipped brain MR weights) are listed by
``--help``. A bad option, input file or output folder stops the app before any work with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Operator, OperatorSpec

from ran_bundle.cli import add_pipeline_options, pipeline_options
from ran_bundle.inputs import InputError, resolve_device
from ran_bundle.outputs import OutputFolder, write_json
from ran_bundle.pipeline import Registration, RegistrationPipeline

#: file stems looked for in the input folder (the labels are optional)
INPUT_STEMS = ("fixed", "moving", "fixed_label", "moving_label")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
TOOL = "ran-deploy-app"

logger = logging.getLogger(__name__)


def find_nifti(folder: Path, stem: str, required: bool = True) -> Path | None:
    """``folder/<stem>.nii.gz`` or ``folder/<stem>.nii``; ``None`` when neither exists and not ``required``.

    Raises:
        InputError: a required file is missing (the message names both names looked for).
    """
    for suffix in NIFTI_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    if required:
        raise InputError(f"input folder {folder} has no {stem}.nii.gz or {stem}.nii.")
    return None


def find_inputs(folder: str | os.PathLike) -> dict[str, str]:
    """The input files of a registration in ``folder``: ``{"fixed", "moving"[, "fixed_label", "moving_label"]}``.

    Raises:
        InputError: ``folder`` is not a folder, or ``fixed``/``moving`` is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"-i {folder}: not a folder.")
    found = {stem: find_nifti(folder, stem, required=stem in ("fixed", "moving")) for stem in INPUT_STEMS}
    return {stem: str(path) for stem, path in found.items() if path is not None}


def load_torchscript(path: str | os.PathLike, device: torch.device) -> torch.jit.ScriptModule:
    """The exported bundle network (``models/model.ts``) in eval mode on ``device``.

    Raises:
        InputError: ``path`` is not a file or not a TorchScript archive.
    """
    if not Path(path).is_file():
        raise InputError(f"-m {path}: not a file; expected the exported bundle, e.g. models/model.ts.")
    try:
        return torch.jit.load(os.fspath(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"-m {path}: cannot load it as a TorchScript model ({first}).") from None


class PairInputOperator(Operator):
    """Find the pair's files in the input folder (``-i``).

    Named outputs:
        pair: ``{"fixed": path, "moving": path[, "fixed_label": path, "moving_label": path]}``.
    """

    def __init__(self, fragment: Fragment, *args: Any, app_context: AppContext, **kwargs: Any) -> None:
        self.app_context = app_context
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("pair")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        pair = find_inputs(self.app_context.input_path)
        logger.info("inputs: %s", pair)
        op_output.emit(pair, "pair", "PyObject")


class RegistrationOperator(Operator):
    """Register the pair with :meth:`RegistrationPipeline.register` (affine, network, instance optimisation,
    whole mapping on the fixed grid).

    Named inputs:
        pair: the paths of :class:`PairInputOperator`.

    Named outputs:
        registration: the :class:`~ran_bundle.pipeline.Registration` (fields and warped images as tensors on the
            fixed image's grid, figures, warnings, timings).

    Args:
        pipeline: the configured pipeline (its network: the TorchScript bundle).
    """

    def __init__(self, fragment: Fragment, *args: Any, pipeline: RegistrationPipeline, **kwargs: Any) -> None:
        self.pipeline = pipeline
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pair")
        spec.output("registration")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        pair = op_input.receive("pair")
        registration = self.pipeline.register(
            pair["fixed"], pair["moving"], pair.get("fixed_label"), pair.get("moving_label")
        )
        op_output.emit(registration, "registration", "PyObject")


class RegistrationWriterOperator(Operator):
    """Write the registration's files and its report into the output folder (``-o``).

    Named inputs:
        registration: the :class:`~ran_bundle.pipeline.Registration` of :class:`RegistrationOperator`.

    Args:
        pipeline: the pipeline that made the registration (its :meth:`~RegistrationPipeline.write` and
            :meth:`~RegistrationPipeline.report`).
        folder: the output folder, already acquired (checked and locked) by :func:`main`.
        arguments: the app's options, recorded in ``report.json``.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        pipeline: RegistrationPipeline,
        folder: OutputFolder,
        arguments: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        self.pipeline = pipeline
        self.folder = folder
        self.arguments = arguments
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("registration")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        registration: Registration = op_input.receive("registration")
        with self.folder.stage() as staging:
            outputs = self.pipeline.write(registration, staging)
            write_json(staging / outputs["report"], self.pipeline.report(registration, outputs, self.arguments))
        logger.info("wrote %s into %s", ", ".join(self.folder.written), self.folder.path)


class RegistrationApp(Application):
    """Deformable registration of ``moving`` to ``fixed`` with the RAN bundle's pipeline.

    Args:
        argv: the script and the MONAI Deploy App SDK's options (``-i``, ``-o``, ``-m``, ``-l``, ...).
        pipeline: the configured pipeline.
        folder: the acquired output folder.
        arguments: the app's options, for the report.
    """

    def __init__(
        self, argv: Sequence[str], pipeline: RegistrationPipeline, folder: OutputFolder, arguments: dict[str, Any]
    ) -> None:
        self.pipeline = pipeline
        self.folder = folder
        self.arguments = arguments
        super().__init__([sys.executable, *argv])  # Holoscan drops the interpreter: ``self.argv`` is ``argv``

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        inputs = PairInputOperator(self, CountCondition(self, 1), app_context=app_context, name="pair_input")
        register = RegistrationOperator(self, pipeline=self.pipeline, name="registration")
        writer = RegistrationWriterOperator(
            self, pipeline=self.pipeline, folder=self.folder, arguments=self.arguments, name="writer"
        )
        self.add_flow(inputs, register, {("pair", "pair")})
        self.add_flow(register, writer, {("registration", "registration")})


def app_parser() -> argparse.ArgumentParser:
    """This app's own options (the SDK's ``-i``, ``-o``, ``-m``, ``-l`` pass through)."""
    p = argparse.ArgumentParser(
        prog="deploy/app.py", description=__doc__.splitlines()[0], add_help=False, allow_abbrev=False
    )
    p.add_argument("--help", action="help", help="this app's options (-i IN -o OUT -m model.ts are the SDK's)")
    add_pipeline_options(p)  # the same options, names and defaults as ran-register
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _sdk_paths(argv: Sequence[str]) -> tuple[str, str, str]:
    """The input folder, output folder and model path that the SDK's ``AppContext`` will hold: its options
    (``-i``, ``-o``, ``-m``, parsed by its own parser, which creates a missing output folder) or, failing
    those, its environment variables and defaults (:class:`monai.deploy.core.RuntimeEnv`)."""
    from monai.deploy.core import RuntimeEnv, parse_args

    args, env = parse_args(list(argv)), RuntimeEnv()  # argv[0]: the script, as in compose()
    return (
        os.fspath(args.input or env.input),
        os.fspath(args.output or env.output),
        os.fspath(args.model or env.model),
    )


def _fail(message: Any, status: int = 2) -> NoReturn:
    print(f"{TOOL}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Check this app's options, the inputs, the model and the output folder, then run the application.

    Exit status 2 with one line on stderr for a bad option, input, model or output folder (before any work),
    1 when the registration itself failed (the log says why; nothing is written)."""
    argv = list(sys.argv if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    own, rest = app_parser().parse_known_args(argv[1:])
    try:
        input_path, output_path, model_path = _sdk_paths([argv[0], *rest])
        files = find_inputs(input_path)  # a missing folder or file is refused before any work
        device = resolve_device(own.device)
        pipeline = RegistrationPipeline(
            weights=model_path,
            device=str(device),
            network=load_torchscript(model_path, device),
            **pipeline_options(own),
        )
        pipeline.check_inputs(files["fixed"], files["moving"], files.get("fixed_label"), files.get("moving_label"))
        folder = OutputFolder(output_path, tool=TOOL).acquire()
    except InputError as e:
        _fail(e)
    arguments = {**vars(own), "input": input_path, "output": output_path, "model": model_path}
    try:
        RegistrationApp([argv[0], *rest], pipeline, folder, arguments).run()
    finally:
        folder.release()
    if not folder.written:  # Holoscan logs an operator's exception and stops the graph
        _fail("the registration failed; nothing was written (see the log above).", status=1)
    logger.info("done in %.1f s: %s", sum(pipeline.timings.values()), output_path)


if __name__ == "__main__":
    main()
