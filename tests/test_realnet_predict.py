"""realnet-predict on files, folders and s3:// prefixes; calibrated threshold; image-level eval."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from realnet_helpers import TINY_MODEL, small_mvtec

from realnet_train.calibration import holdout_split, threshold_at_fpr
from realnet_train.checkpoint import read_checkpoint
from realnet_train.cli import eval_main, train_main
from realnet_train.predict import main as predict_main


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """A tiny model trained 8 steps on 12 bottle images (2 held out) with DTD textures."""
    base = tmp_path_factory.mktemp("pred")
    data = small_mvtec(shared_data, base / "data", n_train=12)
    out = base / "run"
    args = ["--category", "bottle", "--data", str(data), "--out", str(out)]
    args += ["--textures", str(shared_data / "dtd" / "images"), "--image-size", "32"]
    args += ["--batch-size", "2", "--steps", "8", "--workers", "0", "--holdout", "0.2"]
    args += ["--target-fpr", "0.3", *TINY_MODEL]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    res = CliRunner().invoke(train_main, args)
    torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    return data, out / "last.pt"


def test_training_stores_a_threshold_calibrated_on_held_out_good_images(trained):
    _, ckpt_path = trained
    cal = read_checkpoint(ckpt_path)["calibration"]
    assert len(cal["scores"]) == 2 == len(holdout_split(12, 0.2, 0)[1])
    assert all(name.startswith("train/good/") for name in cal["images"])
    assert cal["threshold"] == threshold_at_fpr(cal["scores"], 0.3) == max(cal["scores"])
    assert cal["holdout_fpr"] == 0.0 <= cal["target_fpr"]


def test_threshold_at_fpr_allows_at_most_that_share_above_it():
    scores = np.arange(20) / 20
    for fpr in (0.01, 0.05, 0.1, 0.25, 0.5):
        thr = threshold_at_fpr(scores, fpr)
        assert np.mean(scores > thr) <= fpr
        assert np.mean(scores >= thr) > fpr  # and it is the smallest such threshold


def test_predict_files_folders_and_a_corrupt_image(trained, tmp_path):
    data, ckpt_path = trained
    extra = tmp_path / "inbox"
    extra.mkdir()
    (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    one = sorted((data / "bottle/test/good").glob("*.png"))[0]
    shutil.copy(one, extra / "ok.png")
    with Image.open(one) as im:  # a non-square image: fitted as in training
        im.crop((0, 300, im.size[0], 500)).save(extra / "wide.png")
    out = tmp_path / "pred"
    args = ["--checkpoint", str(ckpt_path), "--out", str(out)]
    res = CliRunner().invoke(predict_main, [str(data / "bottle/test"), str(one), str(extra), *args])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n_images"] == 4 + 1 + 3 and summary["n_errors"] == 1
    thr = read_checkpoint(ckpt_path)["calibration"]["threshold"]
    assert summary["threshold"] == thr and "calibrated at FPR 0.3" in summary["threshold_source"]

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(rows) == len(csv_rows) == 8
    assert [r["input"] for r in rows] == [r["input"] for r in csv_rows]
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["input"].endswith("broken.png")
    scored = [r for r in rows if not r["error"]]
    assert all(r["anomalous"] == (r["score"] > thr) for r in scored)
    assert summary["n_anomalous"] == sum(r["anomalous"] for r in scored)
    same = [r["score"] for r in scored if r["input"].endswith(one.name) and "good" in r["input"]]
    assert len(same) >= 2 and max(same) - min(same) < 1e-6  # one image, same score each time
    for r in scored:  # overlays at the image's own size, a banner on top
        with Image.open(out / r["overlay"]) as im:
            w, h = im.size
        with Image.open(r["input"]) as src:
            assert w == src.size[0] and h > src.size[1]

    lower = CliRunner().invoke(
        predict_main,
        [str(one), *args[:2], "--out", str(tmp_path / "c"), "--target-fpr", "0.6", "--no-overlays"],
    )
    assert lower.exit_code == 0, lower.output
    low = json.loads(lower.stdout.strip().splitlines()[-1])
    assert low["threshold"] <= thr and not list((tmp_path / "c" / "overlays").iterdir())


def test_predict_reads_an_s3_prefix_like_a_folder(trained, tmp_path, s3_root, s3_client):
    data, ckpt_path = trained
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    files = sorted((data / "bottle/test/broken_large").glob("*.png"))
    for f in files:
        s3_client.upload_file(str(f), bucket, f"{prefix}/imgs/{f.name}")
    results = {}
    for name, src in (("local", str(data / "bottle/test/broken_large")), ("s3", f"{s3_root}/imgs")):
        out = tmp_path / name
        res = CliRunner().invoke(
            predict_main, [src, "--checkpoint", str(ckpt_path), "--out", str(out), "--no-overlays"]
        )
        assert res.exit_code == 0, res.output
        rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        results[name] = [r["score"] for r in rows]
    assert len(results["s3"]) == len(files) and results["s3"] == results["local"]


def test_eval_without_ground_truth_or_train_is_image_level(trained, tmp_path):
    data, ckpt_path = trained
    unlabelled = tmp_path / "data"
    shutil.copytree(data, unlabelled)
    shutil.rmtree(unlabelled / "bottle/ground_truth")
    shutil.rmtree(unlabelled / "bottle/train")  # evaluation needs only test/
    res = CliRunner().invoke(
        eval_main,
        ["--checkpoint", str(ckpt_path), "--data", str(unlabelled), "--out", str(tmp_path / "e")],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["level"] == "image" and metrics["pixel_auroc"] is None and metrics["pro"] is None
    assert set(metrics["image_auroc_per_type"]) == {"broken_large"}
    # One defect type: its AUROC is the overall one.
    assert metrics["image_auroc_per_type"]["broken_large"] == metrics["image_auroc"]
    with_masks = CliRunner().invoke(
        eval_main,
        ["--checkpoint", str(ckpt_path), "--data", str(data), "--out", str(tmp_path / "f")],
    )
    full = json.loads(with_masks.stdout.strip().splitlines()[-1])
    assert full["level"] == "pixel" and 0 <= full["pro"] <= 1
    assert full["image_auroc"] == metrics["image_auroc"]
