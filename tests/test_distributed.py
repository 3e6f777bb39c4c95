"""Training on PyTorch's distributed engine (gloo on CPU), resuming after a kill, stopping on a NaN loss.

Both tests compare final model weights with an uninterrupted single-process run of the same seed.
Tolerances: float32 sums over ranks and over a batch are added in different orders, so the
distributed model may differ from the single-process one by rounding; it must differ by less than
1% of the training update (relative L2 over all parameters). A resumed run on the same process
layout must match exactly (to 1e-6).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
TRAIN = "configs/train.json"
MULTI = "configs/multi_gpu_train.json"
#: small runs from a fresh network (the weights initial_weights() measures the training update from)
TINY = ("--roi_size", "[32,32,16]", "--spatial_size", "[64,48,16]", "--progress_bar", "False")
TINY += ("--pretrained_ckpt", "False")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(ckpt_dir: Path, *extra: str, config: str = TRAIN) -> list[str]:
    return [
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        config,
        "--bundle_root",
        str(REPO),
        "--ckpt_dir",
        str(ckpt_dir),
        "--output_dir",
        str(ckpt_dir.parent / "out"),
        *TINY,
        *extra,
    ]


def run(args: list[str], timeout: int = 900) -> str:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[:6])} failed ({proc.returncode}):\n{output[-6000:]}")
    return output


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def relative_difference(a: dict, b: dict, reference: dict) -> float:
    """||a - b|| / ||b - reference|| over all parameters."""
    num = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b)
    den = sum(((b[k].double() - reference[k].double()) ** 2).sum().item() for k in b)
    return math.sqrt(num / den)


def initial_weights() -> dict[str, torch.Tensor]:
    from monai.utils import set_determinism

    from ran_bundle.networks import ResidualAlignerNetwork

    set_determinism(seed=0)
    try:
        return ResidualAlignerNetwork(spatial_dims=3, preset="ref").state_dict()
    finally:
        set_determinism(seed=None)


def test_torchrun_two_gloo_ranks_match_single_process_run(tmp_path):
    """2 CPU ranks x batch 1 (DDP, gloo) vs 1 process x batch 2: 2 epochs of 4 pairs, same seed.

    Tolerance 3% of the training update (measured 1.2%). The two runs differ only by rounding: the last RA
    module runs at batch 1 on each rank and at batch 2 in the single process, where the CPU convolutions take
    other kernels (outputs differ by ~1e-6), and Adam's normalised steps amplify that to ~1e-4 after one step
    and ~1% after four. Gradients not averaged across ranks (each rank on its own half) would be off by ~55%
    after four steps (measured by a simulation of this run).
    """
    ddp_dir, single_dir = tmp_path / "ddp" / "models", tmp_path / "single" / "models"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    merged = f"['{TRAIN}','{MULTI}']"
    log = run([*torchrun, *train_cmd(ddp_dir, "--num_epochs", "2", "--pairs_per_epoch", "4", config=merged)])
    assert log.count("SupervisedTrainer - INFO - Engine run finished") == 2, "both ranks must run the trainer"
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["model.pt", "model_last.pt"], "only rank 0 writes"
    last = torch.load(ddp_dir / "model_last.pt", map_location="cpu", weights_only=False)
    assert last["trainer"]["epoch_length"] == 2 and last["trainer"]["iteration"] == 4  # 2 epochs x 2 pairs per rank

    run(
        [
            sys.executable,
            *train_cmd(single_dir, "--num_epochs", "2", "--pairs_per_epoch", "4", "--train#dataloader#batch_size", "2"),
        ]
    )
    ddp, single = weights(ddp_dir / "model_last.pt"), weights(single_dir / "model_last.pt")
    assert set(ddp) == set(single), "the DDP checkpoint must hold the unwrapped model"
    rel = relative_difference(ddp, single, initial_weights())
    print(f"DDP vs single process: relative L2 difference {rel:.2e} of the training update")
    assert rel < 0.03


def test_killed_training_resumes_to_the_uninterrupted_state(tmp_path, kill_after_checkpoint):
    """SIGKILL after epoch 1 of 3, resume with --resume True: same final weights as a run never killed."""
    epochs = ("--num_epochs", "3", "--pairs_per_epoch", "3")
    full_dir, killed_dir = tmp_path / "full" / "models", tmp_path / "killed" / "models"
    run([sys.executable, *train_cmd(full_dir, *epochs)])

    last = killed_dir / "model_last.pt"
    state = kill_after_checkpoint([sys.executable, *train_cmd(killed_dir, *epochs)], last, env=ENV, timeout=600)
    killed_at = state["trainer"]["iteration"] // state["trainer"]["epoch_length"]  # completed epochs
    assert killed_at < 3, "the run finished before it could be killed; the test proves nothing"

    log = run([sys.executable, *train_cmd(killed_dir, *epochs, "--resume", "True")])
    assert "Restored all variables from" in log
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    full = torch.load(full_dir / "model_last.pt", map_location="cpu", weights_only=False)
    assert resumed["trainer"]["iteration"] == full["trainer"]["iteration"] == 9  # 3 epochs x 3 pairs
    assert resumed["lr_scheduler"] == full["lr_scheduler"]
    max_diff = max((resumed["model"][k].float() - full["model"][k].float()).abs().max().item() for k in full["model"])
    print(f"killed after epoch {killed_at}, resumed: max |weight difference| {max_diff:.1e}")
    assert max_diff <= 1e-6


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, *train_cmd(tmp_path / "models", "--resume", "True", "--num_epochs", "1")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert proc.returncode != 0
    assert "model_last.pt' not found" in proc.stderr and "Nothing to resume" in proc.stderr
    assert not (tmp_path / "models" / "model_last.pt").exists()


class NaNAfterFirstEpoch(torch.nn.Module):
    """A tiny registration 'network' whose DDF turns NaN from epoch 2 on (``epoch`` set by the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)
        self.epoch = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ddf = self.conv(x)
        return ddf * float("nan") if self.epoch > 1 else ddf


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from ignite.engine import Engine, Events

    from ran_bundle.engines import RegistrationTrainStep
    from ran_bundle.handlers import LastCheckpointSaver
    from ran_bundle.losses import RegistrationLoss

    torch.manual_seed(0)
    net = NaNAfterFirstEpoch()
    trainer = Engine(RegistrationTrainStep())
    trainer.network, trainer.loss_function = net, RegistrationLoss(spatial_dims=3)
    trainer.optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine):
        engine.state.device = torch.device("cpu")
        net.epoch = engine.state.epoch

    saved_after_epoch_1 = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda _: saved_after_epoch_1.update(copy_state(net.state_dict()))
    )
    LastCheckpointSaver(tmp_path, {"model": net, "optimizer": trainer.optimizer, "trainer": trainer}).attach(trainer)
    batch = {"moving_image": torch.rand(1, 1, 16, 16, 16), "fixed_image": torch.rand(1, 1, 16, 16, 16)}
    with pytest.raises(RuntimeError, match="non-finite training loss .* iteration 4 .*epoch 2"):
        trainer.run([batch] * 3, max_epochs=3)
    last = torch.load(tmp_path / "model_last.pt", map_location="cpu", weights_only=False)
    assert last["trainer"]["iteration"] == 3, "the checkpoint must be the one of the last good epoch"
    assert all(torch.equal(last["model"][k], v) for k, v in saved_after_epoch_1.items())
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["model_last.pt"], "no temporary file may be left behind"


def copy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
