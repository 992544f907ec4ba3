"""What publishing adds to the dataset card of :mod:`card`: Hugging Face front matter, a
strength histogram, one preview grid per category, provenance and checksums.

The counts table, the overall preview grid and the "how it was made" text stay in
:mod:`card`; this module only renders the extras, so ``sia-gen``'s card and the published
one never disagree on the shared parts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from sia_pipeline.format.card import StrengthBin, bin_of
from sia_pipeline.format.preview import make_grid, png_bytes
from sia_pipeline.format.v1 import SHARDS_DIR, decode_image

HISTOGRAM_NAME = "strength_histogram.png"
PREVIEWS_DIR = "previews"
CHECKSUMS_NAME = "SHA256SUMS"
PACKAGE = "sia-realnet"
PREVIEWS_PER_BIN = 6
# Matplotlib's "tab10" colours, one per category (cycling).
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
_PALETTE += ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")]
_SIZE_CATEGORIES += [(1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")]


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def preview_path(category: str) -> str:
    return f"{PREVIEWS_DIR}/{category}.png"


def size_category(n: int) -> str:
    return next((label for limit, label in _SIZE_CATEGORIES if n < limit), "n>10M")


def front_matter(index: Mapping[str, Any]) -> str:
    """YAML front matter for the Hub: one WebDataset config for all shards and one per
    category, so ``load_dataset(ROOT)`` and ``load_dataset(ROOT, "bottle")`` both work."""
    from huggingface_hub import DatasetCardData

    cats = sorted(index.get("categories", {}))
    configs = [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": f"{SHARDS_DIR}/*/*.tar"}],
            "default": True,
        }
    ]
    configs += [
        {"config_name": c, "data_files": [{"split": "train", "path": f"{SHARDS_DIR}/{c}/*.tar"}]}
        for c in cats
        if c != "default"
    ]
    model = index.get("model", {})
    licence = str(model["license"]).lower() if model.get("license") else "other"
    data = DatasetCardData(
        license=licence,
        pretty_name=f"SIA synthetic anomalies: {', '.join(cats)}",
        size_categories=[size_category(int(index.get("num_samples", 0)))],
        task_categories=["image-segmentation"],
        tags=["webdataset", "synthetic", "anomaly-detection", "industrial", "sdas", "realnet"],
        configs=configs,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def strength_histogram(
    manifest: pa.Table, span: tuple[float, float] | None = None, n_bins: int = 30
) -> bytes:
    """Stacked per-category histogram of strengths as a PNG (width 640, height 320).

    ``span`` is the x range (the spec's uniform range); default: the observed range.
    """
    cats = manifest.column("category").to_numpy(zero_copy_only=False)
    s = manifest.column("strength").to_numpy()
    lo, hi = span or ((float(s.min()), float(s.max())) if s.size else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, n_bins + 1)
    names = sorted(set(cats.tolist()))
    counts = np.stack([np.histogram(s[cats == c], edges)[0] for c in names]) if names else None
    w, h, left, bottom, top = 640, 320, 48, 36, 24
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    plot_w, plot_h = w - left - 130, h - top - bottom
    peak = int(counts.sum(axis=0).max()) if counts is not None and counts.size else 1
    draw.text((left, 4), f"strength histogram ({s.size} images)", fill="black")
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    draw.text((4, top - 4), str(peak), fill="black")
    draw.text((4, top + plot_h - 8), "0", fill="black")
    bar_w = plot_w / n_bins
    for b in range(n_bins):
        y = top + plot_h
        for i in range(len(names)):
            n = int(counts[i, b])
            if not n:
                continue
            bar_h = plot_h * n / max(peak, 1)
            x0 = left + b * bar_w
            draw.rectangle([x0 + 1, y - bar_h, x0 + bar_w - 1, y], fill=_PALETTE[i % 10])
            y -= bar_h
    for frac in (0.0, 0.5, 1.0):
        x = left + frac * plot_w
        draw.text((x - 12, top + plot_h + 6), f"{lo + frac * (hi - lo):.3g}", fill="black")
    draw.text((left + plot_w // 2 - 30, h - 14), "strength s", fill="black")
    for i, name in enumerate(names):
        y = top + 14 * i
        draw.rectangle([w - 124, y + 2, w - 116, y + 10], fill=_PALETTE[i % 10])
        draw.text((w - 110, y), name[:18], fill="black")
    return png_bytes(img)


def pick_preview_keys(
    manifest: pa.Table, bins: Sequence[StrengthBin], per_bin: int = PREVIEWS_PER_BIN
) -> dict[str, list[list[str]]]:
    """Per category, the first ``per_bin`` keys (key order) of each strength bin."""
    picked: dict[str, list[list[str]]] = {}
    rows = zip(
        manifest.column("key").to_pylist(),
        manifest.column("category").to_pylist(),
        manifest.column("strength").to_pylist(),
        strict=True,
    )
    for key, cat, s in sorted(rows):
        cells = picked.setdefault(cat, [[] for _ in bins])
        cell = cells[bin_of(bins, s)]
        if len(cell) < per_bin:
            cell.append(key)
    return picked


def category_grid(
    keys: list[list[str]], samples: Mapping[str, Mapping[str, bytes]], bins: Sequence[StrengthBin]
) -> bytes | None:
    """One category's grid: a row per strength bin, its picked samples left to right."""
    rows, labels = [], []
    for b, row_keys in zip(bins, keys, strict=True):
        images = []
        for k in row_keys:
            member = samples.get(k, {})
            data = next((member[e] for e in ("png", "jpg") if e in member), None)
            if data is not None:
                images.append(decode_image(data))
        if images:
            rows.append(images)
            labels.append(f"s {b.label}")
    if not rows:
        return None
    scale = max(1, 64 // max(rows[0][0].shape[0], 1))
    return png_bytes(make_grid(rows, labels, scale=scale))


def provenance_markdown(index: Mapping[str, Any], files: Sequence[str]) -> str:
    """Model, spec, software and the published files (index.json only: no credentials)."""
    spec = index.get("spec") or {}
    model = index.get("model") or {}
    lines = [
        "## Provenance",
        "",
        f"- model ids: {', '.join(f'`{m}`' for m in index.get('model_ids', [])) or 'unknown'}",
    ]
    if model:
        lines.append(f"- model source: `{model.get('source', 'unknown')}`")
    lines += [
        f"- spec hash: `{index.get('spec_hash', '')}`",
        f"- generated by: {index.get('created_by', 'unknown')}",
        f"- published by: sia-publish ({PACKAGE} {package_version()})",
        f"- format version: {index.get('format_version')}",
    ]
    if not spec:
        lines.append("- spec: not recorded (index.json was rebuilt from the shard stats)")
    else:
        lines += ["", "Generation spec (from `index.json`):", "", "```json"]
        lines += [json.dumps(spec, indent=1, sort_keys=True), "```"]
    lines += [
        "",
        "## Files and integrity",
        "",
        f"Every shard was read in full and matched its stats (sha256, size, sample count) "
        f"before publishing. `{CHECKSUMS_NAME}` lists the sha256 of every file below; check "
        f"a local copy with `sha256sum -c {CHECKSUMS_NAME}`.",
        "",
        *[f"- {f}" for f in files],
        "",
        f"![strength histogram]({HISTOGRAM_NAME})",
        "",
    ]
    return "\n".join(lines)


def category_previews_markdown(categories: Sequence[str]) -> str:
    lines = ["## Previews per category", ""]
    for c in categories:
        lines += [f"### {c}", "", f"![{c}]({preview_path(c)})", ""]
    lines.append("Rows are strength bins; each shows the first samples of that bin (key order).")
    return "\n".join(lines) + "\n"


def checksums_text(sums: Mapping[str, str]) -> str:
    """``sha256sum`` format, sorted by path: ``<hex>  <path>`` per line."""
    return "".join(f"{sums[p]}  {p}\n" for p in sorted(sums))
