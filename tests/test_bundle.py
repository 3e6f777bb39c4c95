"""End-to-end tests of the MONAI bundle: the real ``python -m monai.bundle`` CLI in subprocesses.

One tiny training run (module-scoped fixture) serves the evaluation, inference and export tests.
Every output goes to pytest's tmp folders (``--ckpt_dir``/``--output_dir`` overrides); the
repository is only read. Sizes are tiny so the module runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
TRAIN = "configs/train.json"
EVALUATE = "configs/evaluate.json"
INFERENCE = "configs/inference.json"
META = "configs/metadata.json"
ROI = [32, 32, 16]
SPATIAL = [64, 48, 16]  # eval/inference centre pad/crop, keeps the full-resolution passes short
#: overrides of the tiny training runs: small crops and eval size, no progress bar
TINY_TRAINING = {"roi_size": ROI, "spatial_size": SPATIAL, "progress_bar": False}


def bundle(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle *args`` from the repository root; fail with the output tail."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"monai.bundle {args[0]} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def cli_value(value: Any) -> str:
    """A config override as ``monai.bundle`` reads it: lists as JSON without spaces, anything else ``str``."""
    return json.dumps(value).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)


def bundle_run(
    workflow: str | None, config_file: str, output_dir: Path, **overrides: Any
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [workflow]`` of ``config_file`` with this repository as the bundle root.

    Args:
        workflow: the config key to run (``"training"``), ``None`` for the config's default ``"run"``.
        config_file: one config or a :func:`merged` list of them.
        output_dir: the ``--output_dir`` override.
        overrides: more ``--key value`` overrides (values converted by :func:`cli_value`).
    """
    args = ["run", *([workflow] if workflow else []), "--config_file", config_file, "--bundle_root", str(REPO)]
    args += ["--output_dir", str(output_dir)]
    for key, value in overrides.items():
        args += [f"--{key}", cli_value(value)]
    return bundle(*args)


def merged(*files: str) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path | str]:
    """One tiny training run: 1 epoch of 2 random pairs, validation on the 2 tiny_ct validation pairs."""
    root = tmp_path_factory.mktemp("bundle")
    ckpt_dir, out_dir = root / "models", root / "train_out"
    proc = bundle_run("training", TRAIN, out_dir, ckpt_dir=ckpt_dir, num_epochs=1, pairs_per_epoch=2, **TINY_TRAINING)
    return {"root": root, "ckpt_dir": ckpt_dir, "out_dir": out_dir, "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="module")
def evaluated(trained) -> Path:
    out = trained["root"] / "evaluate"
    bundle_run(None, merged(TRAIN, EVALUATE), out, ckpt_dir=trained["ckpt_dir"], spatial_size=SPATIAL)
    return out


@pytest.fixture(scope="module")
def inferred(trained) -> Path:
    """inference.json (the registration pipeline) on the tiny_ct validation pairs with the tiny trained weights:
    CT intensities at 3 mm, no instance optimisation (the brain-weights defaults are overridden)."""
    out = trained["root"] / "inference"
    bundle_run(
        None,
        INFERENCE,
        out,
        ckpt_path=trained["ckpt_dir"] / "model.pt",
        datalist=REPO / "data" / "tiny_ct" / "datalist.json",
        pairs_key="validation_pairs",
        intensity="ct",
        spacing=3.0,
        io_iterations=[0, 0],
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    """The tiny_ct validation pairs, preprocessed like evaluation/inference (``spatial_size=SPATIAL``)."""
    from ran_bundle.data import load_datalist
    from ran_bundle.transforms import registration_transforms

    data = load_datalist(REPO / "data" / "tiny_ct" / "datalist.json")
    xform = registration_transforms(mode="eval", spacing=None, intensity="ct", spatial_size=SPATIAL)
    out = []
    for p in data["validation_pairs"]:
        item = xform(dict(p))
        stem = lambda f: Path(f).name.replace(".nii.gz", "")  # noqa: E731
        item["name"] = f"{stem(p['moving_image'])}_to_{stem(p['fixed_image'])}"
        out.append(item)
    return out


def inference_folders(inferred: Path) -> list[Path]:
    """The pair folders of inference.json (``<row>_<fixed>__<moving>``, ran_bundle.batch), in row order."""
    return sorted(p for p in inferred.iterdir() if p.is_dir())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- metadata -----------------------------------------------------------------------------------


def test_metadata_is_one_file_and_changelog_has_version():
    root_meta = REPO / "metadata.json"
    assert root_meta.is_symlink(), "metadata.json at the repo root must be a symlink"
    assert root_meta.resolve() == (REPO / META).resolve()
    meta = json.loads((REPO / META).read_text())
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 2
    assert fmt["outputs"]["pred"]["num_channels"] == 3


# --- training, evaluation, inference ------------------------------------------------------------


def test_training_writes_checkpoints_and_logs_loss(trained):
    ckpt_dir = trained["ckpt_dir"]
    assert (ckpt_dir / "model.pt").is_file(), "best checkpoint (by val_mean_dice) missing"
    assert (ckpt_dir / "model_last.pt").is_file(), "last (resumable) checkpoint missing"
    last = torch.load(ckpt_dir / "model_last.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(last)
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"] == 2  # the 1 epoch of 2 pairs
    assert not list(ckpt_dir.glob(".*.tmp")), "a temporary checkpoint file was left behind"
    assert "train_loss" in trained["log"]
    assert "val_mean_dice" in trained["log"]
    # the run tells what it saved and where, and the Dice of no registration to judge validation against
    log = trained["log"]
    assert "validation Dice with no registration (identity)" in log
    assert (
        f"Best model: {ckpt_dir / 'model.pt'}" in log
        and f"Last state (resume with --resume True): {ckpt_dir / 'model_last.pt'}" in log
    )
    assert "TensorBoard logs:" in log


def test_evaluation_csv(evaluated, pairs):
    rows = read_csv(evaluated / "metrics_per_pair.csv")
    assert (evaluated / "metrics_summary.csv").is_file()
    for key in ("pair", "label", "dice", "hd95", "hd", "asd", "non_pos_jac_count", "non_pos_jac_percent", "sdlogj"):
        assert key in rows[0]
    assert {r["pair"] for r in rows} == {p["name"] for p in pairs}
    for p in pairs:
        labels = {r["label"] for r in rows if r["pair"] == p["name"]}
        present = {str(int(v)) for v in np.unique(p["fixed_label"].numpy()) if v != 0}
        assert present <= labels and {"mean", "all"} <= labels
    dices = [float(r["dice"]) for r in rows if r["label"] != "all"]
    assert all(0.0 <= d <= 1.0 for d in dices if not math.isnan(d))


def test_inference_outputs(inferred):
    """inference.json writes each pair's outputs on the fixed image's own grid (as read from the file), the
    affine stage as an ITK transform file, a report per pair and a summary."""
    from ran_bundle.data import load_datalist

    data = load_datalist(REPO / "data" / "tiny_ct" / "datalist.json")
    for folder, raw in zip(inference_folders(inferred), data["validation_pairs"], strict=True):
        files = {k: folder / f"{k}.nii.gz" for k in ("warped", "warped_label", "ddf", "jacobian")}
        for path in files.values():
            assert path.is_file(), path
        assert sitk.ReadTransform(str(folder / "affine.tfm")).IsLinear()
        report = json.loads((folder / "report.json").read_text())
        assert report["inputs"]["fixed"]["path"] == raw["fixed_image"]
        fixed = nib.load(raw["fixed_image"])
        for k in ("warped", "warped_label", "jacobian"):
            img = nib.load(files[k])
            assert img.shape[:3] == fixed.shape[:3]
            np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-4, err_msg=k)
        warped_values = set(np.unique(np.asarray(nib.load(files["warped_label"]).dataobj)).tolist())
        moving_values = set(np.unique(np.asarray(nib.load(raw["moving_label"]).dataobj)).astype(int).tolist())
        assert warped_values <= moving_values
        assert np.isfinite(np.asarray(nib.load(files["jacobian"]).dataobj)).all()
        ddf = sitk.ReadImage(str(files["ddf"]))
        assert ddf.GetNumberOfComponentsPerPixel() == 3 and ddf.GetSize() == fixed.shape[:3]
    summary = read_csv(inferred / "summary.csv")
    assert [r["name"] for r in summary] == [f.name for f in inference_folders(inferred)]
    assert {r["status"] for r in summary} == {"done"}


def test_inference_warns_when_the_setup_differs_from_the_weights(inferred):
    """The tiny run above scales CT at 3 mm with brain-MR-trained settings recorded in inference.json (``mr`` at
    2 mm): every report says both."""
    reports = sorted(inferred.glob("*/report.json"))
    assert reports
    for path in reports:
        warnings = json.loads(path.read_text())["warnings"]
        expected = (
            "intensity 'ct' differs from the 'mr' the weights",
            "network grid spacing [3.0, 3.0, 3.0] mm differs from the 2.0 mm",
        )
        assert [sum(w.startswith(start) for w in warnings) for start in expected] == [1, 1], warnings


def test_inference_labels_agree_with_simpleitk(inferred):
    """Dice of one inference output recomputed with SimpleITK's LabelOverlapMeasures equals the package's Dice
    (ran_bundle.metrics.dice_per_label, what the reports and the comparison use)."""
    from ran_bundle.data import load_datalist
    from ran_bundle.metrics import dice_per_label

    raw = load_datalist(REPO / "data" / "tiny_ct" / "datalist.json")["validation_pairs"][0]
    warped = sitk.ReadImage(str(inference_folders(inferred)[0] / "warped_label.nii.gz"), sitk.sitkInt16)
    fixed = sitk.ReadImage(raw["fixed_label"], sitk.sitkInt16)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(fixed, warped)
    fixed_array, warped_array = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(warped)
    labels = [int(v) for v in np.unique(fixed_array) if v != 0 and (warped_array == v).any()]
    ours = dice_per_label(warped_array, fixed_array, labels)
    assert labels
    for lab in labels:
        assert ours[lab] == pytest.approx(overlap.GetDiceCoefficient(lab), abs=1e-6)


# --- TorchScript export -------------------------------------------------------------------------


def test_ckpt_export_trace_matches_eager(trained, tmp_path):
    ckpt = trained["ckpt_dir"] / "model.pt"
    ts_path = tmp_path / "model.ts"
    bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts_path),
        "--ckpt_file",
        str(ckpt),
        "--meta_file",
        META,
        "--config_file",
        INFERENCE,
        "--key_in_ckpt",
        "model",
        "--use_trace",
        "True",
        "--input_shape",
        "[1, 2, 32, 16, 16]",
    )
    assert ts_path.is_file()

    torch.manual_seed(0)
    x = torch.rand(1, 2, 48, 32, 32)  # not the traced size
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        m = torch.jit.load({str(ts_path)!r}, map_location="cpu").eval()
        with torch.no_grad():
            y = m(torch.load({str(tmp_path / "x.pt")!r}))
        assert not any(k.startswith("ran_bundle") for k in sys.modules), "ran_bundle was imported"
        torch.save(y, {str(tmp_path / "y_ts.pt")!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    y_ts = torch.load(tmp_path / "y_ts.pt")

    from ran_bundle.networks import ResidualAlignerNetwork

    net = ResidualAlignerNetwork(spatial_dims=3, preset="ref")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    with torch.no_grad():
        y = net.eval()(x)
    assert y_ts.shape == y.shape == (1, 3, 48, 32, 32)
    assert (y_ts - y).abs().max().item() < 1e-4


def test_short_training_raises_validation_dice_over_identity(tiny_ct, tmp_path):
    """The real training CLI, on one real pair (tiny_ct subject 4 -> subject 5, as an atlas pair at 6 mm),
    raises that pair's validation Dice over the identity's by at least 0.05 within 24 iterations.

    This checks that the whole training path learns (data, warp direction, loss, gradients, best
    checkpoint by Dice); it fits the pair it validates on. Generalisation to unseen subjects is
    what the shipped brain model is evaluated on (docs/README.md).
    """
    moving, atlas = (
        {
            "image": str(tiny_ct / f"images/subject_{k:02d}.nii.gz"),
            "label": str(tiny_ct / f"labels/subject_{k:02d}.nii.gz"),
        }
        for k in (4, 5)
    )
    datalist = tmp_path / "atlas_pair.json"
    datalist.write_text(json.dumps({"training": [moving], "validation": [moving], "atlas": atlas}))
    spacing = [6.0, 6.0, 6.0]
    proc = bundle_run(
        "training",
        TRAIN,
        tmp_path / "out",
        datalist=datalist,
        ckpt_dir=tmp_path / "models",
        spacing=spacing,
        roi_size=[64, 48, 16],
        num_epochs=3,
        pairs_per_epoch=8,
        learning_rate=0.003,
        progress_bar=False,
    )
    log = proc.stdout + proc.stderr
    dices = [float(v) for v in re.findall(r"Metrics -- .*\bval_mean_dice: ([0-9.]+)", log)]  # folding is logged first
    assert len(dices) == 3, log[-3000:]

    from ran_bundle.data import make_pair
    from ran_bundle.transforms import registration_transforms

    pair = registration_transforms("eval", spacing=spacing, intensity="ct")(make_pair(moving, atlas))
    moving_label, fixed_label = (pair[k][0].numpy().round() for k in ("moving_label", "fixed_label"))
    labels = [v for v in np.unique(fixed_label) if v != 0]
    identity = np.mean(
        [
            2
            * ((moving_label == v) & (fixed_label == v)).sum()
            / ((moving_label == v).sum() + (fixed_label == v).sum())
            for v in labels
        ]
    )
    print(f"identity Dice {identity:.4f}, validation Dice per epoch {dices}")
    logged = float(re.search(r"validation Dice with no registration \(identity\): ([0-9.]+)", log).group(1))
    assert abs(logged - identity) < 1e-3  # the run's own baseline is the identity Dice
    assert max(dices) >= identity + 0.05, f"identity {identity:.4f}, validation Dice {dices}"
    assert (tmp_path / "models" / "model.pt").is_file()


def test_training_starts_from_pretrained_weights_with_one_override(tmp_path):
    """--pretrained_ckpt loads the model weights (here the shipped ones) before the first step; with a
    zero learning rate they come out unchanged."""
    bundle_run(
        "training",
        TRAIN,
        tmp_path / "out",
        ckpt_dir=tmp_path / "models",
        pretrained_ckpt=REPO / "models" / "model.pt",
        learning_rate=0.0,
        num_epochs=1,
        pairs_per_epoch=1,
        **TINY_TRAINING,
    )
    shipped = torch.load(REPO / "models" / "model.pt", map_location="cpu", weights_only=False)["model"]
    trained = torch.load(tmp_path / "models" / "model_last.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(trained[k], v) for k, v in shipped.items())


# --- config structure and engine unit checks ----------------------------------------------------


def parsed_config(*files: str, **overrides: Any):
    """A ``ConfigParser`` of ``files`` merged in order (``configs/...``), this repository as the bundle root."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in files])
    parser["bundle_root"] = str(REPO)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_multi_gpu_override_merges():
    parser = parsed_config(TRAIN, "configs/multi_gpu_train.json")
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train#dataloader#sampler"] == "@train#sampler"
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"
    # a small override: train.json's workflow (checks, loaders, handlers) is kept, not copied
    assert parser["initialize"] == parsed_config(TRAIN)["initialize"] and parser["setup"]
    # ranks > 0 switch off the logging handlers by name, not by their positions in the list
    logging = [h for h in parser["train#handlers"] + parser["validate#handlers"] if "StatsHandler" in str(h)]
    assert len(logging) == 4 and all(h["_disabled_"] == "$not @main_process" for h in logging)
    # everything that does not need a process group still resolves after the merge
    parser.parse()
    assert parser["training"] == parser["run"] and "trainer.run()" in parser["run"][0]
    assert parser.get_parsed_content("loss") is not None
    assert len(parser.get_parsed_content("validate#pairs")) == 2


def test_multi_gpu_training_keeps_the_pretrained_weights_and_the_checks(tmp_path):
    """train.json + multi_gpu_train.json with --pretrained_ckpt (here in one gloo process): the pretrained loader is
    attached to the trainer and loads the weights into the DDP-wrapped network; a missing file is refused by the
    workflow's initialize before the trainer is built; ranks > 0 drop the logging handlers."""
    import torch.distributed as dist
    from ignite.engine import Events
    from monai.handlers import CheckpointLoader

    def workflow(**overrides: Any):
        dirs = {"ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
        return parsed_config(TRAIN, "configs/multi_gpu_train.json", progress_bar=False, **dirs, **overrides)

    def initialize(parser) -> None:
        for i in range(len(parser["initialize"])):
            parser.get_parsed_content(f"initialize#{i}")

    shipped = REPO / "models" / "model.pt"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        parser = workflow(pretrained_ckpt=str(shipped), spatial_size=SPATIAL)
        initialize(parser)
        trainer = parser.get_parsed_content("train#trainer")
        loaders = [h for h in parser.get_parsed_content("train#handlers") if isinstance(h, CheckpointLoader)]
        assert len(loaders) == 1 and loaders[0].load_path == str(shipped)
        assert trainer.has_event_handler(loaders[0], Events.STARTED)
        loaders[0](trainer)
        weights = parser.get_parsed_content("network").module.state_dict()
        expected = torch.load(shipped, map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(weights[k], v) for k, v in expected.items())
        assert any("ProgressBar" not in type(h).__name__ for h in parser.get_parsed_content("train#handlers"))

        missing = workflow(pretrained_ckpt=str(tmp_path / "missing.pt"))
        with pytest.raises(RuntimeError) as error:
            initialize(missing)
        assert "missing.pt' not found" in str(error.value.__cause__)
        assert "train#trainer" not in missing.ref_resolver.resolved_content, "the check must come before any work"

        other_rank = workflow(main_process=False, spatial_size=SPATIAL)
        names = [
            type(h).__name__ for k in ("train#handlers", "validate#handlers") for h in other_rank.get_parsed_content(k)
        ]
        assert "StatsHandler" not in names and "TensorBoardStatsHandler" not in names
        assert "ValidationHandler" in names and "CheckpointSaver" in names  # rank 0 alone writes (ignite)
    finally:
        # ignite cached the native computation model while the group existed: without finalize, every later
        # MONAI metric in this process would try to gather over the destroyed group
        idist.finalize()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_pretrain_is_an_override_of_train():
    """pretrain.json holds only what pretraining changes; train.json's workflow (resume, pretrained weights, checks,
    checkpoints) comes with the merge."""
    raw = json.loads((REPO / "configs" / "pretrain.json").read_text())
    assert "initialize" not in raw and "train#handlers" not in raw and "network_def" not in raw
    parser = parsed_config(TRAIN, "configs/pretrain.json")
    assert parser["initialize"] == parsed_config(TRAIN)["initialize"]
    assert parser["validate#checkpoint_saver"]["key_metric_negative_sign"] is True
    assert "pretraining" in parser["train#pretrained_check#hint"]
    assert type(parser.get_parsed_content("loss")).__name__ == "SyntheticFieldLoss"
    assert parser.get_parsed_content("ckpt_dir").endswith("runs/pretrain")
    assert parser.get_parsed_content("validate#evaluator#additional_metrics") is None
    assert parser["pretraining"] == parser["run"]


def test_evaluation_scores_the_organs_by_name():
    """abdomen_ct.json's organ_labels reach validation and the evaluation workflow's CSV writer by name."""
    organs = [1, 2, 3, 5, 6, 8, 9, 10, 11]
    parser = parsed_config(TRAIN, "configs/abdomen_ct.json", EVALUATE)
    writer = [h for h in parser["validate#handlers"] if h["_target_"].endswith("RegistrationMetricsWriter")]
    assert writer[0]["labels"] == "@organ_labels"
    assert parser.get_parsed_content("organ_labels") == organs
    assert parser.get_parsed_content("validate#key_metric#val_mean_dice#metric_fn").labels == organs
    assert parsed_config(TRAIN, EVALUATE).get_parsed_content("organ_labels") is None  # every label


def test_lung_window_keeps_the_parenchyma_inside_the_similarity_mask(tmp_path):
    """lung_ct.json's CT window, through its own evaluation preprocessing: air -> 0 (masked out), lung parenchyma
    (-900..-500 HU) strictly inside (0, 1) and above the MSE mask threshold, with contrast left between its
    densities and against vessels. The abdomen window [-100, 300] maps all of the parenchyma to 0."""
    parser = parsed_config(TRAIN, "configs/lung_ct.json", spatial_size=None)
    assert parser.get_parsed_content("ct_window") == [-1000, 300]
    threshold = parser.get_parsed_content("loss").similarity.mask_threshold
    hu = np.full((32, 32, 32), -1000.0, dtype=np.float32)  # air
    hu[4:28, 4:28, 4:28] = 40.0  # soft tissue
    hu[8:16, 8:24, 8:24], hu[16:24, 8:24, 8:24] = -900.0, -500.0  # lung parenchyma, two densities
    hu[11:13, 14:16, 8:24] = 40.0  # a vessel in the lung
    labels = (hu < -400).astype(np.int16)
    files = {}
    for key, data in (("image", hu), ("label", labels)):
        files[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(data, np.eye(4)), files[key])
    pair = {f"{side}_{key}": path for side in ("moving", "fixed") for key, path in files.items()}
    image = parser.get_parsed_content("validate#preprocessing")(pair)["fixed_image"][0].numpy()
    air, low, high, vessel = image[0, 0, 0], image[10, 16, 16], image[20, 16, 16], image[12, 15, 16]
    assert air < threshold
    assert threshold < low < high < vessel < 1.0 and high - low > 0.2 and vessel - high > 0.3, (low, high, vessel)
    abdomen = parsed_config(TRAIN, "configs/lung_ct.json", ct_window=[-100, 300], spatial_size=None)
    image = abdomen.get_parsed_content("validate#preprocessing")(pair)["fixed_image"][0].numpy()
    assert image[10, 16, 16] == image[20, 16, 16] == 0.0  # why not the abdomen window


@pytest.mark.parametrize("config", [INFERENCE, "configs/atlas_inference.json"])
def test_the_lung_window_reaches_the_registration_pipeline(config):
    """lung_ct.json's advice for registering with a lung model: ``--intensity ct --ct_window [-1000,300]`` on
    the inference configs sets the pipeline's window; without overrides the configs build the pipeline that
    ``RegistrationPipeline()`` is (one set of defaults, the abdomen window among them)."""
    from ran_bundle.defaults import CT_WINDOW
    from ran_bundle.pipeline import RegistrationPipeline

    default = parsed_config(config).get_parsed_content("pipeline")
    own = RegistrationPipeline(network=default.network)
    settings = ("spacing", "intensity", "ct_window", "affine_stage", "io_iterations", "io_weight", "io_fold_weight")
    assert {k: getattr(default, k) for k in settings} == {k: getattr(own, k) for k in settings}
    assert default.ct_window == CT_WINDOW
    lung = parsed_config(config, intensity="ct", ct_window=[-1000, 300]).get_parsed_content("pipeline")
    assert (lung.intensity, lung.ct_window) == ("ct", (-1000.0, 300.0))


def test_train_step_raises_on_non_finite_loss():
    from types import SimpleNamespace

    from ran_bundle.engines import RegistrationTrainStep
    from ran_bundle.losses import RegistrationLoss

    net = torch.nn.Conv3d(2, 3, 1)
    torch.nn.init.constant_(net.weight, float("nan"))
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu"), iteration=7, epoch=1),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=RegistrationLoss(spatial_dims=3),
        amp=False,
        scaler=None,
    )
    batch = {"moving_image": torch.rand(1, 1, 16, 16, 16), "fixed_image": torch.rand(1, 1, 16, 16, 16)}
    with pytest.raises(RuntimeError, match="iteration 7"):
        RegistrationTrainStep()(engine, batch)


def test_pair_names_fall_back_to_folder_names_when_the_file_names_are_equal():
    """One ``image.nii.gz`` per subject folder (the brain MR data) must not give every pair the same name: the
    inference writer names its output files after the pair."""
    from ran_bundle.engines import pair_name

    assert pair_name("/d/images/subject_01.nii.gz", "/d/images/subject_00.nii.gz") == "subject_01_to_subject_00"
    assert pair_name("/d/oasis_B/image.nii.gz", "/d/oasis_A/image.nii.gz") == "oasis_B_to_oasis_A"
