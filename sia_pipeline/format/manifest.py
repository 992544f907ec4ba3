"""``manifest.parquet`` and ``index.json``, rebuilt from the per-shard stats files alone.

The stats files are the source of truth (each is written only after its tar), so the
manifest and index can be rebuilt at any time without reading a tar: ``sia-gen`` does it
after its last shard, ``sia-publish`` after verifying or merging.
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sia_pipeline.format.card import licence_text
from sia_pipeline.format.interchange import write_interchange
from sia_pipeline.format.v1 import (
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    SAMPLE_SCHEMA,
    FormatError,
    ShardStats,
    list_stats_names,
    read_index,
    read_stats,
    shard_done,
)
from sia_pipeline.io.storage import Storage

log = logging.getLogger(__name__)

IO_THREADS = 16


def read_all_stats(storage: Storage, verify_tars: bool = True) -> list[ShardStats]:
    """Every shard's stats under ``shards/``, sorted by shard id.

    Args:
        verify_tars: also HEAD each tar and require its size to match (a done shard).

    Raises:
        FormatError: unreadable stats, or (with ``verify_tars``) a tar missing or of the
            wrong size.
    """
    names = list_stats_names(storage)

    def load(name: str) -> ShardStats:
        stats = shard_done(storage, name) if verify_tars else read_stats(storage, name)
        if stats is None:
            msg = f"shard {name} under {storage.url} is incomplete (tar missing or wrong size)"
            raise FormatError(msg)
        return stats

    with ThreadPoolExecutor(IO_THREADS) as pool:
        stats = list(pool.map(load, names))
    return sorted(stats, key=lambda s: s.shard)


def manifest_table(stats: list[ShardStats]) -> pa.Table:
    """One row per sample, in key order, with the explicit :data:`SAMPLE_SCHEMA`.

    Raises:
        FormatError: stats without sample rows, or a key that occurs twice.
    """
    rows: list[dict[str, Any]] = []
    for s in stats:
        if len(s.samples) != s.count:
            msg = f"stats of shard {s.shard} hold {len(s.samples)} sample rows, expected {s.count}"
            raise FormatError(msg)
        rows.extend(s.samples)
    rows.sort(key=lambda r: r["key"])
    for prev, cur in zip(rows, rows[1:], strict=False):
        if prev["key"] == cur["key"]:
            msg = f"sample key {cur['key']} occurs more than once"
            raise FormatError(msg)
    columns = {f.name: [r.get(f.name) for r in rows] for f in SAMPLE_SCHEMA}
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_manifest(storage: Storage) -> pa.Table:
    """The manifest of a dataset root, checked against :data:`SAMPLE_SCHEMA`."""
    # Decoded on this thread (no Arrow pool thread is left holding the Python bytes: one
    # that drops them during interpreter shutdown aborts the process; see cli._common).
    data = pa.py_buffer(storage.get_bytes(MANIFEST_NAME))
    table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    missing = [n for n in SAMPLE_SCHEMA.names if n not in table.column_names]
    if missing:
        msg = f"{MANIFEST_NAME} under {storage.url} lacks columns {missing}"
        raise FormatError(msg)
    return table


def build_index(
    stats: list[ShardStats], spec: dict[str, Any] | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``index.json`` document: format version, spec, model ids, shards with sha256.

    Deterministic (no timestamps), so rebuilding an unchanged dataset gives equal bytes.
    """
    spec_hashes = sorted({s.spec_hash for s in stats})
    if len(spec_hashes) > 1:
        msg = f"shards of different specs in one dataset: {', '.join(spec_hashes)}"
        raise FormatError(msg)
    categories: dict[str, dict[str, int]] = {}
    model_ids: set[str] = set()
    for s in stats:
        c = categories.setdefault(s.category, {"samples": 0, "shards": 0})
        c["samples"] += s.count
        c["shards"] += 1
        model_ids.update(r["model_id"] for r in s.samples)
        if s.samples:
            c["class_id"] = int(s.samples[0]["class_id"])
    index: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "spec": spec or {},
        "spec_hash": spec_hashes[0] if spec_hashes else "",
        "model_ids": sorted(model_ids),
        "num_samples": sum(s.count for s in stats),
        "num_shards": len(stats),
        "categories": categories,
        "strength_min": min((s.strength_min for s in stats), default=0.0),
        "strength_max": max((s.strength_max for s in stats), default=0.0),
        "manifest": MANIFEST_NAME,
        "shards": [
            {
                "shard": s.shard,
                "category": s.category,
                "tar": s.tar,
                "count": s.count,
                "size": s.size,
                "sha256": s.sha256,
                "strength_min": s.strength_min,
                "strength_max": s.strength_max,
            }
            for s in stats
        ],
    }
    index.update(extra or {})
    return index


def index_bytes(index: dict[str, Any]) -> bytes:
    return json.dumps(index, indent=1, sort_keys=True).encode()


def rebuild_from_stats(
    storage: Storage,
    spec: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    verify_tars: bool = True,
) -> tuple[pa.Table, dict[str, Any]]:
    """Rewrite ``manifest.parquet``, ``index.json`` and, with it, the interchange indexes
    (``index.wids.json``, ``croissant.json``) of a root from its stats files.

    Args:
        spec: the generation spec to record; None keeps the one in the current index.json.
        extra: more top-level index fields (e.g. ``model``, ``created_by``).

    Returns:
        (manifest table, index document) as written.
    """
    if spec is None or extra is None:
        old = read_index(storage) or {}
        spec = spec if spec is not None else old.get("spec")
        if extra is None:
            keep = ("model", "created_by", "command", "classifier")
            extra = {k: old[k] for k in keep if k in old}
    stats = read_all_stats(storage, verify_tars=verify_tars)
    if not stats:
        msg = f"no shard stats under {storage.url}/shards: nothing to index"
        raise FormatError(msg)
    table = manifest_table(stats)
    index = build_index(stats, spec, extra)
    manifest = parquet_bytes(table)
    storage.put_bytes(manifest, MANIFEST_NAME)
    storage.put_bytes(index_bytes(index), INDEX_NAME)
    write_interchange(storage, index, manifest, licence_text(index))
    log.info("indexed %d samples in %d shards under %s", table.num_rows, len(stats), storage.url)
    return table, index
