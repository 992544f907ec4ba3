"""bench/realnet_resolution.py's measures: thickness, score rules, edge glow, calibration,
and its refusals of bad arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resolution():
    return load_bench("realnet_resolution")


def test_thickness_of_lines_and_blobs(resolution):
    mask = np.zeros((64, 64), bool)
    assert resolution.thickness(mask) == 0.0
    mask[10:13, 5:60] = True  # a 3 px line
    assert 2.0 <= resolution.thickness(mask) <= 4.0
    blob = np.zeros((64, 64), bool)
    blob[10:30, 10:30] = True  # 20 px square: thicker than any line
    assert 18.0 <= resolution.thickness(blob) <= 22.0


def test_score_rules_pool_and_top_fraction(resolution):
    maps = np.zeros((2, 32, 32), np.float32)
    maps[0, 5, 5] = 1.0  # one hot pixel
    maps[1, 8:24, 8:24] = 0.25  # a wide, faint patch
    rules = resolution.score_rules(maps)
    pools = {f"pool {k}" for k in (1, 4, 8, 16, 32)}
    assert set(rules) == pools | {"top 0.001", "top 0.01"}
    assert rules["pool 1"][0] == 1.0 and rules["pool 1"][1] == 0.25
    assert rules["pool 16"][0] == pytest.approx(1 / 256) and rules["pool 16"][1] == 0.25
    assert rules["pool 32"][0] == pytest.approx(1 / 1024) and rules["pool 32"][1] == 0.0625
    # top 0.1 % of 1024 pixels is one pixel; 1 % is ten
    assert rules["top 0.001"][0] == 1.0 and rules["top 0.01"][0] == pytest.approx(0.1)


def test_edge_glow_and_calibration(resolution):
    s = 32
    good = np.full((4, s, s), 0.1, np.float32)
    good[:, :2, :] = 0.5  # every good map glows along its top border
    bad = good[:2].copy()
    bad[:, 15:17, 15:17] = 0.9
    masks = np.zeros((6, s, s), bool)
    masks[4:, 15:17, 15:17] = True
    maps = np.concatenate([good, bad])
    labels = np.array([0, 0, 0, 0, 1, 1])
    glow = resolution.edge_glow(maps, masks, labels, pool=4)
    assert glow["good_border_over_interior"] > 2
    assert glow["good_max_in_border"] == 1.0 and glow["defect_max_on_truth"] == 1.0
    cal = resolution.calibrated(maps, good)  # the normals' glow is taken away
    assert np.allclose(cal["minus mean"][:4], 0) and np.allclose(cal["z"][:4], 0)
    assert cal["minus mean"][4, 15, 15] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--checkpoints", "nope.pt"], "no such file"),
        (["--checkpoints", "{ckpt}", "--sizes", "a,b"], "comma-separated integers"),
        (["--checkpoints", "{ckpt}", "--sizes", "16"], "each in [32, 512]"),
        (["--checkpoints", "{ckpt}", "--calibration-images", "-1"], "--calibration-images"),
        (["--checkpoints", "{ckpt}", "--data", "{tmp}"], "no magnetic_tile/test there"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(resolution, tmp_path, capsys, args, needle):
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"not read before the arguments pass")
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args] + ["--tag", "resolution-test"]
    with pytest.raises(SystemExit) as exit_:
        resolution.main(argv)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err
    assert not list((ROOT / "bench" / "results").glob("resolution-test*"))  # nothing written
