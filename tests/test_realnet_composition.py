"""Composition: masks inside the foreground, opacity in [0.5, 1], the blend follows the mask."""

from __future__ import annotations

import numpy as np
import pytest

from realnet_train.data.composition import (
    ForegroundSpec,
    compose_anomaly,
    foreground_mask,
    foreground_spec,
    perlin_mask,
)
from realnet_train.data.mvtec import MVTecCategory


def test_masks_lie_inside_the_foreground():
    rng = np.random.default_rng(0)
    normal = np.full((64, 64, 3), 200, np.uint8)
    fg = np.zeros((64, 64), bool)
    fg[16:48, 8:40] = True
    source = np.zeros_like(normal)
    nonempty = 0
    for _ in range(30):
        image, mask = compose_anomaly(normal, source, fg, rng)
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        assert not mask[~fg].any()
        assert np.array_equal(image[mask == 0], normal[mask == 0])  # untouched outside
        nonempty += bool(mask.any())
    assert nonempty == 30  # retries find the foreground


def test_opacity_is_uniform_in_half_to_one():
    rng = np.random.default_rng(1)
    normal = np.zeros((32, 32, 3), np.uint8)
    source = np.full((32, 32, 3), 255, np.uint8)
    fg = np.ones((32, 32), bool)
    betas = []
    for _ in range(200):
        image, mask = compose_anomaly(normal, source, fg, rng)
        inside = image[mask == 1].astype(float) / 255.0
        assert inside.std() < 1e-2  # one opacity per composite
        betas.append(inside.mean())
    betas = np.array(betas)
    assert betas.min() >= 0.5 - 1 / 255 and betas.max() <= 1.0
    assert betas.min() < 0.6 and betas.max() > 0.9  # spans the range
    with pytest.raises(ValueError, match="opacity_range"):
        compose_anomaly(normal, source, fg, rng, opacity_range=(0.8, 0.2))


def test_empty_foreground_gives_no_anomaly():
    rng = np.random.default_rng(2)
    normal = np.full((32, 32, 3), 7, np.uint8)
    image, mask = compose_anomaly(normal, normal * 0, np.zeros((32, 32), bool), rng)
    assert not mask.any() and np.array_equal(image, normal)


def test_shape_mismatch_is_an_error():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="shape mismatch"):
        compose_anomaly(
            np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.ones((8, 8), bool), rng
        )


def test_perlin_mask_covers_part_of_the_image():
    rng = np.random.default_rng(4)
    cover = [perlin_mask(100, rng).mean() for _ in range(20)]
    assert all(0.0 <= c < 0.9 for c in cover) and np.mean(cover) > 0.01


def test_foreground_settings_on_real_images(shared_data):
    bottle = MVTecCategory(str(shared_data / "mvtec_ad"), "bottle")
    img = bottle.image(bottle.train_items[0], 128)
    fg = foreground_mask(img, foreground_spec("bottle"))
    # The bottle is a dark disc on a bright background: centre in, corners out.
    assert fg[64, 64] and not fg[2, 2] and not fg[-3, -3]
    assert 0.3 < fg.mean() < 0.9
    tri = foreground_mask(img, ForegroundSpec("triangle", "dark"))
    assert tri[64, 64] and not tri[2, 2]
    assert foreground_mask(img, foreground_spec("magnetic_tile")).all()  # texture: everywhere
    with pytest.raises(ValueError, match="foreground method"):
        ForegroundSpec("kmeans")  # type: ignore[arg-type]
