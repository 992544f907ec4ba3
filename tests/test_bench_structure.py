"""bench/sia_strength_structure.py's measure on synthetic differences with known answers:
grain has a low low-frequency share and spreads evenly, a smooth local blob the opposite, and
the visible fraction counts exactly the pixels past its threshold. No sampling."""

from __future__ import annotations

import numpy as np
import pytest
from bench_helpers import load_bench

SIZE = 128


@pytest.fixture(scope="module")
def structure():
    return load_bench("sia_strength_structure")


def blob(centre=(64, 64), width=12.0, height=0.3) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    return np.repeat((height * np.exp(-r2 / (2 * width**2)))[..., None], 3, axis=-1)


def test_checkerboard_difference_is_all_high_frequency(structure):
    base = np.full((SIZE, SIZE, 3), 0.5)
    checker = (np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 2 - 1)[..., None] * 0.05
    m = structure.structure_measures(base, base + checker, sigmas=[2, 4])
    assert m["low_share@2"] < 1e-3 and m["low_share@4"] < 1e-3
    assert m["mean_abs"] == pytest.approx(0.05)


def test_white_noise_share_matches_the_gaussian_transfer(structure):
    """Analytic white-noise share at sigma: (1/(4 pi s^2)) / (1 - 1/(2 pi s^2))."""
    noise = np.random.default_rng(0).standard_normal((SIZE, SIZE, 3)) * 0.05
    for sigma in (2.0, 4.0):
        q = 1 / (4 * np.pi * sigma**2)
        expected = q / (1 - 2 * q)
        assert structure.low_share(noise, sigma) == pytest.approx(expected, rel=0.15)
    ref = structure.noise_reference(SIZE, [2.0])
    assert ref["low_share@2"] == pytest.approx(structure.low_share(noise, 2.0))
    # blurred grain spreads its energy: far below a local blob's share, above an even 0.05
    assert 0.05 < ref["top5_share@2"] < ref["top5_share_grey@2"] < 0.4


def test_smooth_local_blob_is_low_frequency_and_concentrated(structure):
    base = np.random.default_rng(1).uniform(0.2, 0.6, (SIZE, SIZE, 3))
    m = structure.structure_measures(base, base + blob(width=6.0), sigmas=[2, 4])
    assert m["low_share@2"] > 0.95 and m["low_share@4"] > 0.85
    assert m["top5_share@2"] > 0.5  # 6 px blob: most energy within 5 % of the pixels
    wide = structure.structure_measures(base, base + blob(width=30.0), sigmas=[2])
    assert wide["low_share@2"] > m["low_share@2"]  # smoother still


def test_blob_plus_grain_orders_between(structure):
    grain = np.random.default_rng(2).standard_normal((SIZE, SIZE, 3)) * 0.05
    shares = [
        structure.low_share(d, 2.0) for d in (grain, grain + blob(width=10.0, height=0.1), blob())
    ]
    assert shares[0] < shares[1] < shares[2]


def test_visible_fraction_counts_pixels_past_the_threshold(structure):
    d = np.full((10, 10, 3), 0.01)
    d[0, :] = 0.2  # 10 % of pixels far past both thresholds
    d[1, :, 1] = -0.07  # 10 % past 0.05 in one channel only (and negative)
    d[2, :, 2] = 0.05  # exactly at the threshold: not past it
    assert structure.visible_fraction(d, 0.1) == pytest.approx(0.1)
    assert structure.visible_fraction(d, 0.05) == pytest.approx(0.2)
    m = structure.structure_measures(np.zeros_like(d), d, sigmas=[2])
    assert m["visible>0.1"] == pytest.approx(0.1) and m["visible>0.05"] == pytest.approx(0.2)


def test_no_difference_and_bad_shapes(structure):
    x = np.zeros((8, 8, 3))
    m = structure.structure_measures(x, x, sigmas=[2])
    assert m["mean_abs"] == 0 and m["visible>0.05"] == 0 and np.isnan(m["low_share@2"])
    with pytest.raises(ValueError, match="one shape"):
        structure.structure_measures(x, np.zeros((8, 8, 1)), sigmas=[2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--first-k", "20"], "--first-k"),
        (["--ddim", "0,0.02"], "strengths must be > 0"),
        (["--picture", "ddpm:0.7"], "--picture"),
        (["--picture", "euler:0.1"], "--picture"),
        (["--sigmas", "x"], "bad number"),
    ],
)
def test_bad_arguments_exit_2_before_loading(structure, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        structure.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_steps_summary_one_line_per_category_and_strength(structure):
    def row(cat, sampler, s, k, low):
        m = {"low_share@2": {"mean": low, "std": 0.0}}
        return {"category": cat, "sampler": sampler, "strength": s, "first_k": k, "steps": 20,
                "measures": m}  # fmt: skip

    rows = [
        row("a", "ddpm", 0.5, None, 0.4),
        row("a", "ddpm", 0.5, 10, 0.7),
        row("a", "ddpm", 0.5, 5, 0.9),
        row("a", "ddim", 0.02, None, 0.1),
    ]
    lines = [x for x in structure.steps_summary(rows, "2", 0.02) if x.startswith("- ")]
    assert lines == [
        "- a, DDPM s = 0.5: first 5: 0.90, first 10: 0.70, all 20: 0.40",
        "- DDIM (every step carries s): a s=0.02: 0.10",
    ]
