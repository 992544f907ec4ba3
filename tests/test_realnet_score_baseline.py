"""The score baseline: the image score pools the anomaly map less the mean map of training
normals; the pixel map is untouched, the baseline travels in the checkpoint, and a crafted
one is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from realnet_helpers import tiny_model_config

from realnet_train.checkpoint import CheckpointError, checkpoint_dict, load_model, save_checkpoint
from realnet_train.model.config import RealNetConfig
from realnet_train.model.realnet import RealNet, check_baseline, image_scores


@pytest.fixture(scope="module")
def model() -> RealNet:
    torch.manual_seed(0)
    return RealNet(tiny_model_config()).eval()  # AFS unfitted: the first K channels


def test_the_image_score_pools_the_map_less_the_baseline(model):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(x)
        base = torch.rand(64, 64, generator=torch.Generator().manual_seed(2)) * 0.5
        model.set_score_baseline(base)
        shifted = model(x)
        coarse = base[::2, ::2].contiguous()  # a baseline of another size is resized
        model.set_score_baseline(coarse)
        resized = model(x)
        model.set_score_baseline(None)
        again = model(x)
    pool = model.config.score_pool
    torch.testing.assert_close(shifted.anomaly_map, plain.anomaly_map)  # pixels as they were
    torch.testing.assert_close(shifted.image_score, image_scores(plain.anomaly_map - base, pool))
    up = F.interpolate(coarse[None, None], size=(64, 64), mode="bilinear")[0, 0]
    torch.testing.assert_close(resized.image_score, image_scores(plain.anomaly_map - up, pool))
    torch.testing.assert_close(again.image_score, plain.image_score)
    assert not torch.equal(shifted.image_score, plain.image_score)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (np.zeros((8, 8), np.float32), "not <class 'numpy.ndarray'>"),
        (torch.zeros(8), "not (8,)"),
        (torch.zeros(1, 8, 8), "not (1, 8, 8)"),
        (torch.zeros(8, 8, dtype=torch.int64), "not (8, 8)"),
        (torch.zeros(8, 5000), "sides in [1, 4096]"),
        (torch.full((8, 8), float("nan")), "finite and in [0, 1]"),
        (torch.full((8, 8), 1.5), "finite and in [0, 1]"),
        (torch.full((8, 8), -0.1), "finite and in [0, 1]"),
    ],
)
def test_a_bad_baseline_is_refused(bad, needle):
    with pytest.raises(ValueError, match="score baseline") as err:
        check_baseline(bad)
    assert needle in str(err.value)


def test_the_baseline_travels_in_the_checkpoint_and_a_crafted_one_is_refused(model, tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, checkpoint_dict(model, step=1, category="bottle", image_size=64))
    plain, ckpt = load_model(path)  # a checkpoint without one (every earlier one): none
    assert "score_baseline" not in ckpt and plain.score_baseline is None

    base = torch.linspace(0, 0.4, 64 * 64).reshape(64, 64)
    model.set_score_baseline(base)
    try:
        fields = {"step": 1, "category": "bottle", "image_size": 64}
        save_checkpoint(path, checkpoint_dict(model, **fields))
    finally:
        model.set_score_baseline(None)
    loaded, _ = load_model(path)
    torch.testing.assert_close(loaded.score_baseline, base)

    ckpt = torch.load(path, weights_only=True)
    for bad in (torch.full((64, 64), float("inf")), torch.zeros(3), "a string"):
        ckpt["score_baseline"] = bad
        save_checkpoint(path, ckpt)
        with pytest.raises(CheckpointError, match="score baseline"):
            load_model(path)


def test_the_image_count_is_bounded():
    with pytest.raises(ValueError, match="score_baseline_images"):
        RealNetConfig(score_baseline_images=-1)
    with pytest.raises(ValueError, match="score_baseline_images"):
        RealNetConfig(score_baseline_images=10**6)
