"""One test per foreground rule: real shared images where the rule applies, synthetic
images with a known object elsewhere; plus the ``--foreground`` choice for unknown categories."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from sia_pipeline.compose import (
    CATEGORY_RULES,
    ForegroundRule,
    choose_rule,
    foreground_mask,
    letterbox,
)


def _load(path, size=256) -> np.ndarray:
    return letterbox(np.asarray(Image.open(path).convert("RGB")), size)


def _files(folder, n=4):
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))[:n]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _scene(object_colour, background_colour, shape="disc", seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(256, 256, 3) uint8 image with a known object (bool mask) and mild noise."""
    yy, xx = np.mgrid[:256, :256]
    if shape == "disc":
        obj = (yy - 128) ** 2 + (xx - 120) ** 2 < 70**2
    elif shape == "small":
        obj = (np.abs(yy - 128) < 12) & (np.abs(xx - 100) < 40)
    else:  # a vertical band (zipper)
        obj = np.abs(xx - 128) < 40
    img = np.where(obj[..., None], np.array(object_colour), np.array(background_colour))
    noise = np.random.default_rng(seed).normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), obj


def test_otsu_dark_object_bottle_on_real_images(shared_data):
    """MVTec bottle/capsule/grid/screw/zipper: Otsu, the dark side is the object."""
    for path in _files(shared_data / "mvtec_ad/bottle/train/good"):
        fg = foreground_mask(_load(path), CATEGORY_RULES["bottle"])
        # The bottle is a dark disc on a bright background: centre in, corners out.
        assert fg[128, 128] and not fg[2, 2] and not fg[-3, -3] and not fg[2, -3]
        assert 0.3 < fg.mean() < 0.9
    for cat in ("capsule", "grid", "screw", "zipper"):
        assert CATEGORY_RULES[cat] == CATEGORY_RULES["bottle"]


def test_zipper_polarity_is_the_authors():
    """Zipper: the dark band (teeth and tape) on a bright background is the object."""
    img, obj = _scene((60, 60, 60), (220, 220, 220), "band")
    fg = foreground_mask(img, CATEGORY_RULES["zipper"])
    assert _iou(fg, obj) > 0.97
    assert CATEGORY_RULES["zipper"].object_is == "dark"


def test_everywhere_for_textures_on_real_images(shared_data):
    """carpet/leather/tile/wood/cable/transistor, VisA capsules, BTAD 02: everywhere."""
    cats = ("carpet", "leather", "tile", "wood", "cable", "transistor", "capsules", "02")
    imgs = [_load(p) for p in _files(shared_data / "dtd/images/bubbly", 2)]
    imgs += [_load(p) for p in _files(shared_data / "magnetic_tile/magnetic_tile/train/good", 2)]
    for cat in cats:
        assert CATEGORY_RULES[cat].method == "everywhere"
        assert all(foreground_mask(img, CATEGORY_RULES[cat]).all() for img in imgs)


@pytest.mark.parametrize("category", ["pill", "candle", "cashew", "fryum", "01", "03"])
def test_otsu_bright_object(category):
    """MVTec pill, VisA non-PCB objects, BTAD 01/03: Otsu, the bright side is the object."""
    img, obj = _scene((200, 190, 180), (40, 45, 50))
    fg = foreground_mask(img, CATEGORY_RULES[category])
    assert _iou(fg, obj) > 0.95
    inverted = foreground_mask(255 - img, CATEGORY_RULES[category])
    assert _iou(inverted, ~obj) > 0.95  # polarity: it follows brightness, not position


@pytest.mark.parametrize("category", ["hazelnut", "metal_nut", "toothbrush"])
def test_triangle_bright_object(category):
    """MVTec hazelnut/metal_nut/toothbrush: triangle threshold, bright object."""
    img, obj = _scene((170, 160, 150), (30, 30, 30), "small")
    fg = foreground_mask(img, CATEGORY_RULES[category])
    assert _iou(fg, obj) > 0.9


@pytest.mark.parametrize("category", ["pcb1", "pcb2", "pcb3", "pcb4"])
def test_pcb_reads_the_blue_channel(category):
    """VisA PCBs: triangle on the blue channel; an object visible only in blue is found."""
    img, obj = _scene((90, 90, 220), (90, 90, 40))
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    assert abs(int(gray[obj].mean()) - int(gray[~obj].mean())) < 25  # hardly seen in gray
    fg = foreground_mask(img, CATEGORY_RULES[category])
    assert _iou(fg, obj) > 0.9


@pytest.mark.parametrize("category", ["bracket_black", "bracket_brown", "connector"])
def test_mpdd_green_dark_object(category):
    img, obj = _scene((200, 40, 200), (60, 220, 60))
    assert _iou(foreground_mask(img, CATEGORY_RULES[category]), obj) > 0.95


@pytest.mark.parametrize("category", ["bracket_white", "tubes"])
def test_mpdd_blue_bright_object(category):
    img, obj = _scene((200, 200, 230), (200, 200, 40))
    assert _iou(foreground_mask(img, CATEGORY_RULES[category]), obj) > 0.95


def test_mpdd_metal_plate_gray_dark_object():
    img, obj = _scene((50, 50, 50), (200, 200, 200))
    assert _iou(foreground_mask(img, CATEGORY_RULES["metal_plate"]), obj) > 0.95


def test_auto_picks_otsu_for_an_object_and_everywhere_for_textures(shared_data, caplog):
    caplog.set_level(logging.INFO, logger="sia_pipeline.compose.foreground")
    bottle = [_load(p) for p in _files(shared_data / "mvtec_ad/bottle/train/good", 6)]
    rule = choose_rule("my_bottle", None, bottle)  # unknown name -> auto
    assert (rule.method, rule.object_is) == ("otsu", "dark")
    assert "auto" in rule.source and "my_bottle" in caplog.text  # the choice is logged
    assert (
        _iou(foreground_mask(bottle[0], rule), foreground_mask(bottle[0], CATEGORY_RULES["bottle"]))
        > 0.95
    )
    tiles = [_load(p) for p in _files(shared_data / "magnetic_tile/magnetic_tile/train/good", 6)]
    assert choose_rule("magnetic_tile", None, tiles).method == "everywhere"
    textures = [_load(p) for p in _files(shared_data / "dtd/images/banded", 6)]
    assert choose_rule("fabric", "auto", textures).method == "everywhere"


def test_explicit_choices_override_the_table():
    img, obj = _scene((220, 220, 220), (30, 30, 30))
    assert choose_rule("bottle", None, [img]) == CATEGORY_RULES["bottle"]
    otsu = choose_rule("bottle", "otsu", [img])
    assert (otsu.method, otsu.object_is) == ("otsu", "bright")  # polarity read from the border
    assert _iou(foreground_mask(img, otsu), obj) > 0.95
    tri = choose_rule("x", "triangle", [img])
    assert tri.method == "triangle" and tri.object_is == "bright"
    assert choose_rule("bottle", "everywhere").method == "everywhere"
    with pytest.raises(ValueError, match="needs sample images"):
        choose_rule("x", "auto")
    with pytest.raises(ValueError, match="not in"):
        choose_rule("x", "kmeans", [img])
    with pytest.raises(ValueError, match="foreground method"):
        ForegroundRule("kmeans")  # type: ignore[arg-type]
    assert "otsu, bright object" in otsu.describe() and otsu.to_dict()["method"] == "otsu"


def test_trainer_uses_and_records_the_rule(shared_data, tmp_path):
    """realnet-train: table rule for bottle, ``--foreground`` overrides it; train_log says which."""
    import json

    import torch
    from click.testing import CliRunner
    from realnet_helpers import TINY_MODEL

    from realnet_train.cli import train_main
    from realnet_train.data.mvtec import MVTecCategory
    from realnet_train.train import TrainConfig, build_loader

    data = str(shared_data / "mvtec_ad")
    cfg = TrainConfig("bottle", data, str(tmp_path), textures=str(shared_data / "dtd/images"))
    cfg.mix, cfg.image_size, cfg.num_workers = "normal=0.5,texture=0.5", 32, 0
    mvtec = MVTecCategory(data, "bottle")
    assert build_loader(cfg, mvtec, 0).dataset.config.foreground == CATEGORY_RULES["bottle"]
    cfg.foreground = "everywhere"
    assert build_loader(cfg, mvtec, 0).dataset.config.foreground.method == "everywhere"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["--category", "bottle", "--data", data, "--out", str(tmp_path / "run")]
        args += ["--textures", str(shared_data / "dtd/images"), "--workers", "0"]
        args += ["--image-size", "32", "--batch-size", "2", "--steps", "1", *TINY_MODEL]
        result = CliRunner().invoke(train_main, [*args, "--foreground", "auto"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "run" / "train_log.json").read_text())["foreground"]
    assert (used["method"], used["object_is"]) == ("otsu", "dark") and "auto" in used["source"]
    bad = CliRunner().invoke(train_main, [*args, "--foreground", "kmeans"])
    assert bad.exit_code == 2 and "kmeans" in bad.output
