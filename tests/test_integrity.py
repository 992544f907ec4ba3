"""Integrity: the model id covers the card's semantic fields, and a dataset's spec survives
the loss of its index (``spec.json`` at the root, written before the first shard)."""

from __future__ import annotations

import json
import shutil

import pytest

from sia_pipeline.diffusion.model import (
    BUNDLED_MODEL,
    CARD_HASHED_FIELDS,
    ModelError,
    content_hash,
    load_model,
)

BUNDLED_ID = "sdas-333038416170542b"


def _edit_card(folder, **changes):
    path = folder / "model_card.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model, dst)
    return dst


def test_bundled_model_id_covers_its_card():
    card = json.loads((BUNDLED_MODEL / "model_card.json").read_text())
    assert card["model_id"] == BUNDLED_ID == content_hash(BUNDLED_MODEL, card)
    assert load_model(None).model_id == BUNDLED_ID
    assert {"categories", "resolution", "prediction_type"} <= set(CARD_HASHED_FIELDS)


def test_relabelled_resolution_is_refused(model_copy):
    _edit_card(model_copy, resolution=64)
    with pytest.raises(ModelError) as e:
        load_model(model_copy)
    msg = str(e.value)
    assert "\n" not in msg and "corrupt model at" in msg
    assert "the card says 64 px but the UNet is 32 px" in msg


def test_swapped_class_ids_are_refused(model_copy):
    # Swapping the class ids fits the UNet, so only the hash can tell.
    _edit_card(model_copy, categories={"bottle": 1, "magnetic_tile": 0})
    with pytest.raises(ModelError, match="content hash does not match model_id.*categories"):
        load_model(model_copy)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prediction_type", "sample"), ("data_fingerprint", "sha256:0"), ("learn_sigma", True)],
)
def test_any_semantic_field_edit_is_refused(model_copy, field, value):
    _edit_card(model_copy, **{field: value})
    with pytest.raises(ModelError, match="corrupt model at"):
        load_model(model_copy)


def test_descriptive_card_fields_may_change(model_copy):
    before = load_model(model_copy).model_id
    _edit_card(model_copy, notes="retrained on a quiet machine", train_wall_s=1.0)
    assert load_model(model_copy).model_id == before


def test_model_id_differs_with_card_fields(model_copy):
    card = json.loads((model_copy / "model_card.json").read_text())
    other = dict(card, categories={"bottle": 0, "cable": 1})
    assert content_hash(model_copy, card) != content_hash(model_copy, other)


# --- spec.json: the spec survives a lost index ---------------------------------------


def _gen_same(root, model):
    """The generated_dataset fixture's own command, over ``root`` (nothing left to sample)."""
    from generated_dataset import BATCH_SIZE, CATEGORIES, PER_CATEGORY, SHARD_SIZE

    from sia_pipeline.gen.generate import generate

    return generate(
        categories=",".join(CATEGORIES),
        per_category=PER_CATEGORY,
        shard_size=SHARD_SIZE,
        steps=2,
        batch_size=BATCH_SIZE,
        model=str(model),
        out=str(root),
        workers=1,
        progress=False,
    )


def test_spec_json_records_the_spec(local_root):
    from sia_pipeline.format.spec import read_spec
    from sia_pipeline.format.v1 import read_index
    from sia_pipeline.io.storage import open_storage

    storage = open_storage(local_root)
    doc, index = read_spec(storage), read_index(storage)
    assert doc["spec"] == index["spec"] and doc["spec_hash"] == index["spec_hash"]
    assert doc["index_fields"]["model"] == index["model"]
    assert doc["spec"]["seed"] == 0 and doc["spec"]["per_category"] == 6


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_rebuilds_a_lost_index_exactly(where, local_root, s3_root, s3_endpoint):
    from generated_dataset import upload

    from sia_pipeline.io.storage import open_storage
    from sia_pipeline.publish.publish import publish

    root = str(local_root)
    if where == "s3":
        upload(local_root, s3_root, s3_endpoint)
        root = s3_root
    storage = open_storage(root, s3_endpoint)
    original = storage.get_bytes("index.json")
    for name in ("index.json", "manifest.parquet", "index.wids.json", "croissant.json"):
        storage.delete(name)
    report = publish(root, s3_endpoint)
    assert not report.bad and report.rebuilt == "index.json missing or unreadable"
    assert storage.get_bytes("index.json") == original
    card = storage.get_bytes("README.md").decode()
    assert "- seed: 0, spec hash" in card and "- 6 images per category, 3 per shard" in card
    assert "None" not in card


def test_publish_without_spec_or_index_says_unknown(local_root):
    from sia_pipeline.publish.publish import publish

    for name in ("index.json", "spec.json"):
        (local_root / name).unlink()
    assert not publish(str(local_root)).bad
    card = (local_root / "README.md").read_text()
    assert "- seed: unknown" in card and "None" not in card


def test_gen_repairs_an_index_rebuilt_without_its_spec(local_root, tiny_model):
    from sia_pipeline.format.manifest import rebuild_from_stats
    from sia_pipeline.io.storage import open_storage

    original = (local_root / "index.json").read_bytes()
    # What an older sia-publish left behind on a root that had lost index.json.
    rebuild_from_stats(open_storage(local_root), {}, {})
    assert json.loads((local_root / "index.json").read_bytes())["spec"] == {}
    report = _gen_same(local_root, tiny_model)
    assert report.shards_written == 0 and report.indexed
    repaired = json.loads((local_root / "index.json").read_bytes())
    assert repaired["spec"] == json.loads(original)["spec"]
    assert "- seed: 0" in (local_root / "README.md").read_text()


def test_preview_writes_beside_the_model_by_default(tiny_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sia_pipeline.cli.preview import default_out, main

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    monkeypatch.chdir(tmp_path)
    args = ["--strengths", "0", "--per-strength", "1", "--steps", "1"]
    res = CliRunner().invoke(main, [*args, "--model", str(model)])
    assert res.exit_code == 0, res.output
    assert (model / "preview.png").stat().st_size > 0 and f"-> {model}/preview.png" in res.output
    assert not (tmp_path / "docs").exists()
    # The bundled model (inside the package) and s3:// models: the current folder.
    assert default_out(None) == default_out("s3://bucket/m") == "preview.png"


def test_gen_repairs_a_corrupt_index(local_root, tiny_model):
    original = (local_root / "index.json").read_bytes()
    (local_root / "index.json").write_bytes(original[: len(original) // 2])
    report = _gen_same(local_root, tiny_model)
    assert report.shards_written == 0 and report.indexed
    repaired = json.loads((local_root / "index.json").read_bytes())
    expected = json.loads(original)
    assert repaired.pop("command") != expected.pop("command")  # this run's --out
    assert repaired == expected


def test_card_saved_before_ids_covered_it_is_refused_with_a_hint(model_copy):
    from sia_pipeline.diffusion.model import _weights_only_hash

    _edit_card(model_copy, model_id=_weights_only_hash(model_copy))
    with pytest.raises(ModelError, match="covers the weights but not the card .*save the model"):
        load_model(model_copy)
