"""``ran-register`` from the user's side: the faults a user study found, bad input, and the help text.

Every refusal is ONE line on stderr (``ran-register: error: ...``) and exit status 2, before any work: nothing is
created and the network never runs (the ``no_work`` fixture makes running it an error). Ctrl-C is one line and exit
status 130. Warnings (images that do not overlap, images too small for the network, displacements larger than the
image) go to stderr and into ``report.json["warnings"]``.

The commands run in-process (:func:`ran_bundle.cli.register_main`), on 40^3-voxel synthetic phantoms of 2 mm (a
32^3 network grid, a few seconds per run with ``--io-iterations 2 2``); only the Ctrl-C test starts a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.cli import main, pipeline_options, register_main, register_parser
from ran_bundle.fields import write_image_atomic
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.outputs import OutputFolder
from ran_bundle.pipeline import DEFAULT_WEIGHTS, RegistrationPipeline

REPO = Path(__file__).resolve().parents[1]
FAST = ("--io-iterations", "2", "2", "--device", "cpu")
ERROR = "ran-register: error: "
WARNING = "[ran-register] warning: "

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"shipped weights not found: {DEFAULT_WEIGHTS}")


# ------------------------------------------------------------------------------------------------
# helpers and inputs
# ------------------------------------------------------------------------------------------------


def phantom(shape=(40, 40, 40), spacing=2.0, seed=0, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """An asymmetric head-like phantom: an ellipsoid with a brighter off-centre core and smooth texture; ``offset``
    (mm) moves it inside the image."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64) * spacing
    centre = (np.asarray(shape) - 1) * spacing / 2 + np.asarray(offset)
    semi = np.array([0.33, 0.28, 0.25]) * min(shape) * spacing
    r = np.sqrt(sum(((idx[i] - centre[i]) / semi[i]) ** 2 for i in range(3)))
    core = np.sqrt(sum((idx[i] - centre[i] - o) ** 2 for i, o in enumerate(semi * [0.3, -0.2, 0.2])))
    img = (r < 1.0) * (1.0 + 0.3 * gaussian_filter(rng.standard_normal(shape), 2)) + (core < 0.35 * semi.min())
    return gaussian_filter(img, 1.0).astype(np.float32)


def run(capsys, *argv) -> tuple[int, str]:
    """``ran-register`` in-process: (exit status, stderr)."""
    try:
        register_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def ok(capsys, *argv) -> str:
    code, err = run(capsys, *argv)
    if code != 0:
        pytest.fail(f"ran-register exited {code}:\n{err[-3000:]}")
    assert "Traceback" not in err
    return err


def assert_one_error_line(err: str, *expected: str) -> str:
    """stderr is exactly one line, the error, holding every ``expected`` text."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def tree(folder: Path) -> set[str]:
    """Every path under ``folder``, hidden ones included (staging folders, lock files)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def warnings_of(err: str) -> list[str]:
    return [ln[len(WARNING) :] for ln in err.splitlines() if ln.startswith(WARNING)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A phantom pair (40^3 voxels of 2 mm; the moving phantom shifted by 4 mm and textured differently), a moving
    label map, and tiny invalid inputs."""
    d = tmp_path_factory.mktemp("pair")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    moving = phantom(seed=1, offset=(4.0, -2.0, 0.0))
    small = phantom((32, 32, 32), seed=2)
    nan = small.copy()
    nan[3, 4, 5] = np.nan
    shifted = aff.copy()
    shifted[:3, 3] = [4.0, 0.0, 0.0]
    lab = (small > 0.5).astype(np.int16)
    junk = d / "junk.pt"
    junk.write_text("not a checkpoint")
    ran4 = d / "ran4.pt"
    torch.save({"model": ResidualAlignerNetwork(3, "RAn4").state_dict()}, ran4)
    return {
        "fixed": write_image_atomic(phantom(), aff, d / "fixed.nii.gz"),
        "moving": write_image_atomic(moving, aff, d / "moving.nii.gz"),
        "moving_label": write_image_atomic(
            (moving > 0.5).astype(np.int16) + (moving > 1.2), aff, d / "moving_label.nii.gz"
        ),
        "img": write_image_atomic(small, aff, d / "img.nii.gz"),
        "lab": write_image_atomic(lab, aff, d / "lab.nii.gz"),
        "flat": write_image_atomic(small[:, :, 0], aff, d / "flat.nii.gz"),
        "vol4d": write_image_atomic(np.stack([small, small], -1), aff, d / "vol4d.nii.gz"),
        "nan": write_image_atomic(nan, aff, d / "nan.nii.gz"),
        "const": write_image_atomic(np.zeros_like(small), aff, d / "const.nii.gz"),
        "lab_shape": write_image_atomic(lab[:, :, :30], aff, d / "lab_shape.nii.gz"),
        "lab_affine": write_image_atomic(lab, shifted, d / "lab_affine.nii.gz"),
        "missing": d / "missing.nii.gz",
        "junk": junk,
        "ran4": ran4,
    }


def _boom(*args, **kwargs):
    raise AssertionError("the registration ran although the command should have been refused")


@pytest.fixture
def no_network(monkeypatch):
    """Make every step after reading the inputs an error: the affine stage, the network, the optimisation."""
    for step in ("run_affine", "preprocess", "predict", "optimise"):
        monkeypatch.setattr(f"ran_bundle.pipeline.RegistrationPipeline.{step}", _boom)
    monkeypatch.setattr(ResidualAlignerNetwork, "forward", _boom)


@pytest.fixture
def no_work(monkeypatch, no_network):
    """Make any registration an error, input checks included: the pipeline's ``register`` must not be called."""
    monkeypatch.setattr("ran_bundle.pipeline.RegistrationPipeline.register", _boom)


# ------------------------------------------------------------------------------------------------
# user study: refused before any work, one line, exit 2
# ------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "not a number": (["--io-iterations", "x", "2"], ["argument --io-iterations: invalid int value: 'x'"]),
    "one value": (["--io-iterations", "x"], ["argument --io-iterations: expected 2 arguments"]),
    "negative iterations": (["--io-iterations", "-1", "2"], ["--io-iterations", "non-negative"]),
    "zero spacing": (["--spacing", "0"], ["--spacing '0'", "positive"]),
    "two spacings": (["--spacing", "2", "2"], ["--spacing '2 2'", "one number or three"]),
    "unknown affine": (["--affine", "shear"], ["argument --affine: invalid choice: 'shear'"]),
    "misspelt flag": (["--moving-lable", "x"], ["unrecognized arguments: --moving-lable x"]),
    "abbreviated flag": (["--moving-lab", "x"], ["unrecognized arguments: --moving-lab x"]),
    "zero threads": (["--threads", "0"], ["--threads 0"]),
    "negative weight": (["--io-weight", "-1"], ["--io-weight -1"]),
    "unknown device": (["--device", "tpu"], ["--device 'tpu'"]),
    "unknown preset": (["--preset", "RAn9"], ["--preset 'RAn9'"]),
    "unknown intensity": (["--intensity", "pet"], ["argument --intensity: invalid choice: 'pet'"]),
    "one ct window value": (["--ct-window", "-1000"], ["argument --ct-window: expected 2 arguments"]),
    "reversed ct window": (["--ct-window", "300", "-1000"], ["--ct-window (300.0, -1000.0)", "LOW < HIGH"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_any_work(case, pair, tmp_path, capsys, no_work):
    extra, expected = BAD_ARGUMENTS[case]
    out = tmp_path / "a" / "b" / "out"  # missing parents: not even they may be created
    code, err = run(capsys, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, *extra)
    assert code == 2
    assert_one_error_line(err, *expected)
    assert tree(tmp_path) == set()


def test_unwritable_out_is_refused_before_any_work(pair, tmp_path, capsys, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    cases = [(a_file / "out", "is not a folder"), (a_file, "exists and is not a folder")]
    if Path("/proc/self").is_dir():  # a folder nobody, not even root, can create files in
        cases.append((Path("/proc/ran-register-test-out"), "choose a writable --out"))
    if os.geteuid() != 0:  # root ignores permission bits
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        cases.append((read_only / "out", "not writable"))
    for out, expected in cases:
        code, err = run(capsys, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out)
        assert code == 2
        assert_one_error_line(err, f"--out {out}", expected)
    assert a_file.read_text() == "user data"
    assert tree(tmp_path) <= {"a_file", "read_only"}


def test_numbers_given_as_paths_stay_paths(pair, tmp_path, capsys, monkeypatch):
    """``--out 12.50`` writes into the folder ``12.50`` (not ``12.5``) and ``--moving 1e3`` reads the file ``1e3``
    (not ``1000.0``): arguments are never evaluated as literals."""
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "--fixed", pair["fixed"], "--moving", "1e3", "--out", "12.50", *FAST, "--quiet")
    assert code == 2
    assert_one_error_line(err, "moving image 1e3: file not found")
    assert tree(tmp_path) == set()

    ok(capsys, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", "12.50", *FAST, "--quiet")
    assert sorted(os.listdir(tmp_path)) == ["12.50"]
    report = json.loads((tmp_path / "12.50" / "report.json").read_text())
    assert report["arguments"]["out"] == "12.50"


def test_truncated_weights_are_refused_naming_the_file(pair, tmp_path, capsys, no_work):
    weights = tmp_path / "weights.pt"
    torch.save({"model": ResidualAlignerNetwork(3, "ref").state_dict()}, weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    code, err = run(capsys, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, "--weights", weights)
    assert code == 2
    assert_one_error_line(err, f"weights {weights}: truncated or corrupt file")
    assert tree(tmp_path) == {"weights.pt"}


BAD_INPUTS = {
    "missing fixed": (dict(fixed="missing"), ["fixed image", "missing.nii.gz", "file not found"]),
    "2D image": (dict(moving="flat"), ["moving image", "flat.nii.gz", "not a 3D image"]),
    "4D image": (dict(fixed="vol4d"), ["fixed image", "vol4d.nii.gz", "not a 3D image"]),
    "NaN values": (dict(moving="nan"), ["moving image", "nan.nii.gz", "1 NaN"]),
    "constant image": (dict(fixed="const"), ["fixed image", "const.nii.gz", "same value"]),
    "label shape": (dict(moving_label="lab_shape"), ["moving label", "lab_shape.nii.gz", "shape (32, 32, 30)"]),
    "label affine": (dict(fixed_label="lab_affine"), ["fixed label", "lab_affine.nii.gz", "affine differs"]),
    "label of floats": (dict(moving_label="img"), ["moving label", "img.nii.gz", "non-integer values"]),
    "unreadable weights": (dict(weights="junk"), ["weights", "junk.pt", "cannot read"]),
    "incompatible weights": (dict(weights="ran4"), ["weights", "ran4.pt", "do not fit the RAN preset 'ref'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_files_are_refused_before_any_work(case, pair, tmp_path, capsys, no_network):
    change, expected = BAD_INPUTS[case]
    args = {"fixed": "img", "moving": "img", **change}
    argv = ["--out", tmp_path / "out", "--device", "cpu", "--quiet"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", pair[value]]
    code, err = run(capsys, *argv)
    assert code == 2
    assert_one_error_line(err, *expected)
    assert tree(tmp_path) == set()  # neither the output folder, nor a staging folder, nor the lock


# ------------------------------------------------------------------------------------------------
# user study: the output folder
# ------------------------------------------------------------------------------------------------


def test_reused_out_holds_exactly_the_second_runs_outputs(pair, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, *FAST, "--quiet")
    ok(capsys, *common, "--png", "--inverse", "--moving-label", pair["moving_label"])
    first = set(os.listdir(out))
    assert {"overview.png", "inverse_ddf.nii.gz", "warped_label.nii.gz"} < first
    (out / "notes.txt").write_text("my notes")
    first_report = (out / "report.json").read_text()

    ok(capsys, *common)
    expected = {"warped.nii.gz", "ddf.nii.gz", "affine.tfm", "jacobian.nii.gz", "report.json"}
    assert set(os.listdir(out)) == expected | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "my notes"
    report = json.loads((out / "report.json").read_text())
    assert report != json.loads(first_report) and set(report["outputs"].values()) == expected
    assert report["arguments"]["png"] is False and report["arguments"]["moving_label"] is None
    assert set(os.listdir(tmp_path)) == {"out"}  # no staging folder, no lock left


def test_second_concurrent_run_into_the_same_out_is_refused(pair, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"the other run's file")
    holder = OutputFolder(out).acquire()
    try:
        code, err = run(capsys, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out)
    finally:
        holder.release()
    assert code == 2
    assert_one_error_line(err, f"--out {out}", "is writing into this folder", f"pid {os.getpid()}", "choose another")
    assert os.listdir(out) == ["warped.nii.gz"] and (out / "warped.nii.gz").read_bytes() == b"the other run's file"
    assert set(os.listdir(tmp_path)) == {"out"}


# ------------------------------------------------------------------------------------------------
# user study: Ctrl-C
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(pair, tmp_path_factory) -> dict:
    """``python -m ran_bundle`` interrupted (SIGINT) once its instance optimisation (100,000 iterations) runs."""
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "out"
    cmd = [sys.executable, "-m", "ran_bundle", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
           "--out", str(out), "--io-iterations", "0", "100000", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a test run started in the background by a shell inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as an interactive shell would
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    chunks: list[bytes] = []
    started = threading.Event()

    def read() -> None:
        while chunk := proc.stderr.read1(4096):  # type: ignore[union-attr]
            chunks.append(chunk)
            if b"] instance optimisation:" in b"".join(chunks):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not started.wait(timeout=300):
        proc.kill()
        pytest.fail(f"the optimisation step never started:\n{b''.join(chunks).decode()[-3000:]}")
    time.sleep(1.0)  # well inside the step
    listing_before = tree(root)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ran-register did not stop within 120 s of SIGINT")
    reader.join(timeout=10)
    return {"code": proc.returncode, "stderr": b"".join(chunks).decode(), "root": root, "before": listing_before}


def test_ctrl_c_exits_130_and_leaves_nothing(interrupted):
    # a shell reports 130 both for exit(130) and for a death by SIGINT (128 + 2), which Python chooses when a
    # KeyboardInterrupt escapes during its shutdown (seen once on a loaded 2-core CI run): either is Ctrl-C's 130
    assert interrupted["code"] in (130, -signal.SIGINT), interrupted["code"]
    err = interrupted["stderr"]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count(ERROR) == 1 and f"{ERROR}interrupted; nothing was written\n" in err
    assert tree(interrupted["root"]) == set(), "an output, staging folder or lock was left behind"


def test_ctrl_c_message_is_the_last_line(interrupted):
    lines = interrupted["stderr"].split("\n")
    assert lines[-1] == "" and lines[-2] == f"{ERROR}interrupted; nothing was written", repr(lines[-3:])


# ------------------------------------------------------------------------------------------------
# user study: doubtful registrations are warned about
# ------------------------------------------------------------------------------------------------


def moved_header(path: Path, out: Path, change) -> Path:
    img = nib.load(str(path))
    return write_image_atomic(np.asarray(img.dataobj), change(img.affine.copy()), out)


def translated(affine: np.ndarray) -> np.ndarray:
    affine[0, 3] += 300.0
    return affine


def flipped(affine: np.ndarray) -> np.ndarray:
    """Axis 0 runs the other way over the same box: the anatomy is mirrored left-right."""
    extent = affine[0, 0] * 39
    affine[0, 0] = -affine[0, 0]
    affine[0, 3] += extent
    return affine


@pytest.mark.parametrize(("name", "change"), [("300 mm away", translated), ("flipped", flipped)])
def test_non_overlapping_images_are_warned_about(name, change, pair, tmp_path, capsys):
    """A header that puts the moving image 300 mm away, or mirrors it, with ``--affine none``: a warning on
    stderr and in the report says the images do not overlap."""
    fixed = write_image_atomic(
        phantom(offset=(16.0, 0.0, 0.0)), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "fixed.nii.gz"
    )
    moving = moved_header(fixed, tmp_path / "moving.nii.gz", change)
    out = tmp_path / "out"
    err = ok(capsys, "--fixed", fixed, "--moving", moving, "--out", out, "--affine", "none", *FAST)
    report = json.loads((out / "report.json").read_text())
    assert report["field"]["foreground_overlap_after_affine"] < 0.5
    overlap = [w for w in report["warnings"] if "of the fixed foreground overlaps the moving image's" in w]
    assert len(overlap) == 1 and "a header is wrong" in overlap[0]
    assert overlap[0] in warnings_of(err)


def test_no_overlap_gives_only_the_tools_own_messages(pair, tmp_path, capsys, recwarn):
    """Only ``[ran-register] warning:`` lines on stderr (in-process pytest records Python warnings instead of
    printing them: ``recwarn`` holds what a user would see as raw warnings)."""
    moving = moved_header(pair["fixed"], tmp_path / "moving.nii.gz", translated)
    err = ok(capsys, "--fixed", pair["fixed"], "--moving", moving, "--out", tmp_path / "out", "--affine", "none",
             *FAST, "--quiet")  # fmt: skip
    assert err.splitlines() == [WARNING + w for w in warnings_of(err)], err
    shown = [f"{w.category.__name__}: {w.message}" for w in recwarn if not issubclass(w.category, DeprecationWarning)]
    assert shown == [], shown


def test_displacement_larger_than_the_image_is_warned_about(pair, tmp_path, capsys):
    """The affine stage finds a header 300 mm away: the registration is fine, but a displacement four times the
    image's size is worth a word (same anatomy? overlapping scans?)."""
    moving = moved_header(pair["fixed"], tmp_path / "moving.nii.gz", translated)
    out = tmp_path / "out"
    err = ok(capsys, "--fixed", pair["fixed"], "--moving", moving, "--out", out, *FAST, "--quiet")
    report = json.loads((out / "report.json").read_text())
    assert report["field"]["displacement_mm_max"] > 250
    large = [w for w in report["warnings"] if "exceeds the fixed image's smallest extent" in w]
    assert len(large) == 1 and warnings_of(err) == report["warnings"]


def test_images_too_small_for_the_network_are_refused(tmp_path, capsys, no_network):
    """8^3 voxels of 1 mm are 4 voxels of the network's 2 mm grid: refused with one line, nothing written."""
    path = write_image_atomic(phantom((8, 8, 8), 1.0), np.eye(4), tmp_path / "tiny.nii.gz")
    out = tmp_path / "out"
    code, err = run(capsys, "--fixed", path, "--moving", path, "--out", out, "--quiet")
    assert code == 2
    assert_one_error_line(err, f"fixed image {path}", "too small to register")
    assert tree(tmp_path) == {"tiny.nii.gz"}


def test_small_images_are_warned_about(tmp_path, capsys):
    """8^3 voxels of 2 mm (16 mm) still make a 16^3 network grid: registered, with a warning."""
    fixed = write_image_atomic(phantom((8, 8, 8), 2.0), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "fixed.nii.gz")
    moving = write_image_atomic(
        phantom((8, 8, 8), 2.0, seed=1), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "moving.nii.gz"
    )
    out = tmp_path / "out"
    err = ok(capsys, "--fixed", fixed, "--moving", moving, "--out", out, *FAST, "--quiet")
    report = json.loads((out / "report.json").read_text())
    small = [w for w in report["warnings"] if "covers under 64 mm along an axis" in w]
    assert len(small) == 1 and small[0] in warnings_of(err)


# ------------------------------------------------------------------------------------------------
# defaults and help
# ------------------------------------------------------------------------------------------------

#: the settings a pipeline keeps from its arguments
SETTINGS = (
    "preset", "spacing", "intensity", "ct_window", "affine_stage", "io_iterations", "io_weight", "io_fold_weight",
    "finetune_steps", "finetune_lr", "inverse", "progress",
)  # fmt: skip


def test_the_options_default_to_the_pipelines_own_defaults():
    """ran-register (and the Deploy app, whose options are add_pipeline_options) without options builds the
    pipeline that RegistrationPipeline builds without arguments: one set of defaults."""
    args = register_parser().parse_args(["--fixed", "f", "--moving", "m", "--out", "o"])
    network = ResidualAlignerNetwork(3, "ref")
    own = RegistrationPipeline(network=network)
    cli = RegistrationPipeline(
        network=network, preset=args.preset, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        **pipeline_options(args),
    )  # fmt: skip
    assert {k: getattr(cli, k) for k in SETTINGS} == {k: getattr(own, k) for k in SETTINGS}


def test_help_states_the_conventions(capsys):
    text = " ".join(register_parser().format_help().split())
    assert "ONE ITK displacement field holding the whole mapping, affine included" in text
    assert "maps a FIXED-space point p to the MOVING-space point p + w(p)" in text
    assert "affine.tfm (the affine stage alone" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["warp", "--help"])  # python -m ran_bundle warp
    assert exit_info.value.code == 0 and "usage: ran-warp" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["register", "--help"])
    assert exit_info.value.code == 0 and "usage: ran-register" in capsys.readouterr().out
