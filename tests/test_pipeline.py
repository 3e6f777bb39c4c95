"""The registration pipeline (:mod:`ran_bundle.pipeline`) in-process: arguments, weights, the network steps, and the
conventions of its outputs checked against SimpleITK.

* ``ddf.nii.gz`` holds the WHOLE mapping, affine stage included: ``sitk.Resample(moving, fixed,
  DisplacementFieldTransform(ddf))`` alone reproduces ``warped.nii.gz``; composing ``affine.tfm`` with it
  again would apply the affine twice.
* ``affine.tfm`` is the affine stage alone: with a zero deformable field, ``ddf.nii.gz`` is exactly the
  displacement of ``affine.tfm`` and ``sitk.Resample(moving, fixed, ReadTransform(affine.tfm))`` gives
  ``warped.nii.gz``.
* :meth:`RegistrationPipeline.to_world` equals ITK's composite ``affine o (id + v)`` of the affine and the
  deformable field of the network grid, on oblique, offset grids; the inverse field maps back.

Small synthetic images (40^3 voxels of 2 mm, a 32^3 network grid) keep a full run to a few seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.affine import AffineResult, write_transform
from ran_bundle.cli import register_main
from ran_bundle.fields import write_displacement_nifti, write_image_atomic
from ran_bundle.flow import ddf_voxel_to_mm, field_to_voxel_ddf, map_points, voxel_grid, voxel_to_world
from ran_bundle.inputs import InputError, load_network, parse_spacing, read_state_dict, resolve_device
from ran_bundle.networks import ResidualAlignerNetwork
from ran_bundle.optimise import finetune_network, optimise_field
from ran_bundle.pipeline import DEFAULT_WEIGHTS, NetworkPair, RegistrationPipeline
from ran_bundle.spatial import Grid, foreground_mask, read_displacement_field, sitk_affine, to_sitk_image

LPS = np.diag([-1.0, -1.0, 1.0])


def phantom(shape=(40, 40, 40), spacing=2.0, seed=0) -> np.ndarray:
    """An asymmetric head-like phantom: an ellipsoid with a brighter off-centre core and smooth texture."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64) * spacing
    centre = (np.asarray(shape) - 1) * spacing / 2
    r = np.sqrt(sum(((idx[i] - centre[i]) / s) ** 2 for i, s in enumerate((26.0, 22.0, 20.0))))
    core = np.sqrt(sum((idx[i] - centre[i] - o) ** 2 for i, o in enumerate((8.0, -5.0, 4.0))))
    img = (r < 1.0) * (1.0 + 0.3 * gaussian_filter(rng.standard_normal(shape), 2)) + (core < 9.0)
    return gaussian_filter(img, 1.0).astype(np.float32)


def smooth_field(shape, seed=0, amp=3.0) -> torch.Tensor:
    """``(1, 3, *shape)`` smooth random voxel DDF with maximum ``amp``."""
    rng = np.random.default_rng(seed)
    u = np.stack([gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(3)])
    u *= amp / np.abs(u).max()
    return torch.tensor(u[None], dtype=torch.float32)


def rotation(deg: float, axis: int, shift) -> np.ndarray:
    """``(4, 4)`` rotation about the origin by ``deg`` about ``axis``, then a shift (mm)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift
    return m


def itk_array(img: sitk.Image) -> np.ndarray:
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def fixed_points(shape, affine) -> np.ndarray:
    """``(N, 3)`` RAS world points of every voxel centre, in C order of the array."""
    return voxel_to_world(voxel_grid(shape), affine).numpy().reshape(3, -1).T


def world_to_index(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(N, 3)`` RAS points -> continuous voxel indices of the grid ``affine``."""
    return (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def itk_map(transform: sitk.Transform, points_ras: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(c) for c in LPS @ p)) for p in points_ras]) @ LPS


@pytest.fixture
def one_thread():
    """One intra-op thread: on a tiny input, several threads on a busy 2-core machine spend far longer in sync."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def moved_pair(tmp_path_factory) -> dict[str, Path]:
    """A phantom and the same phantom under a known rigid motion written into the moving file's header only:
    the moving point ``T p`` shows what the fixed point ``p`` shows, ``T`` a 10 degree rotation and a shift."""
    d = tmp_path_factory.mktemp("moved_pair")
    image = phantom()
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = -39.0
    motion = rotation(10.0, 2, [6.0, -4.0, 3.0])
    return {
        "fixed": write_image_atomic(image, fixed_affine, d / "fixed.nii.gz"),
        "moving": write_image_atomic(image, motion @ fixed_affine, d / "moving.nii.gz"),
        "motion": motion,
    }


def register(capsys, *argv) -> str:
    try:
        register_main([str(a) for a in argv])
    except SystemExit as e:
        pytest.fail(f"ran-register exited {e.code}: {capsys.readouterr().err[-3000:]}")
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# arguments and weights
# ------------------------------------------------------------------------------------------------


def test_parse_spacing():
    assert parse_spacing(2) == (2.0, 2.0, 2.0)
    assert parse_spacing((1, 2, 3)) == (1.0, 2.0, 3.0)
    assert parse_spacing("1.5,2,2") == (1.5, 2.0, 2.0)
    assert parse_spacing("2 2 3") == (2.0, 2.0, 3.0)
    assert parse_spacing("[1, 1, 2]") == (1.0, 1.0, 2.0)
    for bad in ("a", (1, 2), "0", "-1 1 1", "1 1 nan", "inf", "none", None, "1 2 3 4"):
        with pytest.raises(InputError, match="--spacing"):
            parse_spacing(bad)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(InputError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


def test_load_network_errors(tmp_path: Path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read it as a PyTorch checkpoint"):
        load_network(junk)
    other = tmp_path / "ran4.pt"
    torch.save({"model": ResidualAlignerNetwork(3, "RAn4").state_dict()}, other)
    with pytest.raises(InputError, match="do not fit the RAN preset 'ref'"):
        load_network(other, "ref")
    torch.manual_seed(0)
    saved = ResidualAlignerNetwork(3, "RAn4").state_dict()
    plain, ddp = tmp_path / "plain.pt", tmp_path / "ddp.pt"
    torch.save(saved, plain)  # a bare state dict is accepted
    torch.save({"model": {f"module.{k}": v for k, v in saved.items()}}, ddp)  # a DDP run's checkpoint too
    for path in (plain, ddp):
        torch.manual_seed(1)  # other initial weights: only the file's values can make them equal
        net = load_network(path, "RAn4")
        assert isinstance(net, ResidualAlignerNetwork) and not net.training
        loaded = net.state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], v) for k, v in saved.items()), path
    with pytest.raises(InputError, match="unknown"):
        load_network(plain, "RAn9")
    with pytest.raises(InputError, match="file not found"):
        load_network(tmp_path / "absent.pt")


def test_pipeline_holds_the_values_of_its_weight_file():
    """Starting from the network, without a network given, the pipeline loads ``weights`` (the shipped file by
    default): its network's state dict is the file's, value for value, not merely a network of the right type."""
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {DEFAULT_WEIGHTS}")
    torch.manual_seed(1)  # other initial weights: only the file's values can make them equal
    loaded = RegistrationPipeline(device="cpu", io_start="network", progress=False).network.state_dict()
    saved = read_state_dict(DEFAULT_WEIGHTS)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in saved.items())


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"spacing": 0}, "--spacing"),
        ({"intensity": "pet"}, "--intensity"),
        ({"ct_window": (300, -1000)}, "--ct-window"),
        ({"ct_window": (-1000,)}, "--ct-window"),
        ({"ct_window": "lung"}, "--ct-window"),
        ({"affine": "shear"}, "--affine"),
        ({"io_iterations": (-1, 5)}, "--io-iterations"),
        ({"io_iterations": (1, 2, 3)}, "--io-iterations"),
        ({"io_weight": -1.0}, "--io-weight"),
        ({"io_fold_weight": float("nan")}, "--io-fold-weight"),
        ({"finetune_steps": 1.5}, "--finetune-steps"),
        ({"finetune_lr": 0}, "--finetune-lr"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_pipeline_refuses_bad_arguments_before_loading_weights(kwargs, flag, monkeypatch):
    def no_weights(*args, **kw):
        raise AssertionError("the weights were read before the arguments were checked")

    monkeypatch.setattr("ran_bundle.pipeline.load_network", no_weights)
    with pytest.raises(InputError, match=flag):
        RegistrationPipeline(**kwargs)


def chest_ct(shift_mm: float, shape=(32, 32, 32), spacing=2.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like CT in HU and its lung mask: air, a soft-tissue body (40 HU), two lungs of parenchyma
    (-850 HU) with vessel-like texture up to -150 HU, shifted by ``shift_mm`` along the second axis. Two of them
    differ in the lungs only, all in -1000..-150 HU."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64) * spacing
    centre = (np.asarray(shape) - 1) * spacing / 2

    def ellipsoid(offset, radii):
        return sum(((idx[i] - centre[i] - offset[i]) / r) ** 2 for i, r in enumerate(radii)) < 1

    hu = np.full(shape, -1000.0)
    hu[ellipsoid((0, 0, 0), (26, 24, 26))] = 40.0
    lungs = ellipsoid((-11, 0, 0), (8, 15, 19)) | ellipsoid((11, 0, 0), (8, 15, 19))
    vessels = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 2.0)
    vessels = np.clip(np.roll(vessels, round(shift_mm / spacing), axis=1) / vessels.std(), 0, None)
    hu[lungs] = np.clip(-850.0 + 250.0 * vessels, -1000.0, -150.0)[lungs]
    return hu.astype(np.float32), lungs


def test_the_ct_window_decides_whether_the_lungs_are_registered(tmp_path: Path, one_thread):
    """A chest CT pair that differs inside the lungs only (-1000..-150 HU): through the abdomen window
    [-100, 300] the network sees two identical images (the parenchyma is all 0) and the lungs stay where they
    were; through the lung window [-1000, 300] the registration aligns them."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -31.0
    fixed, lungs = chest_ct(0.0)
    moving, _ = chest_ct(4.0)
    assert np.array_equal(fixed[~lungs], moving[~lungs]) and max(fixed[lungs].max(), moving[lungs].max()) < -100
    paths = [write_image_atomic(image, affine, tmp_path / f"{name}.nii.gz") for name, image in
             (("fixed", fixed), ("moving", moving))]  # fmt: skip
    before = np.abs(moving - fixed)[lungs].mean()
    network, error = None, {}
    for name, window in (("abdomen", (-100, 300)), ("lung", (-1000, 300))):
        pipeline = RegistrationPipeline(
            network=network, device="cpu", intensity="ct", ct_window=window, affine="none", io_iterations=(10, 20),
            progress=False,
        )  # fmt: skip
        network = pipeline.network
        result = pipeline.register(*paths)
        assert torch.equal(result.pair.moving, result.pair.fixed) == (name == "abdomen")
        error[name] = np.abs(result.warped.numpy() - fixed)[lungs].mean()
    assert error["abdomen"] > 0.9 * before  # flat lungs: nothing to align them by
    assert error["lung"] < 0.7 * before, (before, error)


# ------------------------------------------------------------------------------------------------
# the network steps
# ------------------------------------------------------------------------------------------------


def test_predict_amp_and_finetune_network_on_a_tiny_pair(one_thread):
    torch.manual_seed(0)
    net = ResidualAlignerNetwork(3, "ref").eval()
    torch.nn.init.normal_(net.output_head.weight, std=0.1)  # a non-trivial field
    pipeline = RegistrationPipeline(network=net, device="cpu", progress=False)
    m, f = torch.rand(1, 1, 16, 16, 32), torch.rand(1, 1, 16, 16, 32)
    pair = NetworkPair(m, f, Grid((16, 16, 32), np.eye(4)))
    ddf = pipeline.predict(pair)
    assert ddf.shape == (1, 3, 16, 16, 32) and ddf.dtype == torch.float32 and ddf.abs().mean() > 0.01
    swapped = pipeline.predict(NetworkPair(f, m, pair.grid))
    assert not torch.allclose(ddf, swapped, atol=1e-3)  # the order of the pair matters
    pipeline.amp = True  # autocast (bfloat16 on CPU), float32 out
    amp_ddf = pipeline.predict(pair)
    assert amp_ddf.dtype == torch.float32 and torch.allclose(amp_ddf, ddf, atol=0.1 * ddf.abs().max().item())

    before = {k: v.clone() for k, v in net.state_dict().items()}
    tuned, losses = finetune_network(net, m, f, steps=2, lr=1e-3, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original is untouched
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert not tuned.training


def test_optimise_field_lowers_the_loss_and_aligns(one_thread):
    """Instance optimisation of the field from a zero start on a pair that differs by a smooth deformation."""
    from ran_bundle.flow import warp_image

    fixed = torch.from_numpy(phantom((32, 32, 32)))[None, None]
    fixed = fixed / fixed.max()
    truth = smooth_field((32, 32, 32), seed=3, amp=3.0)
    moving = warp_image(fixed, -truth)  # roughly: moving o (id + truth) = fixed
    result = optimise_field(moving, fixed, torch.zeros_like(truth), iterations=(5, 10), progress=False)
    assert result.ddf.shape == truth.shape and result.iterations == [5, 10] and len(result.losses) == 15
    # each level lowers its own loss (the levels' losses are on different grids and not comparable)
    assert result.losses[4] < result.losses[0] and result.losses[-1] < result.losses[5]
    before = (moving - fixed).abs().mean()
    after = (warp_image(moving, result.ddf) - fixed).abs().mean()
    assert after < 0.5 * before


# ------------------------------------------------------------------------------------------------
# world space: the whole mapping against SimpleITK
# ------------------------------------------------------------------------------------------------


def test_to_world_is_itks_composite_of_affine_and_deformable_field(tmp_path: Path):
    """On a non-RAS fixed grid and an offset moving grid, with an affine and a random field on the network grid:
    the written ``ddf`` maps every fixed point as ITK's ``CompositeTransform`` [affine, field] does, the warped
    image is ``sitk.Resample`` with the written field alone, and the inverse field maps the points back."""
    shape = (36, 30, 40)
    fixed_affine = np.array([[0, 0, -2.0, 40], [-2.5, 0, 0, 30], [0, 1.8, 0, -20], [0, 0, 0, 1]])
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += [3.0, -4.5, 5.0]
    fixed_path = write_image_atomic(phantom(shape, 2.0, seed=1), fixed_affine, tmp_path / "fixed.nii.gz")
    moving_path = write_image_atomic(phantom(shape, 2.0, seed=2), moving_affine, tmp_path / "moving.nii.gz")
    pipeline = RegistrationPipeline(
        network=torch.nn.Identity(), affine="none", intensity="none", spacing=3.0, inverse=True, progress=False
    )  # type: ignore[arg-type]
    inputs = pipeline.check_inputs(fixed_path, moving_path)
    matrix = rotation(4.0, 0, [2.0, -1.0, 1.5])
    affine = AffineResult(matrix, sitk_affine(matrix), "none")
    pair = pipeline.preprocess(inputs, affine)
    grid = pair.grid
    assert all(s % 16 == 0 for s in grid.shape) and np.allclose(grid.affine[:3, :3], 3.0 * np.eye(3))
    ddf = smooth_field(grid.shape, seed=5, amp=1.5)  # voxels of the grid (3 mm): up to 4.5 mm
    world = pipeline.to_world(inputs, affine, grid, ddf_voxel_to_mm(ddf, grid.affine))

    field_path = write_displacement_nifti(ddf, grid.affine, tmp_path / "v.nii.gz", dtype="float64")
    write_transform(matrix, tmp_path / "affine.tfm")
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(tmp_path / "affine.tfm")))  # applied second
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.ReadImage(str(field_path), sitk.sitkVectorFloat64)))
    points = fixed_points(shape, fixed_affine)
    total = world["field"][0].numpy().reshape(3, -1).T
    # fixed voxels inside the network grid (outside it ITK's field is 0, ours keeps the edge value)
    index = world_to_index(points, grid.affine)
    in_grid = ((index >= 0) & (index <= np.asarray(grid.shape) - 1)).all(1)
    assert in_grid.mean() > 0.5
    sample = np.flatnonzero(in_grid)[:: max(1, in_grid.sum() // 3000)]
    np.testing.assert_allclose(points[sample] + total[sample], itk_map(composite, points[sample]), atol=1e-3)
    assert np.abs(total[sample] - (points[sample] @ matrix[:3, :3].T + matrix[:3, 3] - points[sample])).max() > 1.0

    # the warped image: sitk.Resample with the whole field alone
    total_voxels = field_to_voxel_ddf(world["field"], fixed_affine)
    field_file = write_displacement_nifti(total_voxels, fixed_affine, tmp_path / "ddf.nii.gz", dtype="float64")
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(field_file), sitk.sitkVectorFloat64))
    moving_itk = to_sitk_image(inputs.moving.array.astype(np.float32), moving_affine)
    fixed_itk = to_sitk_image(inputs.fixed.array.astype(np.float32), fixed_affine)
    itk = itk_array(sitk.Resample(moving_itk, fixed_itk, transform, sitk.sitkLinear, 0.0))
    mapped = world_to_index(points + total, moving_affine)
    inside = ((mapped >= 1) & (mapped <= np.asarray(shape) - 2)).all(1).reshape(shape)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(world["warped"].numpy()[inside], itk[inside], atol=1e-4)

    # the inverse (on the moving grid) brings the mapped fixed points back where the field is invertible
    inverse, inv_affine = world["inverse_field"], inputs.moving.affine
    back, hit = map_points(points[sample] + total[sample], inverse, inv_affine)
    err = np.linalg.norm(back - points[sample], axis=1)[hit]
    assert hit.mean() > 0.8 and np.median(err) < 0.05 and np.percentile(err, 95) < 0.3, (np.median(err), err.max())


def test_ddf_holds_the_affine_and_affine_tfm_is_the_affine_stage_alone(moved_pair, tmp_path, capsys, monkeypatch):
    """With the network's field and instance optimisation switched off, the whole mapping is the affine stage:
    ``ddf.nii.gz`` is then exactly the displacement ``T p - p`` of ``affine.tfm``, and resampling with either file
    gives ``warped.nii.gz``, which shows the fixed phantom again (the affine stage found the header motion)."""
    monkeypatch.setattr(RegistrationPipeline, "predict", lambda self, pair: torch.zeros(1, 3, *pair.grid.shape))
    out = tmp_path / "out"
    register(capsys, "--fixed", moved_pair["fixed"], "--moving", moved_pair["moving"], "--out", out, "--no-io",
             "--affine", "rigid", "--device", "cpu", "--quiet")  # fmt: skip
    affine_tfm = sitk.ReadTransform(str(out / "affine.tfm"))
    assert affine_tfm.IsLinear()
    fixed = sitk.ReadImage(str(moved_pair["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moved_pair["moving"]), sitk.sitkFloat32)
    field, field_affine = read_displacement_field(out / "ddf.nii.gz")
    fixed_affine = nib.load(str(moved_pair["fixed"])).affine
    np.testing.assert_allclose(field_affine, fixed_affine, atol=1e-4)
    points = fixed_points(field.shape[2:], field_affine)
    by_tfm = itk_map(affine_tfm, points) - points
    np.testing.assert_allclose(field[0].numpy().reshape(3, -1).T, by_tfm, atol=1e-3)
    # the affine stage found (most of) the motion written into the header
    by_motion = points @ moved_pair["motion"][:3, :3].T + moved_pair["motion"][:3, 3] - points
    assert np.linalg.norm(by_tfm - by_motion, axis=1).mean() < 0.5 * np.linalg.norm(by_motion, axis=1).mean()

    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    with_tfm = itk_array(sitk.Resample(moving, fixed, affine_tfm, sitk.sitkLinear, 0.0))
    with_ddf = itk_array(
        sitk.Resample(
            moving,
            fixed,
            sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64)),
            sitk.sitkLinear,
            0.0,
        )
    )
    core = (slice(4, -4),) * 3  # away from the image border (ITK's outer half voxel)
    np.testing.assert_allclose(warped[core], with_tfm[core], atol=1e-3)
    np.testing.assert_allclose(warped[core], with_ddf[core], atol=1e-3)
    image = itk_array(fixed)
    unregistered = itk_array(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.abs(warped - image)[core].mean() < 0.5 * np.abs(unregistered - image)[core].mean()


def test_ddf_alone_reproduces_warped_and_must_not_be_composed_with_affine_tfm(moved_pair, tmp_path, capsys):
    """A full run (shipped weights, 2 + 2 instance-optimisation iterations): ``sitk.Resample`` with
    ``DisplacementFieldTransform(ddf.nii.gz)`` equals ``warped.nii.gz``; adding ``affine.tfm`` in front of it
    applies the affine twice and does not."""
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"shipped weights not found at {DEFAULT_WEIGHTS}")
    out = tmp_path / "out"
    register(capsys, "--fixed", moved_pair["fixed"], "--moving", moved_pair["moving"], "--out", out,
             "--io-iterations", "2", "2", "--device", "cpu", "--quiet")  # fmt: skip
    fixed = sitk.ReadImage(str(moved_pair["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moved_pair["moving"]), sitk.sitkFloat32)
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)

    def ddf_transform() -> sitk.Transform:  # DisplacementFieldTransform takes over the image's buffer: read again
        return sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "ddf.nii.gz"), sitk.sitkVectorFloat64))

    alone = itk_array(sitk.Resample(moving, fixed, ddf_transform(), sitk.sitkLinear, 0.0))
    twice = sitk.CompositeTransform(3)
    twice.AddTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    twice.AddTransform(ddf_transform())
    doubled = itk_array(sitk.Resample(moving, fixed, twice, sitk.sitkLinear, 0.0))
    core = (slice(4, -4),) * 3
    err = np.abs(alone - warped)[core]
    assert err.max() < 1e-3, err.max()
    assert np.abs(doubled - warped)[core].mean() > 100 * err.mean() + 1e-3
    field, _ = read_displacement_field(out / "ddf.nii.gz")
    assert float(field.norm(dim=1).max()) > 5.0  # the header motion is in the field


def test_folding_is_counted_inside_the_fixed_foreground(moved_pair, tmp_path, capsys, monkeypatch):
    """A field that folds only outside the fixed image's foreground: the report counts no folding (the
    jacobian file still shows it), and a fold over the whole image is counted voxel for voxel inside it."""
    fixed_affine = nib.load(str(moved_pair["fixed"])).affine
    mask = foreground_mask(np.asarray(nib.load(str(moved_pair["fixed"])).dataobj))
    assert not mask[:5].any()  # the phantom's foreground starts 10 mm from the image's first face

    def folding(first_voxels: float):
        """``u_0 = 3 sin(pi x / 4)`` voxels (du/dx down to -2.4: det J < 0) for fixed voxel coordinate
        ``x < first_voxels`` (a multiple of 4, where the sine is 0 again: no jump), 0 elsewhere."""

        def predict(self, pair):
            points = voxel_to_world(voxel_grid(pair.grid.shape), pair.grid.affine).numpy().reshape(3, -1).T
            x = world_to_index(points, fixed_affine)[:, 0].reshape(pair.grid.shape)
            u = np.where(x < first_voxels, 3.0 * np.sin(np.pi * x / 4.0), 0.0)
            ddf = torch.zeros(1, 3, *pair.grid.shape)
            ddf[0, 0] = torch.from_numpy(u * 2.0 / pair.grid.spacing[0]).float()  # fixed voxels -> grid voxels
            return ddf

        return predict

    reports = {}
    for name, first in (("outside", 4.0), ("everywhere", 1e9)):
        monkeypatch.setattr(RegistrationPipeline, "predict", folding(first))
        out = tmp_path / name
        register(capsys, "--fixed", moved_pair["fixed"], "--moving", moved_pair["fixed"], "--out", out, "--no-io",
                 "--affine", "none", "--device", "cpu", "--quiet")  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        folded = np.asarray(nib.load(str(out / "jacobian.nii.gz")).dataobj) <= 0
        assert report["field"]["non_positive_jacobian_count"] == int((folded & mask).sum())
        percent = 100 * (folded & mask).sum() / mask.sum()
        assert math.isclose(report["field"]["non_positive_jacobian_percent"], percent, rel_tol=1e-6)
        reports[name] = (int(folded.sum()), report)
    folded, report = reports["outside"]
    assert folded > 0 and report["field"]["non_positive_jacobian_count"] == 0
    assert not any("folds" in w for w in report["warnings"])
    folded, report = reports["everywhere"]
    assert report["field"]["non_positive_jacobian_percent"] > 10.0
    assert any("of the fixed foreground folds (det J <= 0)" in w for w in report["warnings"])


def test_scale_intensity_equals_monai_transforms():
    """``ran_bundle.intensity`` (numpy, so that ``ran-register`` need not import MONAI) scales as MONAI's
    ``ScaleIntensityRange`` and ``ScaleIntensityRangePercentiles`` of the training transforms."""
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

    from ran_bundle.intensity import MR_PERCENTILES, scale_intensity

    rng = np.random.default_rng(0)
    image = (rng.gamma(2.0, 300.0, (17, 12, 9)) - 400.0).astype(np.float32)
    monai_ct = ScaleIntensityRange(-100.0, 300.0, b_min=0.0, b_max=1.0, clip=True)(image[None])[0]
    monai_mr = ScaleIntensityRangePercentiles(*MR_PERCENTILES, b_min=0.0, b_max=1.0, clip=True)(image[None])[0]
    for ours, theirs in (
        (scale_intensity(image, "ct", (-100.0, 300.0)), monai_ct),
        (scale_intensity(image, "mr"), monai_mr),
    ):
        assert ours.dtype == np.float32 and 0.0 < float(ours.mean()) < 1.0
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-6)
    assert not scale_intensity(np.full((4, 4, 4), 7.0), "mr").any()
    with pytest.raises(ValueError, match="intensity"):
        scale_intensity(image, "pet")


def test_registration_without_the_network_starts_without_monai(moved_pair, tmp_path):
    """``ran-register --no-network`` runs without importing MONAI or ignite (about 4 s of its start-up on 2 cores):
    a fresh interpreter registers a phantom pair and lists the modules it loaded."""
    import subprocess
    import sys

    argv = ["--fixed", str(moved_pair["fixed"]), "--moving", str(moved_pair["moving"]), "--out",
            str(tmp_path / "out"), "--no-network", "--io-iterations", "2", "2", "--quiet"]  # fmt: skip
    code = (
        "import sys\nfrom ran_bundle.cli import register_main\n"
        f"register_main({argv!r})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'ignite'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "report.json").is_file()
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def test_load_volume_reads_as_monai_loadimage(tiny_ct, tmp_path):
    """``load_volume`` reads NIfTI with nibabel (no MONAI import) and must give what MONAI's ``LoadImage`` gives:
    the same array, dtype and RAS affine, for an image, a label map, a file with a 4-D singleton axis, and a
    header whose pixdim disagrees with its affine (which MONAI rectifies, so it goes through MONAI)."""
    from monai.transforms import LoadImage

    from ran_bundle.inputs import load_volume

    image = nib.load(tiny_ct / "images" / "subject_00.nii.gz")
    four_d = nib.Nifti1Image(np.asarray(image.dataobj)[..., None], image.affine)
    nib.save(four_d, tmp_path / "four_d.nii.gz")
    odd = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    odd.header.set_zooms((9.0, 9.0, 9.0))  # pixdim against the affine's 1.5-ish mm
    nib.save(odd, tmp_path / "odd_pixdim.nii.gz")
    files = [tiny_ct / "images" / "subject_00.nii.gz", tiny_ct / "labels" / "subject_00.nii.gz"]
    for path in [*files, tmp_path / "four_d.nii.gz", tmp_path / "odd_pixdim.nii.gz"]:
        ours = load_volume(path, "image")
        theirs = LoadImage(image_only=True, dtype=None)(str(path))
        array = np.asarray(theirs.array)
        array = array[..., 0] if array.ndim == 4 else array
        assert ours.array.dtype == array.dtype, path.name
        np.testing.assert_array_equal(ours.array, array)
        np.testing.assert_allclose(ours.affine, theirs.affine.numpy(), atol=1e-6)
