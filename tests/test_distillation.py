"""Distillation of instance optimisation into the network: teacher fields, their crop, the field loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ran_bundle.data import make_pair
from ran_bundle.distillation import TeacherFieldd, teacher_file
from ran_bundle.engines import registration_train_step
from ran_bundle.fields import write_image_atomic
from ran_bundle.flow import warp
from ran_bundle.keys import TEACHER_DDF
from ran_bundle.losses import RegistrationLoss, end_point_error
from ran_bundle.transforms import registration_transforms

SHAPE = (32, 32, 32)


def _blob(shift: float) -> np.ndarray:
    """A smooth bright ellipsoid on a dark background, shifted by ``shift`` voxels along x."""
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in SHAPE), indexing="ij")
    r2 = ((x - 15 - shift) / 8) ** 2 + ((y - 15) / 6) ** 2 + ((z - 16) / 7) ** 2
    return (np.exp(-2 * r2) * 100).astype(np.float32)


@pytest.fixture()
def pair(tmp_path):
    """A fixed blob and the same blob shifted by 2 voxels along x (moving), as NIfTI files."""
    files = {}
    for name, shift in (("fixed", 0.0), ("moving", 2.0)):
        files[name] = str(write_image_atomic(_blob(shift), np.eye(4), tmp_path / f"{name}.nii.gz"))
    return make_pair({"image": files["moving"]}, {"image": files["fixed"]})


def test_end_point_error_is_the_mean_euclidean_distance():
    a, b = torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 3, 4, 4, 4)
    b[:, 0] = 3.0
    b[:, 1] = 4.0
    assert float(end_point_error(a, b)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="shapes differ"):
        end_point_error(a, b[..., :3])


def test_teacher_field_is_computed_once_kept_and_recovers_the_shift(pair, tmp_path):
    teacher = TeacherFieldd(tmp_path / "teachers", iterations=(20, 30))
    transform = registration_transforms(
        "train", spacing=None, intensity="none", roi_size=None, with_labels=False, intensity_scale=0.0,
        before_crop=teacher,
    )  # fmt: skip
    out = transform(pair)
    field = out[TEACHER_DDF]
    assert field.shape == (3, *SHAPE)
    path = teacher_file(tmp_path / "teachers", pair["moving_image"], pair["fixed_image"])
    assert path.is_file()
    # the fixed point p matches the moving point p + u(p): the blob moved by +2 voxels along x
    centre = field[:, 11:20, 11:20, 12:21].mean(dim=(1, 2, 3))
    assert 1.0 < float(centre[0]) < 3.0 and abs(float(centre[1])) < 0.5 and abs(float(centre[2])) < 0.5
    # warping by the teacher brings the moving image closer to the fixed one
    m, f = out["moving_image"][None], out["fixed_image"][None]
    assert float((warp(m, field[None].float()) - f).abs().mean()) < 0.5 * float((m - f).abs().mean())
    # a second use reads the kept field (float16 on disk) instead of optimising again
    mtime = path.stat().st_mtime_ns
    again = transform(pair)[TEACHER_DDF]
    assert path.stat().st_mtime_ns == mtime
    assert torch.allclose(again, field, atol=5e-3)


def test_teacher_field_is_cropped_with_the_images(pair, tmp_path):
    """A teacher field that equals the moving image (channel 0) is cropped at the images' crop location."""
    full = registration_transforms("eval", spacing=None, intensity="none", with_labels=False)(pair)
    path = teacher_file(tmp_path / "teachers", pair["moving_image"], pair["fixed_image"])
    path.parent.mkdir()
    ddf = torch.stack([full["moving_image"][0].as_tensor(), full["fixed_image"][0].as_tensor(), torch.zeros(SHAPE)])
    torch.save({"ddf": ddf.half(), "iterations": [0, 0], "format": 1}, path)
    transform = registration_transforms(
        "train", spacing=None, intensity="none", roi_size=(16, 16, 16), with_labels=False, intensity_scale=0.0,
        before_crop=TeacherFieldd(tmp_path / "teachers", compute_missing=False),
    )  # fmt: skip
    for seed in range(3):
        transform.set_random_state(seed=seed)
        out = transform(pair)
        assert out[TEACHER_DDF].shape == (3, 16, 16, 16)
        assert torch.allclose(out[TEACHER_DDF][0].float(), out["moving_image"][0], atol=0.1)
        assert torch.allclose(out[TEACHER_DDF][1].float(), out["fixed_image"][0], atol=0.1)


def test_missing_or_misfit_teacher_is_named(pair, tmp_path):
    transform = registration_transforms(
        "train", spacing=None, intensity="none", roi_size=None, with_labels=False, intensity_scale=0.0,
        before_crop=TeacherFieldd(tmp_path / "teachers", compute_missing=False),
    )  # fmt: skip
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the transform's error
        transform(pair)
    assert "moving_to_fixed.pt is missing" in str(err.value.__cause__)
    path = teacher_file(tmp_path / "teachers", pair["moving_image"], pair["fixed_image"])
    path.parent.mkdir()
    torch.save({"ddf": torch.zeros(3, 8, 8, 8).half(), "iterations": [0, 0], "format": 1}, path)
    with pytest.raises(RuntimeError) as err:
        transform(pair)
    assert "made for another grid" in str(err.value.__cause__)


def test_field_loss_pulls_the_network_towards_the_teacher():
    """The training step passes the teacher to the loss: steps on the field term alone reduce the end-point error
    of a small network to a known teacher field."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 3, padding=1))
    x = torch.rand(1, 2, 16, 16, 16)
    teacher = torch.zeros(1, 3, 16, 16, 16)
    teacher[:, 0] = 1.5
    loss = RegistrationLoss(3, sim_weight=0.0, smooth_weight=0.0, field_weight=1.0)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = float(end_point_error(net(x).detach(), teacher))
    for _ in range(30):
        _, value, terms = registration_train_step(net, optimiser, x, loss, teacher_ddf=teacher)
    assert "field" in terms
    assert float(end_point_error(net(x).detach(), teacher)) < 0.2 * before
