"""The dataset card: ``README.md`` with counts per category x strength bin, a preview grid
(``preview.png``), how the data was made and its licence.

Built from the manifest and ``index.json`` only (plus one partial shard read per category
for the preview), so ``sia-publish`` can regenerate it for any format-v1 root.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from sia_pipeline.format.preview import make_grid, png_bytes
from sia_pipeline.format.v1 import CARD_NAME, MANIFEST_NAME, decode_sample
from sia_pipeline.io.storage import Storage

log = logging.getLogger(__name__)

PREVIEW_NAME = "preview.png"
MAX_VALUE_BINS = 10
# Data licences of the bundled demo model's training images (see ../shared/data/README.md).
BUNDLED_DATA_LICENCE = (
    "The bundled demo model was trained on MVTec AD `bottle` (CC BY-NC-SA 4.0) and the "
    "Magnetic-tile defect dataset (research use with citation), so these images are for "
    "non-commercial research use, share-alike, with attribution to both sources."
)

KNOWN_DATA_LICENCES = {
    "mvtec": "MVTec AD: CC BY-NC-SA 4.0 (non-commercial, share-alike, with attribution)",
    "magnetic_tile": "Magnetic-tile surface defects: research use, with citation",
    "dtd": "Describable Textures Dataset: research use, with citation",
}


@dataclass(frozen=True)
class StrengthBin:
    """``lo <= s < hi`` (the last bin includes ``hi``); ``label`` heads a table column."""

    lo: float
    hi: float
    label: str


def strength_bins(
    strengths: Sequence[float], n_bins: int = 4, span: tuple[float, float] | None = None
) -> list[StrengthBin]:
    """One bin per distinct value when there are few (grids, lists), else ``n_bins`` equal
    widths over ``span`` (the spec's range; default: the observed range)."""
    values = np.unique(np.asarray(strengths, dtype=np.float64))
    if values.size == 0:
        return []
    if values.size <= MAX_VALUE_BINS:
        return [StrengthBin(float(v), float(v), f"{v:g}") for v in values]
    lo, hi = span or (float(values[0]), float(values[-1]))
    edges = np.linspace(lo, hi, n_bins + 1)
    bins = []
    for i in range(n_bins):
        close = "]" if i == n_bins - 1 else ")"
        label = f"[{edges[i]:.3g}, {edges[i + 1]:.3g}{close}"
        bins.append(StrengthBin(float(edges[i]), float(edges[i + 1]), label))
    return bins


def bin_of(bins: Sequence[StrengthBin], strength: float) -> int:
    """Index of the bin holding ``strength`` (values outside go to the nearest end)."""
    for i, b in enumerate(bins):
        if b.lo == b.hi and strength == b.lo:
            return i
        if b.lo <= strength < b.hi:
            return i
    return len(bins) - 1 if strength >= bins[-1].lo else 0


def count_table(manifest: pa.Table, bins: Sequence[StrengthBin]) -> dict[str, list[int]]:
    """Samples per category (rows, sorted) and strength bin (columns)."""
    cats = manifest.column("category").to_pylist()
    strengths = manifest.column("strength").to_pylist()
    table: dict[str, list[int]] = {c: [0] * len(bins) for c in sorted(set(cats))}
    for c, s in zip(cats, strengths, strict=True):
        table[c][bin_of(bins, s)] += 1
    return table


def _iter_tar(storage: Storage, tar_name: str):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = storage.open_read(tar_name)
    try:
        yield from group_by_keys(tar_file_expander([{"url": tar_name, "stream": stream}]))
    finally:
        stream.close()


def preview_rows(
    storage: Storage, index: dict[str, Any], bins: Sequence[StrengthBin]
) -> tuple[list[list[np.ndarray]], list[str]]:
    """Per category, the first sample of each strength bin in its first shard."""
    first_shard: dict[str, str] = {}
    for s in index["shards"]:
        first_shard.setdefault(s["category"], s["tar"])
    rows, labels = [], []
    for category in sorted(first_shard):
        cells: list[np.ndarray | None] = [None] * len(bins)
        for sample in _iter_tar(storage, first_shard[category]):
            image, meta = decode_sample(sample)
            i = bin_of(bins, float(meta["strength"]))
            if cells[i] is None:
                cells[i] = image
            if all(c is not None for c in cells):
                break
        filled = [c for c in cells if c is not None]
        if not filled:
            continue
        blank = np.full_like(filled[0], 200)
        rows.append([c if c is not None else blank for c in cells])
        labels.append(category)
    return rows, labels


def preview_png(storage: Storage, index: dict[str, Any], bins: Sequence[StrengthBin]) -> bytes:
    """The preview grid as PNG bytes: rows = categories, columns = strength bins."""
    rows, labels = preview_rows(storage, index, bins)
    scale = max(1, 96 // max(rows[0][0].shape[0], 1)) if rows else 1
    return png_bytes(make_grid(rows, labels, [b.label for b in bins], scale=scale))


def counts_markdown(counts: dict[str, list[int]], bins: Sequence[StrengthBin]) -> str:
    head = "| category | " + " | ".join(f"s {b.label}" for b in bins) + " | total |"
    rule = "|---|" + "---:|" * (len(bins) + 1)
    lines = [head, rule]
    for cat, row in counts.items():
        lines.append(f"| {cat} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    totals = [sum(r[i] for r in counts.values()) for i in range(len(bins))]
    lines.append("| **all** | " + " | ".join(str(n) for n in totals) + f" | {sum(totals)} |")
    return "\n".join(lines)


def licence_text(index: dict[str, Any]) -> str:
    """The model's stated licence, else the terms of the training data it names."""
    model = index.get("model", {})
    if model.get("license"):
        return f"Released under the model's stated licence: {model['license']}."
    data = model.get("data") or []
    data = [data] if isinstance(data, str) else [str(d) for d in data]
    terms = [
        text
        for key, text in KNOWN_DATA_LICENCES.items()
        if any(key in d.lower().replace("-", "_") for d in data)
    ]
    if terms:
        names = ", ".join(f"`{d}`" for d in data)
        return (
            f"Synthetic images derived from a diffusion model trained on {names}; they carry "
            "the terms of that data:\n\n" + "\n".join(f"- {t}" for t in terms)
        )
    if model.get("bundled"):
        return BUNDLED_DATA_LICENCE
    names = f" ({', '.join(f'`{d}`' for d in data)})" if data else ""
    return (
        "Synthetic images derived from a diffusion model trained on real images"
        f"{names}: they carry the licence terms of that training data."
    )


class _Known(dict):
    """A spec whose lost fields (a root without index.json or spec.json) read "unknown"."""

    def get(self, key: str, default: Any = "unknown") -> Any:
        value = super().get(key)
        return default if value is None else value


def render_card(
    index: dict[str, Any],
    counts: dict[str, list[int]],
    bins: Sequence[StrengthBin],
    preview_name: str | None = PREVIEW_NAME,
) -> str:
    """The README.md text of a dataset (no credentials: built from index.json only)."""
    spec = _Known(index.get("spec") or {})
    model = index.get("model", {})
    strengths = _Known(spec.get("strengths", None) or {})
    cats = ", ".join(sorted(index.get("categories", {})))
    parts = [
        f"# SIA dataset: {cats}",
        "",
        "Synthetic Industrial Anomaly (SIA) images made by SDAS (strength-controllable "
        "diffusion anomaly synthesis, RealNet, CVPR 2024): a class-conditional diffusion "
        "model sampled with inflated reverse noise of strength `s`.",
        "",
        f"{index['num_samples']} images in {index['num_shards']} WebDataset shards, "
        f"SIA format version {index['format_version']}, strengths "
        f"{index['strength_min']:.3g} to {index['strength_max']:.3g}.",
        "",
        "## Counts per category and strength",
        "",
        counts_markdown(counts, bins),
        "",
    ]
    if preview_name:
        parts += [
            "## Preview",
            "",
            f"![preview grid]({preview_name})",
            "",
            "One row per category, one column per strength bin: the first sample of that "
            "bin in the category's first shard.",
            "",
        ]
    parts += [
        "## How it was made",
        "",
        f"- model: `{', '.join(index.get('model_ids', []))}`"
        + (f" ({model['resolution']} px)" if model.get("resolution") else "")
        + (f", from `{model['source']}`" if model.get("source") else ""),
        f"- sampler: {spec.get('sampler')}, {spec.get('steps')} steps"
        + (f", eta {spec.get('eta')}" if spec.get("sampler") == "ddim" else "")
        + (
            f"; the strength on timesteps t >= {spec.get('strength_min_t')} only (a departure "
            "from the paper, which applies it on every step)"
            if spec.get("strength_min_t", 0)
            else ""
        ),
        f"- strengths: `{strengths.get('spec')}` ({strengths.get('kind')})",
        f"- seed: {spec.get('seed')}, spec hash `{index.get('spec_hash')}`",
        f"- {spec.get('per_category')} images per category, "
        f"{spec.get('shard_size')} per shard, {spec.get('image_format')}",
    ]
    if index.get("command"):
        parts.append(f"- command: `{index['command']}`")
    parts += [
        "",
        "Each image is a pure function of (model id, category, sample index, seed, "
        "strength spec, sampler config): rerunning the command reproduces it.",
        "",
        "## Layout",
        "",
        "- `shards/CATEGORY/CATEGORY-NNNNNN.tar`: samples `{__key__, "
        f"{spec.get('image_format', 'png')}, json}}`; the `.json` next to it holds the "
        "shard's size, sha256 and sample rows",
        f"- `{MANIFEST_NAME}`: one row per sample; `index.json`: spec, models, shard list",
        "",
        "## Licence",
        "",
        licence_text(index),
        "",
    ]
    return "\n".join(parts)


def write_card(storage: Storage, index: dict[str, Any], manifest: pa.Table) -> str:
    """Write ``preview.png`` and ``README.md`` to the root; returns the card text."""
    strengths = index.get("spec", {}).get("strengths", {})
    span = tuple(strengths["values"]) if strengths.get("kind") == "uniform" else None
    bins = strength_bins(manifest.column("strength").to_numpy(), span=span)
    counts = count_table(manifest, bins)
    preview: str | None = PREVIEW_NAME
    try:
        storage.put_bytes(preview_png(storage, index, bins), PREVIEW_NAME)
    except ValueError as e:  # no decodable sample: a card without a picture
        log.warning("no preview grid: %s", e)
        preview = None
    text = render_card(index, counts, bins, preview)
    storage.put_bytes(text.encode(), CARD_NAME)
    return text
