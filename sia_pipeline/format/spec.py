"""``spec.json``: a dataset's generation spec, written at its root before the first shard.

``index.json`` is written last, so a root whose run crashed, or that lost its index, still
holds everything needed to rebuild the index exactly: the spec (seed, images per category,
strengths, sampler...) and the top-level fields sia-gen records (model, command). The
stats files say which spec wrote each shard (``spec_hash``); ``spec.json`` is used only
when its hash matches theirs.
"""

from __future__ import annotations

import json
from typing import Any

from sia_pipeline.format.schema import SPEC, SPEC_DOC, load_json, validate
from sia_pipeline.format.v1 import FORMAT_VERSION, FormatError
from sia_pipeline.io.storage import Storage

SPEC_NAME = "spec.json"


def spec_document(spec: dict[str, Any], spec_hash: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``spec.json`` document: the spec, its hash and the index's extra fields."""
    return {
        "format_version": FORMAT_VERSION,
        "spec_hash": spec_hash,
        "spec": spec,
        "index_fields": extra,
    }


def spec_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def read_spec(storage: Storage) -> dict[str, Any] | None:
    """The root's ``spec.json``, or None if it has none.

    Raises:
        FormatError: the file is not JSON or does not match its schema
            (:data:`~sia_pipeline.format.schema.SPEC_DOC`, and
            :data:`~sia_pipeline.format.schema.SPEC` for a non-empty spec: finite
            strengths, a layout of at most a million shards per category...).
    """
    try:
        data = storage.get_bytes(SPEC_NAME)
    except FileNotFoundError:
        return None
    where = f"{SPEC_NAME} under {storage.url}"
    doc = validate(load_json(data, where, FormatError), SPEC_DOC, where, FormatError)
    if doc["spec"]:
        validate(doc["spec"], SPEC, f"{where}, spec", FormatError)
    return doc


def write_spec(
    storage: Storage, spec: dict[str, Any], spec_hash: str, extra: dict[str, Any]
) -> bool:
    """Write ``spec.json`` unless the root already records this spec (a rerun from another
    folder or with another batch size writes nothing: the first run's fields are kept).

    Returns:
        True if it was (re)written.
    """
    try:
        current = read_spec(storage)
    except FormatError:
        current = None
    if current is not None and current["spec_hash"] == spec_hash and current["spec"] == spec:
        return False
    storage.put_bytes(spec_bytes(spec_document(spec, spec_hash, extra)), SPEC_NAME)
    return True


def recorded_spec(
    storage: Storage, spec_hash: str, index: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(spec, extra index fields) for shards of ``spec_hash``: from ``spec.json`` when its
    hash matches, else from an ``index.json`` of that hash that still has its spec; None if
    neither has it (a root made before spec.json existed, that also lost its index)."""
    try:
        doc = read_spec(storage)
    except FormatError:
        doc = None
    if doc is not None and doc["spec_hash"] == spec_hash and doc["spec"]:
        return doc["spec"], dict(doc.get("index_fields") or {})
    if index and index.get("spec") and index.get("spec_hash") == spec_hash:
        return index["spec"], {}
    return None


def shard_ranges(
    per_category: int, shard_size: int, extends: tuple[int, ...] | list[int] = ()
) -> list[tuple[int, int]]:
    """Sample-index ranges [start, stop) of a category's shards, in shard order.

    A dataset grown with ``sia-gen --extend`` keeps its earlier shards as they were:
    ``extends`` lists the earlier images-per-category counts, and each layer
    (``[0, e1)``, ``[e1, e2)``, ..., ``[ek, per_category)``) is cut into shards of
    ``shard_size`` on its own. Without ``extends`` this is the usual layout.
    """
    n = shards_in_layers(per_category, shard_size, extends)
    return [shard_range(per_category, shard_size, extends, k) for k in range(n)]


def _layers(per_category: int, extends) -> list[tuple[int, int]]:
    bounds = [0, *[int(b) for b in extends], int(per_category)]
    return list(zip(bounds, bounds[1:], strict=False))


def shards_in_layers(per_category: int, shard_size: int, extends=()) -> int:
    """How many shards a category has (O(layers), see :func:`shard_ranges`)."""
    return sum(-(-(hi - lo) // shard_size) for lo, hi in _layers(per_category, extends))


def shard_range(per_category: int, shard_size: int, extends, shard: int) -> tuple[int, int]:
    """Sample-index range [start, stop) of one shard (O(layers), see :func:`shard_ranges`)."""
    for lo, hi in _layers(per_category, extends):
        n = -(-(hi - lo) // shard_size)
        if shard < n:
            start = lo + shard * shard_size
            return start, min(start + shard_size, hi)
        shard -= n
    msg = f"shard {shard} is beyond the layout of {per_category} per category"
    raise IndexError(msg)
