"""The overview figure (:mod:`ran_bundle.figures`) on a small synthetic registration: titles, orientation,
the affine-only moving image, the deformation grid, the Jacobian's folding and the PNG itself."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from ran_bundle import figures  # noqa: E402
from ran_bundle.affine import AffineResult  # noqa: E402
from ran_bundle.figures import COLUMNS, ROWS, overview_figure, overview_png, require_matplotlib  # noqa: E402
from ran_bundle.flow import voxel_grid, voxel_to_world  # noqa: E402
from ran_bundle.inputs import InputError, Volume  # noqa: E402
from ran_bundle.pipeline import NetworkPair, PairInputs, Registration  # noqa: E402
from ran_bundle.spatial import Grid, sitk_affine  # noqa: E402

SHAPE = (20, 16, 24)
#: file axes: i -> patient's left (x decreasing, 2 mm), j -> superior (z, 3 mm), k -> posterior (y decreasing, 1.5 mm)
FIXED_AFFINE = np.array([[-2.0, 0.0, 0.0, 20.0], [0.0, 0.0, -1.5, 10.0], [0.0, 3.0, 0.0, -30.0], [0.0, 0.0, 0.0, 1.0]])
SHIFT = np.array([5.0, -3.0, 7.0])  # moving space = fixed space shifted by SHIFT (mm)
#: the fixed image: x + 2 y + 4 z of each voxel's RAS world point (it grows towards R, A and S)
WEIGHTS = np.array([1.0, 2.0, 4.0])


def world_points(shape, affine) -> np.ndarray:
    return voxel_to_world(voxel_grid(shape), affine).numpy()


def make_registration(field: torch.Tensor | None = None, jacobian: torch.Tensor | None = None) -> Registration:
    fixed_array = np.tensordot(WEIGHTS, world_points(SHAPE, FIXED_AFFINE), axes=1).astype(np.float32)
    moving_affine = FIXED_AFFINE.copy()
    moving_affine[:3, 3] += SHIFT
    matrix = np.eye(4)
    matrix[:3, 3] = SHIFT  # fixed point p -> moving point p + SHIFT: the same anatomy
    fixed = Volume(fixed_array, FIXED_AFFINE, "/data/fixed.nii.gz", "fixed image")
    moving = Volume(fixed_array.copy(), moving_affine, "/data/moving.nii.gz", "moving image")
    zeros = torch.zeros(1, 3, 8, 8, 8)
    return Registration(
        inputs=PairInputs(fixed, moving),
        affine=AffineResult(matrix, sitk_affine(matrix), "affine"),
        pair=NetworkPair(zeros[:, :1], zeros[:, :1], Grid((8, 8, 8), np.eye(4))),
        ddf_network=zeros,
        ddf=zeros,
        field=torch.zeros(1, 3, *SHAPE) if field is None else field,
        jacobian=torch.ones(SHAPE) if jacobian is None else jacobian,
        warped=-torch.from_numpy(fixed_array),  # distinguishable from the others
        warped_label=None,
        inverse_field=None,
        stats={},
    )


@pytest.fixture(scope="module")
def figure():
    return overview_figure(make_registration())


def panels(fig) -> np.ndarray:
    grid = [[None] * 3 for _ in ROWS]
    for ax in fig.axes:
        if " / " in ax.get_label():
            row, column = ax.get_label().rsplit(" / ", 1)
            grid[ROWS.index(row)][COLUMNS.index(column)] = ax
    return np.array(grid, dtype=object)


def shown(ax, k: int = 0) -> np.ndarray:
    """The k-th image of a panel as displayed: rows upwards (origin lower), columns rightwards."""
    return np.ma.getdata(ax.images[k].get_array()).astype(np.float64)


def test_titles_labels_and_letters(figure):
    axes = panels(figure)
    assert axes.shape == (6, 3) and all(ax is not None for ax in axes.ravel())
    assert len(figure.axes) == 6 * 3 + 1, "18 panels and the Jacobian's colour bar"
    for column, name in enumerate(COLUMNS):
        assert axes[0, column].get_title().startswith(name)
    assert [axes[row, 0].get_ylabel() for row in range(6)] == list(ROWS)
    title = figure.get_suptitle()
    assert "fixed.nii.gz" in title and "moving.nii.gz" in title
    expected = {"sagittal": ("P", "A", "I", "S"), "coronal": ("L", "R", "I", "S"), "axial": ("L", "R", "P", "A")}
    for column, name in enumerate(COLUMNS):
        for ax in axes[:, column]:
            at = {tuple(np.round(t.get_position(), 2)): t.get_text() for t in ax.texts}
            assert (at[(0.02, 0.5)], at[(0.98, 0.5)], at[(0.5, 0.02)], at[(0.5, 0.98)]) == expected[name]
    assert "det J" in figure.axes[-1].get_xlabel()


def test_slices_are_shown_in_ras_with_physical_aspect(figure):
    """The fixed image grows towards R (1 per mm), A (2) and S (4): right and up in every panel."""
    axes = panels(figure)
    # canonical spacing: x 2 mm (file i), y 1.5 mm (file k), z 3 mm (file j)
    steps = {"sagittal": (2 * 1.5, 4 * 3.0), "coronal": (1 * 2.0, 4 * 3.0), "axial": (1 * 2.0, 2 * 1.5)}
    sizes = {"sagittal": (24 * 1.5, 16 * 3.0), "coronal": (20 * 2.0, 16 * 3.0), "axial": (20 * 2.0, 24 * 1.5)}
    for column, name in enumerate(COLUMNS):
        image = shown(axes[0, column])
        np.testing.assert_allclose(np.diff(image, axis=1), steps[name][0], atol=1e-3)
        np.testing.assert_allclose(np.diff(image, axis=0), steps[name][1], atol=1e-3)
        x0, x1, y0, y1 = axes[0, column].images[0].get_extent()
        np.testing.assert_allclose((x1 - x0, y1 - y0), sizes[name])
        assert axes[0, column].get_aspect() == 1.0


def test_rows_show_what_they_say(figure):
    axes = panels(figure)
    for column in range(3):
        fixed = shown(axes[0, column])
        # moving after the affine only: sampled at matrix @ p, which is the fixed anatomy again
        np.testing.assert_allclose(shown(axes[1, column]), fixed, atol=1e-3 * np.ptp(fixed))
        np.testing.assert_allclose(shown(axes[2, column]), -fixed, atol=1e-4)
        checker = shown(axes[3, column])
        assert checker.min() >= 0 and checker.max() <= 1 and len(np.unique(checker)) > 4


def test_affine_only_row_follows_the_matrix():
    """A matrix applied the wrong way round (p - SHIFT) would shift the image by 2 SHIFT."""
    reg = make_registration()
    reg.affine.matrix[:3, 3] = 0.0  # now the moving image is NOT brought back: it is shifted by SHIFT
    axes = panels(overview_figure(reg))
    inner = (slice(4, -4), slice(4, -4))  # away from the edges, which blend with the zeros outside
    coronal_fixed, coronal_moving = shown(axes[0, 1])[inner], shown(axes[1, 1])[inner]
    # at p the moving image shows the anatomy of p - SHIFT: x + 2y + 4z drops by SHIFT . WEIGHTS
    np.testing.assert_allclose(coronal_moving - coronal_fixed, -(SHIFT @ WEIGHTS), atol=1e-2)


def test_deformation_grid_lines(figure):
    axes = panels(figure)
    for column in range(3):
        contours = [c for c in axes[4, column].collections if hasattr(c, "levels")]
        assert len(contours) == 2, "one family of lines per in-plane axis"
        for c in contours:
            assert len(c.levels) >= 2
            np.testing.assert_allclose(np.asarray(c.levels) / 8.0, np.round(np.asarray(c.levels) / 8.0))


def test_deformation_grid_moves_with_the_field():
    field = torch.zeros(1, 3, *SHAPE)
    field[0, 0] = 4.0  # every point maps 4 mm to the right: the x = 8k lines move 4 mm to the left
    straight = panels(overview_figure(make_registration()))[4, 1]
    moved = panels(overview_figure(make_registration(field=field)))[4, 1]

    def x_positions(ax) -> dict[float, float]:
        """Level (moving-space x, mm) -> horizontal position of its line (the first contour set holds the
        lines of constant x, the horizontal axis of the coronal view)."""
        lines = ax.collections[0]
        return {
            float(level): float(np.concatenate(segs)[:, 0].mean())
            for level, segs in zip(lines.levels, lines.allsegs, strict=True)
            if segs and len(np.concatenate(segs))
        }

    a, b = x_positions(straight), x_positions(moved)
    common = sorted(set(a) & set(b))
    assert len(common) >= 3
    np.testing.assert_allclose([a[level] - b[level] for level in common], 4.0, atol=1e-6)


def test_folding_is_painted():
    jacobian = torch.ones(SHAPE)
    jacobian[8:12, 6:10, 10:14] = -0.5  # around the centre: in all three mid slices
    axes = panels(overview_figure(make_registration(jacobian=jacobian)))
    for column in range(3):
        overlay = axes[5, column].images[1].get_array()
        assert 0 < int((~np.ma.getmaskarray(overlay)).sum()) < overlay.size
        norm = axes[5, column].images[0].norm
        assert norm.vcenter == 1.0 and norm(0.0) == 0.0
    clean = panels(overview_figure(make_registration()))
    assert np.ma.getmaskarray(clean[5, 0].images[1].get_array()).all()


def test_png_file(tmp_path):
    import matplotlib.image

    path = overview_png(tmp_path / "overview.png", make_registration())
    assert path == tmp_path / "overview.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width == 840 and 600 < height <= 2200
    assert pixels[..., :3].std() > 0.1, "an empty figure"


def test_missing_matplotlib_is_an_input_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(InputError, match=r"--png needs matplotlib: pip install 'ran-bundle\[figures\]'"):
        require_matplotlib()
    with pytest.raises(InputError, match="needs matplotlib"):
        overview_png(tmp_path / "overview.png", make_registration())
    assert not Path(tmp_path / "overview.png").exists()
    assert figures.MATPLOTLIB_MISSING.startswith("--png")
