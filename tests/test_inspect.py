"""sia-inspect against a local folder and the loopback S3 server, on a dataset made by the
real sia-gen code: the summary table, one sample by key, and re-sampling a key from the
recorded provenance (bit-identical when untouched, named differences when not)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from generated_dataset import (
    BATCH_SIZE,
    CATEGORIES,
    PER_CATEGORY,
    SHARD_SIZE,
)
from PIL import Image

from sia_pipeline.cli.inspect import main as inspect_main
from sia_pipeline.format.v1 import iter_shard_samples
from sia_pipeline.format.writer import ShardTarWriter, encode_image

TOTAL = PER_CATEGORY * len(CATEGORIES)


def run(*args: str):
    return CliRunner().invoke(inspect_main, list(args), catch_exceptions=False)


def manifest_rows(root) -> dict[str, dict]:
    table = pq.read_table(root / "manifest.parquet")
    return {r["key"]: r for r in table.to_pylist()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_summary_table(where, dataset, request):
    root = str(dataset) if where == "local" else request.getfixturevalue("s3_dataset")
    res = run(root)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    index = json.loads((dataset / "index.json").read_text())
    assert index["spec_hash"] in lines[1] and index["model_ids"][0] in lines[1]
    shards = -(-PER_CATEGORY // SHARD_SIZE)
    rows = manifest_rows(dataset)
    for c in CATEGORIES:
        cells = next(ln for ln in lines if ln.startswith(c + " ")).split()
        assert cells[1:3] == [str(shards), str(PER_CATEGORY)]
        strengths = [r["strength"] for r in rows.values() if r["category"] == c]
        assert float(cells[3]) == pytest.approx(min(strengths), rel=1e-2)
        assert float(cells[4]) == pytest.approx(np.mean(strengths), rel=1e-2)
        assert float(cells[5]) == pytest.approx(max(strengths), rel=1e-2)
    total = next(ln for ln in lines if ln.startswith("all ")).split()
    assert total[1:3] == [str(shards * len(CATEGORIES)), str(TOTAL)]
    every = [r["strength"] for r in rows.values()]
    assert float(total[4]) == pytest.approx(np.mean(every), rel=1e-2)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_key_prints_metadata_and_writes_image(where, dataset, request, tmp_path):
    root = str(dataset) if where == "local" else request.getfixturevalue("s3_dataset")
    key = f"magnetic_tile-000001-{SHARD_SIZE - 1:06d}"
    res = run(root, "--key", key, "--out-dir", str(tmp_path))
    assert res.exit_code == 0, res.output
    meta = json.loads(res.output[: res.output.rindex("}") + 1])
    row = manifest_rows(dataset)[key]
    for field in ("category", "class_id", "strength", "seed", "sample_index", "model_id"):
        assert meta[field] == row[field], field
    stored = next(
        s
        for s in iter_shard_samples(str(dataset / "shards/magnetic_tile/magnetic_tile-000001.tar"))
        if s["__key__"] == key
    )
    path = tmp_path / f"{key}.png"
    assert f"image: {path}" in res.output
    assert path.read_bytes() == stored["png"]
    with Image.open(path) as im:
        assert im.size == (32, 32)


def test_bad_keys_and_roots_exit_2_naming_them(dataset, tmp_path):
    for key, needle in [
        ("bottle-000000-000099", "no sample 'bottle-000000-000099'"),
        ("bottle-000042-000000", "no shard shards/bottle/bottle-000042.tar"),
        ("bottle.000000.000000", "not a format-v1 sample key: 'bottle.000000.000000'"),
    ]:
        res = run(str(dataset), "--key", key, "--out-dir", str(tmp_path))
        assert res.exit_code == 2, key
        assert needle in res.output, res.output
    res = run(str(tmp_path))
    assert res.exit_code == 2 and f"no index.json under {tmp_path}" in res.output


@pytest.mark.parametrize("where", ["local", "s3"])
def test_regenerate_untouched_key_is_bit_identical(where, dataset, request):
    root = str(dataset) if where == "local" else request.getfixturevalue("s3_dataset")
    # Position 2 of a shard is the start of its second batch (batch size 2): it is sampled
    # with the batch positions sia-gen used, from the recorded command.
    key = f"bottle-000001-{BATCH_SIZE:06d}"
    res = run(root, "--regenerate", key)
    assert res.exit_code == 0, res.output
    assert f"{key}: bit-identical: image and metadata" in res.output
    assert f"batch of {SHARD_SIZE - BATCH_SIZE} on cpu" in res.output


def _replace_image(root, category: str, shard: int, key: str) -> None:
    """Rewrite one shard with ``key``'s image inverted (stats updated to match)."""
    tar = root / f"shards/{category}/{category}-{shard:06d}.tar"
    samples = list(iter_shard_samples(str(tar)))
    writer = ShardTarWriter(tar.with_suffix(".new"))
    for s in samples:
        png = s["png"]
        if s["__key__"] == key:
            img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            png = encode_image(255 - img, "png")
        writer.write(s["__key__"], png, "png", json.loads(s["json"]))
    size, sha = writer.close()
    tar.with_suffix(".new").replace(tar)
    stats_path = tar.with_suffix(".json")
    stats = json.loads(stats_path.read_text())
    stats.update(size=size, sha256=sha)
    stats_path.write_text(json.dumps(stats))


def test_regenerate_replaced_image_is_not_identical(local_root, tmp_path):
    key = "bottle-000000-000001"
    _replace_image(local_root, "bottle", 0, key)
    res = run(str(local_root), "--regenerate", key, "--out-dir", str(tmp_path))
    assert res.exit_code == 1
    assert f"{key}: NOT identical: image bytes differ" in res.output
    assert "pixel values differ" in res.output and "metadata differs" not in res.output
    # The regenerated picture is the original one: the inverse of what is stored now.
    with Image.open(tmp_path / f"{key}.regenerated.png") as im:
        regenerated = np.asarray(im.convert("RGB"))
    other = run(str(local_root), "--regenerate", "bottle-000000-000000")
    assert other.exit_code == 0, other.output  # its neighbour in the same shard is intact
    stored = next(
        s
        for s in iter_shard_samples(str(local_root / "shards/bottle/bottle-000000.tar"))
        if s["__key__"] == key
    )
    inverted = np.asarray(Image.open(io.BytesIO(stored["png"])).convert("RGB"))
    assert np.array_equal(regenerated, 255 - inverted)


def test_regenerate_with_the_wrong_model_is_refused(local_root, tmp_path):
    from sia_pipeline.diffusion.model import init_model

    other = tmp_path / "other-model"
    init_model(other, {"bottle": 0, "magnetic_tile": 1}, preset="test", seed=1)
    res = run(str(local_root), "--regenerate", "bottle-000000-000000", "--model", str(other))
    assert res.exit_code == 2
    assert "the dataset needs sdas-" in res.output
