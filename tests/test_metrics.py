"""Tests of ran_bundle.metrics (CPU; one real label pair from the shared data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ran_bundle.handlers import MeanDiceOverLabels
from ran_bundle.metrics import (
    FIELD_METRICS,
    LABEL_METRICS,
    evaluate_pair,
    jacobian_determinant,
    label_metrics,
    non_positive_jacobian,
    sdlogj,
    summarise,
)


def linear_field(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """u(x) = A x in voxels, (d, *shape)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", a, grid)


# ----------------------------------------------------------------------------- Jacobian
@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7)])
def test_jacobian_of_zero_field_is_one(shape):
    d = len(shape)
    det = jacobian_determinant(np.zeros((2, d, *shape)))
    assert isinstance(det, np.ndarray) and det.shape == (2, *shape)
    np.testing.assert_allclose(det, 1.0)
    det_t = jacobian_determinant(torch.zeros(d, *shape))  # unbatched torch in, torch out
    assert isinstance(det_t, torch.Tensor) and det_t.shape == shape
    assert torch.allclose(det_t, torch.ones(shape, dtype=det_t.dtype))


@pytest.mark.parametrize("d", [2, 3])
def test_jacobian_of_linear_field_is_det_of_identity_plus_a(d):
    rng = np.random.default_rng(0)
    a = 0.3 * rng.standard_normal((d, d))
    shape = (5, 6, 7)[:d]
    ddf = linear_field(a, shape)[None]
    expected = np.linalg.det(np.eye(d) + a)
    det = jacobian_determinant(ddf)
    np.testing.assert_allclose(det, expected, rtol=1e-10)  # exact for a linear field, borders included
    # the determinant does not depend on the voxel spacing
    np.testing.assert_allclose(jacobian_determinant(ddf, spacing=(2.0, 3.0, 0.5)[:d]), expected, rtol=1e-10)
    assert sdlogj(ddf)[0] == pytest.approx(0.0, abs=1e-10)


def test_folding_field_has_non_positive_jacobian():
    shape = (8, 8, 8)
    ddf = np.zeros((1, 3, *shape))
    # a local fold: u_0 = -3 (x_0 - 3.5) inside a block (central slope -3 => det = -2 there)
    x0 = np.arange(8, dtype=np.float64)[:, None, None]
    ddf[0, 0, 2:6, 3:5, 3:5] = (-3.0 * (x0[2:6] - 3.5)) * np.ones((4, 2, 2))
    count, percent = non_positive_jacobian(ddf)
    assert count.shape == (1,) and count[0] > 0
    assert 0 < percent[0] < 100
    assert percent[0] == pytest.approx(100.0 * count[0] / np.prod(shape))
    # counting inside a mask that misses the fold gives 0
    mask = np.zeros(shape, dtype=bool)
    mask[:2] = True
    assert non_positive_jacobian(ddf, mask)[0][0] == 0
    # a global reflection folds everything
    flip = linear_field(np.diag([-2.0, 0.0, 0.0]), shape)[None]
    count, percent = non_positive_jacobian(torch.from_numpy(flip))
    assert count[0] == np.prod(shape) and percent[0] == pytest.approx(100.0)
    assert sdlogj(ddf)[0] > 1.0  # log(1e-9) outliers
    assert sdlogj(np.zeros((3, *shape)))[0] == 0.0


def trig_field(shape: tuple[int, int, int], period: float, a: float, b: float, c: float):
    """A smooth non-linear field ``(3, *shape)`` in voxels and its analytic ``det(I + grad u)`` ``(*shape)``:
    ``u0 = a sin(k x0) cos(k x1)``, ``u1 = b sin(k x1) sin(k x2)``, ``u2 = c cos(k x0) sin(k x2)``,
    ``k = 2 pi / period``. Returns ``(u, det, k)``."""
    k = 2 * np.pi / period
    x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    s, co = [np.sin(k * xi) for xi in x], [np.cos(k * xi) for xi in x]
    u = np.stack([a * s[0] * co[1], b * s[1] * s[2], c * co[0] * s[2]])
    grad = np.zeros((*shape, 3, 3))  # grad[..., i, j] = d u_i / d x_j
    grad[..., 0, 0], grad[..., 0, 1] = a * k * co[0] * co[1], -a * k * s[0] * s[1]
    grad[..., 1, 1], grad[..., 1, 2] = b * k * co[1] * s[2], b * k * s[1] * co[2]
    grad[..., 2, 0], grad[..., 2, 2] = -c * k * s[0] * s[2], c * k * co[0] * co[2]
    return u, np.linalg.det(np.eye(3) + grad), k


def test_jacobian_of_a_non_linear_field_matches_the_analytic_determinant():
    """Inside the grid (central differences) the determinant of a sine field matches the analytic one to the
    central-difference error: each derivative of ``sin(k x)`` comes out scaled by ``sin(k)/k``, an error of at
    most ``e = amplitude * k * (1 - sin(k)/k)`` per entry, and ``det`` adds six such entries, each times a
    cofactor below ``(1 + amplitude * k)**2``. Halving ``k`` must cut the error about 8-fold (second order),
    not 4-fold (a one-sided difference)."""
    errors = []
    for period in (16.0, 32.0):
        u, expected, k = trig_field((20, 22, 24), period, 1.2, 1.2, 1.2)
        det = jacobian_determinant(u[None])[0]
        inner = (slice(1, -1),) * 3
        error = np.abs(det - expected)[inner].max()
        amplitude_k = 1.2 * k
        bound = 6 * amplitude_k * (1 - np.sin(k) / k) * (1 + amplitude_k) ** 2
        assert error < bound, (period, error, bound)
        assert np.ptp(expected[inner]) > 0.5  # a field whose determinant varies a lot
        errors.append(error)
    assert errors[0] / errors[1] > 6, errors
    # torch in, same values
    det_t = jacobian_determinant(torch.from_numpy(u))
    np.testing.assert_allclose(det_t.numpy(), jacobian_determinant(u), rtol=1e-12)


def test_jacobian_is_negative_where_a_non_linear_field_folds():
    """A sine field strong enough to fold (``a k = 1.5``): the analytic determinant is negative around
    ``x0 = 8, x1 = 0`` (mod 16) and around ``x0 = 0, x1 = 8``; the computed one has the analytic sign at every
    interior voxel whose analytic value is farther from 0 than the central-difference error, and
    :func:`non_positive_jacobian` counts those voxels."""
    shape = (32, 32, 12)
    u, expected, k = trig_field(shape, 16.0, 1.5 / (2 * np.pi / 16), 0.3, 0.0)
    det = jacobian_determinant(u)
    inner = (slice(1, -1),) * 3
    assert expected[8, 0, 5] < -0.4 and expected[0, 8, 5] < -0.4 and expected[0, 0, 5] > 2.0  # the known fold
    assert det[8, 1, 5] < 0 and det[1, 8, 5] < 0 < det[1, 1, 5]
    margin = 0.2  # > the largest |det - expected| inside, measured 0.05
    assert np.abs(det - expected)[inner].max() < margin
    folded, unfolded = expected < -margin, expected > margin
    assert folded[inner].sum() > 100
    assert (det[inner][folded[inner]] < 0).all() and (det[inner][unfolded[inner]] > 0).all()
    count, _ = non_positive_jacobian(u, np.pad(np.ones((30, 30, 10), bool), 1))
    ambiguous = (~folded & ~unfolded)[inner].sum()
    assert folded[inner].sum() <= count[0] <= folded[inner].sum() + ambiguous


# ----------------------------------------------------------------------------- label metrics
def test_label_metrics_matches_simpleitk_on_real_labels(shared_data):
    nib = pytest.importorskip("nibabel")
    sitk = pytest.importorskip("SimpleITK")
    path = shared_data / "totalseg_example_ct" / "ts_example" / "label.nii.gz"
    if not path.exists():
        pytest.skip(f"label file not found: {path}")
    labels = [1, 2, 3, 5]  # spleen, right kidney, left kidney, liver
    full = np.asarray(nib.load(str(path)).dataobj).astype(np.int64)
    ref = np.where(np.isin(full, labels), full, 0)
    pred = np.zeros_like(ref)
    pred[:, 2:] = ref[:, :-2]  # shifted by 2 voxels (6 mm) along axis 1
    spacing = (3.0, 3.0, 3.0)
    ours = label_metrics(pred, ref, labels, spacing)

    def to_sitk(a):
        img = sitk.GetImageFromArray(a.astype(np.uint8))
        img.SetSpacing(spacing)
        return img

    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(to_sitk(ref), to_sitk(pred))
    voxel_diagonal = math.sqrt(sum(s * s for s in spacing))
    for lab in labels:
        assert ours[lab]["dice"] == pytest.approx(overlap.GetDiceCoefficient(lab), abs=1e-6)
        hd_filter = sitk.HausdorffDistanceImageFilter()
        hd_filter.Execute(to_sitk(ref == lab), to_sitk(pred == lab))
        # SimpleITK measures between all voxels of the two objects, MONAI between their surface
        # (edge) voxels: the two definitions can differ by up to about one voxel diagonal.
        assert abs(ours[lab]["hd"] - hd_filter.GetHausdorffDistance()) <= voxel_diagonal
        assert ours[lab]["hd"] >= 6.0 - 1e-6  # a 6 mm shift moves some surface point by 6 mm
        assert 0 < ours[lab]["asd"] <= ours[lab]["hd95"] <= ours[lab]["hd"]


def test_label_metrics_absent_labels_and_spacing():
    ref = np.zeros((12, 12, 12), dtype=np.int64)
    ref[2:6, 2:6, 2:6] = 1
    ref[7:10, 7:10, 7:10] = 2
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 3:7] = 1  # label 1 shifted by 1 voxel along axis 2; label 2 missing
    pred[0, 0, 0] = 3  # label 3 only in pred
    out = label_metrics(torch.from_numpy(pred)[None], ref, labels=[1, 2, 3, 4], spacing=(1.0, 1.0, 2.0))
    assert out[1]["dice"] == pytest.approx(2 * 48 / 128)
    assert out[1]["hd"] == pytest.approx(2.0)  # one voxel along the 2 mm axis
    assert out[2]["dice"] == 0.0 and math.isnan(out[2]["hd"]) and math.isnan(out[2]["asd"])
    assert out[3]["dice"] == 0.0 and math.isnan(out[3]["hd95"])
    assert all(math.isnan(v) for v in out[4].values())  # absent from both
    assert set(label_metrics(pred, ref, spacing=(1.0, 1.0, 1.0))) == {1, 2}  # default: labels of ref


def test_evaluate_pair_rows_and_summarise():
    ref = np.zeros((10, 10, 10), dtype=np.int64)
    ref[1:5, 1:5, 1:5] = 1
    ref[5:9, 5:9, 5:9] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # label 2 lost
    ddf = np.zeros((3, 10, 10, 10))
    ddf[0, 6:8] = np.array([0.0, -2.0])[:, None, None]  # fold inside label 2 (rows 6-7), not in label 1
    rows = evaluate_pair(pred, ref, ddf, spacing=(2.0, 2.0, 2.0), pair="p0")
    assert [r["label"] for r in rows] == [1, 2, "mean", "all"]
    keys = {"pair", "label", *LABEL_METRICS, *FIELD_METRICS}
    assert all(set(r) == keys for r in rows)
    by_label = {r["label"]: r for r in rows}
    assert by_label[1]["dice"] == 1.0 and by_label[1]["hd"] == 0.0
    assert by_label[2]["dice"] == 0.0 and math.isnan(by_label[2]["hd"])
    assert by_label["mean"]["dice"] == pytest.approx(0.5)
    assert by_label["mean"]["hd"] == 0.0  # nan-mean skips the undefined distance
    assert by_label[1]["non_pos_jac_count"] == 0
    assert by_label[2]["non_pos_jac_count"] > 0
    assert by_label["all"]["non_pos_jac_count"] >= by_label["mean"]["non_pos_jac_count"] > 0
    assert math.isnan(by_label["all"]["dice"])

    rows2 = evaluate_pair(ref, ref, None, spacing=(2.0, 2.0, 2.0), pair="p1")
    assert all(math.isnan(r["sdlogj"]) for r in rows2)
    summary = {s["label"]: s for s in summarise(rows + rows2)}
    assert summary[2]["n"] == 2
    assert summary[2]["dice_mean"] == pytest.approx(0.5)
    assert summary[2]["dice_std"] == pytest.approx(0.5)
    assert summary[1]["hd_mean"] == 0.0


def test_mean_dice_over_labels_metric():
    y = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    y[:, :, :2, :2] = 1
    y[:, :, 3:, 3:] = 2
    pred = y.clone()
    pred[0, :, 3:, 3:] = 0  # item 0 loses label 2 -> mean (1 + 0) / 2
    pred[1, :, 0, :] = 5  # item 1: label 5 only in pred is ignored; label 1 keeps 2 of 4 voxels
    metric = MeanDiceOverLabels()
    values = metric(y_pred=pred.float(), y=y)
    assert values.shape == (2, 1)
    assert values[0, 0].item() == pytest.approx(0.5)
    assert values[1, 0].item() == pytest.approx((2 * 2 / 6 + 1.0) / 2)
    metric(y_pred=torch.zeros(1, 1, 6, 6), y=torch.zeros(1, 1, 6, 6))  # no label: nan, skipped
    assert metric.aggregate().item() == pytest.approx((0.5 + (2 / 3 + 1.0) / 2) / 2)
    metric.reset()
    only_two = MeanDiceOverLabels(labels=[2])
    only_two([p for p in pred], [t for t in y])  # list of channel-first items, as ignite gives
    assert only_two.aggregate().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels"):
        MeanDiceOverLabels(labels=[0, 1])


def test_mean_dice_over_labels_is_the_mean_of_the_per_label_dice():
    """Arbitrary label values (FreeSurfer-like, more than one pass of one-hot maps): the metric is the mean over the
    labels of each fixed map of :func:`label_metrics`' Dice, which scores a label missing from the prediction 0."""
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0, 2, 3, 17, 41, 1002, 2035] + list(range(100, 120)))
    y = values[torch.randint(0, len(values), (2, 1, 10, 9, 8), generator=g)]
    pred = torch.where(torch.rand(y.shape, generator=g) < 0.7, y, values[torch.randint(0, 8, y.shape, generator=g)])
    pred[pred == 17] = 0  # label 17 is lost by the prediction: Dice 0
    values = MeanDiceOverLabels()(pred.float(), y)
    for b in range(2):
        expected = np.mean([m["dice"] for m in label_metrics(pred[b, 0], y[b, 0]).values()])
        assert values[b, 0].item() == pytest.approx(expected, rel=1e-6)
