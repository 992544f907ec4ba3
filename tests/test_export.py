"""sia-export on the shared real images: pixels, masks, the three layouts read back by their
readers, the held-out split (no anomaly composed into a training normal), determinism,
resume, S3, non-square images, and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sia_pipeline.cli.export import main
from sia_pipeline.compose import CATEGORY_RULES, content_mask, foreground_mask, letterbox
from sia_pipeline.export.export import ExportSpec, export, output_seed

SIZE = 128


@pytest.fixture(scope="module")
def normals(shared_data, tmp_path_factory) -> Path:
    """MVTec-layout root: 5 bottle and 4 magnetic_tile (non-square) training images."""
    root = tmp_path_factory.mktemp("normals")
    picks = {
        "bottle": sorted((shared_data / "mvtec_ad/bottle/train/good").glob("*.png"))[:5],
        "magnetic_tile": sorted(
            (shared_data / "magnetic_tile/magnetic_tile/train/good").glob("*.png")
        )[:4],
    }
    for category, files in picks.items():
        (root / category / "train/good").mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / category / "train/good" / f.name)
    return root


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, [*args, "--no-progress", "--image-size", str(SIZE)])
    assert result.exit_code == 0, result.output
    return result.stdout


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def _normal(root: Path, category: str, rel: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(Image.open(root / category / rel).convert("RGB"))
    return letterbox(raw, SIZE), content_mask(*raw.shape[:2], SIZE)


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _check_pair(image, mask, normal, fg) -> None:
    inside = mask > 0
    assert set(np.unique(mask)) <= {0, 255} and inside.any()  # non-empty 0/255 mask
    assert np.array_equal(image[~inside], normal[~inside])  # outside: the resized normal
    changed = (image != normal).any(-1)[inside].mean()
    assert changed > 0.5, changed  # inside: the anomaly
    assert not (inside & ~fg).any()  # inside the foreground


def test_mvtec_layout_through_ray_read_by_the_project_reader(
    normals, tiny_sia, tmp_path, ray_local
):
    from realnet_train.data.mvtec import MVTecCategory

    out = tmp_path / "out"
    args = [str(tiny_sia), "--data", str(normals), "--category", "bottle", "--out", str(out)]
    summary = _run([*args, "--per-image", "2", "--holdout", "0.6", "--preview"])
    assert "6 anomaly pairs on 3 held-out normal images (2 kept for training)" in summary
    cat_out = out / "bottle"
    rows = _rows(cat_out)
    assert [r["index"] for r in rows] == list(range(6))
    card = json.loads((cat_out / "export.json").read_text())
    assert card["foreground"]["method"] == "otsu" and "MVTec AD" in card["foreground"]["source"]
    for row in rows:
        image = np.asarray(Image.open(cat_out / row["image"]))
        mask = np.asarray(Image.open(cat_out / row["mask"]))
        normal, valid = _normal(normals, "bottle", row["data_normal"])
        fg = foreground_mask(normal, CATEGORY_RULES["bottle"])
        _check_pair(image, mask, normal, fg)
        # The held-out normal is written to test/good as it was before the anomaly went in.
        assert row["normal"].startswith("test/good/")
        assert np.array_equal(np.asarray(Image.open(cat_out / row["normal"])), normal)
        assert not mask[:4, :4].any()  # the bright corners are background
        assert row["source"] == "sia" and row["sia_key"].startswith("bottle-")
        assert 0.5 <= row["opacity"] <= 1.0 and 0.1 <= row["strength"] <= 0.5
        assert row["perlin_seed"] == output_seed(0, row["data_normal"], row["k"])
    # The project's own MVTec reader takes the folder as a data set.
    mvtec = MVTecCategory(str(out), "bottle")
    assert len(mvtec.train_items) == 2 and len(mvtec.test_items) == 6 + 3
    assert sum(it.label for it in mvtec.test_items) == 6 and mvtec.has_masks
    item = next(it for it in mvtec.test_items if it.label)
    assert item.label == 1 and item.defect == "synthetic"
    row = next(r for r in rows if r["image"] == item.image)
    assert np.array_equal(mvtec.mask(item, SIZE), np.asarray(Image.open(cat_out / row["mask"])) > 0)
    with Image.open(cat_out / "preview.png") as im:
        assert im.size[0] > 4 * SIZE and im.size[1] > 3 * SIZE  # 6 pairs, two per row


def test_webdataset_layout_read_by_webdataset(normals, tiny_sia, shared_data, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    textures = str(shared_data / "dtd/images")
    args = [str(tiny_sia), "--data", str(normals), "--category", "bottle", "--out", str(out)]
    args += ["--layout", "webdataset", "--source", "both", "--textures", textures]
    _run([*args, "--holdout", "0.8"])
    _run([*args, "--holdout", "0.8"])  # rerun
    cat_out = out / "bottle"
    rows = {r["key"]: r for r in _rows(cat_out)}
    tars = sorted((cat_out / "shards").glob("*.tar"))
    assert tars and not (cat_out / "train").exists()
    seen = 0
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb8"):
        meta = sample["json"]
        assert rows[sample["__key__"]] == meta
        # The row names its tar (relative to the export root) and its members.
        assert (cat_out / meta["tar"]).is_file() and meta["tar"] == sample["__url__"][
            -len(meta["tar"]) :
        ]
        assert meta["image"] == f"{meta['key']}.png" and meta["mask"] == f"{meta['key']}.mask.png"
        assert meta["normal"] is None  # this layout writes no normal images
        normal, _ = _normal(normals, "bottle", meta["data_normal"])
        fg = foreground_mask(normal, CATEGORY_RULES["bottle"])
        _check_pair(sample["png"], sample["mask.png"][..., 0], normal, fg)
        lo = 0.5 if meta["source"] == "sia" else 0.2
        assert lo <= meta["opacity"] <= 1.0
        seen += 1
    assert seen == len(rows) == 4  # 0.8 of 5 normals held out
    spec_hash = json.loads((cat_out / "export.json").read_text())["spec_hash"]
    for tar in tars:
        stats = json.loads(tar.with_suffix(".json").read_text())
        assert stats["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert stats["count"] == len(stats["keys"])
        assert [r["key"] for r in stats["samples"]] == stats["keys"]  # filled like sia-gen's
        assert all(rows[r["key"]] == r for r in stats["samples"])
        assert len(spec_hash) == 16 and stats["spec_hash"] == spec_hash
    # A decode mode applies to every image member: "pil" makes the mask RGB, "pill" the image
    # gray. The README's recipe decodes the mask member on its own first.
    plain = next(iter(wds.WebDataset([str(tars[0])], shardshuffle=False).decode("pil")))
    assert plain["mask.png"].mode == "RGB"
    mask_l = wds.handle_extension("mask.png", lambda b: Image.open(io.BytesIO(b)).convert("L"))
    first = next(iter(wds.WebDataset([str(tars[0])], shardshuffle=False).decode(mask_l, "pil")))
    assert first["mask.png"].mode == "L" and first["png"].mode == "RGB"
    assert set(np.unique(np.asarray(first["mask.png"]))) <= {0, 255}


def test_folder_layout_deterministic_resumable_and_order_free(normals, tiny_sia, tmp_path):
    args = [str(tiny_sia), "--data", str(normals), "--category", "bottle", "--workers", "0"]
    args += ["--layout", "folder", "--seed", "7"]
    _run([*args, "--out", str(tmp_path / "a")])
    _run([*args, "--out", str(tmp_path / "b")])
    a, b = tmp_path / "a" / "bottle", tmp_path / "b" / "bottle"
    assert _tree(a) == _tree(b)  # same command, same bytes
    assert len(list((a / "abnormal").iterdir())) == len(list((a / "mask").iterdir())) == 1
    split = json.loads((a / "export.json").read_text())["split"]
    assert sorted(p.name for p in (a / "normal").iterdir()) == sorted(
        Path(r["data"]).name for r in split["train"]
    )
    assert [p.name for p in (a / "normal_test").iterdir()] == [
        Path(r["data"]).name for r in split["held_out"]
    ]
    assert len(split["train"]) == 4 and len(split["held_out"]) == 1  # 0.2 of 5
    # Resume: lose a unit's marker and one of its images; the rerun restores the same bytes.
    marker = next((b / ".export/units").glob("sia-*.json"))
    lost = json.loads(marker.read_text().splitlines()[0])["image"]
    marker.unlink()
    (b / lost).unlink()
    (b / "metadata.jsonl").unlink()
    assert "3 units (2 already done)" in _run([*args, "--out", str(tmp_path / "b")])
    assert _tree(a) == _tree(b)
    # Seeds come from (seed, normal image, k), not from the order: a subset gives equal pairs.
    # An image's holdout hash does not depend on the others: the held-out image and one
    # training image of the full set, split (one each side), hold out the same image.
    subset = tmp_path / "subset"
    (subset / "bottle/train/good").mkdir(parents=True)
    kept = [split["held_out"][0]["data"], split["train"][0]["data"]]
    for f in kept:
        shutil.copy(normals / "bottle" / f, subset / "bottle/train/good")
    sub_args = [*args[:2], str(subset), *args[3:]]
    _run([*sub_args, "--out", str(tmp_path / "c")])  # 0.2 of 2: at least one each side
    full = {r["data_normal"]: r for r in _rows(a)}
    sub_rows = _rows(tmp_path / "c" / "bottle")
    assert [r["data_normal"] for r in sub_rows] == [kept[0]]
    for row in sub_rows:
        same = full[row["data_normal"]]
        assert (tmp_path / "c/bottle" / row["image"]).read_bytes() == (
            a / same["image"]
        ).read_bytes()
    other = _run([*args[:-1], "8", "--out", str(tmp_path / "d")])
    assert other and _tree(tmp_path / "d/bottle") != _tree(a)  # another seed, other pairs


def test_non_square_images_keep_their_aspect_and_auto_foreground(normals, shared_data, tmp_path):
    out = tmp_path / "tile"
    args = ["--data", str(normals), "--category", "magnetic_tile", "--out", str(out)]
    args += ["--source", "texture", "--textures", str(shared_data / "dtd/images"), "--workers", "0"]
    _run(args)
    card = json.loads((out / "magnetic_tile/export.json").read_text())
    assert card["foreground"]["method"] == "everywhere" and "auto" in card["foreground"]["source"]
    for row in _rows(out / "magnetic_tile"):
        image = np.asarray(Image.open(out / "magnetic_tile" / row["image"]))
        mask = np.asarray(Image.open(out / "magnetic_tile" / row["mask"]))
        normal, valid = _normal(normals, "magnetic_tile", row["data_normal"])
        assert image.shape == (SIZE, SIZE, 3) and not valid.all()  # letterboxed, padded
        _check_pair(image, mask, normal, valid)  # never in the padding
        assert row["texture"].endswith(".jpg") and row["strength"] is None


def test_export_to_s3(normals, tiny_sia, s3_root, s3_endpoint, s3_client):
    spec = ExportSpec(
        "bottle", str(normals), str(tiny_sia), None, 1, "webdataset", "sia", 0, 64, None, None
    )
    report = export(spec, s3_root, workers=0, progress=False, endpoint_url=s3_endpoint)
    assert report.outputs == report.held_out == 1 and report.train == 4
    bucket, prefix = s3_root[5:].split("/", 1)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"{prefix}/bottle/metadata.jsonl" in keys and f"{prefix}/bottle/export.json" in keys
    assert any(k.endswith(".tar") for k in keys) and not any(".tmp" in k for k in keys)


def test_bad_input_exits_2_with_one_line_and_writes_nothing(normals, tiny_sia, tmp_path):
    screw = tmp_path / "screw_data"
    (screw / "screw/train/good").mkdir(parents=True)
    for i, f in enumerate(sorted((normals / "bottle/train/good").iterdir())[:2]):
        shutil.copy(f, screw / f"screw/train/good/{i}.png")  # a split, then no SIA samples
    one = tmp_path / "one_data"  # nothing to split
    (one / "bottle/train/good").mkdir(parents=True)
    shutil.copy(next((normals / "bottle/train/good").iterdir()), one / "bottle/train/good")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "never"
    base = [str(tiny_sia), "--data", str(normals), "--category", "bottle", "--out", str(out)]
    cases = {
        "unknown category": ([*base[:4], "kettle", *base[5:]], "no normal images"),
        "no train/good": ([*base[:2], str(tmp_path / "empty"), *base[3:]], "no normal images"),
        "SIA root lacks it": (
            [*base[:2], str(screw), "--category", "screw", *base[5:]],
            "SIA root",
        ),
        "per-image 0": ([*base, "--per-image", "0"], "--per-image"),
        "out is under a file": ([*base[:-1], str(tmp_path / "afile" / "out")], "is a file"),
        "out is a file": ([*base[:-1], str(tmp_path / "afile")], "not a folder"),
        "texture without folder": ([*base, "--source", "texture"], "--textures"),
        "strengths match no shard": ([*base, "--strengths", "0.9:1"], "no shards"),
        "strengths match no sample": ([*base, "--strengths", "0.19:0.195"], "no bottle samples"),
        "bad strengths": ([*base, "--strengths", "a:b"], "LO:HI"),
        "SIA root missing": (["/nonexistent", *base[1:]], "SIA_ROOT /nonexistent: no such"),
        "holdout 0": ([*base, "--holdout", "0"], "--holdout must be in (0, 1)"),
        "holdout 1": ([*base, "--holdout", "1"], "--holdout must be in (0, 1)"),
        "one normal image": ([*base[:2], str(one), *base[3:]], "at least 2 normal images"),
    }
    for name, (args, expected) in cases.items():
        result = CliRunner().invoke(main, [*args, "--no-progress"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("sia-export: error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])
        assert not out.exists() and (tmp_path / "afile").read_text() == "x", name


def _letterboxed(root: Path, category: str, names: list[str]) -> dict[str, np.ndarray]:
    return {n: _normal(root, category, n)[0] for n in names}


@pytest.mark.parametrize("layout", ["mvtec", "folder", "webdataset"])
def test_no_anomaly_is_composed_into_a_training_normal(normals, tiny_sia, tmp_path, layout):
    """0 of N anomalies have a training normal as their source: checked from the metadata and
    from the pixels (each anomaly image equals exactly one normal outside its mask)."""
    import webdataset as wds

    out = tmp_path / layout
    args = [str(tiny_sia), "--data", str(normals), "--category", "bottle", "--out", str(out)]
    _run([*args, "--layout", layout, "--per-image", "2", "--holdout", "0.4", "--workers", "0"])
    cat_out = out / "bottle"
    split = json.loads((cat_out / "export.json").read_text())["split"]
    train = [r["data"] for r in split["train"]]
    held = [r["data"] for r in split["held_out"]]
    everything = sorted(p.name for p in (normals / "bottle/train/good").iterdir())
    assert sorted(Path(n).name for n in train + held) == everything
    assert len(held) == 2 and not set(train) & set(held)  # 0.4 of 5
    rows = _rows(cat_out)
    assert len(rows) == 4 and {r["data_normal"] for r in rows} == set(held)
    images = _letterboxed(normals, "bottle", train + held)
    if layout == "webdataset":
        tars = sorted(str(t) for t in (cat_out / "shards").glob("*.tar"))
        pairs = [
            (s["json"], s["png"], s["mask.png"][..., 0])
            for s in wds.WebDataset(tars, shardshuffle=False).decode("rgb8")
        ]
    else:
        pairs = [
            (
                r,
                np.asarray(Image.open(cat_out / r["image"])),
                np.asarray(Image.open(cat_out / r["mask"])),
            )
            for r in rows
        ]
        # The training folder holds exactly the training normals, the test folder the rest.
        for entries, expect in ((split["train"], train), (split["held_out"], held)):
            assert [e["data"] for e in entries] == expect
            for e in entries:
                written = np.asarray(Image.open(cat_out / e["image"]))
                assert np.array_equal(written, images[e["data"]])
        train_dir, test_dir = split["train_dir"], split["test_dir"]
        assert len(list((cat_out / train_dir).iterdir())) == len(train)
        assert len(list((cat_out / test_dir).iterdir())) == len(held)
    assert len(pairs) == 4
    for row, image, mask in pairs:
        outside = mask == 0
        sources = [n for n, im in images.items() if np.array_equal(image[outside], im[outside])]
        assert sources == [row["data_normal"]] and sources[0] in held, (layout, sources)
