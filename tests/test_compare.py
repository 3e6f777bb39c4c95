"""End-to-end toy runs of ``scripts/compare.py`` (every model) and ``scripts/paper_figures.py`` on data/tiny_ct.

No accuracy assertions (3 training steps): the tests check that every model is trained, saved and scored on the
same pairs, that the identity row equals the labels' own overlap, and that the tables and SVG figures are complete.
The figures need matplotlib (the ``figures`` extra) and ``paper_figures.py`` needs scipy: the tests that make or
read figures skip without them. The scripts' own functions are imported from the bundle's ``scripts`` package, with
the repository root on ``sys.path`` as the scripts put it.
"""

from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ran_bundle.data import load_datalist
from ran_bundle.metrics import dice
from ran_bundle.transforms import registration_transforms

pytestmark = pytest.mark.slow  # subprocesses or training runs: not in `pytest -m "not slow"`

MODELS = ("ref", "RAn0", "RAn3", "RAn4+", "voxelmorph", "localnet")  # RAn4: RAn4+ with fewer channels
REFERENCE = "ref [models/model.pt]"  # the shipped weights, scored but not trained by the comparison
SVG_NS = "{http://www.w3.org/2000/svg}"
NO_FIGURES = "the figures need matplotlib: pip install 'ran-bundle[figures]'"


@pytest.fixture
def scripts(repo_root, monkeypatch):
    """``scripts.<name>`` of the bundle, imported with the repository root on ``sys.path``."""
    monkeypatch.syspath_prepend(str(repo_root))
    return lambda name: importlib.import_module(f"scripts.{name}")


def _svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg"
    return [t.text for t in root.iter(f"{SVG_NS}text")]


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``text`` as a list of ``{column: cell}`` rows."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append([dict(zip(block[0], row, strict=True)) for row in block[2:]])
            block = []
    return tables


def _number(cell: str) -> float:
    """``"0.812 ± 0.003"`` -> 0.812."""
    return float(cell.split("±")[0])


@pytest.fixture(scope="module")
def compare_run(repo_root, tiny_ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cmd = [sys.executable, str(repo_root / "scripts" / "compare.py"), "--quick", "--out", str(out)]
    cmd += ["--ckpt-dir", str(out / "ckpt"), "--models", *MODELS, "--threads", "1"]
    cmd += ["--reference", "ref=models/model.pt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_compare_writes_every_model_and_the_identity(compare_run, repo_root, tiny_ct):
    out, proc = compare_run
    assert "train RAn4+" in proc.stderr and "3/3" in proc.stderr  # tqdm progress over the training steps
    report = (out / "compare.md").read_text()
    assert "Machine:" in report and "3 steps of batch 1, seed 0" in report and "spacing 6.0 mm" in report
    summary, per_label = _tables(report)
    assert [r["model"] for r in summary] == ["identity", REFERENCE, *MODELS]
    assert "References (weights loaded, not trained here): `ref [models/model.pt]`" in report
    names = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta"]
    names += ["inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas"]
    assert [c for c in summary[0] if c.startswith("Dice ")] == [f"Dice {n}" for n in names]
    for row in summary:
        for col in ("mean Dice", "HD95 (mm)", "ASD (mm)", "% det J ≤ 0 (labels)", "SDlogJ"):
            assert math.isfinite(_number(row[col])), (row["model"], col, row[col])
        assert 0.0 <= _number(row["mean Dice"]) <= 1.0
        if row["model"] == "identity":
            assert row["params (M)"] == row["GFLOPs"] == row["time/pair (s)"] == "–"
            assert _number(row["SDlogJ"]) == 0.0 and _number(row["% det J ≤ 0 (labels)"]) == 0.0
        else:
            assert float(row["params (M)"]) > 0 and float(row["GFLOPs"]) > 0 and float(row["time/pair (s)"]) > 0
            assert (row["train (min)"] == "–") == (row["model"] == REFERENCE)
    by_model = {r["model"]: r for r in summary}
    assert round(float(by_model["ref"]["params (M)"]) * 1e3) == 738  # the released topology
    assert by_model[REFERENCE]["params (M)"] == by_model["ref"]["params (M)"]
    # the shipped weights move the images, the 3-step ref barely: their fields must differ
    assert by_model[REFERENCE]["SDlogJ"] != by_model["ref"]["SDlogJ"]
    assert len(per_label) == (len(names) + 1) * (len(MODELS) + 2)

    # the identity row is the overlap of the raw label maps of the validation pairs, preprocessed at 6 mm
    pairs = load_datalist(tiny_ct / "datalist.json")["validation_pairs"]
    xform = registration_transforms("eval", spacing=(6.0, 6.0, 6.0), intensity="ct")
    scores = {k: [] for k in range(1, 11)}
    for pair in pairs:
        d = xform(pair)
        mov, fix = d["moving_label"][0].numpy().round(), d["fixed_label"][0].numpy().round()
        for k in scores:
            scores[k].append(dice(mov == k, fix == k))
    for k, name in enumerate(names, start=1):
        assert _number(by_model["identity"][f"Dice {name}"]) == pytest.approx(np.mean(scores[k]), abs=6e-4)

    with open(out / "compare_per_pair.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (len(MODELS) + 2) * len(pairs) * (len(names) + 2)  # labels + "mean" + "all" per pair
    assert {r["model"] for r in rows} == {"identity", REFERENCE, *MODELS}
    for name in (*MODELS, "ref_model"):
        assert (out / "ckpt" / f"{name}.pt").is_file()


def test_compare_dice_box_plot(compare_run):
    pytest.importorskip("matplotlib", reason=NO_FIGURES)
    out, _ = compare_run
    texts = _svg_texts(out / "compare_dice.svg")
    for name in ("identity", REFERENCE, *MODELS, "spleen", "pancreas", "mean"):
        assert name in texts
    assert "![Dice per label](compare_dice.svg)" in (out / "compare.md").read_text()


def test_box_plot_draws_one_box_and_the_dots_per_group_and_series(scripts, tmp_path):
    pytest.importorskip("matplotlib", reason=NO_FIGURES)
    figures = scripts("figures")
    groups = {
        "spleen": {"identity": [0.5, 0.6], "ref": [0.7, 0.8, 0.9]},
        "liver": {"identity": [0.4], "ref": [float("nan")]},  # no finite value: no box
        "mean": {"identity": [0.45, 0.5], "ref": [0.6, 0.65]},
    }
    fig = figures.box_plot(groups, ylabel="Dice", title="Dice per label")
    ax = fig.axes[0]
    assert len(ax.patches) == 5  # one filled box per (group, series) with values
    assert [t.get_text() for t in ax.get_xticklabels()] == ["spleen", "liver", "mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["identity", "ref"]
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert sorted(len(line.get_ydata()) for line in dots) == [1, 2, 2, 2, 3]
    texts = _svg_texts(figures.save(fig, tmp_path / "box.svg"))
    assert {"Dice per label", "Dice", "spleen", "identity", "ref"} <= set(texts)
    assert figures.save(fig, tmp_path / "box.png").read_bytes()[:4] == b"\x89PNG"


def test_figures_say_how_to_install_matplotlib_when_it_is_missing(scripts, monkeypatch):
    pytest.importorskip("scipy", reason="scripts/paper_figures.py needs scipy")
    figures, paper_figures = scripts("figures"), scripts("paper_figures")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not figures.available()
    with pytest.raises(ImportError, match=r"ran-bundle\[figures\]"):
        figures.line_plot({"a": ([0, 1], [0, 1])})
    with pytest.raises(SystemExit, match=r"ran-bundle\[figures\]"):
        paper_figures.main(["--theory-only"])


def test_paper_figures_on_the_trained_models(compare_run, repo_root):
    pytest.importorskip("matplotlib", reason=NO_FIGURES)
    pytest.importorskip("scipy", reason="scripts/paper_figures.py needs scipy")
    out, _ = compare_run
    figs = out / "figures"
    cmd = [sys.executable, str(repo_root / "scripts" / "paper_figures.py"), "--out", str(figs)]
    cmd += ["--ckpt-dir", str(out / "ckpt"), "--models", "RAn0", "RAn3", "RAn4+", "ref_model", "--num-pairs", "20000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theory, fig7 = _tables((figs / "paper_figures.md").read_text())
    assert [r["preset"] for r in theory] == ["RAn0", "RAn3", "RAn4", "RAn4+", "ref"]
    ran0 = theory[0]
    assert ran0["pool sizes p_k"] == "[16, 8, 4, 2, 1]" and ran0["dilations r_k"] == "[1, 1, 1, 1, 1]"
    assert [r["model"] for r in fig7] == ["RAn0", "RAn3", "RAn4+", REFERENCE]
    for row in fig7:
        assert 0 < float(row["% organ voxels correct (labels)"]) <= 100 and int(row["correct pairs sampled"]) > 100
    titles = {name: _svg_texts(figs / f"{name}.svg") for name in ("fig3c_capture_range", "fig3d_separability")}
    assert "Fig. 3(c) capture range" in titles["fig3c_capture_range"]
    assert {"Fig. 3(d) motion separability", "RAn0", "ref"} <= set(titles["fig3d_separability"])
    # Fig. 7(a): one heat map panel per model; (b): the three pairwise differences
    assert {"RAn0", "RAn3", "RAn4+", REFERENCE} <= set(_svg_texts(figs / "fig7a_pdf.svg"))
    assert {"RAn3 − RAn0", "RAn4+ − RAn0", "RAn4+ − RAn3"} <= set(_svg_texts(figs / "fig7b_diff.svg"))


def test_correct_pairs_distance_and_motion(scripts):
    """Two correct voxels 3 apart whose predicted motions differ by 2: every sampled pair is (3, 2)."""
    pytest.importorskip("scipy", reason="scripts/paper_figures.py needs scipy")
    figures = scripts("paper_figures")
    correct = np.zeros((4, 4, 8), dtype=bool)
    correct[1, 1, 1] = correct[1, 1, 4] = True
    ddf = np.zeros((3, 4, 4, 8))
    ddf[2, 1, 1, 4] = -2.0
    ddf[0, 1, 1, 4] = 0.5
    dist, motion = figures.correct_pairs(correct, ddf, 3, 20_000, np.random.default_rng(0))
    assert len(dist) > 50 and np.all(dist == 3) and np.all(motion == 2.0)
    dist, _ = figures.correct_pairs(correct, ddf, 2, 20_000, np.random.default_rng(0))
    assert len(dist) == 0  # the only other correct voxel is out of reach
    density, x_edges, y_edges = figures.pair_density(np.full(10, 3.0), np.full(10, 2.0), 4, 4.0, 0.5)
    assert density.shape == (4, 8) and density.sum() == pytest.approx(1.0)
    assert np.unravel_index(density.argmax(), density.shape) == (2, 4)  # distance bin 3, motion bin [2, 2.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ref=runs/no_such.pt", "no_such.pt"),
        ("ref", "PRESET=CHECKPOINT"),
        ("RAn9=models/model.pt", "unknown model 'RAn9'"),
        ("RAn0=models/model.pt", "do not fit the RAn0 preset"),
    ],
)
def test_compare_refuses_a_bad_reference_before_any_work(scripts, tmp_path, spec, message):
    compare = scripts("compare")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message) as err:
        compare.main(["--quick", "--reference", spec, "--out", str(out), "--ckpt-dir", str(out / "ckpt")])
    assert str(err.value).startswith("compare.py: error:") and not out.exists()


def test_quick_mode_options(scripts, repo_root):
    """--quick picks the toy settings but never writes to docs/results; explicit options win."""
    compare = scripts("compare")
    args = compare.parse_args(["--quick"])
    assert (args.spacing, args.steps, args.crop, args.intensity) == (6.0, 3, [32, 32, 16], "ct")
    assert args.out == repo_root / "runs" / "compare_quick" and "docs" not in args.ckpt_dir.parts
    args = compare.parse_args(["--quick", "--steps", "5", "--out", "x", "--models", "RAn0"])
    assert (args.steps, str(args.out), args.models, args.spacing) == (5, "x", ["RAn0"], 6.0)
    with pytest.raises(SystemExit):
        compare.parse_args(["--crop", "32", "32", "20"])
