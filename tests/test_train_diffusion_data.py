"""SDAS training data and its guards: aspect ratio kept, greyscale categories stay grey,
non-finite updates skipped, the bundled preset's size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import mvtec_subset
from PIL import Image

from sia_pipeline.diffusion import train as train_mod
from sia_pipeline.diffusion.images import (
    MAX_ASPECT,
    is_grey,
    load_normal_images,
    resize_short_side,
)
from sia_pipeline.diffusion.model import PRESETS, build_unet, load_model
from sia_pipeline.diffusion.sampler import Sampler, to_grey
from sia_pipeline.diffusion.train import TrainConfig, train


@pytest.fixture(scope="module")
def mixed_root(shared_data, tmp_path_factory):
    """Real images: 6 square RGB bottles and 6 non-square greyscale magnetic tiles."""
    return mvtec_subset(shared_data, tmp_path_factory.mktemp("mixed"), 6, non_square_tiles=True)


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(data=[str(root)], categories=["bottle", "magnetic_tile"], out=str(out))
    return TrainConfig(**{**base, "preset": "test", "threads": 2, **kw})


def test_resize_short_side_keeps_aspect_and_caps_it():
    assert resize_short_side(Image.new("L", (113, 256)), 32).size == (32, 72)  # 256/113*32
    assert resize_short_side(Image.new("RGB", (256, 256)), 32).size == (32, 32)
    long = resize_short_side(Image.new("RGB", (1000, 100)), 10)
    assert long.size == (int(10 * MAX_ASPECT), 10)


def test_is_grey():
    assert is_grey(Image.new("L", (4, 4), 7))
    assert is_grey(Image.new("RGB", (4, 4), (9, 9, 9)))
    assert not is_grey(Image.new("RGB", (4, 4), (9, 9, 10)))


def test_loader_marks_grey_categories_and_crops_squares(mixed_root):
    data = load_normal_images(str(mixed_root), ["bottle", "magnetic_tile"], 32)
    assert data.grey == ["magnetic_tile"]
    tiles = [im for im, c in zip(data.images, data.labels, strict=True) if c == 1]
    assert all(min(im.shape[:2]) == 32 and max(im.shape[:2]) > 32 for im in tiles)
    i = int(np.flatnonzero(data.labels == 1)[0])
    h, w = data.images[i].shape[:2]
    first, last = data.crop(i, 0.0), data.crop(i, 0.999)
    assert first.shape == last.shape == (32, 32, 3)
    # the two ends of a long image are different squares of it, not a squashed whole
    assert not np.array_equal(first, last)
    end = data.images[i][h - 32 :, w - 32 :]
    np.testing.assert_array_equal(last, end)


def test_to_grey_only_touches_flagged_rows():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    out = to_grey(images, [False, True, False])
    np.testing.assert_array_equal(out[[0, 2]], images[[0, 2]])
    assert (out[1, ..., 0] == out[1, ..., 1]).all() and (out[1, ..., 1] == out[1, ..., 2]).all()
    expected = np.asarray(Image.fromarray(images[1]).convert("L"))
    assert np.abs(out[1, ..., 0].astype(int) - expected).max() <= 1  # PIL's luma, rounded


def test_trained_model_samples_grey_categories_grey(mixed_root, tmp_path):
    out = tmp_path / "model"
    cfg = _cfg(mixed_root, out, steps=2, batch_size=4, checkpoint_every=2)
    train(cfg)
    card = json.loads((out / "model_card.json").read_text())
    assert card["grey_categories"] == ["magnetic_tile"]
    model = load_model(out)
    images = Sampler(model, steps=3).sample(["bottle", "magnetic_tile"], [0.0, 0.3], [1, 2])
    tile, bottle = images[1].astype(int), images[0].astype(int)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()
    assert (bottle[..., 0] != bottle[..., 1]).any()  # an RGB category keeps its colour


def test_grey_categories_are_part_of_the_model_id(mixed_root, tmp_path):
    out = tmp_path / "model"
    cfg = _cfg(mixed_root, out, steps=1, batch_size=2, checkpoint_every=1)
    train(cfg)
    card_file = out / "model_card.json"
    card = json.loads(card_file.read_text())
    card["grey_categories"] = []  # an edited card no longer matches the weights' id
    card_file.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="model_id"):
        load_model(out)


def test_non_finite_update_is_skipped_not_applied(mixed_root, tmp_path, monkeypatch, caplog):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def first_overflows(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return torch.tensor(float("inf")) if calls["n"] == 1 else norm

    monkeypatch.setattr(train_mod.torch.nn.utils, "clip_grad_norm_", first_overflows)
    out = tmp_path / "model"
    cfg = _cfg(mixed_root, out, steps=3, batch_size=2, checkpoint_every=3)
    train(cfg)
    card = json.loads((out / "model_card.json").read_text())
    assert card["skipped_nonfinite_updates"] == 1
    assert "non-finite gradient norm" in caplog.text
    assert all(torch.isfinite(p).all() for p in load_model(out).unet.parameters())


def test_diverged_training_stops_with_a_hint(mixed_root, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train_mod.torch.nn.utils, "clip_grad_norm_", lambda p, m: torch.tensor(float("nan"))
    )
    monkeypatch.setattr(train_mod, "MAX_NONFINITE_IN_A_ROW", 2)
    cfg = _cfg(mixed_root, tmp_path / "m", steps=5, batch_size=2, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match="lower --lr and --resume"):
        train(cfg)


def test_bundled_preset_fits_the_size_budget():
    """small-cpu: 128 px, fp16 weights under the 15 MB the bundled model may take."""
    p = PRESETS["small-cpu"]
    unet = build_unet(p, num_classes=2, learn_sigma=p.learn_sigma)
    assert p.resolution == 128 and unet.config.out_channels == 6
    assert sum(t.numel() for t in unet.parameters()) * 2 < 15e6
