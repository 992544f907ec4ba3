"""bench/sia_realism.py's measure on real images: KID in Lite0 feature space is about 0 for two
sets of the same part, and grows with blur and with a different kind of image."""

from __future__ import annotations

import pytest
from bench_helpers import load_bench
from PIL import Image, ImageFilter


@pytest.fixture(scope="module")
def realism():
    return load_bench("sia_realism")


def test_kid_orders_same_blurred_and_foreign_images(realism, shared_data):
    files = sorted((shared_data / "mvtec_ad/bottle/train/good").iterdir())[:48]
    textures = sorted((shared_data / "dtd/images").rglob("*.jpg"))[:24]
    a = [Image.open(f) for f in files[:24]]
    b = [Image.open(f) for f in files[24:]]
    features = realism.Lite0Features()
    real = realism.to_batch(a)
    same = realism.kid(features, real, realism.to_batch(b))["kid_x1000"]
    blurred = [im.filter(ImageFilter.GaussianBlur(6)) for im in b]
    blur = realism.kid(features, real, realism.to_batch(blurred))["kid_x1000"]
    dtd = realism.kid(features, real, realism.to_batch([Image.open(f) for f in textures]))
    assert abs(same) < 20 < blur < dtd["kid_x1000"]


def test_real_images_keep_their_aspect(realism):
    tall = Image.new("RGB", (100, 300))
    tall.paste((255, 0, 0), (0, 0, 100, 100))  # the top third red, the rest black
    batch = realism.to_batch([tall], size=8)
    assert batch.shape == (1, 3, 8, 8) and int(batch[0, 0].max()) == 0  # the centre square only


def test_bad_arguments_exit_2(realism, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        realism.parse_args(["--data", str(tmp_path), "--categories", "bottle"])
    assert e.value.code == 2 and "no {root}/CATEGORY/train/good" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        realism.parse_args(["--model", "a=x", "--sweep-model", "b"])
    assert e.value.code == 2
    for bad in ("ddpm", "ddpm:x", "euler:20", "ddim:0"):
        with pytest.raises(SystemExit) as e:
            realism.parse_args(["--sampling", bad])
        assert e.value.code == 2 and "--sampling" in capsys.readouterr().err


def test_each_sampling_setting_is_a_column(realism):
    """Two --sampling settings of the bundled model: two columns, the sweep on the first."""
    args = realism.parse_args(
        ["--categories", "bottle", "--n", "4", "--sweep", "0,0.2", "--sweep-n", "4"]
        + ["--sampling", "ddpm:2,ddim:2", "--batch", "4"]
    )
    results = realism.run(args)
    columns = ["bundled ddpm:2", "bundled ddim:2"]
    assert results["settings"]["columns"] == columns
    rows = results["categories"]["bottle"]
    assert list(rows["models"]) == columns
    assert all(rows["models"][c]["s0"]["kid_x1000"] is not None for c in columns)
    assert rows["sweep"]["sampling"] == "ddpm:2" and list(rows["sweep"]["kid"]) == ["0.0", "0.2"]
    table = realism.markdown(results)
    assert "bundled ddpm:2 (floor)" in table and "bundled ddim:2 (floor)" in table
