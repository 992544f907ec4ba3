"""``--preset paper`` holds the authors' MVTec AD config; ``cpu`` lists every departure."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from _reference import REFERENCE
from click.testing import CliRunner
from PIL import Image

from realnet_train.cli import train_main
from realnet_train.data.mvtec import decode_mask, decode_rgb
from realnet_train.model.config import RealNetConfig
from realnet_train.presets import CPU, CPU_DEPARTURES, PAPER, resolve
from realnet_train.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def authors_config() -> dict:
    path = REFERENCE / "experiments" / "MVTec-AD" / "realnet.yaml"
    if not path.is_file():
        pytest.skip(f"the authors' code is absent ({path})")
    return yaml.safe_load(path.read_text())


def test_paper_preset_is_the_authors_config():
    cfg = authors_config()
    nets = {n["name"]: n for n in cfg["net"]}
    m, t = PAPER.model, PAPER.train
    assert m["backbone"] == nets["backbone"]["kwargs"]["backbone"] == "wide_resnet50_2"
    assert [f"layer{i}" for i in m["levels"]] == [b["layers"][0]["idx"] for b in cfg["structure"]]
    assert list(m["afs_keep"]) == [b["layers"][0]["planes"] for b in cfg["structure"]]
    assert t["afs_batches"] == nets["afs"]["kwargs"]["init_bsn"]
    recon = nets["recon"]["kwargs"]
    assert m["recon_width"] is None and m["recon_hide_ratio"] == recon["hide_channels_ratio"]
    assert list(m["recon_channel_mult"]) == recon["channel_mult"]
    assert m["recon_res_blocks"] == recon["num_res_blocks"]
    assert list(m["recon_attention_ds"]) == recon["attention_mult"]
    rrs = nets["rrs"]["kwargs"]
    assert rrs["modes"] == ["max", "mean"] and list(m["rrs_counts"]) == rrs["mode_numbers"]
    assert m["head_residual_layers"] == rrs["num_residual_layers"]
    assert [t["image_size"]] * 2 == cfg["dataset"]["input_size"]
    assert t["batch_size"] == cfg["dataset"]["batch_size"]
    assert cfg["trainer"]["optimizer"]["type"] == "Adam"
    assert t["lr"] == cfg["trainer"]["optimizer"]["kwargs"]["lr"]
    image_metric = cfg["evaluator"]["metrics"]["auc"][0]
    assert [m["score_pool"]] * 2 == image_metric["kwargs"]["avgpool_size"]
    # The model's defaults are the paper's too; widths follow the authors' 0.5 x kept.
    assert RealNetConfig().to_dict() == RealNetConfig(**m).to_dict()
    assert list(RealNetConfig(**m).widths().values()) == [128, 256, 256, 128]


def test_cpu_preset_is_the_default_and_differs_only_where_listed():
    assert TrainConfig("bottle", "d", "o").model == RealNetConfig(**CPU.model)
    assert TrainConfig("bottle", "d", "o").image_size == CPU.train["image_size"]
    changed_model = {k for k in PAPER.model if PAPER.model[k] != CPU.model[k]}
    assert changed_model == {"backbone", "afs_keep", "recon_width", "rrs_counts"}
    changed_train = {k for k in PAPER.train if PAPER.train[k] != CPU.train[k]}
    assert changed_train == {"image_size", "batch_size", "steps", "lr", "time_budget_s"}
    text = " ".join(CPU_DEPARTURES)
    for word in ("Lite0", "24/40/56/40", "64 batches of 8", "width 32", "32 by max + 32 by mean",
                 "128 px", "batch 8", "lr 1e-3", "1,500 steps", "20 minutes"):  # fmt: skip
        assert word in text, word


def test_help_and_docs_list_every_departure():
    out = CliRunner().invoke(train_main, ["--help"]).output
    doc = (ROOT / "docs" / "realnet.md").read_text()
    for line in CPU_DEPARTURES:
        assert line in " ".join(out.split()), line
        assert line in " ".join(doc.split()), line


def test_paper_preset_refuses_a_missing_weights_file(shared_data, tmp_path):
    data, textures = shared_data / "mvtec_ad", shared_data / "dtd" / "images"
    base = ["--category", "bottle", "--data", str(data), "--textures", str(textures)]
    out = tmp_path / "run"
    for extra in ([], ["--backbone-weights", str(tmp_path / "wrn50.pth")]):
        result = CliRunner().invoke(
            train_main, [*base, "--out", str(out), "--preset", "paper", *extra]
        )
        assert result.exit_code == 2, result.output
        assert "backbone-weights" in result.output
        assert not out.exists()
    with pytest.raises(ValueError, match="no such file"):
        resolve("paper", {}, {"backbone_weights": str(tmp_path / "nope.pth")})


def test_explicit_options_override_the_preset():
    train_kw, model = resolve("cpu", {"steps": 7, "lr": None}, {"rrs_counts": (4, 4)})
    assert train_kw["steps"] == 7 and train_kw["lr"] == CPU.train["lr"]
    assert train_kw["preset"] == "cpu" and model.rrs_counts == (4, 4)
    assert model.afs_keep == CPU.model["afs_keep"]


def test_paper_backbone_loads_a_torchvision_weights_file():
    """``--backbone-weights`` for paper: torchvision's wide_resnet50_2 file loads strictly into
    timm's model (same names, same shapes); checked on the meta device, no weights needed."""
    torchvision = pytest.importorskip("torchvision")
    import timm
    import torch

    with torch.device("meta"):
        theirs = torchvision.models.wide_resnet50_2().state_dict()
        ours = timm.create_model(PAPER.model["backbone"]).state_dict()
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].shape == ours[k].shape for k in ours)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_paper_preset_resizes_as_the_authors_test_transform():
    """Their ``TestBaseTransform`` resizes image and mask to the (h, w) input size: a squash."""
    path = REFERENCE / "datasets" / "base_dataset.py"
    if not path.is_file():
        pytest.skip(f"the authors' code is absent ({path})")
    from torchvision import transforms

    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if getattr(n, "name", "") == "TestBaseTransform")
    scope: dict = {"transforms": transforms, "Image": Image}
    exec(compile(ast.Module([cls], []), str(path), "exec"), scope)  # noqa: S102
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 120, 3), dtype=np.uint8)  # 2.5:1, like a commutator
    mask = (rng.random((48, 120)) > 0.7).astype(np.uint8) * 255
    theirs = scope["TestBaseTransform"]([32, 32])(Image.fromarray(image), Image.fromarray(mask))
    fit = PAPER.train["resize"]
    assert fit == "squash" == CPU.train["resize"]
    assert np.array_equal(np.asarray(theirs[0]), decode_rgb(png(image), 32, fit))
    assert np.array_equal(np.asarray(theirs[1]) > 0, decode_mask(png(mask), 32, fit) > 0)
