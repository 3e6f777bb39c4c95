"""Does a registration network learn a field that depends on its input? A 2D supervised probe.

Short unsupervised runs of the RAN learn one mean field for every pair (see the model card's
limitations). This probe separates "cannot learn" from "learns late" cheaply, in 2D on CPU:

* data: axial slices of the real CT of ``data/tiny_ct`` subject 0 (TotalSegmentator's example scan,
  Apache-2.0; CT window [-100, 300] HU to [0, 1]), resized to ``--size``;
* pairs: ``fixed = moving`` warped by a random smooth field ``u`` (a random translation of up to
  ``--shift`` voxels plus a cubic B-spline field of 4x4 control points with standard deviation
  ``--bend`` voxels), so ``u`` is the true moving -> fixed DDF;
* training: ``--steps`` Adam steps (``--lr``) on the field MSE, batch ``--batch``, every network from
  the same seed and the same pairs (the package's training step,
  :func:`ran_bundle.engines.registration_train_step`, with the true field);
* report every ``--every`` steps, on ``--held`` held-back pairs: the mean end-point error of the
  predicted field (and of the zero field), and the **spread**: the mean distance of each pair's
  predicted field from the mean prediction over the held-back pairs. A network that ignores its input
  has spread 0 whatever it learns; the true fields' spread is printed beside it.

Usage::

    python scripts/probe_input_dependence.py --networks ref localnet --steps 300
    python scripts/probe_input_dependence.py --networks ref --lr 3e-4 --steps 400 --out probe.md
    python scripts/probe_input_dependence.py --networks RAn3:q=1 RAn3:q=2 --steps 300
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

# the bundle root: scripts.* when run as a file, and ran_bundle from the release zip (not installed there)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ran_bundle.engines import registration_train_step
from ran_bundle.flow import warp
from ran_bundle.networks import PRESETS, ResidualAlignerNetwork
from ran_bundle.synthetic import bspline_field
from ran_bundle.transforms import CT_WINDOW
from scripts.peers import local_net

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "data" / "tiny_ct" / "images" / "subject_00.nii.gz"


def ct_slices(size: int) -> torch.Tensor:
    """``(n, 1, size, size)`` axial slices of the embedded real CT, windowed to [0, 1]."""
    volume = torch.from_numpy(np.asarray(nib.load(CT).dataobj, dtype=np.float32))  # (112, 80, 30)
    low, high = CT_WINDOW
    volume = ((volume - low) / (high - low)).clamp(0, 1)
    slices = volume.permute(2, 0, 1).unsqueeze(1)
    return F.interpolate(slices, size=(size, size), mode="bilinear", align_corners=False)


def random_pairs(
    slices: torch.Tensor, count: int, shift: float, bend: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pairs ``(count, 2, S, S)`` (moving, fixed) and their true DDFs ``(count, 2, S, S)`` in voxels."""
    size = slices.shape[-1]
    moving = slices[torch.randint(0, slices.shape[0], (count,), generator=generator)]
    control = torch.randn(count, 2, 4, 4, generator=generator, dtype=torch.float64) * bend
    fields = torch.stack([bspline_field((size, size), c) for c in control]).float()
    fields = fields + (torch.rand(count, 2, 1, 1, generator=generator) * 2 - 1) * shift
    fixed = warp(moving, fields)
    return torch.cat([moving, fixed], dim=1), fields


def make_network(name: str) -> torch.nn.Module:
    """A RAN preset by name, with optional :class:`~ran_bundle.networks.RANConfig` overrides after colons
    (``RAn3:q=1``, ``ref:head_weighting='softmax'``), or MONAI's ``localnet`` (2 input channels, DDF out) as the
    reference learner."""
    preset, *overrides = name.split(":")
    if preset in PRESETS:
        config = {key: ast.literal_eval(value) for key, value in (item.split("=", 1) for item in overrides)}
        return ResidualAlignerNetwork(spatial_dims=2, preset=preset, **config)
    if name == "localnet":
        return local_net(2, 16, (3,))
    raise ValueError(f"unknown network {name!r}; choose a RAN preset {sorted(PRESETS)} or 'localnet'")


def field_mse(warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor, true_ddf: torch.Tensor) -> torch.Tensor:
    """The probe's loss: the MSE of the predicted field to the true one (the images are not compared)."""
    return F.mse_loss(ddf, true_ddf)


def spread(fields: torch.Tensor) -> float:
    """Mean distance (voxels) of each field ``(N, 2, S, S)`` from their mean field."""
    return (fields - fields.mean(dim=0, keepdim=True)).norm(dim=1).mean().item()


def probe(name: str, args: argparse.Namespace, slices: torch.Tensor) -> list[dict[str, float]]:
    """Train ``name`` and return one row per report: step, EPE of network and zero field, spreads, seconds."""
    torch.manual_seed(args.seed)
    network = make_network(name)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    held_pairs, held_fields = random_pairs(slices, args.held, args.shift, args.bend, torch.Generator().manual_seed(1))
    train_generator = torch.Generator().manual_seed(args.seed + 2)
    rows, start = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            network.eval()
            with torch.no_grad():
                predicted = network(held_pairs)
            network.train()
            rows.append(
                {
                    "step": step,
                    "epe": (predicted - held_fields).norm(dim=1).mean().item(),
                    "epe_zero": held_fields.norm(dim=1).mean().item(),
                    "spread": spread(predicted),
                    "true_spread": spread(held_fields),
                    "seconds": time.perf_counter() - start,
                }
            )
            figures = ", ".join(f"{key} {value:.3f}" for key, value in rows[-1].items() if key != "step")
            print(f"{name} step {step}: {figures}", flush=True)
        if step == args.steps:
            break
        pairs, fields = random_pairs(slices, args.batch, args.shift, args.bend, train_generator)
        registration_train_step(network, optimizer, pairs, field_mse, true_ddf=fields)
    return rows


def markdown(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    """The probe's table: one row per network and report step."""
    lines = [
        f"2D supervised probe: {args.size}x{args.size} slices of data/tiny_ct subject 0, shift {args.shift} + "
        f"B-spline {args.bend} voxels, Adam lr {args.lr}, batch {args.batch}, seed {args.seed}, "
        f"{args.held} held-back pairs.",
        "",
        "| network | step | EPE (vox) | EPE zero field | EPE / zero | spread (vox) | true spread | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['step']} | {r['epe']:.3f} | {r['epe_zero']:.3f} | {r['epe'] / r['epe_zero']:.3f} | "
                f"{r['spread']:.3f} | {r['true_spread']:.3f} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--networks", nargs="+", default=["ref", "localnet"], help="RAN presets (overrides: RAn3:q=1), localnet"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="report every this many steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="slice size (a multiple of 16)")
    parser.add_argument("--shift", type=float, default=3.0, help="largest translation per axis (voxels)")
    parser.add_argument("--bend", type=float, default=2.0, help="std of the B-spline control displacements (voxels)")
    parser.add_argument("--held", type=int, default=16, help="held-back pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    slices = ct_slices(args.size)
    results = {name: probe(name, args, slices) for name in args.networks}
    table = markdown(results, args)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
