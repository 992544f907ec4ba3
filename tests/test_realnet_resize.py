"""--resize: squash (the default) fills the square, letterbox pads it; eval and predict fit
images as training did."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from realnet_helpers import TINY_MODEL, TINY_RUN, small_mvtec

from realnet_train.checkpoint import checkpoint_fit, read_checkpoint
from realnet_train.cli import eval_main, train_main
from realnet_train.data.mvtec import MVTecCategory, decode_mask, decode_rgb
from realnet_train.predict import main as predict_main
from sia_pipeline.compose.resize import FITS, content_box, fit_square


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_squash_fills_the_square_and_letterbox_pads_it():
    img = np.zeros((64, 128, 3), np.uint8)
    img[:, :64] = 200  # left half bright
    mask = np.zeros((64, 128), np.uint8)
    mask[:8] = 255  # a band along the top edge
    squashed = decode_rgb(png(img), 32, "squash")
    expected = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(squashed, expected)
    assert np.array_equal(decode_rgb(png(img), 32), fit_square(img, 32, "letterbox"))
    m_squash, m_box = decode_mask(png(mask), 32, "squash"), decode_mask(png(mask), 32)
    assert m_squash[:4].all() and not m_squash[4:].any()  # 8 of 64 rows -> 4 of 32, at the top
    top, _, new_h, _ = content_box(64, 128, 32)
    assert (top, new_h) == (8, 16) and not m_box[:top].any() and m_box[top : top + 2].all()
    assert content_box(64, 128, 32, "squash") == (0, 0, 32, 32)
    with pytest.raises(ValueError, match="unknown fit 'crop'"):
        fit_square(img, 32, "crop")


def non_square_set(shared_data, root):
    """small_mvtec with every image and mask cut to its middle 2:1 band (rows 200-500 of 900)."""
    data = small_mvtec(shared_data, root, n_train=8)
    for path in (data / "bottle").rglob("*.png"):
        with Image.open(path) as im:
            w = im.size[0]
            im.crop((0, w // 4, w, w // 4 + w // 2)).save(path)
    return data


def test_squash_never_thins_a_crack_more_than_letterbox():
    """The 101x256 case: a 2 px crack along the long side keeps more rows when squashed, one
    across it as many columns and more rows; letterboxing halves both axes."""
    seen = []
    for crack in (np.s_[50:52, :], np.s_[:, 128:130]):  # along the long side, across it
        mask = np.zeros((101, 256), np.uint8)
        mask[crack] = 255
        fitted = {fit: decode_mask(png(mask), 128, fit) > 0 for fit in ("squash", "letterbox")}
        assert fitted["squash"].sum() > fitted["letterbox"].sum()
        seen.append({f: (int(m.any(1).sum()), int(m.any(0).sum())) for f, m in fitted.items()})
    along, across = seen  # (rows, columns) the crack covers
    assert along["letterbox"] == (1, 128) and along["squash"][0] >= 2
    assert across == {"squash": (128, 1), "letterbox": (50, 1)}


@pytest.mark.parametrize(
    ("option", "fit"), [([], "squash"), (["--resize", "letterbox"], "letterbox")]
)
def test_a_run_evaluates_and_predicts_as_it_was_fitted(shared_data, tmp_path, option, fit):
    data = non_square_set(shared_data, tmp_path / "data")
    out = tmp_path / "run"
    args = ["--category", "bottle", "--data", str(data), "--out", str(out), *option]
    args += ["--textures", str(shared_data / "dtd" / "images"), "--image-size", "32"]
    args += ["--batch-size", "2", "--steps", "2", "--workers", "0", "--threads", "1"]
    res = CliRunner().invoke(train_main, args + TINY_MODEL)
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(out / "last.pt")
    assert checkpoint_fit(ckpt) == fit
    assert checkpoint_fit({"train_config": {}}) == "letterbox"  # checkpoints before the option

    # The test masks the evaluation scores against are fitted the same way.
    other = "letterbox" if fit == "squash" else "squash"
    mvtec = MVTecCategory(str(data), "bottle", fit=fit)
    defect = next(it for it in mvtec.test_items if it.label)
    raw = (data / "bottle" / defect.mask).read_bytes()
    assert np.array_equal(mvtec.mask(defect, 32), decode_mask(raw, 32, fit))
    assert not np.array_equal(mvtec.mask(defect, 32), decode_mask(raw, 32, other))
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(out / "last.pt"), "--data", str(data)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["n_test"] == 4
    # Pixel metrics score the images' own pixels: a letterboxed 2:1 image's padding is left out.
    content = 4 * 32 * 32 if fit == "squash" else 4 * 32 * 16
    assert metrics["pixels_scored"] == content

    image = next((data / "bottle/test/good").glob("*.png"))
    res = CliRunner().invoke(
        predict_main,
        [str(image), "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "p")],
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "p" / "results.jsonl").read_text().splitlines()[0])
    with Image.open(tmp_path / "p" / row["overlay"]) as ov, Image.open(image) as src:
        assert ov.size[0] == src.size[0] and ov.size[1] > src.size[1]  # own size + banner


def trained_weights(data, out, fit: str, shared_data) -> dict:
    args = ["--category", "bottle", "--data", str(data), "--out", str(out), "--resize", fit]
    args += ["--textures", str(shared_data / "dtd" / "images"), *TINY_RUN, "--steps", "2"]
    res = CliRunner().invoke(train_main, args + TINY_MODEL)
    assert res.exit_code == 0, res.output
    return read_checkpoint(out / "last.pt")["model"]


def test_square_images_train_the_same_under_either_fit(shared_data, tmp_path):
    """Bottle is square: a letterbox run and a squash run of one seed end with equal weights
    (so the benchmark's letterbox rows of square categories stand for the default too); the
    same runs on 2:1 images do not."""
    for name, data in [
        ("square", small_mvtec(shared_data, tmp_path / "square", n_train=8)),
        ("2:1", non_square_set(shared_data, tmp_path / "wide")),
    ]:
        runs = tmp_path / "runs" / name  # outside the data root (--out inside it is refused)
        w = {f: trained_weights(data, runs / f, f, shared_data) for f in FITS}
        same = [torch.equal(w["squash"][k], w["letterbox"][k]) for k in w["squash"]]
        assert all(same) if name == "square" else not all(same)
