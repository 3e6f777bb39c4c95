"""Whether the network earns its place in the pipeline: is its field a better start than no field?

On a validation pair of ``configs/datalists/brain_mindboggle.json`` (Mindboggle-101 OASIS-TRT-20 subjects 10 -> 11,
Klein & Tourville 2012, CC BY-NC-SA 3.0; read from ``../shared/data``, skipped when absent), made 2 mm so that the
test is quick, through ``ran-register``'s pipeline steps with one affine stage shared by every row:

- the shipped network's field alone scores a higher Dice than a zero field (the affine stage alone);
- instance optimisation started from the network's field scores at least 0.02 more Dice than the same optimisation
  (same iterations) started from a zero field (``ran-register``'s default start): expected to fail (xfail) until
  the network earns its place.

Dice: mean over the labels of at least 100 voxels on the fixed image's grid (the report's ``mean_registered_100``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ran_bundle.cli import register_main
from ran_bundle.data import load_datalist
from ran_bundle.fields import write_image_atomic
from ran_bundle.flow import ddf_voxel_to_mm
from ran_bundle.inputs import InputError
from ran_bundle.pipeline import RegistrationPipeline

REPO = Path(__file__).resolve().parents[1]


def _blob(shift: float) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.arange(40, dtype=np.float32),) * 3, indexing="ij")
    r = np.sqrt(((x - 20 - shift) / 12) ** 2 + ((y - 19) / 10) ** 2 + ((z - 20) / 11) ** 2)
    return gaussian_filter((r < 1).astype(np.float32) + (r < 0.5), 1.0)


def test_no_network_reads_no_weights_and_optimises_from_a_zero_field(tmp_path, capsys):
    """``--no-network``: the pipeline reads no weights (a missing file is fine), the report says the network was
    not used, and the instance optimisation from a zero field still aligns a shifted phantom."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = write_image_atomic(_blob(0.0), affine, tmp_path / "fixed.nii.gz")
    moving = write_image_atomic(_blob(2.0), affine, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    argv = ["--fixed", fixed, "--moving", moving, "--out", out, "--affine", "none", "--no-network", "--weights",
            tmp_path / "missing.pt", "--io-iterations", "10", "20", "--device", "cpu", "--quiet"]  # fmt: skip
    register_main([str(a) for a in argv])
    report = json.loads((out / "report.json").read_text())
    assert report["network"]["run"] is False and report["network"]["weights"] is None
    pipe = RegistrationPipeline(io_start="zero", affine="none", io_iterations=(10, 20), progress=False)
    registration = pipe.register(str(fixed), str(moving))
    assert float(registration.ddf_network.abs().max()) == 0.0
    warped, image = registration.warped.numpy(), _blob(0.0)
    assert np.abs(warped - image).mean() < 0.6 * np.abs(_blob(2.0) - image).mean()
    with pytest.raises(InputError, match="--no-network"):
        RegistrationPipeline(io_start="zero", finetune_steps=2)
    capsys.readouterr()


@pytest.mark.slow
def test_network_start_beats_a_zero_start_on_a_validation_pair(shared_data: Path, tmp_path, resample_isotropic):
    data = load_datalist(REPO / "configs" / "datalists" / "brain_mindboggle.json", base_dir=shared_data)
    pair = data["validation_pairs"][0]
    files = {
        key: resample_isotropic(Path(pair[key]), tmp_path / f"{key}.nii.gz", 2.0, key.endswith("label"))
        for key in ("fixed_image", "moving_image", "fixed_label", "moving_label")
    }
    torch.set_num_threads(2)
    pipe = RegistrationPipeline(io_iterations=(15, 20), io_start="network", progress=False)
    inputs = pipe.check_inputs(files["fixed_image"], files["moving_image"], files["fixed_label"], files["moving_label"])
    affine = pipe.run_affine(inputs)
    network_pair = pipe.preprocess(inputs, affine)

    def dice(ddf: torch.Tensor) -> float:
        world = pipe.to_world(inputs, affine, network_pair.grid, ddf_voxel_to_mm(ddf, network_pair.grid.affine))
        return world["stats"]["dice"]["mean_registered_100"]

    zero = torch.zeros(1, 3, *network_pair.grid.shape)
    network = pipe.predict(network_pair)
    scores = {
        "zero": dice(zero),
        "network": dice(network),
        "IO from zero": dice(pipe.optimise(network_pair, zero)[0]),
        "IO from the network": dice(pipe.optimise(network_pair, network)[0]),
    }
    print({k: round(v, 4) for k, v in scores.items()})
    assert scores["network"] > scores["zero"] + 0.02, scores
    if scores["IO from the network"] < scores["IO from zero"] + 0.02:
        # issue 21's target (IO from the network >= IO from zero + 0.02), not met by the 0.4.0 weights: on the 6
        # validation pairs at 1 mm, 20 + 25 iterations, zero 0.630 against 0.625, zero ahead on every pair; on this
        # 2 mm pair the two lie within 0.003 either way. Strict, so that weights that meet the target make this
        # test fail until the expectation is turned into a plain assertion
        pytest.xfail(f"IO from the network's start is not yet 0.02 above IO from zero: {scores}")
    pytest.fail(f"IO from the network now beats IO from zero: make it an assertion. {scores}")
