"""Datalists, pair datasets and registration transforms on the embedded tiny CT set."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ran_bundle.data import RandomPairDataset, load_datalist, make_pair, ordered_pairs
from ran_bundle.transforms import PadToCommonShaped, registration_transforms

# ---------------------------------------------------------------------------------------------
# datalists


def _write_datalist(folder: Path, content: dict) -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def fake_files(tmp_path: Path) -> list[str]:
    """Five empty placeholder 'images' (file existence is all the datalist checks)."""
    names = []
    for i in range(5):
        (tmp_path / f"img{i}.nii.gz").write_bytes(b"")
        (tmp_path / f"lab{i}.nii.gz").write_bytes(b"")
        names.append(f"img{i}.nii.gz")
    return names


def test_tiny_datalist_loads_with_absolute_paths(tiny_ct: Path):
    dl = load_datalist(tiny_ct / "datalist.json")
    assert len(dl["training"]) == 4 and len(dl["validation"]) == 2
    assert dl["test"] == [] and dl["test_pairs"] == []
    for s in dl["training"] + dl["validation"]:
        assert Path(s["image"]).is_absolute() and Path(s["image"]).is_file()
        assert Path(s["label"]).is_file()
    vp = dl["validation_pairs"]
    assert [(p["moving_image"], p["fixed_image"]) for p in vp] == [
        (dl["validation"][0]["image"], dl["validation"][1]["image"]),
        (dl["validation"][1]["image"], dl["validation"][0]["image"]),
    ]
    assert vp[0]["moving_label"] == dl["validation"][0]["label"]


def test_datalist_missing_referenced_file(tmp_path: Path, fake_files):
    path = _write_datalist(tmp_path, {"training": [{"image": fake_files[0]}, {"image": "nope.nii.gz"}]})
    with pytest.raises(ValueError, match=r"training\[1\]\['image'\]: file not found: .*nope\.nii\.gz"):
        load_datalist(path)
    assert load_datalist(path, check_files=False)["training"][1]["image"] == str(tmp_path / "nope.nii.gz")


def test_datalist_missing_label_file(tmp_path: Path, fake_files):
    subj = [{"image": fake_files[0], "label": "missing_lab.nii.gz"}, {"image": fake_files[1]}]
    with pytest.raises(ValueError, match=r"\['label'\]: file not found"):
        load_datalist(_write_datalist(tmp_path, {"training": subj}))


def test_datalist_one_subject_is_an_error(tmp_path: Path, fake_files):
    with pytest.raises(ValueError, match="'training' has 1 subject.*at least 2"):
        load_datalist(_write_datalist(tmp_path, {"training": [{"image": fake_files[0]}]}))
    content = {"training": [{"image": f} for f in fake_files[:2]], "validation": [{"image": fake_files[2]}]}
    with pytest.raises(ValueError, match="'validation' has 1 subject"):
        load_datalist(_write_datalist(tmp_path, content))
    # explicit pairs make a 1-subject split usable
    content["validation_pairs"] = [[0, fake_files[3]]]
    pairs = load_datalist(_write_datalist(tmp_path, content))["validation_pairs"]
    assert pairs == [{"moving_image": str(tmp_path / fake_files[2]), "fixed_image": str(tmp_path / fake_files[3])}]


def test_datalist_missing_keys(tmp_path: Path, fake_files):
    with pytest.raises(ValueError, match=r"training\[1\] is missing the required key 'image'"):
        load_datalist(_write_datalist(tmp_path, {"training": [{"image": fake_files[0]}, {"label": "x"}]}))
    with pytest.raises(ValueError, match="missing required key.*training"):
        load_datalist(_write_datalist(tmp_path, {"subjects": [{"image": fake_files[0]}]}))
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_datalist(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_datalist(tmp_path / "bad.json")


def test_datalist_bad_pairs(tmp_path: Path, fake_files):
    base = {"validation": [{"image": f} for f in fake_files[:3]]}
    for pairs, msg in [
        ([[0, 0]], "same image"),
        ([[0, 7]], "out of range"),
        ([{"moving": 0}], "'moving' and 'fixed'"),
        ([[0, 1, 2]], r"\[moving, fixed\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_datalist(_write_datalist(tmp_path, {**base, "validation_pairs": pairs}))
    dup = {"validation": [{"image": fake_files[0]}, {"image": "./" + fake_files[0]}]}
    with pytest.raises(ValueError, match="listed twice"):
        load_datalist(_write_datalist(tmp_path, dup))


def test_datalist_explicit_pairs_and_base_dir(tmp_path: Path, fake_files):
    sub = tmp_path / "lists"
    sub.mkdir()
    val = [{"image": f, "label": f.replace("img", "lab")} for f in fake_files[:3]]
    content = {
        "validation": val,
        "validation_pairs": [
            {"moving": 2, "fixed": fake_files[0]},
            {"moving_image": fake_files[1], "fixed_image": fake_files[4]},
        ],
    }
    dl = load_datalist(_write_datalist(sub, content), base_dir=tmp_path)
    p0, p1 = dl["validation_pairs"]
    assert p0["moving_image"] == str(tmp_path / fake_files[2]) and p0["fixed_image"] == str(tmp_path / fake_files[0])
    assert p0["fixed_label"] == str(tmp_path / "lab0.nii.gz")  # label looked up by image path
    assert set(p1) == {"moving_image", "fixed_image"}


def test_ordered_pairs_order_distinct_and_labels():
    subjects = [{"image": f"i{i}", "label": f"l{i}"} for i in range(4)]
    pairs = ordered_pairs(subjects)
    assert len(pairs) == 12
    idx = [(int(p["moving_image"][1]), int(p["fixed_image"][1])) for p in pairs]
    assert idx == [(m, f) for m in range(4) for f in range(4) if m != f]
    assert all(p["moving_label"] == "l" + p["moving_image"][1] for p in pairs)
    assert set(make_pair({"image": "a", "label": "b"}, {"image": "c"})) == {"moving_image", "fixed_image"}
    with pytest.raises(ValueError, match="at least 2"):
        ordered_pairs(subjects[:1])


def test_random_pairs_never_self_and_reproducible():
    subjects = [{"image": f"i{i}"} for i in range(3)]
    ds = RandomPairDataset(subjects, transform=None, num_pairs_per_epoch=300, seed=7)
    assert len(ds) == 300
    draws = [(p["moving_image"], p["fixed_image"]) for p in (ds[i] for i in range(len(ds)))]
    assert all(m != f for m, f in draws)
    assert len(set(draws)) == 6  # every ordered pair of distinct subjects shows up
    again = RandomPairDataset(subjects, num_pairs_per_epoch=300, seed=7)
    assert [(p["moving_image"], p["fixed_image"]) for p in (again[i] for i in range(300))] == draws
    other = RandomPairDataset(subjects, num_pairs_per_epoch=300, seed=8)
    assert [(p["moving_image"], p["fixed_image"]) for p in (other[i] for i in range(300))] != draws
    with pytest.raises(ValueError, match="at least 2 subjects"):
        RandomPairDataset(subjects[:1])
    with pytest.raises(IndexError):
        ds[300]


def test_random_pairs_depend_only_on_seed_epoch_and_index():
    ds = RandomPairDataset([{"image": f"i{i}"} for i in range(4)], num_pairs_per_epoch=20, seed=3)

    def draws(order=range(20)):
        return {i: (ds[i]["moving_image"], ds[i]["fixed_image"]) for i in order}

    epoch0 = draws()
    assert draws(reversed(range(20))) == epoch0  # access order (workers, ranks) does not matter
    ds.set_random_state(seed=99)  # what MONAI's DataLoader does per worker
    assert draws() == epoch0
    ds.set_epoch(1)
    assert draws() != epoch0
    ds.set_epoch(0)
    assert draws() == epoch0


def test_atlas_datalist_pairs_every_subject_with_the_atlas(tmp_path: Path, fake_files):
    content = {
        "training": [fake_files[0]],
        "validation": [{"image": fake_files[1], "label": "lab1.nii.gz"}, fake_files[2]],
        "atlas": {"image": fake_files[4], "label": "lab4.nii.gz"},
    }
    dl = load_datalist(_write_datalist(tmp_path, content))
    atlas = str(tmp_path / fake_files[4])
    assert dl["atlas"] == [{"image": atlas, "label": str(tmp_path / "lab4.nii.gz")}]
    assert [p["fixed_image"] for p in dl["validation_pairs"]] == [atlas, atlas]
    assert [Path(p["moving_image"]).name for p in dl["validation_pairs"]] == [fake_files[1], fake_files[2]]
    assert "moving_label" in dl["validation_pairs"][0] and "moving_label" not in dl["validation_pairs"][1]
    content["training"].append(fake_files[4])
    with pytest.raises(ValueError, match="atlas .* is also a training subject"):
        load_datalist(_write_datalist(tmp_path, content))


def test_random_pairs_with_fixed_subjects_always_use_them():
    moving, atlas = [{"image": f"i{i}"} for i in range(3)], [{"image": "atlas"}]
    ds = RandomPairDataset(moving, num_pairs_per_epoch=60, seed=1, fixed_subjects=atlas)
    draws = [(p["moving_image"], p["fixed_image"]) for p in (ds[i] for i in range(len(ds)))]
    assert {f for _, f in draws} == {"atlas"} and {m for m, _ in draws} == {"i0", "i1", "i2"}
    assert len(RandomPairDataset(moving[:1], fixed_subjects=atlas)) == 100
    with pytest.raises(ValueError, match="both moving and fixed"):
        RandomPairDataset(moving, fixed_subjects=moving[:1])


# ---------------------------------------------------------------------------------------------
# transforms


def _values(path: str) -> set[int]:
    return set(np.unique(np.asarray(nib.load(path).dataobj)).astype(int).tolist())


def test_eval_transforms_on_tiny_ct(tiny_ct: Path):
    dl = load_datalist(tiny_ct / "datalist.json")
    pair = dl["validation_pairs"][0]
    out = registration_transforms("eval", spacing=(4.0, 4.0, 4.0), intensity="ct")(pair)
    mov, fix = out["moving_image"], out["fixed_image"]
    assert mov.shape == fix.shape == out["moving_label"].shape == out["fixed_label"].shape
    assert mov.shape[0] == 1 and all(s % 16 == 0 for s in mov.shape[1:])
    assert mov.dtype == fix.dtype == torch.float32
    assert 0.0 <= float(mov.min()) and float(mov.max()) <= 1.0 and float(mov.max()) > 0.9
    for key in ("moving_label", "fixed_label"):
        lab = out[key]
        vals = set(torch.unique(lab).tolist())
        assert torch.equal(lab, lab.round())
        assert vals <= _values(pair[key]) and len(vals) > 5
    np.testing.assert_allclose(np.diag(np.asarray(mov.affine))[:3], [4.0, 4.0, 4.0])


def test_train_transforms_share_crop_and_intensity_factor(tiny_ct: Path):
    dl = load_datalist(tiny_ct / "datalist.json")
    s = dl["training"][0]
    same = {
        "moving_image": s["image"],
        "fixed_image": s["image"],
        "moving_label": s["label"],
        "fixed_label": s["label"],
    }
    tr = registration_transforms("train", spacing=None, roi_size=(64, 48, 32), intensity_scale=0.2)
    tr.set_random_state(seed=0)
    maxima = []
    for _ in range(3):
        out = tr(same)
        assert tuple(out["moving_image"].shape) == tuple(out["fixed_image"].shape) == (1, 64, 48, 32)
        # one crop location and one intensity factor for the whole pair
        assert torch.equal(out["moving_image"], out["fixed_image"])
        assert torch.equal(out["moving_label"], out["fixed_label"])
        np.testing.assert_allclose(np.asarray(out["moving_image"].affine), np.asarray(out["fixed_image"].affine))
        maxima.append(float(out["moving_image"].max()))
        assert 0.0 <= float(out["moving_image"].min()) and maxima[-1] <= 1.2 + 1e-6
    assert len(set(maxima)) > 1  # the scale / crop is random


def test_random_pair_dataset_with_transforms(tiny_ct: Path):
    dl = load_datalist(tiny_ct / "datalist.json")
    tr = registration_transforms("train", spacing=None, roi_size=(32, 32, 32))
    a = RandomPairDataset(dl["training"], tr, num_pairs_per_epoch=2, seed=3)
    b = RandomPairDataset(dl["training"], registration_transforms("train", spacing=None, roi_size=(32, 32, 32)), 2, 3)
    a[1]  # another item first: item 0's crop and intensity factor must not change
    xa, xb = a[0], b[0]
    assert torch.equal(xa["moving_image"], xb["moving_image"]) and torch.equal(xa["fixed_label"], xb["fixed_label"])
    assert xa["moving_image"].shape == (1, 32, 32, 32)


def test_pair_of_different_sizes_is_padded_to_one_divisible_shape(tiny_ct: Path, tmp_path: Path):
    src = nib.load(str(tiny_ct / "images" / "subject_01.nii.gz"))
    aff = src.affine.copy()
    aff[:3, 3] += src.affine[:3, :3] @ np.array([10, 5, 4])  # the crop's own grid
    small = nib.Nifti1Image(np.asarray(src.dataobj)[10:-20, 5:-3, 4:], aff)  # 82 x 72 x 26
    nib.save(small, str(tmp_path / "small.nii.gz"))
    pair = {
        "moving_image": str(tiny_ct / "images" / "subject_00.nii.gz"),
        "fixed_image": str(tmp_path / "small.nii.gz"),
    }
    out = registration_transforms("infer", spacing=None, intensity="mr")(pair)
    assert out["moving_image"].shape == out["fixed_image"].shape == (1, 112, 80, 32)
    assert 0.0 <= float(out["fixed_image"].min()) and float(out["fixed_image"].max()) <= 1.0
    # fixed: centred zero padding (symmetric), affine shifted by the padding
    pad0 = (112 - 82) // 2
    expected = src.affine[:3, :3] @ np.array([10 - pad0, 5 - (80 - 72) // 2, 4 - (32 - 26) // 2]) + src.affine[:3, 3]
    np.testing.assert_allclose(np.asarray(out["fixed_image"].affine)[:3, 3], expected, atol=1e-4)
    # fixed size rule
    out = registration_transforms("eval", spacing=None, spatial_size=(96, 96, 32), with_labels=False)(pair)
    assert out["moving_image"].shape == out["fixed_image"].shape == (1, 96, 96, 32)
    assert PadToCommonShaped(["a"], k=16, min_size=(40, 8, 8)).target_shape([(33, 17, 5), (20, 30, 6)]) == (48, 32, 16)


def test_orientation_and_spacing_keep_world_positions(tiny_ct: Path, tmp_path: Path):
    img_path = tiny_ct / "images" / "subject_00.nii.gz"
    lab_path = tiny_ct / "labels" / "subject_00.nii.gz"
    src, lab = nib.load(str(img_path)), nib.load(str(lab_path))
    # an LPS copy: axes 0 and 1 reversed, affine adjusted so that world positions are unchanged
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [src.shape[0] - 1, src.shape[1] - 1]
    aff_lps = src.affine @ flip
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1, ::-1].copy(), aff_lps), str(tmp_path / "img_lps.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[::-1, ::-1].copy(), aff_lps), str(tmp_path / "lab_lps.nii.gz"))
    assert nib.aff2axcodes(aff_lps) == ("L", "P", "S")
    pair = {
        "moving_image": str(tmp_path / "img_lps.nii.gz"),
        "fixed_image": str(img_path),
        "moving_label": str(tmp_path / "lab_lps.nii.gz"),
        "fixed_label": str(lab_path),
    }
    out = registration_transforms("eval", spacing=None)(pair)
    assert torch.equal(out["moving_image"], out["fixed_image"])  # reoriented to RAS: identical arrays
    assert torch.equal(out["moving_label"], out["fixed_label"])
    np.testing.assert_allclose(np.asarray(out["moving_image"].affine), np.asarray(out["fixed_image"].affine), atol=1e-4)

    # resampling to 4 mm keeps each organ's world centroid (within a voxel)
    out4 = registration_transforms("eval", spacing=(4.0, 4.0, 4.0))(pair)
    lab_arr = np.asarray(lab.dataobj)
    for value in (1, 5, 7):
        c_src = src.affine[:3, :3] @ np.argwhere(lab_arr == value).mean(0) + src.affine[:3, 3]
        for key in ("moving_label", "fixed_label"):
            a = np.asarray(out4[key].affine)
            c_out = a[:3, :3] @ np.argwhere(out4[key][0].numpy() == value).mean(0) + a[:3, 3]
            assert np.linalg.norm(c_out - c_src) < 2.0, (value, key, c_out, c_src)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        registration_transforms("training")
    with pytest.raises(ValueError, match="intensity"):
        registration_transforms("eval", intensity="pet")
    with pytest.raises(ValueError, match="roi_size.*multiple of divisible_k=16"):
        registration_transforms("train", roi_size=(100, 96, 96))
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's error
        registration_transforms("eval", spacing=None)({"moving_image": "a", "fixed_image": "b"})
    assert isinstance(err.value.__cause__, KeyError)
    assert "moving_label" in str(err.value.__cause__) and "with_labels=False" in str(err.value.__cause__)


def test_eval_transforms_are_invertible(tiny_ct: Path):
    from monai.transforms import Invertd

    pair = load_datalist(tiny_ct / "datalist.json")["validation_pairs"][1]
    tr = registration_transforms("eval", spacing=None)
    out = tr(pair)
    back = Invertd(keys="fixed_label", transform=tr, orig_keys="fixed_label", nearest_interp=True)(out)
    orig = nib.load(pair["fixed_label"])
    assert tuple(out["fixed_label"].shape[1:]) != orig.shape  # padded ...
    np.testing.assert_array_equal(back["fixed_label"][0].numpy(), np.asarray(orig.dataobj))  # ... and undone
    np.testing.assert_allclose(np.asarray(back["fixed_label"].affine), orig.affine, atol=1e-5)
