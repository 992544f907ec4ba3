"""The GPU path's static shapes and one-GPU actors, checked on CPU.

* A tail batch padded to the batch size (``pad_to``, what a compiled worker does) keeps the
  images its samples get in any full batch, bit for bit: padding never changes a kept image.
* ``--gpus-per-worker`` above 1 is refused with one line (exit 2) before anything is made:
  a worker samples on one GPU, so a second one would idle.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from sia_pipeline.diffusion.model import load_model
from sia_pipeline.diffusion.sampler import Sampler


@pytest.fixture(scope="module")
def demo_sampler():
    return Sampler(load_model(None), "ddpm", 2)


def test_padded_tail_keeps_the_images_of_a_full_batch(demo_sampler):
    cats, strengths, seeds = ["bottle"] * 4, [0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]
    full = demo_sampler.sample(cats, strengths, seeds)
    tail = demo_sampler.sample(cats[:2], strengths[:2], seeds[:2], pad_to=4)
    assert tail.shape == (2, *full.shape[1:])
    assert np.array_equal(tail, full[:2])
    # other companions of the same batch size: the kept images are still the same
    mixed = demo_sampler.sample(
        cats[:2] + ["magnetic_tile"] * 2, strengths[:2] + [0.0, 0.0], seeds[:2] + [9, 10]
    )
    assert np.array_equal(tail, mixed[:2])
    # a full batch is not padded
    assert np.array_equal(demo_sampler.sample(cats, strengths, seeds, pad_to=4), full)


def test_warm_up_samples_one_throw_away_batch(demo_sampler):
    assert demo_sampler.warm_up("bottle", 2, 0.2) > 0


@pytest.mark.parametrize("value", ["2", "1.5"])
def test_more_than_one_gpu_per_worker_is_refused(tmp_path, value):
    from sia_pipeline.cli.gen import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--out", str(out), "--gpus-per-worker", value])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--gpus-per-worker must be in (0, 1]" in lines[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("value", ["1", "0.5"])
def test_one_or_a_fraction_of_a_gpu_per_worker_is_accepted(tmp_path, value):
    from sia_pipeline.cli.gen import main

    args = ["--out", str(tmp_path / "o"), "--gpus-per-worker", value, "--dry-run"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
