"""Looking inside a published SIA dataset: a summary and one sample (read only).

Re-sampling a key is :mod:`sia_pipeline.gen.regenerate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from sia_pipeline.format.genspec import human_bytes
from sia_pipeline.format.v1 import (
    IMAGE_EXTS,
    MANIFEST_NAME,
    FormatError,
    iter_shard_samples,
    parse_key,
    read_index,
    shard_tar_name,
)
from sia_pipeline.io.storage import Storage, join_url


class InspectError(ValueError):
    """A root or key that cannot be inspected; one line naming it."""


def load_index(storage: Storage) -> dict[str, Any]:
    try:
        index = read_index(storage)
    except FormatError as e:
        raise InspectError(str(e)) from None
    if index is None:
        msg = (
            f"no index.json under {storage.url}: not a finished SIA dataset "
            "(rerun sia-gen to finish it, or sia-publish to rebuild the index)"
        )
        raise InspectError(msg)
    return index


# --- summary -------------------------------------------------------------------------


@dataclass
class CategoryRow:
    category: str
    shards: int = 0
    samples: int = 0
    size: int = 0
    strength_min: float = float("inf")
    strength_max: float = float("-inf")
    strength_mean: float | None = None


def summarize(storage: Storage) -> tuple[dict[str, Any], list[CategoryRow]]:
    """Per-category shards, samples, bytes and strengths from index.json (+ manifest means)."""
    index = load_index(storage)
    rows: dict[str, CategoryRow] = {}
    for s in index["shards"]:
        r = rows.setdefault(s["category"], CategoryRow(s["category"]))
        r.shards += 1
        r.samples += int(s["count"])
        r.size += int(s.get("size", 0))
        r.strength_min = min(r.strength_min, float(s["strength_min"]))
        r.strength_max = max(r.strength_max, float(s["strength_max"]))
    if storage.exists(MANIFEST_NAME):
        from sia_pipeline.format.manifest import read_manifest

        table = read_manifest(storage)
        cats = np.asarray(table.column("category").to_pylist())
        strengths = table.column("strength").to_numpy()
        for r in rows.values():
            picked = strengths[cats == r.category]
            r.strength_mean = float(picked.mean()) if picked.size else None
    return index, [rows[c] for c in sorted(rows)]


def format_summary(root: str, index: dict[str, Any], rows: list[CategoryRow]) -> str:
    """A fixed-width text table with a totals line."""
    head = (
        f"SIA dataset {root}\n"
        f"format {index.get('format_version')}, spec {index.get('spec_hash') or '?'}, "
        f"model {', '.join(index.get('model_ids', [])) or '?'}\n\n"
    )
    fmt = "{:<24} {:>7} {:>9} {:>8} {:>8} {:>8} {:>10}"
    lines = [fmt.format("category", "shards", "samples", "s min", "s mean", "s max", "size")]
    for r in rows:
        mean = f"{r.strength_mean:.3g}" if r.strength_mean is not None else "-"
        lines.append(
            fmt.format(
                r.category,
                r.shards,
                r.samples,
                f"{r.strength_min:.3g}",
                mean,
                f"{r.strength_max:.3g}",
                human_bytes(r.size),
            )
        )
    total = CategoryRow("all")
    for r in rows:
        total.shards += r.shards
        total.samples += r.samples
        total.size += r.size
    means = [(r.strength_mean, r.samples) for r in rows if r.strength_mean is not None]
    mean_all = "-"
    if rows and len(means) == len(rows) and total.samples:
        mean_all = f"{sum(m * n for m, n in means) / total.samples:.3g}"
    lines.append(
        fmt.format(
            "all",
            total.shards,
            total.samples,
            f"{index.get('strength_min', 0):.3g}",
            mean_all,
            f"{index.get('strength_max', 0):.3g}",
            human_bytes(total.size),
        )
    )
    return head + "\n".join(lines)


# --- one sample ----------------------------------------------------------------------


@dataclass
class Sample:
    """One stored sample: its metadata, image bytes and extension, and raw json bytes."""

    key: str
    meta: dict[str, Any]
    image: bytes
    ext: str
    json_bytes: bytes


def find_sample(storage: Storage, key: str, endpoint_url: str | None = None) -> Sample:
    """Stream the key's shard (named by the key itself) up to the key."""
    try:
        category, shard, _ = parse_key(key)
    except FormatError as e:
        raise InspectError(str(e)) from None
    tar = shard_tar_name(category, shard)
    if not storage.exists(tar):
        msg = f"no shard {tar} under {storage.url} for key {key!r}"
        raise InspectError(msg)
    for sample in iter_shard_samples(join_url(storage.url, tar), endpoint_url):
        if sample["__key__"] != key:
            continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "json" not in sample:
            msg = f"sample {key!r} in {tar} lacks an image or json member"
            raise InspectError(msg)
        return Sample(key, json.loads(sample["json"]), sample[ext], ext, sample["json"])
    msg = f"no sample {key!r} in {join_url(storage.url, tar)}"
    raise InspectError(msg)
