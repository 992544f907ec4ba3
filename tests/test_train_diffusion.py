"""sia-train-diffusion on a tiny real subset: train, checkpoint, resume, save, reload, sample."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import mvtec_subset

from sia_pipeline.cli.train_diffusion import main as train_cli
from sia_pipeline.diffusion.model import load_model
from sia_pipeline.diffusion.sampler import Sampler
from sia_pipeline.diffusion.train import TrainConfig, train


@pytest.fixture(scope="module")
def small_root(shared_data, tmp_path_factory):
    """An MVTec-layout root with 12 real bottle and 12 real magnetic-tile training images."""
    return mvtec_subset(shared_data, tmp_path_factory.mktemp("mvtec"), 12)


def _cfg(root, out, **kw):
    base = dict(
        data=[str(root)],
        categories=["bottle", "magnetic_tile"],
        out=str(out),
        preset="test",
        steps=4,
        batch_size=4,
        checkpoint_every=2,
        threads=2,
    )
    return TrainConfig(**{**base, **kw})


def test_train_save_reload_sample(small_root, tmp_path):
    out = tmp_path / "model"
    model_id = train(_cfg(small_root, out))
    m = load_model(out)
    assert m.model_id == model_id
    card = json.loads((out / "model_card.json").read_text())
    assert card["categories"] == {"bottle": 0, "magnetic_tile": 1}
    assert card["resolution"] == 32 and card["train_steps"] == 4
    assert card["data_fingerprint"].startswith("sha256:") and card["num_images"] == 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2.pt",
        "checkpoint-4.pt",
    ]
    images = Sampler(m, "ddpm", steps=5).sample(["bottle", "magnetic_tile"], [0.0, 0.3], [1, 2])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images.min() >= 0 and images.max() <= 255 and images.std() > 0


def test_learned_sigma_model_trains_and_samples(small_root, tmp_path):
    out = tmp_path / "model"
    train(_cfg(small_root, out, learn_sigma=True, steps=2))
    m = load_model(out)
    assert m.unet.config.out_channels == 6
    assert m.scheduler_config["variance_type"] == "learned_range"
    for sampler in ("ddpm", "ddim"):
        images = Sampler(m, sampler, steps=4).sample(["bottle"] * 2, [0.0, 0.2], [3, 4])
        assert images.shape == (2, 32, 32, 3)


def test_resume_continues_from_checkpoint(small_root, tmp_path):
    out = tmp_path / "model"
    train(_cfg(small_root, out, steps=2))
    train(_cfg(small_root, out, steps=4, resume=True))
    card = json.loads((out / "model_card.json").read_text())
    assert card["train_steps"] == 4
    assert (out / "checkpoints" / "checkpoint-4.pt").exists()
    # Resuming must give the same weights as training 4 steps straight through.
    straight = tmp_path / "straight"
    train(_cfg(small_root, straight, steps=4))
    a = load_model(out).unet.state_dict()
    b = load_model(straight).unet.state_dict()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, err_msg=k)


def test_corrupt_image_is_skipped_with_warning(small_root, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(small_root / "bottle", root / "bottle")
    (root / "bottle/train/good/999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with caplog.at_level(logging.WARNING):
        train(_cfg(root, tmp_path / "m", categories=["bottle"], steps=1))
    assert any("999.png" in r.getMessage() for r in caplog.records)
    card = json.loads((tmp_path / "m/model_card.json").read_text())
    assert card["num_images"] == 12 and card["skipped_images"] == ["bottle/train/good/999.png"]


def test_cli_unknown_category_exits_2(small_root, tmp_path):
    res = CliRunner().invoke(
        train_cli,
        [
            "--data",
            str(small_root),
            "--categories",
            "bottle,cable",
            "--out",
            str(tmp_path / "m"),
            "--preset",
            "test",
        ],
    )
    assert res.exit_code == 2
    assert "'cable'" in res.output and not (tmp_path / "m" / "model_card.json").exists()


def test_cli_trains(small_root, tmp_path):
    res = CliRunner().invoke(
        train_cli,
        [
            "--data",
            str(small_root),
            "--categories",
            "bottle",
            "--out",
            str(tmp_path / "m"),
            "--preset",
            "test",
            "--steps",
            "1",
            "--batch-size",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "model sdas-" in res.output
