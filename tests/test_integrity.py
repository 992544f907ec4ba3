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

BUNDLED_ID = "sdas-c0ef5731a912e5f3"


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
