"""The RAN network: shapes, presets, gradients, tracing, and learning on a real CT pair."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from ran_bundle.flow import warp
from ran_bundle.losses import RegistrationLoss
from ran_bundle.networks import PRESETS, ResidualAlignerNetwork
from ran_bundle.networks.blocks import (
    HEAD_WEIGHTINGS,
    ResidualAligner,
    ScalarNorm,
    SharedHeads,
    resize_nearest_like,
    scalar_norm_reference,
)

#: exact parameter counts in 3D; ``ref`` is the released checkpoint's, the others sit 5-8 % below the paper's
#: Table 2 (``PAPER_PARAMS``) and ``docs/results.md`` says why
PARAMS = {"ref": 738_030, "RAn0": 674_433, "RAn3": 670_713, "RAn4": 661_729, "RAn4+": 687_665}
PAPER_PARAMS = {"RAn0": 0.71e6, "RAn3": 0.72e6, "RAn4": 0.71e6, "RAn4+": 0.75e6}
#: our count against the paper's, in % (rounded to 0.1)
PAPER_GAP_PERCENT = {"RAn0": -5.0, "RAn3": -6.8, "RAn4": -6.8, "RAn4+": -8.3}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("shape", [(2, 32, 32, 32), (1, 33, 17, 21)])
def test_output_shape_3d(preset, shape):
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, preset).eval()
    x = torch.rand(shape[0], 2, *shape[1:])
    with torch.no_grad():
        ddf = net(x)
    assert ddf.shape == (shape[0], 3, *shape[1:])
    assert torch.isfinite(ddf).all()


@pytest.mark.parametrize("preset", ["ref", "RAn0", "RAn4+"])
def test_output_shape_2d(preset):
    net = ResidualAlignerNetwork(2, preset).eval()
    with torch.no_grad():
        out = net.register(torch.rand(3, 2, 35, 48))
    assert out.ddf.shape == (3, 2, 35, 48)
    assert out.backward_ddf.shape == (3, 2, 35, 48)
    assert out.warped.shape == (3, 1, 35, 48)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_are_pinned(preset):
    """Exact counts (``ref`` = the released checkpoint's 738,030); the paper presets' gap to its Table 2 is
    systematic (all below, by 5.0 to 8.3 %), not noise within a tolerance."""
    count = n_params(ResidualAlignerNetwork(3, preset))
    assert count == PARAMS[preset]
    if preset in PAPER_PARAMS:
        assert round(100 * (count / PAPER_PARAMS[preset] - 1), 1) == PAPER_GAP_PERCENT[preset]


def test_the_defaults_name_every_preset():
    """``ran_bundle.defaults.PRESET_NAMES`` (which the pipeline checks ``--preset`` against without importing the
    network) lists the presets the network builds."""
    from ran_bundle.defaults import PRESET_NAMES

    assert list(PRESET_NAMES) == list(PRESETS)


def test_ablation_switches_change_the_model():
    base = ResidualAlignerNetwork(3, "RAn3")
    no_confidence = ResidualAlignerNetwork(3, "RAn3", head_weighting="softmax")
    single_head = ResidualAlignerNetwork(3, "RAn3", heads=1)
    single_head_no_confidence = ResidualAlignerNetwork(3, "RAn3", heads=1, head_weighting="softmax")
    # the confidence C1 is one 1x1 conv (heads -> 1) per RA module, with one head too
    assert n_params(base) - n_params(no_confidence) == 5 * (6 + 1)
    assert n_params(single_head) - n_params(single_head_no_confidence) == 5 * (1 + 1)
    assert n_params(single_head) < n_params(base)
    for q in (0, 3, 4):
        net = ResidualAlignerNetwork(3, "RAn3", q=q)
        assert net.exponents[0] == 4 - q
        with torch.no_grad():
            assert net(torch.rand(1, 2, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_released_weighting_uses_raw_logits():
    ref = ResidualAlignerNetwork(3, "ref")
    assert all(a.head_weighting == "none" and a.confidence is None for a in ref.aligners)
    paper = ResidualAlignerNetwork(3, "ref", head_weighting="softmax_confidence")
    assert all(a.confidence is not None for a in paper.aligners)


def test_single_head_keeps_the_head_weighting():
    """``heads=1`` (multi-head off) still applies ``head_weighting``: the paper's Table 2 has confidence weights
    without multi-head. The softmax over one head is 1, so the default weights the DDF by the confidence C1, and
    ``"softmax"``/``"none"`` give other fields from the same shared weights."""
    torch.manual_seed(0)
    nets = {w: ResidualAlignerNetwork(3, "RAn3", heads=1, head_weighting=w).eval() for w in HEAD_WEIGHTINGS}
    paper = nets["softmax_confidence"]
    assert all(a.confidence is not None for a in paper.aligners)
    torch.nn.init.normal_(paper.output_head.weight, std=0.1)  # a non-trivial DDF
    state = paper.state_dict()
    for w in ("softmax", "none"):
        missing, unexpected = nets[w].load_state_dict(state, strict=False)
        assert not missing and unexpected and all(".confidence." in k for k in unexpected)
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        ddfs = {w: net(x) for w, net in nets.items()}
    scale = ddfs["softmax_confidence"].abs().mean()
    assert scale > 1e-3
    for a, b in [("softmax_confidence", "softmax"), ("softmax_confidence", "none"), ("softmax", "none")]:
        assert (ddfs[a] - ddfs[b]).abs().mean() > 1e-3 * scale, (a, b)


def test_shipped_weights_give_the_same_field_as_before(repo_root):
    """``models/model.pt`` (preset ``ref``: six heads, ``head_weighting="none"``) loads strictly and gives the
    field pinned when these weights (0.4.0) were shipped: a change of the network code that changes what the
    weights mean fails here."""
    net = ResidualAlignerNetwork(3, "ref").eval()
    state = torch.load(repo_root / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    net.load_state_dict(state, strict=True)
    x = torch.rand(1, 2, 32, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddf = net(x)[0].double()
    expected_sums = [11720.360774457775, 7948.246548453935, -2733.469187313749]
    sums = ddf.sum(dim=(1, 2, 3))
    assert torch.allclose(sums, torch.tensor(expected_sums, dtype=torch.float64), rtol=1e-5, atol=0.05), sums
    expected = {
        (0, 0, 0): [0.25071918964385986, 0.24775385856628418, 0.4121118485927582],
        (5, 17, 30): [0.4780363142490387, 0.06883663684129715, 0.13523636758327484],
        (16, 20, 24): [0.8497380018234253, 0.18760523200035095, 0.5017628073692322],
        (31, 39, 47): [-0.032756730914115906, 0.1011316180229187, 0.20875923335552216],
        (10, 3, 41): [0.13859936594963074, 0.1870366632938385, -0.7764991521835327],
    }
    for voxel, values in expected.items():
        assert torch.allclose(ddf[(slice(None), *voxel)], torch.tensor(values, dtype=torch.float64), atol=1e-4)


def aligner(head_weighting: str, heads: int = 6) -> ResidualAligner:
    """A non-first RA module of 16 feature channels with its own shared convolutions."""
    torch.manual_seed(0)
    return ResidualAligner(3, 16, 1, SharedHeads(3, heads), heads=heads, head_weighting=head_weighting)


def test_softmax_head_weights_sum_to_one_over_heads():
    """Eq. 12's M-H mask softmax(theta) sums to 1 over the heads at every voxel; with the confidence the weights
    sum to relu(C1(vartheta)) instead, and ``"none"`` passes the logits through."""
    torch.manual_seed(1)
    theta, source = torch.randn(2, 6, 5, 6, 7) * 3, torch.randn(2, 6, 5, 6, 7)
    weights = aligner("softmax").head_weights(theta, source)
    assert weights.shape == theta.shape and (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 5, 6, 7), atol=1e-6)
    paper = aligner("softmax_confidence")
    confidence = torch.relu(paper.confidence(paper.act(source)))
    assert (confidence > 0).any() and (confidence == 0).any()  # relu: some voxels are switched off
    assert torch.allclose(paper.head_weights(theta, source), torch.softmax(theta, dim=1) * confidence, atol=1e-6)
    assert torch.allclose(paper.head_weights(theta, source).sum(dim=1, keepdim=True), confidence, atol=1e-6)
    assert torch.equal(aligner("none").head_weights(theta, source), theta)


def test_zero_confidence_drops_the_residual_heads_from_the_weighted_stack():
    """With relu(C1) = 0 the weighted heads of eq. 12 vanish: the fusion convs see only the head mean, so heads
    that differ but have the same mean give the same new DDF. With a positive confidence they do not."""
    paper = aligner("softmax_confidence")
    torch.nn.init.zeros_(paper.confidence.weight)
    torch.nn.init.zeros_(paper.confidence.bias)
    torch.manual_seed(2)
    size = (8, 8, 8)
    residual, attribute = torch.randn(2, 6 * 3, *size), torch.randn(2, 6, *size)
    previous_ddf, previous_theta = torch.randn(2, 3, *size), torch.randn(2, 6, *size)

    stacked = paper.stack_heads(residual, attribute, attribute)
    assert stacked.shape == (2 * 3, 6 + 1, *size)  # per spatial component: 6 weighted heads and their mean
    assert (stacked[:, :6] == 0).all()
    head_mean = residual.reshape(2, 6, 3, *size).mean(dim=1).reshape(2 * 3, *size)
    assert torch.allclose(stacked[:, 6], head_mean, atol=1e-6)

    spread = torch.randn(2, 6, 3, *size)
    spread = (spread - spread.mean(dim=1, keepdim=True)).reshape(2, 18, *size)  # zero mean over the heads

    def accumulate(heads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return paper._accumulate(heads, attribute, previous_ddf, previous_theta)[0]

    assert torch.allclose(accumulate(residual), accumulate(residual + spread), atol=1e-5)
    torch.nn.init.constant_(paper.confidence.bias, 1.0)  # confidence 1 everywhere
    assert (accumulate(residual) - accumulate(residual + spread)).abs().max() > 1e-3

    # one head: the weighted copy of the DDF vanishes, the DDF itself stays
    single = aligner("softmax_confidence", heads=1)
    torch.nn.init.zeros_(single.confidence.weight)
    torch.nn.init.zeros_(single.confidence.bias)
    stacked = single.stack_heads(previous_ddf, previous_theta[:, :1], previous_theta[:, :1])
    assert torch.equal(stacked[:, :3], previous_ddf) and (stacked[:, 3:] == 0).all()


@pytest.mark.parametrize("bad", [(1, 1, 32, 32, 32), (1, 2, 32, 32), (1, 2, 32, 8, 32)])
def test_bad_input_is_named(bad):
    with pytest.raises(ValueError, match="expected|at least"):
        ResidualAlignerNetwork(3, "ref")(torch.rand(*bad))


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'RAn9'"):
        ResidualAlignerNetwork(3, "RAn9")


@pytest.mark.parametrize("preset", ["ref", "RAn4+"])
def test_gradients_reach_every_parameter(preset):
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, preset)
    out = net.register(torch.rand(1, 2, 32, 32, 32))
    (out.ddf.square().mean() + out.backward_ddf.square().mean() + out.warped.mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_activation_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = ResidualAlignerNetwork(3, "ref")
    recomputed = ResidualAlignerNetwork(3, "ref", activation_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.rand(1, 2, 32, 32, 32)
    grads = []
    for net in (plain, recomputed):
        net.zero_grad()
        out = net.register(x)
        (out.ddf.square().mean() + out.backward_ddf.square().mean()).backward()
        grads.append(({n: p.grad.clone() for n, p in net.named_parameters()}, out.ddf.detach()))
    (g0, d0), (g1, d1) = grads
    assert torch.allclose(d0, d1, atol=1e-6)
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-8) for n in g0)


@pytest.mark.parametrize("preset", ["ref", "RAn0"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_computes_only_the_needed_direction_in_the_last_module(preset, checkpointing):
    """``forward`` runs the last RA module for the moving -> fixed rows only: the same DDF and the same
    gradients as taking those rows of the two-way ``register``."""
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, preset, activation_checkpointing=checkpointing)
    torch.nn.init.normal_(net.output_head.weight, std=0.1)  # a non-trivial DDF
    x = torch.rand(2, 2, 32, 32, 48)
    grads = []
    for run in (lambda: net(x), lambda: net.register(x).ddf):
        net.zero_grad()
        ddf = run()
        ddf.square().mean().backward()
        grads.append((ddf.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (d0, g0), (d1, g1) = grads
    assert d0.shape == (2, 3, 32, 32, 48) and d0.abs().mean() > 1e-3
    assert torch.allclose(d0, d1, atol=1e-6)
    # batch B and batch 2B convolutions round differently (more so in channels_last): compare each gradient
    # to its own scale (measured: 4e-5 of the largest entry at worst)
    assert len(g0) == len(g1)
    assert all((a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(g0, g1, strict=True))


def test_scalar_norm_normalises_whole_sample():
    x = torch.randn(2, 4, 5, 6, 7) * 3 + 5
    y = ScalarNorm()(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3, 4)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y.std(dim=(1, 2, 3, 4), unbiased=False), torch.ones(2), atol=1e-3)


def _reference_norms(monkeypatch) -> None:
    """Every ScalarNorm computed by its definition (``torch.std_mean`` and autograd) instead of the fused path."""

    def forward(self: ScalarNorm, x: torch.Tensor) -> torch.Tensor:
        return scalar_norm_reference(x, self.gamma, self.beta, self.eps)

    monkeypatch.setattr(ScalarNorm, "forward", forward)


def test_fused_scalar_norm_matches_its_definition():
    """The fused ScalarNorm (two-pass statistics, closed-form backward) is the reference formula: values and
    gradients in float64 (gradcheck), channels-last input, a constant sample (finite gradients), bfloat16."""
    x = (torch.randn(2, 3, 4, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
    gamma = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    norm = ScalarNorm().double()
    with torch.no_grad():
        norm.gamma.copy_(gamma)
        norm.beta.copy_(beta)
    assert torch.autograd.gradcheck(lambda *a: ScalarNorm.forward(norm, a[0]), (x,))
    y, y_ref = norm(x), scalar_norm_reference(x, norm.gamma, norm.beta, norm.eps)
    assert (y - y_ref).abs().max() < 1e-12
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), (x, norm.gamma, norm.beta))
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), (x, norm.gamma, norm.beta))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, grads_ref, strict=True))

    x32 = torch.randn(2, 8, 6, 7, 5).contiguous(memory_format=torch.channels_last_3d) * 3 + 5
    y32 = ScalarNorm()(x32)
    assert y32.is_contiguous(memory_format=torch.channels_last_3d)
    assert (y32 - scalar_norm_reference(x32, torch.ones(1), torch.zeros(1), 1e-3)).abs().max() < 1e-5

    constant = torch.ones(1, 2, 3, 3, 3, requires_grad=True)
    ScalarNorm()(constant).square().sum().backward()
    assert torch.isfinite(constant.grad).all()

    half = x32.bfloat16()
    assert ScalarNorm()(half).dtype == torch.bfloat16
    assert (ScalarNorm()(half).float() - y32).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(32, 40, 48), (48, 33, 64)])
def test_shipped_weights_fused_norm_equals_the_definition(repo_root, monkeypatch, shape):
    """On the shipped weights the network with the fused ScalarNorm gives the field of the reference formula
    (max abs diff < 1e-5 voxels) and the same parameter gradients to float32 rounding (measured against a float64
    run: both within 1e-5 voxels, and gradients within 8e-4 of their largest entry for std_mean, 1.3e-4 fused);
    the state dict is unchanged."""
    state = torch.load(repo_root / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    net = ResidualAlignerNetwork(3, "ref")
    assert set(net.state_dict()) == set(state)
    net.load_state_dict(state, strict=True)
    x = torch.rand(1, 2, *shape, generator=torch.Generator().manual_seed(1))

    def field_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        ddf = net(x)
        (ddf.square().mean() + net.register(x).warped.mean()).backward()
        return ddf.detach(), [p.grad.clone() for p in net.parameters()]

    ddf, grads = field_and_grads()
    _reference_norms(monkeypatch)
    ddf_ref, grads_ref = field_and_grads()
    assert (ddf - ddf_ref).abs().max() < 1e-5
    for g, g_ref in zip(grads, grads_ref, strict=True):
        # relative to the largest entry, with a float32 floor for parameters whose gradient is tiny (1e-4 and below)
        assert (g - g_ref).abs().max() <= 1e-3 * g_ref.abs().max() + 1e-6


def test_warp_matches_monai_warp():
    from monai.networks.blocks import Warp

    torch.manual_seed(0)
    image = torch.rand(2, 1, 9, 10, 11)
    ddf = torch.randn(2, 3, 9, 10, 11) * 2
    expected = Warp(mode="bilinear", padding_mode="zeros")(image, ddf)
    assert torch.allclose(warp(image, ddf), expected, atol=1e-5)


def test_resize_nearest_like_repeats_for_odd_sizes():
    x = torch.arange(3.0).view(1, 1, 3)
    out = resize_nearest_like(x, torch.zeros(1, 1, 7), 2)
    assert out.flatten().tolist() == [0, 0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("preset", ["ref", "RAn0"])
def test_traced_model_matches_eager_at_another_size(preset):
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, preset).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.rand(1, 2, 32, 32, 32))
        x = torch.rand(1, 2, 35, 33, 41)
        eager, scripted = net(x), traced(x)
    assert eager.abs().max() > 0
    assert torch.allclose(eager, scripted, atol=1e-5)


def rotated_pair(image: torch.Tensor, degrees: float, shift: tuple[float, float, float]):
    """The fixed image = ``image`` warped by a known rotation about the last axis plus a shift."""
    spatial = image.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij"))
    centre = torch.tensor([(s - 1) / 2 for s in spatial[:2]])[:, None]
    angle = math.radians(degrees)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    xy = grid[:2].reshape(2, -1) - centre
    field = torch.zeros(1, 3, *spatial)
    field[0, :2] = (rot @ xy - xy).reshape(2, *spatial)
    field += torch.tensor(shift).view(1, 3, 1, 1, 1)
    return warp(image, field), field


@pytest.mark.slow
def test_optimising_one_real_pair_recovers_known_motion(shared_data):
    """A few dozen Adam steps on one real CT pair (known rotation + shift) must align it.

    Thresholds: the masked image MSE falls below 30% of its initial value and the mean end-point error
    inside the body (fixed intensity > 0.1) below 50% of the zero field's (about 2.1 voxels here).
    """
    torch.manual_seed(0)
    path = shared_data / "totalseg_example_ct" / "ts_example" / "image.nii.gz"
    hu = nib.load(path).get_fdata().astype(np.float32)
    image = torch.from_numpy(np.clip((hu + 100) / 400, 0, 1))[None, None, 13:109, 10:90, :]
    image = torch.nn.functional.pad(torch.nn.functional.avg_pool3d(image, (2, 2, 1)), (1, 1))  # 48x40x32
    fixed, true_ddf = rotated_pair(image, degrees=4, shift=(1.5, -1.0, 0.5))
    body = (fixed > 0.1)[0, 0]

    net = ResidualAlignerNetwork(3, "ref")
    loss_fn = RegistrationLoss(3, similarity="mse", sim_weight=1.0, smooth_weight=0.05)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    pair = torch.cat([image, fixed], dim=1)
    for _ in range(30):
        out = net.register(pair)
        loss = loss_fn(out.warped, fixed, out.ddf)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        out = net.register(pair)
    mse_before = (image - fixed).square()[0, 0][body].mean()
    mse_after = (out.warped - fixed).square()[0, 0][body].mean()
    epe_zero = true_ddf[0].norm(dim=0)[body].mean()
    epe = (out.ddf[0] - true_ddf[0]).norm(dim=0)[body].mean()
    assert mse_after < 0.3 * mse_before, (mse_before, mse_after)
    assert epe < 0.5 * epe_zero, (epe_zero, epe)
