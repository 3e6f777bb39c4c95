"""The README's first command, ``python -m monai.bundle run training --config_file configs/train.json``: what it
reports (:class:`ran_bundle.handlers.TrainingReport`) and that its model learns on the embedded data."""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from ran_bundle import handlers
from ran_bundle.handlers import TrainingReport

REPO = Path(__file__).resolve().parents[1]

#: the main job at a smaller budget that still shows the gain (the config's defaults are the README's main job)
SMALL_BUDGET = {"num_epochs": 3}


def cube(shift: int) -> torch.Tensor:
    """``(1, 1, 8, 8, 8)`` label map: a 4-voxel cube of label 1 shifted by ``shift`` voxels along axis 0."""
    label = torch.zeros(1, 1, 8, 8, 8)
    label[0, 0, 2 + shift : 6 + shift, 2:6, 2:6] = 1
    return label


class ShiftBack(torch.nn.Module):
    """A "network" whose DDF is +1 voxel along axis 0 everywhere: it registers :func:`cube` ``(1)`` onto ``(0)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(x.shape[0], 3, *x.shape[2:])
        ddf[:, 0] = 1.0
        return ddf


def fake_training(
    tmp_path: Path, dice: list[float], losses: list[float], score_start: bool = False
) -> tuple[TrainingReport, Path]:
    """A trainer of ``len(dice)`` one-iteration epochs (loss ``losses[e]``), each followed by a validation that
    scores ``dice[e]``, with a :class:`TrainingReport` attached; the one validation pair is a cube shifted by 1
    voxel (Dice of no registration 0.75), which the validator's network (:class:`ShiftBack`) registers exactly."""
    pair = {"moving_image": cube(1), "fixed_image": cube(0), "moving_label": cube(1), "fixed_label": cube(0)}
    validator = Engine(lambda engine, batch: None)
    validator.data_loader = [pair]
    validator.network = ShiftBack()
    validator.state.device = torch.device("cpu")

    def score(engine: Engine) -> None:
        value = dice[trainer.state.epoch - 1]
        best = max(dice[: trainer.state.epoch])
        engine.state.metrics["val_mean_dice"] = value
        engine.state.best_metric, engine.state.best_metric_epoch = best, dice.index(best) + 1

    validator.add_event_handler(Events.EPOCH_COMPLETED, score)
    trainer = Engine(lambda engine, batch: {"loss": losses[engine.state.epoch - 1]})
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validator.run([0]))
    ckpt_dir = tmp_path / "runs" / "models"
    report = TrainingReport(
        validator,
        ckpt_dir,
        tmp_path / "runs" / "logs",
        example_pair={
            "moving_image": "m.nii.gz",
            "fixed_image": "f.nii.gz",
            "moving_label": "ml.nii.gz",
            "fixed_label": "fl.nii.gz",
        },
        spacing=[6.0, 6.0, 6.0],
        intensity="ct",
        score_start=score_start,
    )
    report.attach(trainer)
    trainer.run([0], max_epochs=len(dice))
    return report, ckpt_dir


def test_report_gives_dice_before_and_after_the_curve_and_the_next_command(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    with caplog.at_level(logging.INFO, logger="ran_bundle.handlers"):
        report, ckpt_dir = fake_training(tmp_path, dice=[0.70, 0.85, 0.80], losses=[-0.2, -0.5, -0.6])
    log = caplog.text
    assert report.identity == pytest.approx(0.75)  # 2 * 48 / (64 + 64)
    assert (
        "validation Dice before training: 0.7500 with no registration; after training: 0.8500 (best model, epoch 2; "
        "last validation 0.8000), +0.1000 over no registration"
    ) in log
    assert report.train_curve == [(1, -0.2), (2, -0.5), (3, -0.6)]
    assert report.val_curve == [(1, 0.70), (2, 0.85), (3, 0.80)]
    curve = tmp_path / "runs" / "logs" / "learning_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve.stat().st_size > 5000
    assert f"learning curve: {curve}" in log
    command = re.search(r"next, register a pair with the best model: (.*)", log).group(1)
    assert command == (
        f"ran-register --fixed f.nii.gz --moving m.nii.gz --fixed-label fl.nii.gz --moving-label ml.nii.gz "
        f"--weights {ckpt_dir / 'model.pt'} --intensity ct --spacing 6 --out {tmp_path / 'runs' / 'register'} --png"
    )
    assert log.rstrip().endswith("all the options: ran-register --help")


def test_report_scores_the_starting_weights(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ran_bundle.handlers"):
        report, _ = fake_training(tmp_path, dice=[0.9], losses=[-0.3], score_start=True)
    assert report.start == pytest.approx(1.0)  # ShiftBack registers the pair exactly
    assert "validation Dice before training: 0.7500 with no registration, 1.0000 with the starting weights;" in (
        caplog.text
    )


def test_report_without_matplotlib_says_how_to_get_the_curve(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(handlers, "_has_matplotlib", lambda: False)
    with caplog.at_level(logging.INFO, logger="ran_bundle.handlers"):
        fake_training(tmp_path, dice=[0.8], losses=[-0.3])
    assert "learning curve: not drawn, it needs matplotlib: pip install 'ran-bundle[figures]'" in caplog.text
    assert not (tmp_path / "runs" / "logs" / "learning_curve.png").exists()
    assert "--png" not in caplog.text  # ran-register would refuse it


@pytest.mark.slow
def test_main_job_learns_and_its_next_command_runs(tmp_path):
    """The README's first command on the embedded data at a smaller budget: its best validation Dice on held-out
    pairs is at least 0.05 above no registration, it draws the learning curve, and the ``ran-register`` command
    it prints registers that pair with the trained model."""
    out = tmp_path / "runs"
    args = ["--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--progress_bar", "False"]
    for key, value in SMALL_BUDGET.items():
        args += [f"--{key}", str(value)]
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    found = re.search(r"before training: ([0-9.]+) with no registration.*; after training: ([0-9.]+)", log)
    assert found, log[-4000:]
    before, after = float(found.group(1)), float(found.group(2))
    print(f"validation Dice {before:.4f} -> {after:.4f}")
    assert after >= before + 0.05, f"no registration {before:.4f}, best {after:.4f}"
    pytest.importorskip("matplotlib")
    assert (out / "eval" / "logs" / "learning_curve.png").is_file()

    command = shlex.split(re.search(r"next, register a pair with the best model: (.*)", log).group(1))
    assert command[0] == "ran-register" and "--weights" in command
    register = subprocess.run(
        [sys.executable, "-m", "ran_bundle", *command[1:], "--threads", "1", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert register.returncode == 0, register.stderr[-4000:]
    report = json.loads((out / "register" / "report.json").read_text())
    assert "dice" in json.dumps(report).lower()
