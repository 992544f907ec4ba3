"""Training on crops: windows hold their anomaly, and image, clean image and mask stay aligned."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from realnet_helpers import small_mvtec, tiny_train_config

from realnet_train.data.train_stream import CompositeStream, StreamConfig, crop_window
from realnet_train.evaluate import evaluate
from realnet_train.train import train
from sia_pipeline.compose import ForegroundRule


def test_a_window_of_an_empty_mask_lies_anywhere_in_the_image():
    rng = np.random.default_rng(0)
    corners = {crop_window(np.zeros((64, 64)), 32, rng) for _ in range(300)}
    assert all(0 <= y <= 32 and 0 <= x <= 32 for y, x in corners)
    ys, xs = zip(*corners, strict=True)
    assert min(ys) <= 2 and max(ys) >= 30 and min(xs) <= 2 and max(xs) >= 30


def test_windows_touch_the_image_edges_as_often_as_they_hold_its_inside():
    # Uniform windows of a 2x image would touch an edge in 2 of 33 draws per axis; the
    # evaluated whole image always has its border, so half the windows hold it.
    rng = np.random.default_rng(0)
    corners = np.array([crop_window(np.zeros((64, 64)), 32, rng) for _ in range(4000)])
    for axis in (0, 1):
        at_first, at_last = np.mean(corners[:, axis] == 0), np.mean(corners[:, axis] == 32)
        assert 0.24 < at_first < 0.30 and 0.24 < at_last < 0.30
    mask = np.zeros((64, 64), np.float32)
    mask[20:22, 40:42] = 1  # windows holding it may start at y 0 but never reach x 0
    corners = np.array([crop_window(mask, 32, rng) for _ in range(4000)])
    assert np.mean(corners[:, 0] == 0) > 0.24 and np.mean(corners[:, 0] == 32) == 0
    assert np.mean(corners[:, 1] == 32) > 0.24 and corners[:, 1].min() >= 9


@pytest.mark.parametrize("spot", [(0, 0), (63, 63), (10, 50), (40, 5)])
def test_a_window_always_holds_part_of_the_anomaly(spot):
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 64), np.float32)
    mask[spot[0] : spot[0] + 2, spot[1] : spot[1] + 2] = 1  # a 1-4 px anomaly, even at a corner
    for _ in range(200):
        y, x = crop_window(mask, 32, rng)
        assert 0 <= y <= 32 and 0 <= x <= 32
        assert mask[y : y + 32, x : x + 32].sum() > 0


def test_the_stream_crops_image_clean_and_mask_at_one_place():
    rng = np.random.default_rng(2)
    normals = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    sources = itertools.cycle([{"image": np.full((64, 64, 3), 255, np.uint8)}])
    mix = {"normal": 0.3, "sia": 0.7, "texture": 0.0}
    config = StreamConfig(64, mix, ForegroundRule(), seed=0, crop=32)
    n_anomalous = 0
    for sample in itertools.islice(CompositeStream(normals, config, sia=sources), 40):
        image, clean, mask = sample["image"], sample["clean"], sample["mask"]
        assert image.shape == clean.shape == (32, 32, 3) and mask.shape == (32, 32)
        # The clean crop is one window of one normal image ...
        hits = [
            (i, y, x)
            for i, y, x in itertools.product(range(4), range(33), range(33))
            if np.array_equal(normals[i, y : y + 32, x : x + 32], clean)
        ]
        assert len(hits) == 1
        # ... and the composite is that window with the anomaly blended in where the mask is.
        outside = mask == 0
        assert np.array_equal(image[outside], clean[outside])
        if sample["source"] != 0:
            n_anomalous += 1
            assert mask.sum() > 0 and not np.array_equal(image, clean)
    assert 10 <= n_anomalous <= 40


def test_training_on_crops_evaluates_on_whole_images(shared_data, tiny_sia, tmp_path):
    data = small_mvtec(shared_data, tmp_path / "mvtec", n_train=8)
    out = tmp_path / "run"
    cfg = tiny_train_config(data, tiny_sia, out, image_size=64, crop_size=32)
    result = train(cfg)
    assert result["step"] == 3 and result["config"]["crop_size"] == 32
    metrics = evaluate(out / "last.pt", str(data), tmp_path / "eval", panels=1)
    assert metrics["image_size"] == 64 and metrics["n_test"] == 4  # whole 64 px images
    with Image.open(next((tmp_path / "eval" / "panels").glob("*.png"))) as im:
        assert im.size == (3 * 64 + 8, 64)  # image | ground truth | anomaly map
