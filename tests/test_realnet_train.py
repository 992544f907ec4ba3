"""A short CPU training on a small real subset lowers both losses; resume and eval work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from realnet_helpers import small_mvtec, tiny_train_config

from realnet_train.evaluate import evaluate
from realnet_train.model.config import RealNetConfig
from realnet_train.train import TrainConfig, load_model, make_optimizer, train

# The cpu preset's structure, shrunk: 3 Lite0 levels, 8 channels each, 2-resolution UNets.
TINY_MODEL = RealNetConfig(
    backbone="tf_efficientnet_lite0",
    levels=(1, 2, 3),
    afs_keep=(8, 8, 8),
    recon_width=32,
    recon_channel_mult=(1, 2),
    recon_attention_ds=(2,),
    rrs_counts=(4, 4),
)


@pytest.fixture(scope="module")
def small_bottle(shared_data, tmp_path_factory) -> Path:
    """MVTec-layout subset: 32 train images, 3 good + 3 broken_large test images with masks."""
    src = shared_data / "mvtec_ad" / "bottle"
    root = tmp_path_factory.mktemp("mvtec")
    dst = root / "bottle"
    picks = {
        "train/good": sorted((src / "train/good").glob("*.png"))[:32],
        "test/good": sorted((src / "test/good").glob("*.png"))[:3],
        "test/broken_large": sorted((src / "test/broken_large").glob("*.png"))[:3],
    }
    for folder, files in picks.items():
        (dst / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / folder / f.name)
    (dst / "ground_truth/broken_large").mkdir(parents=True)
    for f in picks["test/broken_large"]:
        mask = src / "ground_truth/broken_large" / f"{f.stem}_mask.png"
        shutil.copy(mask, dst / "ground_truth/broken_large" / mask.name)
    return root


@pytest.fixture
def one_thread():
    """One torch thread: on a shared CPU, more threads only contend (and slow down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(data: Path, sia: Path, out: Path, steps: int, resume: bool = False):
    return TrainConfig(
        category="bottle",
        data=str(data),
        out=str(out),
        sia=str(sia),
        mix="normal=0.25,sia=0.75",
        image_size=64,
        batch_size=4,
        steps=steps,
        lr=2e-3,
        afs_batches=2,
        checkpoint_every=10,
        num_workers=0,
        seed=0,
        resume=resume,
        model=TINY_MODEL,
    )


def test_short_training_lowers_both_losses_then_resumes_and_evaluates(
    small_bottle, tiny_sia, tmp_path, one_thread
):
    out = tmp_path / "run"
    result = train(small_config(small_bottle, tiny_sia, out, steps=40))
    hist = result["history"]
    assert result["step"] == 40 and len(hist["recon"]) == 40
    for name in ("recon", "seg"):
        first, last = np.mean(hist[name][:8]), np.mean(hist[name][-8:])
        assert last < 0.8 * first, f"{name} loss did not drop: {first:.3f} -> {last:.3f}"

    model, ckpt = load_model(out / "last.pt")
    assert ckpt["step"] == 40 and ckpt["model_args"]["levels"] == [1, 2, 3]
    assert bool(model.afs.fitted)
    assert not any(
        k.startswith("backbone.") for k in ckpt["model"]
    )  # weights come from the package

    resumed = train(small_config(small_bottle, tiny_sia, out, steps=45, resume=True))
    assert resumed["step"] == 45 and resumed["steps_this_run"] == 5
    assert len(resumed["history"]["seg"]) == 45
    again, _ = load_model(out / "last.pt")
    for lv in model.afs.levels:  # AFS is chosen once, not refitted on resume
        assert again.afs.indices(lv).tolist() == model.afs.indices(lv).tolist()

    metrics = evaluate(out / "last.pt", str(small_bottle), tmp_path / "eval", panels=4)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["n_test"] == 6 and metrics["n_anomalous"] == 3
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["model_ms_per_image"] > 0  # model-only, beside the end-to-end time
    assert metrics["end_to_end_ms_per_image"] > 0
    pngs = sorted((tmp_path / "eval" / "panels").glob("*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[0]) as im:
        assert im.size == (3 * 64 + 8, 64)  # image | ground truth | anomaly map


def test_cli_train_then_eval(small_bottle, shared_data, tmp_path, one_thread):
    from click.testing import CliRunner

    from realnet_train.cli import eval_main, train_main

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["--category", "bottle", "--data", str(small_bottle), "--out", str(out)]
    missing = runner.invoke(train_main, args)
    assert missing.exit_code == 2 and "--sia URL and/or --textures DIR" in missing.output

    small = ["--image-size", "64", "--batch-size", "2", "--steps", "3", "--levels", "1,2"]
    small += ["--afs-keep", "8,8", "--rrs-counts", "4,4", "--afs-batches", "2"]
    textures = ["--textures", str(shared_data / "dtd" / "images"), "--workers", "0"]
    result = runner.invoke(train_main, args + small + textures)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 3
    assert json.loads((out / "train_log.json").read_text())["config"]["mix"] == (
        "normal=0.5,texture=0.5"
    )

    result = runner.invoke(
        eval_main, ["--checkpoint", str(out / "last.pt"), "--data", str(small_bottle)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["category"] == "bottle" and metrics["n_test"] == 6
    assert (out / "eval" / "metrics.json").is_file()


def test_the_optimizer_is_fused_adam_with_the_loop_adams_update():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(list(a.parameters()), 1e-3, torch.device("cpu"))
    loop = torch.optim.Adam(b.parameters(), lr=1e-3, foreach=False)
    assert fused.defaults["fused"]
    x = torch.randn(4, 16)
    for _ in range(3):
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a checkpoint of the loop optimiser's state loads into the fused one (older runs resume)
    fused.load_state_dict(loop.state_dict())
    fused.step()


def test_the_loop_reads_the_losses_off_the_device_once_per_sync_interval(
    shared_data, tiny_sia, tmp_path, monkeypatch
):
    # A GPU must not wait for the host every step: the losses are read in one transfer
    # every SYNC_EVERY steps (and at the end), not by .item() per step.
    import realnet_train.train as train_module

    monkeypatch.setattr(train_module, "SYNC_EVERY", 4)
    data = small_mvtec(shared_data, tmp_path / "mvtec", n_train=8)
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            reads.append(1)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for steps in (3, 11):
        reads.clear()
        log = train(tiny_train_config(data, tiny_sia, tmp_path / f"run{steps}", steps=steps))
        counts[steps] = len(reads)
        assert len(log["history"]["recon"]) == len(log["history"]["seg"]) == steps
        assert all(np.isfinite(log["history"]["recon"]))
    assert counts[11] - counts[3] == 2  # reads after steps 4 and 8; per-step reads would be 16


def test_a_time_budget_stops_the_run_before_its_steps(shared_data, tiny_sia, tmp_path, caplog):
    data = small_mvtec(shared_data, tmp_path / "mvtec", n_train=8)
    cfg = tiny_train_config(data, tiny_sia, tmp_path / "run", steps=1000, time_budget_s=1e-6)
    with caplog.at_level("INFO", logger="realnet_train.train"):
        log = train(cfg)
    assert log["step"] == 0 and log["history"] == {"recon": [], "seg": []}
    assert (tmp_path / "run" / "last.pt").is_file()
    assert "time budget of 0 s reached at step 0" in caplog.text
