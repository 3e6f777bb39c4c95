"""Batch registration (``ran_bundle.batch``, ``ran-register-batch``, ``configs/inference.json``): resume, bad
subjects isolated, a SIGKILL survived, ``torchrun`` ranks sharing the pairs.

The pairs are the tiny CT subjects resampled to 6 mm (56 x 40 x 15 voxels), registered at 6 mm without the
affine stage and with 2 + 2 instance-optimisation iterations on one thread, so a pair takes about a second.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ran_bundle.batch import PairJob, atlas_pairs, batch_main, read_pairs_csv
from ran_bundle.inputs import InputError

REPO = Path(__file__).resolve().parents[1]
#: quick pipeline options for the small pairs
# the network's step (--network-start) keeps a pair long enough for the SIGKILL test to land inside one
FAST = ["--spacing", "6", "--intensity", "ct", "--affine", "none", "--network-start", "--io-iterations", "2", "2",
        "--threads", "1"]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_ct, resample_isotropic) -> Path:
    """The six tiny CT subjects and their labels at 6 mm."""
    root = tmp_path_factory.mktemp("small")
    for i in range(6):
        for kind, label in (("images", False), ("labels", True)):
            (root / kind).mkdir(exist_ok=True)
            name = f"subject_{i:02d}.nii.gz"
            resample_isotropic(tiny_ct / kind / name, root / kind / name, 6.0, label)
    return root


def pairs_csv(path: Path, small: Path, movings: list[int], images: Path | None = None) -> Path:
    """Subject 0 fixed, ``movings`` moving (from ``images``, default ``small/images``), with labels; paths
    relative to the CSV file."""
    images = images or small / "images"

    def rel(p: Path) -> str:
        return os.path.relpath(p, path.parent)

    lines = ["fixed,moving,fixed_label,moving_label"]
    for m in movings:
        name = f"subject_{m:02d}.nii.gz"
        fixed, label = small / "images" / "subject_00.nii.gz", small / "labels" / "subject_00.nii.gz"
        lines.append(f"{rel(fixed)},{rel(images / name)},{rel(label)},{rel(small / 'labels' / name)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        batch_main([*args, "--quiet"])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def leftovers(out: Path) -> list[str]:
    """Staging folders, locks and partial files in ``out`` and beside it."""
    names = [p.name for folder in (out, out.parent) for p in folder.iterdir()]
    return [n for n in names if ".tmp-" in n or n.endswith(".lock") or n.startswith(".partial-")]


def same_outputs(a: Path, b: Path) -> None:
    """Every pair folder of ``a`` and ``b`` holds the same files, byte for byte, but the reports' timings, command
    and system (the same otherwise)."""
    folders = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in b.iterdir() if p.is_dir())
    for name in folders:
        files = sorted(p.name for p in (a / name).iterdir())
        assert files == sorted(p.name for p in (b / name).iterdir()), name
        for file in files:
            if file == "report.json":
                ra, rb = (json.loads((d / name / file).read_text()) for d in (a, b))
                for key in ("timings_s", "command", "system"):
                    ra.pop(key), rb.pop(key)
                ra["arguments"].pop("rank"), rb["arguments"].pop("rank")
                assert ra == rb, name
            else:
                assert (a / name / file).read_bytes() == (b / name / file).read_bytes(), f"{name}/{file}"


# --- pairs files ------------------------------------------------------------------------------------


def test_pairs_csv_resolves_relative_paths_and_labels(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "pairs.csv"
    path.write_text("moving, fixed ,moving_label\nm1.nii.gz,f1.nii.gz,\n/abs/m2.nii,f2.nii.gz,ml2.nii.gz\n")
    jobs = read_pairs_csv(path)
    assert jobs == [
        PairJob(1, str(tmp_path / "d" / "f1.nii.gz"), str(tmp_path / "d" / "m1.nii.gz")),
        PairJob(2, str(tmp_path / "d" / "f2.nii.gz"), "/abs/m2.nii", None, str(tmp_path / "d" / "ml2.nii.gz")),
    ]
    assert [job.name for job in jobs] == ["00001_f1__m1", "00002_f2__m2"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fixed,image\na,b\n", "needs a header with 'fixed' and 'moving'"),
        ("fixed,moving\n", "holds no pairs"),
        ("fixed,moving\na.nii,\n", "row 1 lacks a fixed or a moving image"),
    ],
)
def test_bad_pairs_csv_is_refused(tmp_path, text, expected):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=expected):
        read_pairs_csv(path)


def test_atlas_mode_pairs_the_atlas_with_every_subject(tmp_path):
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("# cohort\ns1.nii.gz\n\n/data/s2.nii.gz\n")
    jobs = atlas_pairs("/a/atlas.nii.gz", "/a/atlas_seg.nii.gz", subjects)
    assert [(j.row, j.fixed, j.moving, j.moving_label) for j in jobs] == [
        (1, str(tmp_path / "s1.nii.gz"), "/a/atlas.nii.gz", "/a/atlas_seg.nii.gz"),
        (2, "/data/s2.nii.gz", "/a/atlas.nii.gz", "/a/atlas_seg.nii.gz"),
    ]


def test_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    code, _, err = run(["--pairs", str(tmp_path / "none.csv"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.strip() == f"ran-register-batch: error: --pairs {tmp_path / 'none.csv'}: not found."
    code, _, err = run(["--atlas", "a.nii.gz", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--atlas needs --subjects" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- a bad subject, then the reruns -------------------------------------------------------------------


def test_six_pairs_one_truncated_then_rerun_skips_five_and_retries_one(small, tmp_path, capsys):
    """5 pairs succeed and the truncated one fails with its reason; a rerun skips the 5 (files untouched) and
    fails the bad one again; once the file is repaired the next rerun registers it alone."""
    bad = tmp_path / "images"
    shutil.copytree(small / "images", bad)
    broken = bad / "subject_04.nii.gz"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    pairs = pairs_csv(tmp_path / "pairs.csv", small, [1, 2, 3, 4, 5, 1], images=bad)
    out = tmp_path / "out"

    code, stdout, _ = run(["--pairs", str(pairs), "--out", str(out), *FAST], capsys)
    rows = read_summary(out)
    assert code == 1
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "done", "done"]
    failed = rows[3]
    assert failed["reason"].startswith(f"moving image {broken}: truncated or corrupt file")
    assert not (out / failed["name"]).exists(), "a failed pair left a folder"
    for r in rows:
        if r["status"] == "done":  # registered: the labels overlap better than without the deformable step
            assert float(r["dice_registered"]) > float(r["dice_affine"]) + 0.05, r
            assert float(r["folding_percent"]) < 1.0
    assert "6 pairs: 5 done, 0 skipped, 1 failed" in stdout
    assert f"failed: {failed['name']}: moving image {broken}: truncated" in stdout.splitlines()[-1]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*")}

    code, stdout, _ = run(["--pairs", str(pairs), "--out", str(out), *FAST], capsys)
    assert code == 1 and "6 pairs: 0 done, 5 skipped, 1 failed" in stdout
    rerun = read_summary(out)
    assert [r["status"] for r in rerun] == ["skipped"] * 3 + ["failed"] + ["skipped"] * 2
    for before, after in zip(rows, rerun, strict=True):  # the skipped rows keep the first run's figures
        assert {k: before[k] for k in ("dice_registered", "folding_percent", "warnings")} == {
            k: after[k] for k in ("dice_registered", "folding_percent", "warnings")
        }
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*")} == stamps, "a skipped pair was rewritten"

    shutil.copy(small / "images" / "subject_04.nii.gz", broken)
    code, stdout, _ = run(["--pairs", str(pairs), "--out", str(out), *FAST], capsys)
    assert code == 0 and "6 pairs: 1 done, 5 skipped, 0 failed" in stdout
    final = read_summary(out)
    assert [r["status"] for r in final] == ["skipped"] * 3 + ["done"] + ["skipped"] * 2
    assert float(final[3]["dice_registered"]) > float(final[3]["dice_affine"])
    assert not leftovers(out)


def test_changed_settings_redo_the_pairs(small, tmp_path, capsys):
    """The fingerprint holds the settings: other instance-optimisation iterations register again."""
    pairs = pairs_csv(tmp_path / "pairs.csv", small, [1])
    out = tmp_path / "out"
    assert run(["--pairs", str(pairs), "--out", str(out), *FAST], capsys)[0] == 0
    assert run(["--pairs", str(pairs), "--out", str(out), *FAST, "--io-iterations", "2", "3"], capsys)[0] == 0
    assert read_summary(out)[0]["status"] == "done"
    report = json.loads((out / "00001_subject_00__subject_01" / "report.json").read_text())
    assert report["instance_optimisation"]["iterations"] == [2, 3]


# --- a kill, torchrun ranks, the MONAI way (subprocesses) -----------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(small, tmp_path_factory) -> tuple[Path, Path]:
    """One process, never interrupted: the reference outputs of 5 pairs."""
    root = tmp_path_factory.mktemp("reference")
    pairs = pairs_csv(root / "pairs.csv", small, [1, 2, 3, 4, 5])
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ran_bundle.batch", "--pairs", str(pairs), "--out", str(out), *FAST, "--quiet"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pairs, out


@pytest.mark.slow
def test_sigkill_during_the_third_pair_then_rerun_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    """SIGKILL while the third pair is being registered; the rerun skips the two done pairs and finishes; every
    output equals the uninterrupted run's byte for byte (NIfTI, transform; reports but their timings, command
    and system), and no staging folder, lock or partial file is left."""
    pairs, reference = uninterrupted
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ran_bundle.batch", "--pairs", str(pairs), "--out", str(out), *FAST, "--quiet"]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".partial-rank0-of-1.jsonl"
    third = out / f".{read_pairs_csv(pairs)[2].name}.lock"
    try:
        deadline = time.time() + 300
        while not (third.exists() and partial.read_text().count("\n") == 2) and time.time() < deadline:
            assert proc.poll() is None, "the run ended before its third pair"
            time.sleep(0.02)
        assert third.exists(), "the third pair did not start in time"
        time.sleep(0.3)  # inside the third pair's registration
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert partial.read_text().count("\n") == 2 and not (out / "summary.csv").exists()
    assert not (out / read_pairs_csv(pairs)[2].name / "report.json").exists(), "the kill came too late"

    rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["status"] for r in read_summary(out)] == ["skipped", "skipped", "done", "done", "done"]
    same_outputs(out, reference)
    assert not leftovers(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_summary_of_one_process(uninterrupted, tmp_path):
    """``torchrun`` with 2 CPU processes (gloo): the same summary (but seconds) and the same files as one process;
    each pair registered once, by the rank ``row - 1 mod 2``."""
    pairs, reference = uninterrupted
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "ran_bundle.batch", "--pairs", str(pairs), "--out", str(out), *FAST, "--quiet"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("5 pairs: 5 done, 0 skipped, 0 failed") == 1, proc.stdout  # rank 0 alone reports

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    rows = read_summary(out)
    assert without_seconds(rows) == without_seconds(read_summary(reference))
    assert [r["status"] for r in rows] == ["done"] * 5
    for r in rows:
        report = json.loads((out / r["name"] / "report.json").read_text())
        assert report["arguments"]["rank"] == f"{(int(r['row']) - 1) % 2}/2"
    same_outputs(out, reference)
    assert not leftovers(out)


@pytest.mark.slow
def test_monai_bundle_inference_runs_the_batch(small, tmp_path):
    """``python -m monai.bundle run inference`` goes through the batch runner: a truncated subject fails alone
    (non-zero exit naming it, the other pair written), and the rerun skips the done pair."""
    bad = tmp_path / "bad.nii.gz"
    data = (small / "images" / "subject_02.nii.gz").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    image, label = (
        (lambda i: str(small / "images" / f"subject_0{i}.nii.gz")),
        (lambda i: str(small / "labels" / f"subject_0{i}.nii.gz")),
    )
    datalist = tmp_path / "datalist.json"
    pairs = [
        {"fixed_image": image(0), "moving_image": image(1), "fixed_label": label(0), "moving_label": label(1)},
        {"fixed_image": image(0), "moving_image": str(bad)},
    ]
    datalist.write_text(json.dumps({"test": [], "test_pairs": pairs}))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
        "--datalist", str(datalist), "--output_dir", str(out), "--spacing", "6.0", "--intensity", "ct",
        "--affine_stage", "none", "--io_iterations", "[2,2]", "--progress", "False", "--threads", "1",
    ]  # fmt: skip
    first = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert first.returncode != 0
    assert f"1 of 2 pairs failed (see {out}/summary.csv): 00002_subject_00__bad: moving image {bad}" in first.stderr
    rows = read_summary(out)
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert float(rows[0]["dice_registered"]) > float(rows[0]["dice_affine"])
    assert (out / rows[0]["name"] / "warped_label.nii.gz").is_file()

    shutil.copy(small / "images" / "subject_02.nii.gz", bad)
    second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["status"] for r in read_summary(out)] == ["skipped", "done"]
    assert not leftovers(out)


@pytest.mark.slow
def test_benchmark_throughput_compares_one_process_with_one_thread_processes(tmp_path):
    """``scripts/benchmark.py --throughput`` runs both ways on the cores it may use and reports pairs per hour."""
    out = tmp_path / "throughput.md"
    options = "--intensity ct --spacing 6 --affine none --io-iterations 2 2"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--throughput", "--throughput-pairs", "2",
         "--throughput-options", options, "--out", str(out)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    rows = [row for row in cells if "process" in row[0]]
    cores = len(os.sched_getaffinity(0))
    assert [r[0].strip() for r in rows] == [f"1 process x {cores} threads", f"{cores} processes x 1 thread"]
    for row in rows:
        pairs, wall, per_hour = int(row[1]), float(row[2]), float(row[3])
        assert pairs == 2 and per_hour == pytest.approx(2 * 3600 / wall, rel=0.01)
