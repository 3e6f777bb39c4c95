"""Run the checks the MONAI model zoo's CI applies to a bundle, offline, and say which fail.

Usage (from anywhere)::

    python scripts/check_model_zoo.py [--bundle-root .] [--export models/model.ts]

Checks, in order (each prints ``PASS``/``FAIL`` and the reason; the exit status is the number of
failures, capped at 1):

1. the files a zoo bundle must have: ``LICENSE``, ``configs/metadata.json``,
   ``configs/inference.json``, ``docs/README.md``, ``docs/data_license.txt``, ``large_files.yml``;
2. the top-level ``metadata.json`` is the same file as ``configs/metadata.json`` (one source);
3. ``python -m monai.bundle verify_metadata`` against the schema shipped in
   ``configs/schema/metadata_schema.json`` (MONAI's own schema is a download; ours checks the same
   fields) and ``version`` present in ``changelog``;
4. every ``large_files.yml`` entry exists with the listed md5;
5. ``python -m monai.bundle verify_net_in_out network_def`` with ``configs/inference.json``;
6. ``python -m monai.bundle ckpt_export network_def --use_trace True`` of ``models/model.pt``
   (MONAI's ``Warp`` cannot be scripted), then the exported TorchScript model, loaded by a plain
   ``torch`` process that never imports ``ran_bundle``, gives the checkpoint's DDF at two input sizes
   other than the traced one; the same for ``models/model.ts`` when it exists.

``--export PATH`` keeps the exported model at ``PATH`` (e.g. ``models/model.ts`` when making a
release); otherwise it goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "docs/README.md",
    "docs/data_license.txt",
    "large_files.yml",
)
TRACE_SHAPE = (1, 2, 32, 32, 32)
CHECK_SHAPES = ((1, 2, 48, 32, 32), (1, 2, 32, 48, 64))
TOLERANCE = 1e-4  # max abs DDF difference (voxels) between TorchScript and eager


class CheckFailed(Exception):
    """A model-zoo check did not pass; the message says why."""


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def monai_bundle(root: Path, *args: str) -> str:
    """Run ``python -m monai.bundle *args`` in ``root``; return its output or raise naming the command."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=root, capture_output=True, text=True, timeout=1800
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CheckFailed(f"`monai.bundle {' '.join(args[:2])}` exited {proc.returncode}: {output.strip()[-1500:]}")
    return output


def check_required_files(root: Path) -> str:
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise CheckFailed(f"missing {missing}")
    return f"{len(REQUIRED_FILES)} files present"


def check_single_metadata(root: Path) -> str:
    top, configs = root / "metadata.json", root / "configs" / "metadata.json"
    if not top.exists():
        raise CheckFailed("no top-level metadata.json")
    if top.resolve() != configs.resolve() and not filecmp.cmp(top, configs, shallow=False):
        raise CheckFailed("metadata.json differs from configs/metadata.json")
    return "metadata.json is configs/metadata.json"


def check_metadata(root: Path) -> str:
    monai_bundle(
        root,
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        "configs/schema/metadata_schema.json",
    )
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if meta.get("version") not in meta.get("changelog", {}):
        raise CheckFailed(f"version {meta.get('version')!r} is not in changelog")
    return f"schema valid, version {meta['version']} in changelog"


def check_large_files(root: Path) -> str:
    entries = yaml.safe_load((root / "large_files.yml").read_text()).get("large_files") or []
    if not entries:
        raise CheckFailed("large_files.yml lists no file")
    for entry in entries:
        path = root / entry["path"]
        if not path.is_file():
            raise CheckFailed(f"{entry['path']} is listed but missing (python -m monai.bundle download_large_files)")
        if md5(path) != entry.get("hash_val"):
            raise CheckFailed(f"md5 of {entry['path']} is {md5(path)}, large_files.yml says {entry.get('hash_val')}")
    return ", ".join(entry["path"] for entry in entries) + " match their md5"


def check_net_in_out(root: Path) -> str:
    out = monai_bundle(
        root,
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    if "verified with no error" not in out:
        raise CheckFailed(f"verify_net_in_out printed no verification: {out.strip()[-500:]}")
    return "input/output format verified"


def torchscript_outputs(model_path: Path, inputs: list[torch.Tensor], workdir: Path) -> list[torch.Tensor]:
    """DDFs of a TorchScript model run by a plain ``torch`` process (fails if it imports ``ran_bundle``)."""
    torch.save(inputs, workdir / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        model = torch.jit.load({str(model_path)!r}, map_location="cpu").eval()
        with torch.no_grad():
            outputs = [model(x) for x in torch.load({str(workdir / "inputs.pt")!r})]
        if any(name.split(".")[0] == "ran_bundle" for name in sys.modules):
            sys.exit("the TorchScript model imported ran_bundle")
        torch.save(outputs, {str(workdir / "outputs.pt")!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise CheckFailed(f"plain torch could not run {model_path}: {proc.stderr.strip()[-1500:]}")
    return torch.load(workdir / "outputs.pt")


def compare_with_checkpoint(root: Path, model_path: Path, workdir: Path) -> str:
    from ran_bundle.networks import ResidualAlignerNetwork

    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=False)
    net = ResidualAlignerNetwork(spatial_dims=3, preset="ref")
    net.load_state_dict(checkpoint.get("model", checkpoint))
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(shape, generator=generator) for shape in CHECK_SHAPES]
    scripted = torchscript_outputs(model_path, inputs, workdir)
    errors = []
    with torch.no_grad():
        for x, y_ts in zip(inputs, scripted, strict=True):
            y = net.eval()(x)
            if y_ts.shape != y.shape:
                raise CheckFailed(f"{model_path.name}: DDF shape {tuple(y_ts.shape)} != eager {tuple(y.shape)}")
            errors.append((y_ts - y).abs().max().item())
    if max(errors) > TOLERANCE:
        raise CheckFailed(f"{model_path.name}: max |DDF difference| {max(errors):.3g} > {TOLERANCE} voxels")
    sizes = " and ".join("x".join(map(str, s[2:])) for s in CHECK_SHAPES)
    return f"{model_path.name} equals the checkpoint at {sizes} (max diff {max(errors):.1e} voxels)"


def check_export(root: Path, export: Path | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        target = export.resolve() if export is not None else workdir / "model.ts"
        monai_bundle(
            root,
            "ckpt_export",
            "network_def",
            "--filepath",
            str(target),
            "--ckpt_file",
            "models/model.pt",
            "--key_in_ckpt",
            "model",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
            "--use_trace",
            "True",
            "--input_shape",
            json.dumps(list(TRACE_SHAPE)),
        )
        messages = ["exported by tracing; " + compare_with_checkpoint(root, target, workdir)]
        shipped = root / "models" / "model.ts"
        if shipped.is_file() and shipped.resolve() != target:
            messages.append(compare_with_checkpoint(root, shipped, workdir))
    return "; ".join(messages)


CHECKS: tuple[tuple[str, Callable[..., str]], ...] = (
    ("required files", check_required_files),
    ("one metadata file", check_single_metadata),
    ("metadata schema and changelog", check_metadata),
    ("large files and hashes", check_large_files),
    ("network input/output", check_net_in_out),
)


def run_checks(root: Path, export: Path | None = None) -> int:
    """Run every check on the bundle at ``root``, print one line each; return the number of failures."""
    failures = 0
    checks = [*CHECKS, ("TorchScript export", lambda r: check_export(r, export))]
    for name, check in checks:
        try:
            print(f"PASS {name}: {check(root)}", flush=True)
        except CheckFailed as e:
            failures += 1
            print(f"FAIL {name}: {e}", flush=True)
    print(f"{len(checks) - failures}/{len(checks)} model-zoo checks passed", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--export", type=Path, default=None, help="keep the exported TorchScript model here")
    args = parser.parse_args(argv)
    return min(1, run_checks(args.bundle_root.resolve(), args.export))


if __name__ == "__main__":
    sys.exit(main())
