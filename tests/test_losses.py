"""Tests of ran_bundle.losses (CPU, small tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss

from ran_bundle.losses import (
    EdgeAwareSmoothnessLoss,
    LocalNCCLoss,
    MaskedMSELoss,
    RegistrationLoss,
    SyntheticFieldLoss,
    box_sum,
    edge_aware_smoothness,
    local_ncc,
    similarity_loss,
)


def smooth_noise(shape, seed, sigma_pass=2):
    """Smooth random image in [0, 1], shape (B, C, *spatial)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    pool = F.avg_pool3d if len(shape) == 5 else F.avg_pool2d
    for _ in range(sigma_pass):
        x = pool(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x - x.amin()
    return x / x.amax()


def boxed_image(seed, size=24, margin=5):
    """Smooth texture in [0.2, 1] inside a box, 0 in a margin wider than half the NCC window."""
    x = 0.2 + 0.8 * smooth_noise((1, 1, size, size, size), seed)
    inside = torch.zeros_like(x)
    inside[..., margin:-margin, margin:-margin, margin:-margin] = 1
    return x * inside


# ----------------------------------------------------------------------------- NCC / MSE
def test_box_sum_matches_direct_sum_even_and_odd_windows():
    x = torch.rand(1, 2, 7, 6, 5)
    for k in (3, 4):
        out = box_sum(x, (k, k, k))
        assert out.shape == x.shape
        b = (k - 1) // 2  # TensorFlow "SAME": (k-1)//2 before, the rest after
        i, j, l_ = 3, 2, 2
        ref = x[:, :, i - b : i - b + k, j - b : j - b + k, l_ - b : l_ - b + k].sum((2, 3, 4))
        torch.testing.assert_close(out[:, :, i, j, l_], ref)


@pytest.mark.parametrize(("shape", "kernel"), [((2, 1, 12, 10, 11), 5), ((2, 1, 12, 10, 11), 3), ((3, 1, 20, 18), 9)])
def test_local_ncc_equals_monai_lncc_for_odd_windows_without_mask(shape, kernel):
    """The package keeps its own local NCC for the released recipe (even window 8, a mask, pooled channels,
    all refused or missing in MONAI); where MONAI's LNCC applies too (odd window, no mask, one channel) both give
    the same loss."""
    fixed, moving = smooth_noise(shape, 0, sigma_pass=0), smooth_noise(shape, 1, sigma_pass=0)  # textured: var >> eps
    dims = len(shape) - 2
    ours = LocalNCCLoss(dims, kernel_size=kernel, mask_threshold=None, eps=1e-5)(moving, fixed)
    monai = LocalNormalizedCrossCorrelationLoss(dims, kernel_size=kernel, kernel_type="rectangular")(moving, fixed)
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)
    per_item = -local_ncc(moving, fixed, [kernel] * dims)
    reference = LocalNormalizedCrossCorrelationLoss(dims, kernel_size=kernel, reduction="none")(moving, fixed)
    torch.testing.assert_close(per_item, reference.flatten(1).mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        LocalNormalizedCrossCorrelationLoss(dims, kernel_size=8)  # the released window: why ours stays


def test_ncc_self_is_minus_one_and_unrelated_is_weaker():
    fixed = boxed_image(0)
    other = smooth_noise((1, 1, 24, 24, 24), 1)  # no box: shares no structure with fixed
    loss = LocalNCCLoss(spatial_dims=3, kernel_size=9, mask_threshold=0.1)
    self_value = loss(fixed, fixed)
    assert self_value.ndim == 0
    assert self_value.item() == pytest.approx(-1.0, abs=1e-3)
    unrelated = loss(other, fixed).item()
    assert -0.3 < unrelated <= 0.0


def test_ncc_invariant_to_affine_intensity_change():
    fixed = boxed_image(0)
    moving = 0.6 * boxed_image(0) + 0.4 * boxed_image(2)
    loss = LocalNCCLoss(spatial_dims=3, kernel_size=9, mask_threshold=0.1, eps=1e-9)
    base = loss(moving, fixed).item()
    changed = loss(3.0 * moving + 0.7, fixed).item()
    assert -1.0 < base < -0.2
    assert changed == pytest.approx(base, abs=1e-4)


def test_ncc_mask_and_window_matter():
    fixed = boxed_image(0)
    moving = 0.6 * boxed_image(0) + 0.4 * boxed_image(2)
    masked = LocalNCCLoss(3, kernel_size=8, mask_threshold=0.1)(moving, fixed)
    unmasked = LocalNCCLoss(3, kernel_size=8, mask_threshold=None)(moving, fixed)
    # the background (fixed == 0) has zero local variance, cc = 0 there: no mask dilutes the mean
    assert unmasked.item() > masked.item() + 0.05
    batch = [t.repeat(2, 1, 1, 1, 1) for t in (moving, fixed)]
    per_item = LocalNCCLoss(3, kernel_size=8, reduction="none")(*batch)
    assert per_item.shape == (2,)


def test_ncc_gradients_flow_2d():
    fixed = smooth_noise((2, 1, 20, 20), 3)
    moving = smooth_noise((2, 1, 20, 20), 4).requires_grad_(True)
    loss = LocalNCCLoss(spatial_dims=2, kernel_size=5, mask_threshold=None)(moving, fixed)
    loss.backward()
    assert torch.isfinite(moving.grad).all()
    assert moving.grad.abs().sum() > 0


def test_lncc_and_mse_from_factory():
    fixed = smooth_noise((1, 1, 16, 16, 16), 0)  # textured everywhere: MONAI's LNCC has no mask
    lncc = similarity_loss("lncc", spatial_dims=3, kernel_size=5)
    assert lncc(fixed + 0.01, fixed).item() == pytest.approx(-1.0, abs=1e-2)
    mse = similarity_loss("mse")
    assert isinstance(mse, MaskedMSELoss)
    assert mse(fixed, fixed).item() == 0.0
    assert isinstance(similarity_loss("ncc", spatial_dims=2), LocalNCCLoss)
    with pytest.raises(ValueError, match="name"):
        similarity_loss("ssim")


def test_masked_mse_only_counts_mask():
    fixed = torch.zeros(1, 1, 4, 4)
    fixed[..., :2, :] = 1.0
    moving = fixed.clone()
    moving[..., 3, 3] = 5.0  # an error in the background, outside the mask
    assert MaskedMSELoss(mask_threshold=0.5)(moving, fixed).item() == 0.0
    assert MaskedMSELoss()(moving, fixed).item() == pytest.approx(25.0 / 16)
    moving[..., 0, 0] = 3.0  # an error inside the mask (8 voxels)
    assert MaskedMSELoss(mask_threshold=0.5)(moving, fixed).item() == pytest.approx(4.0 / 8)


def test_argument_validation_names_argument():
    with pytest.raises(ValueError, match="kernel_size"):
        LocalNCCLoss(3, kernel_size=0)
    with pytest.raises(ValueError, match="spatial_dims"):
        LocalNCCLoss(4)
    with pytest.raises(ValueError, match="reduction"):
        LocalNCCLoss(3, reduction="max")
    with pytest.raises(ValueError, match="p must"):
        EdgeAwareSmoothnessLoss(3, p=3)
    with pytest.raises(ValueError, match="mode"):
        EdgeAwareSmoothnessLoss(3, mode="tf")
    with pytest.raises(ValueError, match="dice_weight"):
        RegistrationLoss(3, dice_weight=-1)
    with pytest.raises(ValueError, match="ddf"):
        EdgeAwareSmoothnessLoss(3)(torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------- smoothness
@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 9)])
def test_smoothness_zero_for_constant_positive_otherwise(mode, p, shape):
    d = len(shape)
    image = smooth_noise((2, 1, *shape), 5)
    loss = EdgeAwareSmoothnessLoss(d, p=p, mode=mode)
    constant = torch.ones(2, d, *shape) * torch.arange(1.0, d + 1).view(1, d, *[1] * d)
    assert loss(constant, image).item() == 0.0
    assert loss(constant).item() == 0.0
    ddf = torch.randn(2, d, *shape, generator=torch.Generator().manual_seed(0))
    assert loss(ddf, image).item() > 0
    assert loss(ddf).item() > loss(ddf, image).item()  # all weights are <= 1


def test_plain_smoothness_matches_direct_formula_odd_sizes():
    ddf = torch.randn(1, 3, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    n = ddf[0, 0].numel()
    for p in (1, 2):
        per_axis = [(ddf.diff(dim=a + 2).abs() ** p).sum() / (3 * n) for a in range(3)]
        expected = torch.stack(per_axis).mean()
        got = EdgeAwareSmoothnessLoss(3, p=p)(ddf)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["paper", "code"])
@pytest.mark.parametrize("shape", [(9, 6), (9, 6, 5)])
def test_edge_weight_aligns_with_ddf_jump(mode, shape):
    """A DDF jump on the fixed image's edge is cheap; the same jump elsewhere costs the plain price."""
    d = len(shape)
    image = torch.full((1, 1, *shape), 0.3)
    image[:, :, 4:] = 1.0  # intensity step between rows 3 and 4 of axis 0

    def jump_at(k):
        ddf = torch.zeros(1, d, *shape)
        ddf[:, :, k:] = 1.0  # displacement step between rows k-1 and k of axis 0
        return ddf

    loss = EdgeAwareSmoothnessLoss(d, p=2, edge_weight=25.0, mode=mode)
    on_edge, off_edge = jump_at(4), jump_at(7)
    plain = loss(on_edge).item()
    assert plain > 0
    assert loss(on_edge, image).item() < 0.01 * plain
    assert loss(off_edge, image).item() == pytest.approx(loss(off_edge).item(), rel=1e-6)


def test_paper_weight_inside_norm_code_weight_outside():
    ddf = torch.zeros(1, 2, 6, 6)
    ddf[:, :, 3:] = 1.0
    image = torch.zeros(1, 1, 6, 6)
    image[:, :, 3:] = 0.5
    w_paper = torch.exp(torch.tensor(-(0.5**2)))
    # paper, p=2: (jump * w)^2 at the 6 edge voxels of each of the 2 components, axis 0 only
    expected_paper = (2 * 6 * w_paper**2) / (2 * 2 * 36)
    got = edge_aware_smoothness(ddf, image, p=2, edge_weight=1.0, mode="paper")
    torch.testing.assert_close(got, expected_paper.reshape(1))
    # code, p=1: |jump| * exp(-s dI^2 / (0.2 + I)^2), the code's diff sits on the row after the step
    w_code = torch.exp(torch.tensor(-(0.5**2) / (0.2 + 0.5) ** 2))
    expected_code = (2 * 6 * w_code) / (2 * 2 * 36)
    got = edge_aware_smoothness(ddf, image, p=1, edge_weight=1.0, mode="code")
    torch.testing.assert_close(got, expected_code.reshape(1))


def test_smoothness_gradients_flow():
    ddf = torch.randn(1, 3, 6, 7, 5, requires_grad=True)
    image = smooth_noise((1, 1, 6, 7, 5), 2)
    EdgeAwareSmoothnessLoss(3, p=1, mode="code", edge_weight=9)(ddf, image).backward()
    assert torch.isfinite(ddf.grad).all() and ddf.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- composite losses
def test_registration_loss_is_weighted_sum_of_terms():
    fixed = boxed_image(0, size=16, margin=2)
    warped = boxed_image(1, size=16, margin=2)
    ddf = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    sim = LocalNCCLoss(3, kernel_size=8)
    smooth = EdgeAwareSmoothnessLoss(3, p=1, edge_weight=25.0, mode="code")
    loss_fn = RegistrationLoss(3, similarity=sim, smoothness=smooth, sim_weight=2.0, smooth_weight=0.5)
    total = loss_fn(warped, fixed, ddf)
    expected = 2.0 * sim(warped, fixed) + 0.5 * smooth(ddf, fixed)
    torch.testing.assert_close(total, expected)
    assert set(loss_fn.last_terms) == {"similarity", "smoothness", "total"}
    assert loss_fn.last_terms["total"] == pytest.approx(total.item())
    total.backward()
    assert ddf.grad.abs().sum() > 0
    # the defaults build the same abdomen recipe
    torch.testing.assert_close(RegistrationLoss(3)(warped, fixed, ddf.detach()), expected.detach())


def test_registration_loss_dice_term():
    fixed = boxed_image(0, size=12, margin=2)
    ddf = torch.zeros(1, 3, 12, 12, 12)
    labels = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    labels[..., 2:6, 2:6, 2:6] = 1
    labels[..., 6:10, 6:10, 6:10] = 2
    onehot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    loss_fn = RegistrationLoss(3, similarity="mse", dice_weight=1.0)
    assert isinstance(loss_fn.dice, DiceLoss) and not loss_fn.dice.include_background
    perfect = loss_fn(fixed, fixed, ddf, onehot, labels)
    assert loss_fn.last_terms["dice"] == pytest.approx(0.0, abs=1e-6)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    swapped = onehot[:, [0, 2, 1]]  # labels 1 and 2 exchanged: no overlap
    loss_fn(fixed, fixed, ddf, swapped, onehot)
    assert loss_fn.last_terms["dice"] == pytest.approx(1.0, abs=1e-4)
    no_dice = RegistrationLoss(3, similarity="mse")
    no_dice(fixed, fixed, ddf, swapped, onehot)
    assert "dice" not in no_dice.last_terms
    # soft labels against integer labels: MONAI's soft Dice of the foreground channels, mean over labels and items
    soft = torch.softmax(torch.randn(2, 3, 12, 12, 12, generator=torch.Generator().manual_seed(0)), 1)
    both = labels.repeat(2, 1, 1, 1, 1)
    terms = loss_fn.terms(
        fixed.repeat(2, 1, 1, 1, 1), fixed.repeat(2, 1, 1, 1, 1), ddf.repeat(2, 1, 1, 1, 1), soft, both
    )
    target = F.one_hot(both[:, 0], 3).movedim(-1, 1).float()[:, 1:]
    inter, sizes = (soft[:, 1:] * target).sum((2, 3, 4)), (soft[:, 1:] + target).sum((2, 3, 4))
    torch.testing.assert_close(terms["dice"], 1 - ((2 * inter + 1e-5) / (sizes + 1e-5)).mean())


def test_synthetic_field_loss():
    fixed = smooth_noise((1, 1, 8, 8, 8), 0)
    true_ddf = torch.ones(1, 3, 8, 8, 8)
    loss_fn = SyntheticFieldLoss(3)
    assert loss_fn(fixed, fixed, true_ddf, true_ddf).item() == 0.0
    ddf = true_ddf + 0.5
    moved = fixed + 0.1
    total = loss_fn(moved, fixed, ddf, true_ddf)
    terms = loss_fn.last_terms
    assert terms["field"] == pytest.approx(0.25)
    assert terms["image"] == pytest.approx(0.01, rel=1e-4)
    assert terms["smoothness"] == 0.0
    assert total.item() == pytest.approx(0.1 * 0.01 + 0.25, rel=1e-4)
    weighted = SyntheticFieldLoss(3, image_weight=1.0, field_weight=2.0)(moved, fixed, ddf, true_ddf)
    assert weighted.item() == pytest.approx(0.01 + 0.5, rel=1e-4)


# ----------------------------------------------------------------------------- MIND-SSC
def test_mind_ssc_follows_its_definition_at_interior_voxels():
    """Each channel: exp(-(D_ab - min D) / V) with D_ab the patch mean of the squared difference of the image at
    p + d a and p + d b, V the mean over the 12 channels (clamp inactive on this texture); computed by loops."""
    from ran_bundle.losses import MIND_SSC_PAIRS, mind_ssc

    x = smooth_noise((1, 1, 14, 13, 12), 3, sigma_pass=1).double()
    radius, dilation = 1, 2
    out = mind_ssc(x, radius=radius, dilation=dilation)
    assert out.shape == (1, 12, 14, 13, 12) and len(MIND_SSC_PAIRS) == 12
    img = x[0, 0].numpy()
    for p in ((5, 6, 5), (7, 4, 6), (6, 8, 7)):
        d = []
        for a, b in MIND_SSC_PAIRS:
            total = 0.0
            for q in np.ndindex(3, 3, 3):
                c = np.asarray(p) + np.asarray(q) - radius
                total += (img[tuple(c + dilation * np.asarray(a))] - img[tuple(c + dilation * np.asarray(b))]) ** 2
            d.append(total / 27)
        d = np.asarray(d) - min(d)
        expected = np.exp(-d / d.mean())
        np.testing.assert_allclose(out[0, :, p[0], p[1], p[2]].numpy(), expected, rtol=1e-6)


def test_mind_ssc_is_invariant_to_a_monotonic_contrast_change_in_ssd():
    """MIND of an image and of a rescaled, inverted copy are nearly the same (the descriptor is built from local
    self-similarity), while the images themselves differ: SSD of the descriptors << SSD against a shifted image."""
    from ran_bundle.losses import mind_ssc, mind_ssd

    x = smooth_noise((1, 1, 20, 20, 20), 5, sigma_pass=1)
    other = 1.0 - 0.5 * x  # inverted, scaled: another "contrast" of the same structure
    shifted = torch.roll(x, 2, dims=2)
    same = float(mind_ssd(mind_ssc(other), mind_ssc(x))[0])
    moved = float(mind_ssd(mind_ssc(shifted), mind_ssc(x))[0])
    assert same < 0.1 * moved, (same, moved)
    assert float(mind_ssd(mind_ssc(x), mind_ssc(x))[0]) == 0.0
