"""End-point error and Dice of synthetic pretraining (and a short unsupervised fine-tuning) on a real CT.

One run does, in order (the paper's two-stage schedule in miniature, Sec. 4.2):

1. **Pretraining** (unless ``--checkpoint`` gives one, e.g. ``runs/pretrain/model.pt`` of
   ``configs/pretrain.json``), from random weights or from ``--init`` (e.g. the shipped ``models/model.pt``,
   which has left the RAN's early plateau): ``--pretrain-iters`` steps of
   :class:`~ran_bundle.engines.SyntheticTrainStep` with :class:`~ran_bundle.losses.SyntheticFieldLoss`
   (0.1 image MSE + 1 field MSE + 1 smoothness)
   on synthetic pairs of the training subjects of ``--datalist`` (default ``data/tiny_ct``), random
   ``--roi`` crops, fields of :class:`~ran_bundle.synthetic.RandSyntheticDeformationd` (seed 0).
2. **Fine-tuning**: ``--finetune-iters`` steps of :class:`~ran_bundle.engines.RegistrationTrainStep`
   with the unsupervised :class:`~ran_bundle.losses.RegistrationLoss` (the bundle's default NCC +
   edge-aware smoothness; the true field is NOT used) on other synthetic pairs of the same subjects
   (seed 1).
3. **Test**: the CT of ``<shared data>/totalseg_example_ct`` (TotalSegmentator's example scan, 3 mm,
   with organ labels; found through ``--shared-data``, default ``$RAN_SHARED_DATA`` or
   ``../shared/data``) deformed by ``--test-pairs`` fields the training never saw (seed 100000),
   at the same voxel size as the training. Scored for the zero field, the pretrained network and the
   fine-tuned one: mean end-point error ``|u_pred - u_true|`` in voxels and mm inside the body
   (fixed intensity > 0.1 after the [-100, 300] HU window), mean Dice over the organs of the warped
   moving label (nearest neighbour) against the fixed label, and the percentage of non-positive
   Jacobian determinants.

Caveat printed with the table: ``data/tiny_ct`` is derived from the same scan as the test CT, so the
test fields are unseen but the anatomy is not.

``--quick`` (under 10 minutes on 2 free CPU cores with the RAN, about a minute with
``--network localnet``): the data and fields of the learning test of ``tests/test_synthetic.py``:
6 mm voxels, 24x24x16 training crops, batch 4, fields of at most 3 degrees, 4 voxels of translation
and 1 voxel of B-spline displacement; 40 pretraining and 5 fine-tuning steps (the test: 60), 4 test
pairs. From random weights the RAN needs far longer training (the paper: 50k pretraining iterations); use a
GPU, more iterations, ``--init models/model.pt`` or ``--checkpoint``.

Usage::

    python scripts/pretraining_report.py --quick [--out report.md]
    python scripts/pretraining_report.py --quick --init models/model.pt --pretrain-iters 150
    python scripts/pretraining_report.py --checkpoint runs/pretrain/model.pt --spacing 3 --roi 48 48 32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.utils import set_determinism

from ran_bundle.data import load_datalist
from ran_bundle.engines import RegistrationTrainStep, SyntheticTrainStep, prepare_batch
from ran_bundle.flow import warp
from ran_bundle.keys import TRUE_DDF
from ran_bundle.losses import RegistrationLoss, SyntheticFieldLoss
from ran_bundle.metrics import dice, non_positive_jacobian
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.synthetic import SyntheticPairDataset, end_point_error, load_pretrained, synthetic_pair_transforms
from scripts.peers import local_net

REPO = Path(__file__).resolve().parents[1]

TEST_SEED = 100000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings that run in minutes on 2 CPU cores")
    p.add_argument("--shared-data", default=os.environ.get("RAN_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--datalist", default=str(REPO / "data" / "tiny_ct" / "datalist.json"))
    p.add_argument("--checkpoint", default=None, help="skip pretraining and load this checkpoint ('model' key)")
    p.add_argument(
        "--init", default=None, help="start the pretraining from these weights ('model' key), e.g. models/model.pt"
    )
    p.add_argument("--network", choices=("ran", "localnet"), default="ran", help="RAN (default) or MONAI LocalNet")
    p.add_argument("--preset", default="ref", help="RAN preset (the bundle's configs use 'ref')")
    p.add_argument("--spacing", type=float, default=None, help="voxel size in mm (quick 6, else 3 = native)")
    p.add_argument("--roi", type=int, nargs=3, default=None, help="training crop (quick 24 24 16, else 48 48 32)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (4)")
    p.add_argument("--pretrain-iters", type=int, default=None, help="quick 40, else 1000")
    p.add_argument("--finetune-iters", type=int, default=None, help="quick 5, else 200")
    p.add_argument("--test-pairs", type=int, default=None, help="quick 4, else 8")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate of the pretraining, decayed linearly to 0"
    )
    p.add_argument(
        "--finetune-lr", type=float, default=1e-4, help="the same for the fine-tuning (released code, real data: 1e-4)"
    )
    p.add_argument("--rotation-deg", type=float, default=None, help="largest rotation (quick 3, else 45 = paper)")
    p.add_argument("--translation", type=float, default=None, help="largest translation in voxels (quick 4, else 8)")
    p.add_argument(
        "--magnitude", type=float, default=None, help="largest B-spline control displacement (quick 1, else 4)"
    )
    p.add_argument(
        "--control-spacing", type=float, default=None, help="B-spline control spacing, voxels (quick 12, else 16)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = p.parse_args(argv)
    quick = {  # the settings of the learning test in tests/test_synthetic.py
        "spacing": 6.0,
        "roi": [24, 24, 16],
        "batch_size": 4,
        "pretrain_iters": 40,
        "finetune_iters": 5,
        "test_pairs": 4,
        "rotation_deg": 3.0,
        "translation": 4.0,
        "magnitude": 1.0,
        "control_spacing": 12.0,
    }
    full = {
        "spacing": 3.0,
        "roi": [48, 48, 32],
        "batch_size": 4,
        "pretrain_iters": 1000,
        "finetune_iters": 200,
        "test_pairs": 8,
        "rotation_deg": 45.0,
        "translation": 8.0,
        "magnitude": 4.0,
        "control_spacing": 16.0,
    }
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def make_network(args: argparse.Namespace) -> torch.nn.Module:
    if args.network == "localnet":
        return local_net(3, 8, (3,))
    return ResidualAlignerNetwork(3, args.preset)


def deformation(args: argparse.Namespace) -> dict:
    return {
        "rotation_range": math.radians(args.rotation_deg),
        "translation_range": args.translation,
        "magnitude": args.magnitude,
        "control_spacing": args.control_spacing,
    }


def train(net, args, subjects, loss, step, iters: int, seed: int, lr: float) -> float:
    """``iters`` steps of ``step`` on random synthetic pairs of ``subjects``, lr decayed linearly; returns seconds."""
    if iters <= 0:
        return 0.0
    xform = synthetic_pair_transforms(
        "train", spacing=(args.spacing,) * 3, roi_size=args.roi, intensity_scale=0.0, **deformation(args)
    )
    ds = SyntheticPairDataset(subjects, xform, num_samples=iters * args.batch_size, seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    trainer = SupervisedTrainer(
        device=torch.device(args.device),
        max_epochs=1,
        train_data_loader=DataLoader(ds, batch_size=args.batch_size, num_workers=0),
        network=net,
        optimizer=optimizer,
        loss_function=loss,
        prepare_batch=prepare_batch,
        iteration_update=step,
        decollate=False,
    )
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / iters))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: decay.step())
    t0 = time.time()
    trainer.run()
    return time.time() - t0


def test_samples(args) -> list[dict]:
    root = Path(args.shared_data) / "totalseg_example_ct"
    subject = {"image": str(root / "ts_example" / "image.nii.gz"), "label": str(root / "ts_example" / "label.nii.gz")}
    if not Path(subject["image"]).is_file():
        raise SystemExit(f"test CT not found: {subject['image']} (set --shared-data or RAN_SHARED_DATA)")
    xform = synthetic_pair_transforms("eval", spacing=(args.spacing,) * 3, with_labels=True, **deformation(args))
    ds = SyntheticPairDataset([subject], xform, num_samples=args.test_pairs, seed=TEST_SEED, fixed_samples=True)
    return [ds[i] for i in range(len(ds))]


def score(ddfs: list[torch.Tensor], samples: list[dict], spacing: float) -> dict[str, float]:
    """Mean over the test pairs of EPE (voxels, mm; inside the body), organ Dice and % det J <= 0."""
    epe, dsc, fold = [], [], []
    for ddf, s in zip(ddfs, samples, strict=True):
        true = s[TRUE_DDF][None].float()
        body = s["fixed_image"][None] > 0.1
        epe.append(float(end_point_error(ddf, true, mask=body)))
        moving_label = s["moving_label"][None].as_tensor().float()
        warped = warp(moving_label, ddf.float(), mode="nearest")[0, 0].round().long().numpy()
        fixed = s["fixed_label"][0].as_tensor().round().long().numpy()
        organs = [v for v in np.unique(fixed) if v != 0 and (fixed == v).sum() >= 20]
        dsc.append(float(np.mean([dice(warped == v, fixed == v) for v in organs])))
        fold.append(float(non_positive_jacobian(ddf)[1][0]))
    return {
        "epe_vox": float(np.mean(epe)),
        "epe_mm": float(np.mean(epe)) * spacing,
        "dice": float(np.mean(dsc)),
        "fold": float(np.mean(fold)),
    }


@torch.no_grad()
def predict(net, samples, device) -> list[torch.Tensor]:
    net.eval()
    out = []
    for s in samples:
        pair = torch.cat([s["moving_image"][None].as_tensor(), s["fixed_image"][None].as_tensor()], 1).to(device)
        out.append(net(pair).float().cpu())
    return out


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    set_determinism(seed=0)
    t_start = time.time()
    device = torch.device(args.device)
    subjects = load_datalist(args.datalist)["training"]
    net = make_network(args).to(device)
    samples = test_samples(args)
    rows: list[tuple[str, dict]] = []
    zero = [torch.zeros_like(s[TRUE_DDF][None]) for s in samples]
    rows.append(("zero field (no registration)", score(zero, samples, args.spacing)))

    if args.checkpoint:
        load_pretrained(net, args.checkpoint, device)
        t_pre, pre_what = 0.0, f"loaded from {args.checkpoint}"
    else:
        if args.init:
            load_pretrained(net, args.init, device)
        t_pre = train(net, args, subjects, SyntheticFieldLoss(3), SyntheticTrainStep(), args.pretrain_iters, 0, args.lr)
        pre_what = f"{args.pretrain_iters} steps" + (f" from {args.init}" if args.init else "")
    rows.append((f"pretrained ({pre_what})", score(predict(net, samples, device), samples, args.spacing)))

    loss = RegistrationLoss(3)
    t_ft = train(net, args, subjects, loss, RegistrationTrainStep(), args.finetune_iters, 1, args.finetune_lr)
    rows.append(
        (
            f"pretrained + {args.finetune_iters} unsupervised steps",
            score(predict(net, samples, device), samples, args.spacing),
        )
    )

    name = f"RAN preset {args.preset!r}" if args.network == "ran" else "MONAI LocalNet (8 channels)"
    head = [
        f"# Synthetic pretraining report ({'quick' if args.quick else 'full'})",
        "",
        f"- network: {name}; device {device}; Adam, learning rate {args.lr} (pretraining) and {args.finetune_lr} "
        f"(fine-tuning), each decayed linearly to 0; batch {args.batch_size}",
        f"- voxel size {args.spacing} mm; training crops {'x'.join(map(str, args.roi))} of the training subjects of "
        f"`{os.path.relpath(args.datalist, REPO)}`",
        f"- fields: rotation <= {args.rotation_deg} deg about a random axis, translation <= {args.translation} voxels, "
        f"B-spline control spacing {args.control_spacing} voxels, control displacement <= {args.magnitude} voxels",
        f"- pretraining: {pre_what} ({t_pre:.0f} s, field seed 0); fine-tuning: {args.finetune_iters} steps of "
        f"RegistrationLoss (NCC + smoothness, no true field; {t_ft:.0f} s, seed 1)",
        f"- test: `totalseg_example_ct` resampled to {args.spacing} mm, {args.test_pairs} unseen fields "
        f"(seeds from {TEST_SEED}); EPE inside the body (fixed > 0.1); Dice: mean over organs of >= 20 voxels",
        "- caveat: `data/tiny_ct` is derived from the same scan, so the test fields are unseen but the anatomy is not",
        "",
        "| method | EPE (voxels) | EPE (mm) | mean Dice | det J <= 0 (%) |",
        "|---|---|---|---|---|",
    ]
    lines = [f"| {n} | {r['epe_vox']:.3f} | {r['epe_mm']:.2f} | {r['dice']:.3f} | {r['fold']:.3f} |" for n, r in rows]
    report = "\n".join(head + lines + ["", f"total time {time.time() - t_start:.0f} s"]) + "\n"
    print(report, flush=True)
    if args.out:
        Path(args.out).write_text(report)
    set_determinism(seed=None)
    return report


if __name__ == "__main__":
    main()
