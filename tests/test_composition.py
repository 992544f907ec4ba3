"""Composition: masks inside the foreground, the authors' opacities and blend, texture jitter,
aspect-keeping resize, and one framework-free module shared by the trainer and sia-export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sia_pipeline.compose import (
    OPACITY_RANGE,
    compose,
    compose_anomaly,
    content_mask,
    letterbox,
    perlin_mask,
    rand_augment,
    texture_source,
)
from sia_pipeline.compose.perlin import rotate


def test_masks_lie_inside_the_foreground():
    rng = np.random.default_rng(0)
    normal = np.full((64, 64, 3), 200, np.uint8)
    fg = np.zeros((64, 64), bool)
    fg[16:48, 8:40] = True
    source = np.zeros_like(normal)
    for _ in range(30):
        image, mask = compose_anomaly(normal, source, fg, rng)
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        assert not mask[~fg].any() and mask.any()  # retries find the foreground
        assert np.array_equal(image[mask == 0], normal[mask == 0])  # untouched outside


@pytest.mark.parametrize("kind", ["sia", "texture"])
def test_opacity_is_uniform_in_the_authors_range(kind):
    lo, hi = OPACITY_RANGE[kind]
    assert (lo, hi) == {"sia": (0.5, 1.0), "texture": (0.2, 1.0)}[kind]
    rng = np.random.default_rng(1)
    normal = np.zeros((32, 32, 3), np.uint8)
    source = np.full((32, 32, 3), 255, np.uint8)
    fg = np.ones((32, 32), bool)
    betas = []
    for _ in range(300):
        c = compose(normal, source, fg, rng, OPACITY_RANGE[kind])
        inside = c.image[c.mask == 1].astype(float)
        assert inside.max() - inside.min() <= 1  # one opacity per composite
        assert inside[0, 0] == int(255 * c.opacity)  # blended in float, truncated
        betas.append(c.opacity)
    betas = np.array(betas)
    assert betas.min() >= lo and betas.max() <= hi
    assert betas.min() < lo + 0.05 and betas.max() > hi - 0.05  # spans the range


def test_blend_is_the_authors_formula():
    rng = np.random.default_rng(5)
    normal = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    c = compose(normal, source, np.ones((48, 48), bool), np.random.default_rng(6))
    m = c.mask[..., None].astype(np.float64)
    src = source.astype(np.float32)
    expected = c.opacity * (m * src) + (1 - c.opacity) * (m * normal)
    expected = ((-m + 1) * normal + expected).astype(np.uint8)
    np.testing.assert_array_equal(c.image, expected)
    with pytest.raises(ValueError, match="opacity_range"):
        compose(normal, source, np.ones((48, 48), bool), rng, opacity_range=(0.8, 0.2))


def test_empty_foreground_gives_no_anomaly():
    rng = np.random.default_rng(2)
    normal = np.full((32, 32, 3), 7, np.uint8)
    c = compose(normal, normal * 0, np.zeros((32, 32), bool), rng)
    assert not c.mask.any() and np.array_equal(c.image, normal) and c.tries == 10


def test_shape_mismatch_is_an_error():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="shape mismatch"):
        compose_anomaly(
            np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), np.ones((8, 8), bool), rng
        )


def test_perlin_mask_covers_part_of_the_image_any_shape():
    rng = np.random.default_rng(4)
    cover = [perlin_mask((100, 100), rng).mean() for _ in range(20)]
    assert all(0.0 <= c < 0.9 for c in cover) and np.mean(cover) > 0.01
    assert perlin_mask((40, 100), rng).shape == (40, 100)
    a = perlin_mask((64, 64), np.random.default_rng(9))
    assert np.array_equal(a, perlin_mask((64, 64), np.random.default_rng(9)))  # seeded


def test_rotation_turns_about_the_centre_with_zero_outside():
    img = np.zeros((9, 9), np.float64)
    img[4, 4:] = 1.0  # a ray from the centre to the right
    turned = rotate(img, 90.0)
    np.testing.assert_allclose(turned[4:, 4], 1.0, atol=1e-9)  # now points down (clockwise)
    corner = rotate(np.ones((9, 9)), 45.0)
    assert corner[0, 0] == 0.0 and corner[4, 4] == 1.0  # outside the turned image: zero


def test_texture_jitter_is_three_random_ops_and_seeded(shared_data):
    path = next(iter(sorted((shared_data / "dtd/images/banded").iterdir())))
    img = np.asarray(Image.open(path).convert("RGB"))
    out = texture_source(img, (64, 96), np.random.default_rng(0))
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    again = texture_source(img, (64, 96), np.random.default_rng(0))
    assert np.array_equal(out, again)
    small = np.asarray(Image.fromarray(img).resize((96, 64), Image.Resampling.BILINEAR))
    changed = [
        not np.array_equal(rand_augment(small, np.random.default_rng(s)), small) for s in range(10)
    ]
    assert sum(changed) >= 9  # three ops almost never leave a texture as it was
    colours = {
        tuple(rand_augment(small, np.random.default_rng(s)).mean((0, 1)).round()) for s in range(10)
    }
    assert len(colours) >= 8  # the jitter varies the colour


def test_letterbox_keeps_the_aspect_ratio():
    img = np.zeros((101, 256, 3), np.uint8)
    img[:, :, 0] = 200
    img[50, :, 1] = 255  # a 1 px horizontal crack across the middle
    out = letterbox(img, 128)
    assert out.shape == (128, 128, 3)
    valid = content_mask(101, 256, 128)
    rows = np.flatnonzero(valid.any(1))
    assert len(rows) == 50 and valid.all(1)[rows].all()  # 101 * 128/256 = 50.5 -> 50 rows
    assert (out[..., 0] == 200).all()  # edge padding repeats the border, no new band
    crack_rows = np.flatnonzero(out[..., 1].max(1) > 60)
    assert 1 <= len(crack_rows) <= 2  # still a thin line, not squashed into a smear
    mask = np.zeros((101, 256), np.uint8)
    mask[0:10] = 255
    boxed = letterbox(mask, 128, Image.Resampling.NEAREST, pad="zero")
    assert boxed[: rows[0]].max() == 0 and boxed[rows[0]].min() == 255  # padding is not mask
    square = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    expected = np.asarray(Image.fromarray(square).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(letterbox(square, 32), expected)  # squares: a plain resize


def test_compose_is_framework_free_and_not_copied():
    """The trainer uses this module's functions (not a copy); it loads no framework."""
    code = (
        "import sys, sia_pipeline.compose as c;"
        "heavy = {'torch', 'ray', 'diffusers', 'webdataset'} & set(sys.modules);"
        "import realnet_train.data.train_stream as t, realnet_train.data.sources as src;"
        "assert t.compose_anomaly is c.compose_anomaly and src.texture_source is c.texture_source;"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
