"""``sia-export``: ready-to-train anomaly image + mask pairs from an SIA dataset (or textures).

The normal training images of a category are split by a seeded hash into training and
held-out ones (``holdout``, :func:`split_normals`). For each held-out image, ``per_image``
composites are made with the composition the trainer uses (:mod:`sia_pipeline.compose`), so
no anomaly's source image is among the training normals, and written in an MVTec AD, anomalib
Folder or WebDataset layout (:mod:`export_layouts`), with ``metadata.jsonl`` (one row per
output, paths relative to the export root) and ``export.json`` (the settings, the split, the
foreground rule, counts). Every output is
seeded from (seed, normal image, k) by hashing, so the same command gives the same bytes;
the work is split into units (:mod:`export_units`) run by Ray (or in-process), each marked
done when written, so a rerun finishes an interrupted export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sia_pipeline.compose import CHOICES, choose_rule, letterbox
from sia_pipeline.export.export_layouts import (
    LAYOUTS,
    NORMAL_DIRS,
    normal_path,
    read_pair,
    rows_json,
)
from sia_pipeline.export.export_units import Job, Output, Unit, read_marker, run_local, run_ray
from sia_pipeline.format.v1 import (
    FormatError,
    ShardStats,
    check_category,
    decode_image,
    iter_shard_samples,
    list_shards,
)
from sia_pipeline.io.storage import (
    IMAGE_SUFFIXES,
    StorageError,
    can_create_in,
    is_s3,
    iter_files,
    join_url,
    nearest_existing,
    open_storage,
)

log = logging.getLogger(__name__)

SOURCES = ("sia", "texture", "both")
UNIT_OUTPUTS = 64
UNIT_NORMALS = 256
HOLDOUT = 0.2  # default share of the normal images held out for testing
SPEC_NAME = ".export/spec.json"
EXPORT_NAME = "export.json"
METADATA_NAME = "metadata.jsonl"
PREVIEW_NAME = "preview.png"


class ExportError(ValueError):
    """Bad input: exits 2 before anything is written."""


class ExportFailed(RuntimeError):
    """Units still failing after retries: exits 1; a rerun finishes them."""


@dataclass(frozen=True)
class ExportSpec:
    """The settings that decide the bytes of an export (saved as ``.export/spec.json``)."""

    category: str
    data: str
    sia: str | None
    textures: str | None
    per_image: int
    layout: str
    source: str
    seed: int
    size: int
    foreground: str | None
    strengths: tuple[float, float] | None
    holdout: float = HOLDOUT


def output_seed(seed: int, normal: str, k: int, purpose: str = "compose") -> int:
    """A 63-bit seed hashed from (seed, normal image path, k, purpose): order-independent."""
    digest = hashlib.sha256(f"{seed}\0{normal}\0{k}\0{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def split_normals(
    normals: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training, held-out) normal images: the ``round(fraction * n)`` images (at least one,
    at most ``n - 1``) with the lowest seeded hash of their path are held out. Each image's
    hash depends only on (seed, its path), not on the listing order; both lists keep the
    order of ``normals``.

    Raises:
        ExportError: ``fraction`` is not in (0, 1), or fewer than 2 images to split.
    """
    if not 0 < fraction < 1:
        msg = f"--holdout must be in (0, 1), got {fraction}"
        raise ExportError(msg)
    n = len(normals)
    if n < 2:
        msg = f"--holdout needs at least 2 normal images (one to train on, one to test), got {n}"
        raise ExportError(msg)
    k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    ranked = sorted(normals, key=lambda name: (output_seed(seed, name, 0, "holdout"), name))
    held = set(ranked[:k])
    return [m for m in normals if m not in held], [m for m in normals if m in held]


def _check_out(out: str, endpoint_url: str | None) -> None:
    """--out must be writable; checked without creating anything."""
    if is_s3(out):
        try:
            open_storage(out, endpoint_url).check_writable()
        except StorageError as e:
            msg = f"--out {out} is not writable: {e}"
            raise ExportError(msg) from None
        return
    path = Path(out.removeprefix("file://")).expanduser()
    if path.exists() and not path.is_dir():
        msg = f"--out {out} exists and is not a folder"
        raise ExportError(msg)
    parent = nearest_existing(path)
    if not can_create_in(parent):
        msg = f"--out {out} is not writable ({parent} does not accept new files)"
        raise ExportError(msg)


def _sia_samples(spec: ExportSpec, endpoint_url: str | None) -> list[tuple[str, str, float]]:
    """(shard url, key, strength) of every SIA sample of the category in the strength range."""
    try:
        shards = list_shards(spec.sia or "", [spec.category], spec.strengths, endpoint_url)
    except (FormatError, StorageError, FileNotFoundError) as e:
        msg = f"SIA root {spec.sia}: {e}"
        raise ExportError(msg) from None
    samples = []
    for shard in shards:
        base, _, tar = shard.url.rpartition("/")
        stats_name = tar.removesuffix(".tar") + ".json"
        try:
            stats = ShardStats.from_json(open_storage(base, endpoint_url).get_bytes(stats_name))
            known = {s["key"]: float(s["strength"]) for s in stats.samples if "key" in s}
        except (FileNotFoundError, FormatError):
            stats, known = None, {}
        if stats is None or len(known) != len(stats.keys):  # no per-sample stats: read the tar
            known = {
                raw["__key__"]: float(json.loads(raw["json"])["strength"])
                for raw in iter_shard_samples(shard.url, endpoint_url)
            }
        lo, hi = spec.strengths or (-np.inf, np.inf)
        samples += [(shard.url, k, s) for k, s in sorted(known.items()) if lo <= s <= hi]
    if not samples:
        msg = (
            f"SIA root {spec.sia} has no {spec.category} samples with strength in {spec.strengths}"
        )
        raise ExportError(msg)
    return samples


def plan_units(
    spec: ExportSpec,
    train: Sequence[str],
    held: Sequence[str],
    sia: Sequence[tuple[str, str, float]],
    textures: Sequence[str],
) -> list[Unit]:
    """Every output (composed into a held-out normal ``held``), its source and seed, grouped
    into units (SIA by shard, then textures), then the normal images to write (file layouts:
    ``train``, then ``held``)."""
    outputs = []
    for i, normal in enumerate(held):
        for k in range(spec.per_image):
            pick = np.random.default_rng(output_seed(spec.seed, normal, k, "pick"))
            source = spec.source
            if source == "both":
                source = "sia" if pick.random() < 0.5 else "texture"
            if source == "sia":
                url, ref, strength = sia[int(pick.integers(len(sia)))]
            else:
                url, ref, strength = None, textures[int(pick.integers(len(textures)))], None
            seed = output_seed(spec.seed, normal, k)
            outputs.append(
                (url, Output(i * spec.per_image + k, normal, k, source, ref, strength, seed))
            )
    units: list[Unit] = []
    groups: dict[str | None, list[Output]] = {url: [] for url, _, _ in sia}  # shard order
    groups[None] = []  # texture outputs last
    for url, o in outputs:
        groups[url].append(o)
    for url, group in groups.items():
        for j in range(0, len(group), UNIT_OUTPUTS):
            kind = "sia" if url else "texture"
            chunk = tuple(group[j : j + UNIT_OUTPUTS])
            units.append(Unit(f"{kind}-{len(units):06d}", len(units), kind, url, chunk))
    if spec.layout in NORMAL_DIRS:
        for held_out, names in ((False, train), (True, held)):
            prefix = "heldout" if held_out else "normals"
            for j in range(0, len(names), UNIT_NORMALS):
                chunk_n = tuple(names[j : j + UNIT_NORMALS])
                uid = f"{prefix}-{len(units):06d}"
                units.append(Unit(uid, len(units), "normals", normals=chunk_n, held_out=held_out))
    return units


def prepare(
    spec: ExportSpec, out: str, endpoint_url: str | None = None
) -> tuple[Job, list[Unit], dict[str, Any]]:
    """Check every input, split the normals, choose the foreground rule and plan the units;
    writes nothing. Returns the job, its units and the split (as ``export.json`` records it)."""
    if spec.per_image < 1:
        msg = f"--per-image must be at least 1, got {spec.per_image}"
        raise ExportError(msg)
    if spec.layout not in LAYOUTS or spec.source not in SOURCES:
        msg = f"--layout must be one of {LAYOUTS} and --source one of {SOURCES}"
        raise ExportError(msg)
    if spec.size < 16:
        msg = f"--image-size must be at least 16, got {spec.size}"
        raise ExportError(msg)
    if spec.foreground is not None and spec.foreground not in CHOICES:
        msg = f"--foreground must be one of {CHOICES}, got {spec.foreground!r}"
        raise ExportError(msg)
    try:
        check_category(spec.category)
    except FormatError as e:
        raise ExportError(str(e)) from None
    data_url = join_url(spec.data, spec.category)
    try:
        data = open_storage(data_url, endpoint_url)
        normals = sorted(iter_files(data, "train/good", IMAGE_SUFFIXES))
    except StorageError as e:
        raise ExportError(str(e)) from None
    if not normals:
        msg = f"no normal images under {join_url(data_url, 'train/good')} (unknown category?)"
        raise ExportError(msg)
    train, held = split_normals(normals, spec.holdout, spec.seed)
    names = [normal_path("folder", n) for n in normals]
    if len(set(names)) < len(names):
        same = sorted(n for n in normals if names.count(normal_path("folder", n)) > 1)[:2]
        msg = f"normal images {same} would share one output name (<stem>.png); rename one"
        raise ExportError(msg)
    sia, textures = [], []
    if spec.source in ("sia", "both"):
        if not spec.sia:
            msg = f"--source {spec.source} needs an SIA_ROOT"
            raise ExportError(msg)
        sia = _sia_samples(spec, endpoint_url)
    if spec.source in ("texture", "both"):
        if not spec.textures:
            msg = f"--source {spec.source} needs --textures DIR (e.g. DTD's images/)"
            raise ExportError(msg)
        try:
            textures = sorted(
                iter_files(open_storage(spec.textures, endpoint_url), "", IMAGE_SUFFIXES)
            )
        except StorageError as e:
            raise ExportError(str(e)) from None
        if not textures:
            msg = f"no texture images under {spec.textures}"
            raise ExportError(msg)
    _check_out(out, endpoint_url)
    samples = [
        letterbox(decode_image(data.get_bytes(n), f"normal image {n}"), spec.size)
        for n in normals[:8]
    ]
    rule = choose_rule(spec.category, spec.foreground, samples)
    log.info("%s: foreground rule %s", spec.category, rule.describe())
    job = Job(
        spec.category,
        data_url,
        join_url(out, spec.category),
        spec.layout,
        spec.size,
        rule,
        spec.textures,
        endpoint_url,
        hashlib.sha256(_spec_bytes(spec, rule)).hexdigest()[:16],
    )
    dirs = NORMAL_DIRS.get(spec.layout, (None, None))
    split = {
        "holdout": spec.holdout,
        "method": "the round(holdout * n) normal images with the lowest sha256(seed, path)",
        "anomalies_into": "held-out normal images only",
        "train_dir": dirs[0],
        "test_dir": dirs[1],
        "test_good": "all held-out normal images" if dirs[1] else None,
        "train": [{"data": n, "image": normal_path(spec.layout, n)} for n in train],
        "held_out": [{"data": n, "image": normal_path(spec.layout, n, True)} for n in held],
    }
    return job, plan_units(spec, train, held, sia, textures), split


def _spec_bytes(spec: ExportSpec, rule) -> bytes:
    return json.dumps({**asdict(spec), "rule": rule.to_dict()}, sort_keys=True, indent=1).encode()


@dataclass
class ExportReport:
    out: str
    outputs: int
    units: int
    skipped: int
    seconds: float
    train: int = 0
    held_out: int = 0

    def summary(self) -> str:
        return (
            f"{self.outputs} anomaly pairs on {self.held_out} held-out normal images"
            f" ({self.train} kept for training) in {self.units} units"
            f" ({self.skipped} already done) -> {self.out} in {self.seconds:.1f} s"
        )


def export(
    spec: ExportSpec,
    out: str,
    workers: int | None = None,
    ray_address: str | None = None,
    preview: bool = False,
    progress: bool = True,
    endpoint_url: str | None = None,
) -> ExportReport:
    """Run (or finish) an export. ``workers=0`` runs in this process, else through Ray."""
    import time

    t0 = time.perf_counter()
    job, units, split = prepare(spec, out, endpoint_url)
    storage = open_storage(job.out, endpoint_url)
    spec_json = _spec_bytes(spec, job.rule)
    try:
        previous = storage.get_bytes(SPEC_NAME)
    except FileNotFoundError:
        previous = None
    if previous is not None and previous != spec_json:
        msg = f"{job.out} holds an export with other settings ({SPEC_NAME}); use another --out"
        raise ExportError(msg)
    if previous is None:
        storage.put_bytes(spec_json, SPEC_NAME)
    rows: dict[str, list[dict[str, Any]]] = {}
    todo = []
    for unit in units:
        done = read_marker(storage, unit.uid)
        if done is None:
            todo.append(unit)
        else:
            rows[unit.uid] = done
    log.info(
        "%d units (%d outputs), %d already done",
        len(units),
        sum(len(u.outputs) for u in units),
        len(rows),
    )
    failed: list[str] = []
    bar = tqdm(total=sum(u.size for u in todo), unit="img", desc="sia-export", disable=not progress)

    def on_done(result, unit: Unit) -> None:
        if result.ok:
            rows[unit.uid] = result.rows
        else:
            log.error("unit %s failed: %s", unit.uid, result.error)
            failed.append(f"{unit.uid}: {result.error}")
        bar.update(unit.size)

    if todo and workers == 0:
        run_local(job, todo, on_done)
    elif todo:
        from sia_pipeline.io.raycluster import init_ray

        started = init_ray(ray_address)
        try:
            import ray

            cpus = int(ray.cluster_resources().get("CPU", 1))
            run_ray(job, todo, on_done, workers or cpus)
        except TimeoutError as e:
            raise ExportFailed(str(e)) from None
        finally:
            if started:
                ray.shutdown()
    bar.close()
    if failed:
        msg = f"{len(failed)} unit(s) failed, e.g. {failed[0]}; rerun the same command to finish"
        raise ExportFailed(msg)
    outputs = sorted(
        (r for u in units if u.kind != "normals" for r in rows[u.uid]), key=lambda r: r["index"]
    )
    storage.put_bytes(rows_json(outputs), METADATA_NAME)
    card = {
        "what": "anomaly image + mask pairs made by sia-export",
        "settings": asdict(spec),
        "foreground": {**job.rule.to_dict(), "describe": job.rule.describe()},
        "opacity": {"sia": [0.5, 1.0], "texture": [0.2, 1.0]},
        "outputs": len(outputs),
        "normals": {"train": len(split["train"]), "held_out": len(split["held_out"])},
        "split": split,
        "spec_hash": job.spec_hash,
        "sources": {s: sum(r["source"] == s for r in outputs) for s in ("sia", "texture")},
        "metadata": METADATA_NAME,
    }
    storage.put_bytes(json.dumps(card, indent=1, sort_keys=True).encode() + b"\n", EXPORT_NAME)
    if preview:
        write_preview(storage, spec.layout, outputs)
    return ExportReport(
        job.out,
        len(outputs),
        len(units),
        len(units) - len(todo),
        time.perf_counter() - t0,
        len(split["train"]),
        len(split["held_out"]),
    )


def write_preview(storage, layout: str, rows: Sequence[dict[str, Any]], n: int = 8) -> None:
    """``preview.png``: the first ``n`` outputs as image | mask pairs, two pairs per row."""
    from sia_pipeline.format.preview import make_grid, png_bytes

    tiles = []
    for row in rows[:n]:
        image, mask = read_pair(storage, layout, row)
        tiles += [image, np.repeat(mask[..., None], 3, axis=2)]
    grid = make_grid(
        [tiles[i : i + 4] for i in range(0, len(tiles), 4)],
        col_labels=["image", "mask", "image", "mask"],
    )
    storage.put_bytes(png_bytes(grid), PREVIEW_NAME)
