"""Model folders: loading, the bundled model, and clear errors for bad folders and inputs."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from sia_pipeline.cli.preview import main as preview_cli
from sia_pipeline.diffusion.model import BUNDLED_MODEL, ModelError, load_model
from sia_pipeline.diffusion.sampler import Sampler


def test_load_tiny_and_sample(tiny_model):
    m = load_model(tiny_model)
    assert m.categories == {"bottle": 0, "magnetic_tile": 1}
    assert m.model_id.startswith("sdas-")
    assert Sampler(m, "ddim", steps=3).sample(["bottle"], [0.1], [0]).shape == (1, 32, 32, 3)


def test_load_from_s3(tiny_model, s3_root, s3_client):
    bucket, prefix = s3_root[5:].split("/", 1)
    for f in tiny_model.rglob("*"):
        if f.is_file():
            key = f"{prefix}/model/{f.relative_to(tiny_model).as_posix()}"
            s3_client.upload_file(str(f), bucket, key)
    m = load_model(f"{s3_root}/model")
    assert m.model_id == load_model(tiny_model).model_id


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not built")
def test_bundled_model_is_small_and_loads():
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert size <= 15 * 1024 * 1024
    m = load_model(None)
    assert set(m.categories) == {"bottle", "magnetic_tile"}
    # Trained with sia-train-diffusion's defaults: the recipe the README gives.
    from sia_pipeline.cli.train_diffusion import main as train_cli
    from sia_pipeline.diffusion.model import PRESETS

    default = next(o.default for o in train_cli.params if o.name == "preset")
    assert m.card["preset"] == default == "small-cpu"
    assert m.resolution == PRESETS[default].resolution
    assert m.card["train_steps"] == PRESETS[default].train_steps
    assert m.card["grey_categories"] == ["magnetic_tile"]


def test_unknown_category(tiny_model):
    with pytest.raises(ValueError, match="unknown category 'cable'.*bottle"):
        Sampler(load_model(tiny_model)).sample(["cable"], [0.1], [0])


def test_negative_strength(tiny_model):
    with pytest.raises(ValueError, match=r"strength must be finite and >= 0, got \[-0.1\]"):
        Sampler(load_model(tiny_model)).sample(["bottle"], [-0.1], [0])


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError, match="model folder not found: .*nope"):
        load_model(tmp_path / "nope")


def test_incomplete_model_folder(tiny_model, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="not an SDAS model folder: missing unet/diffusion_py"):
        load_model(broken)


def test_corrupt_weights_detected(tiny_model, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model, broken)
    w = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt model at .*content hash"):
        load_model(broken)


def test_corrupt_card_detected(tiny_model, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model, broken)
    (broken / "model_card.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt model at"):
        load_model(broken)
    (broken / "model_card.json").write_text(json.dumps({"resolution": 32}))
    with pytest.raises(ModelError, match="lacks 'categories'"):
        load_model(broken)


def test_preview_cli(tiny_model, tmp_path):
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(
        preview_cli,
        [
            "--model",
            str(tiny_model),
            "--strengths",
            "0,0.3",
            "--per-strength",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 0 and "images/s" in res.output


@pytest.mark.parametrize("bad", ["-0.1", "abc", ""])
def test_preview_cli_bad_strengths(tiny_model, tmp_path, bad):
    res = CliRunner().invoke(
        preview_cli,
        ["--model", str(tiny_model), "--strengths", bad, "--out", str(tmp_path / "g.png")],
    )
    assert res.exit_code == 2 and "--strengths" in res.output


def test_preview_cli_missing_model(tmp_path):
    res = CliRunner().invoke(preview_cli, ["--model", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such folder" in res.output


def test_loading_the_bundled_model_says_nothing_about_accelerate(tmp_path):
    """A fresh interpreter with diffusers at its default verbosity (no CLI logging set-up):
    loading prints no "pip install accelerate" notice, nor any other output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "DIFFUSERS_VERBOSITY"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    code = "from sia_pipeline.diffusion.model import load_model; load_model(None)"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "accelerate" not in res.stdout + res.stderr
    assert res.stdout == res.stderr == ""
