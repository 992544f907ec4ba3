"""Manifest, index and dataset card, rebuilt from shard stats written by a real worker."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sia_pipeline.format.card import count_table, render_card, strength_bins, write_card
from sia_pipeline.format.manifest import (
    manifest_table,
    read_all_stats,
    read_manifest,
    rebuild_from_stats,
)
from sia_pipeline.format.v1 import SAMPLE_SCHEMA, FormatError, list_shards, read_index
from sia_pipeline.gen.plan import make_spec, make_tasks
from sia_pipeline.gen.worker import SamplerWorker
from sia_pipeline.io.storage import open_storage


@pytest.fixture(scope="module")
def root(tiny_model, tmp_path_factory):
    """A root with three shards (two categories) written by a real worker, not yet indexed."""
    out = tmp_path_factory.mktemp("manifest") / "root"
    worker = SamplerWorker(str(tiny_model), str(out), device="cpu", threads=1)
    spec = make_spec(
        model_id=worker.model.model_id,
        model_categories=worker.model.categories,
        resolution=32,
        strengths="0.1,0.3",
        per_category=5,
        shard_size=3,
        categories="bottle,magnetic_tile",
    )
    tasks = make_tasks(spec, batch_size=4)[:3]
    assert all(worker(t).ok for t in tasks)
    return out, spec


def test_rebuild_writes_manifest_then_index(root):
    out, spec = root
    storage = open_storage(str(out))
    table, index = rebuild_from_stats(storage, spec.to_dict(), {"created_by": "test"})
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert read_manifest(storage).equals(table)
    assert table.num_rows == 3 + 2 + 3 == index["num_samples"]
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    assert index["format_version"] == 1 and index["spec_hash"] == spec.spec_hash
    assert index["categories"] == {
        "bottle": {"samples": 5, "shards": 2, "class_id": 0},
        "magnetic_tile": {"samples": 3, "shards": 1, "class_id": 1},
    }
    assert [s["shard"] for s in index["shards"]] == [
        "bottle-000000",
        "bottle-000001",
        "magnetic_tile-000000",
    ]
    assert read_index(storage) == index
    # The reader API finds the shards through the index just written.
    assert [r.count for r in list_shards(str(out), categories=["bottle"])] == [3, 2]


def test_rebuild_is_deterministic_and_keeps_the_recorded_spec(root):
    out, spec = root
    storage = open_storage(str(out))
    rebuild_from_stats(storage, spec.to_dict(), {"created_by": "test"})
    first = (storage.get_bytes("index.json"), storage.get_bytes("manifest.parquet"))
    _, index = rebuild_from_stats(storage)  # what sia-publish does: no spec given
    assert index["spec"] == spec.to_dict() and index["created_by"] == "test"
    assert (storage.get_bytes("index.json"), storage.get_bytes("manifest.parquet")) == first


def test_duplicate_keys_are_refused(root):
    stats = read_all_stats(open_storage(str(root[0])))
    with pytest.raises(FormatError, match="occurs more than once"):
        manifest_table(stats + stats[:1])


def test_truncated_tar_is_not_a_done_shard(root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root[0], copy)
    tar = copy / "shards/bottle/bottle-000001.tar"
    tar.write_bytes(tar.read_bytes()[:512])
    with pytest.raises(FormatError, match="bottle-000001.json .* incomplete"):
        read_all_stats(open_storage(str(copy)))


def test_strength_bins_per_value_or_equal_width():
    grid = strength_bins([0.1, 0.2, 0.1, 0.3])
    assert [b.label for b in grid] == ["0.1", "0.2", "0.3"]
    uniform = strength_bins(np.linspace(0.11, 0.49, 40), span=(0.1, 0.5))
    assert [b.label for b in uniform] == ["[0.1, 0.2)", "[0.2, 0.3)", "[0.3, 0.4)", "[0.4, 0.5]"]
    table = pa.table({"category": ["a", "a", "b", "b"], "strength": [0.1, 0.45, 0.5, 0.2]})
    assert count_table(table, uniform) == {"a": [1, 0, 0, 1], "b": [0, 1, 0, 1]}


def test_card_counts_preview_and_licence(root):
    out, spec = root
    storage = open_storage(str(out))
    table, index = rebuild_from_stats(storage, spec.to_dict(), {"model": {"bundled": True}})
    text = write_card(storage, index, table)
    assert "| bottle | 3 | 2 | 5 |" in text  # round-robin over 0.1, 0.3 for indices 0..4
    assert "| magnetic_tile | 2 | 1 | 3 |" in text
    assert "| **all** | 5 | 3 | 8 |" in text
    assert "CC BY-NC-SA 4.0" in text
    assert storage.get_bytes("README.md").decode() == text
    grid = Image.open(io.BytesIO(storage.get_bytes("preview.png")))
    assert grid.width > 2 * 32 and grid.height > 2 * 32  # two rows, two columns, upscaled


def test_card_names_a_stated_licence():
    index = {
        "num_samples": 1,
        "num_shards": 1,
        "format_version": 1,
        "strength_min": 0.1,
        "strength_max": 0.1,
        "model": {"license": "CC-BY-4.0", "resolution": 32, "source": "s3://m/x"},
        "categories": {"bottle": {}},
    }
    text = render_card(index, {"bottle": [1]}, strength_bins([0.1]), preview_name=None)
    assert "CC-BY-4.0" in text and "preview" not in text.lower().split("## how")[0]


def test_licence_follows_the_training_data_the_model_names():
    from sia_pipeline.format.card import licence_text

    text = licence_text({"model": {"data": ["../shared/data/mvtec_ad", "/d/magnetic_tile"]}})
    assert "CC BY-NC-SA 4.0" in text and "Magnetic-tile" in text
    assert "terms of that training data" in licence_text({"model": {"data": "s3://x/y"}})
