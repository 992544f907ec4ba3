"""``publish()``: the whole of ``sia-publish`` as one function (the CLI only parses).

Order: read every shard's stats, verify every tar against them in full (sha256, size,
sample count, keys); stop there, writing nothing, if any shard is bad. Otherwise rebuild
``manifest.parquet`` and ``index.json`` from the stats if they are missing or out of date,
write the card (README.md with Hub front matter, previews, histogram) and, last,
``SHA256SUMS`` over everything published.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sia_pipeline.format.card import (
    PREVIEW_NAME,
    count_table,
    preview_png,
    render_card,
    strength_bins,
)
from sia_pipeline.format.interchange import CROISSANT_NAME, WIDS_NAME
from sia_pipeline.format.manifest import (
    build_index,
    manifest_table,
    read_manifest,
    rebuild_from_stats,
)
from sia_pipeline.format.spec import SPEC_NAME, read_spec, recorded_spec
from sia_pipeline.format.v1 import (
    CARD_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SAMPLE_SCHEMA,
    FormatError,
    ShardStats,
    list_stats_names,
    read_index,
)
from sia_pipeline.format.verify import (
    VERIFY_THREADS,
    ShardCheck,
    layout_problems,
    load_stats,
    verify_shards,
)
from sia_pipeline.io.lease import PUBLISHER, Lease, LeaseHeld, held_elsewhere
from sia_pipeline.io.storage import Storage, open_storage
from sia_pipeline.publish.publish_card import (
    CHECKSUMS_NAME,
    HISTOGRAM_NAME,
    PREVIEWS_PER_BIN,
    category_grid,
    category_previews_markdown,
    checksums_text,
    front_matter,
    pick_preview_keys,
    preview_path,
    provenance_markdown,
    strength_histogram,
)

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The root cannot be published at all (not a dataset, unreadable); names the root."""


@dataclass
class PublishReport:
    """What ``publish`` found and wrote; ``bad`` non-empty means nothing was written."""

    root: str
    checks: list[ShardCheck] = field(default_factory=list)
    samples: int = 0
    rebuilt: str = ""  # why manifest/index were rewritten, "" if they were current
    written: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[ShardCheck]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        if self.bad:
            return f"{len(self.bad)} bad shard(s) under {self.root}; nothing published"
        rebuilt = f"; rebuilt manifest and index ({self.rebuilt})" if self.rebuilt else ""
        return (
            f"verified {len(self.checks)} shard(s), {self.samples} samples{rebuilt}; "
            f"wrote {', '.join(self.written)} under {self.root}"
        )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _index_extra(index: dict[str, Any] | None) -> dict[str, Any]:
    """Top-level index fields that build_index does not derive (model, command, ...)."""
    derived = set(build_index([], None))
    return {k: v for k, v in (index or {}).items() if k not in derived}


def _stale_reason(
    storage: Storage,
    index: dict[str, Any] | None,
    stats: list[ShardStats],
    recorded: tuple[dict[str, Any], dict[str, Any]] | None,
) -> str:
    """Why manifest/index must be rewritten from the stats, or "" if all are current."""
    if index is None:
        return f"{INDEX_NAME} missing or unreadable"
    if index != build_index(stats, index.get("spec"), _index_extra(index)):
        return f"{INDEX_NAME} does not match the shard stats"
    if recorded is not None and index.get("spec") != recorded[0]:
        return f"{INDEX_NAME} lacks the spec recorded in {SPEC_NAME}"
    missing = [n for n in (WIDS_NAME, CROISSANT_NAME) if not storage.exists(n)]
    if missing:
        return f"{' and '.join(missing)} missing"
    if not storage.exists(MANIFEST_NAME):
        return f"{MANIFEST_NAME} missing"
    try:
        current = read_manifest(storage).select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA)
    except (FormatError, pa.ArrowException, OSError) as e:
        return f"{MANIFEST_NAME} unreadable ({type(e).__name__})"
    if not current.equals(manifest_table(stats)):
        return f"{MANIFEST_NAME} does not match the shard stats"
    return ""


def _recorded(
    storage: Storage, index: dict[str, Any] | None, stats: list[ShardStats]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The spec and index fields that made these shards (spec.json, else index.json)."""
    hashes = {s.spec_hash for s in stats}
    if len(hashes) != 1:
        return None
    found = recorded_spec(storage, hashes.pop(), index)
    if found is None:
        return None
    spec, extra = found
    same = index is not None and index.get("spec_hash") == stats[0].spec_hash
    return spec, (_index_extra(index) if same else {}) | extra


def _render_spec(index: dict[str, Any], manifest: pa.Table) -> dict[str, Any]:
    """The index for rendering; a lost spec is partly recovered from the sample rows."""
    if index.get("spec") or manifest.num_rows == 0:
        return index
    row = manifest.slice(0, 1).to_pylist()[0]
    spec = {k: row[k] for k in ("sampler", "steps", "eta", "image_format")}
    return dict(index, spec=spec)


def check_root(storage: Storage) -> list[str]:
    """The root's shard stats names, once it is known to be an SIA dataset root.

    Raises:
        PublishError: no shard stats, or a spec.json that fails its schema.
    """
    names = list_stats_names(storage)
    if not names:
        msg = f"no shard stats under {storage.url}/shards: not an SIA dataset root"
        raise PublishError(msg)
    try:  # a spec.json that fails its schema is never rebuilt from, or certified
        read_spec(storage)
    except FormatError as e:
        msg = f"{e}; fix or remove it (nothing was published)"
        raise PublishError(msg) from None
    return names


def verify_root(
    storage: Storage,
    threads: int = VERIFY_THREADS,
    per_bin: int = PREVIEWS_PER_BIN,
    names: list[str] | None = None,
) -> tuple[list[ShardCheck], list[ShardStats], dict[str, str], dict[str, Any] | None]:
    """Every check on a root's shards, with the bytes of the preview samples kept.

    ``names``: the stats names :func:`check_root` returned (checked here when not given).

    Returns:
        (checks, stats, sha256 by stats-file name, index.json or None)
    """
    names = check_root(storage) if names is None else names
    stats, checks, stat_sums = load_stats(storage, names, threads)
    try:
        index = read_index(storage)
    except FormatError as e:
        log.warning("%s; it will be rebuilt from the stats", e)
        index = None
    recorded = _recorded(storage, index, stats)
    spec = recorded[0] if recorded else (index or {}).get("spec")
    keep: set[str] = set()
    rows = [r for s in stats for r in s.samples]
    if rows:
        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in ("key", "category", "strength")} for r in rows]
        )
        bins = strength_bins(table.column("strength").to_numpy(), span=_span({"spec": spec}))
        for cells in pick_preview_keys(table, bins, per_bin).values():
            keep.update(k for cell in cells for k in cell)
    checks += verify_shards(storage, stats, keep, threads)
    checks += layout_problems(storage, stats, spec)
    return checks, stats, stat_sums, index


def _span(index: dict[str, Any] | None) -> tuple[float, float] | None:
    strengths = ((index or {}).get("spec") or {}).get("strengths") or {}
    return tuple(strengths["values"]) if strengths.get("kind") == "uniform" else None


def publish(
    root: str,
    endpoint_url: str | None = None,
    threads: int = VERIFY_THREADS,
    previews_per_bin: int = PREVIEWS_PER_BIN,
) -> PublishReport:
    """Verify a dataset root and, if every shard is sound, write its published card.

    Holds the root's lease (``_lease.json``) while it runs, as ``sia-gen`` does.

    Raises:
        PublishError: no shard stats under ``root``, or a live ``sia-gen`` holds its lease.
        StorageError: the root is unreachable (missing bucket, no credentials).
    """
    storage = open_storage(root, endpoint_url)
    names = check_root(storage)  # not a dataset: refused before the lease writes into it
    # One writer per root: not while sia-gen writes shards (the card would describe half a
    # dataset, the index race its commit), and no sia-gen starts while the card is written.
    try:  # writes nothing when a live driver holds it
        lease = Lease(storage, PUBLISHER).acquire()
    except LeaseHeld as e:
        raise PublishError(held_elsewhere(storage.url, e.holder)) from None
    try:
        return _publish(storage, threads, previews_per_bin, lease, names)
    finally:
        lease.release()


def _publish(
    storage: Storage, threads: int, previews_per_bin: int, lease: Lease, names: list[str]
) -> PublishReport:
    report = PublishReport(storage.url)
    checks, stats, stat_sums, index = verify_root(storage, threads, previews_per_bin, names)
    report.checks = checks
    if report.bad:
        log.warning("%d bad shard(s) under %s; publishing nothing", len(report.bad), storage.url)
        return report

    lease.check()  # still ours after the (long) verification: only then write
    recorded = _recorded(storage, index, stats)
    report.rebuilt = _stale_reason(storage, index, stats, recorded)
    try:  # stats that changed since they were verified: one line, not a traceback
        if report.rebuilt:
            log.info("rebuilding %s and %s: %s", MANIFEST_NAME, INDEX_NAME, report.rebuilt)
            spec, extra = recorded or ((index or {}).get("spec") or {}, _index_extra(index))
            manifest, index = rebuild_from_stats(storage, spec, extra, False)
            report.written += [MANIFEST_NAME, INDEX_NAME, WIDS_NAME, CROISSANT_NAME]
        else:
            manifest = manifest_table(stats)
    except FormatError as e:
        msg = f"{e} (was the root written to while sia-publish ran?); rerun sia-publish"
        raise PublishError(msg) from None
    report.samples = manifest.num_rows
    samples = {k: v for c in checks for k, v in c.samples.items()}
    report.written += _write_card(storage, index, manifest, samples, previews_per_bin)

    sums = {s.tar: s.sha256 for s in stats} | stat_sums
    extras = [n for n in (SPEC_NAME,) if storage.exists(n)]
    for name in (MANIFEST_NAME, INDEX_NAME, WIDS_NAME, CROISSANT_NAME, *extras, *report.written):
        if name not in sums:
            sums[name] = _sha(storage.get_bytes(name))
    storage.put_bytes(checksums_text(sums).encode(), CHECKSUMS_NAME)
    report.written.append(CHECKSUMS_NAME)
    return report


def _write_card(
    storage: Storage,
    index: dict[str, Any],
    manifest: pa.Table,
    samples: dict[str, dict[str, bytes]],
    per_bin: int,
) -> list[str]:
    """Histogram, per-category grids, the overall grid and README.md; returns the names."""
    bins = strength_bins(manifest.column("strength").to_numpy(), span=_span(index))
    written = [HISTOGRAM_NAME]
    storage.put_bytes(strength_histogram(manifest, _span(index)), HISTOGRAM_NAME)
    categories = []
    for cat, keys in sorted(pick_preview_keys(manifest, bins, per_bin).items()):
        grid = category_grid(keys, samples, bins)
        if grid is not None:
            storage.put_bytes(grid, preview_path(cat))
            written.append(preview_path(cat))
            categories.append(cat)
    preview: str | None = PREVIEW_NAME
    try:
        storage.put_bytes(preview_png(storage, index, bins), PREVIEW_NAME)
        written.append(PREVIEW_NAME)
    except ValueError as e:  # no decodable sample
        log.warning("no overall preview grid: %s", e)
        preview = None
    body = render_card(_render_spec(index, manifest), count_table(manifest, bins), bins, preview)
    files = [
        f"{CARD_NAME}: this card",
        "shards/CATEGORY/CATEGORY-NNNNNN.tar and .json: the shards and their stats",
        f"{MANIFEST_NAME}, {INDEX_NAME}: one row per sample; spec and shard list",
        f"{SPEC_NAME}: the generation spec, written before the first shard",
        f"{WIDS_NAME}, {CROISSANT_NAME}: wids shard index and Croissant 1.0 metadata",
        f"{PREVIEW_NAME}, previews/CATEGORY.png: preview grids",
        f"{HISTOGRAM_NAME}: strength histogram, stacked by category",
        f"{CHECKSUMS_NAME}: sha256 of every file above",
    ]
    text = "\n".join(
        [
            front_matter(index) + body,
            category_previews_markdown(categories) if categories else "",
            provenance_markdown(index, files),
        ]
    )
    storage.put_bytes(text.encode(), CARD_NAME)
    written.append(CARD_NAME)
    return written
