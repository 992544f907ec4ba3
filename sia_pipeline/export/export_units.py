"""``sia-export`` work units: compose and write a group of anomaly pairs; run them with Ray.

A unit is a small, self-contained piece of an export: the outputs that use one SIA shard
(read once, streamed), a chunk of texture outputs, or a chunk of training or held-out normal
images to write (letterboxed like the outputs).
Each output is composed from its own seed (hashed from the export seed, the normal image
and its number ``k``), so a unit gives the same bytes wherever and whenever it runs. A unit
writes its files, then a marker with its metadata rows; a rerun skips units with markers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sia_pipeline.compose import (
    OPACITY_RANGE,
    ForegroundRule,
    compose,
    content_mask,
    foreground_mask,
    letterbox,
    texture_source,
)
from sia_pipeline.export.export_layouts import normal_path, rows_json, write_pairs
from sia_pipeline.format.v1 import decode_image, decode_sample, iter_shard_samples
from sia_pipeline.format.writer import encode_image
from sia_pipeline.io.storage import open_storage

log = logging.getLogger(__name__)

MARKERS = ".export/units"
MAX_TRIES = 50  # Perlin draws until one meets the foreground


@dataclass(frozen=True)
class Output:
    """One anomaly pair to make: output ``index`` = normal image x composite number ``k``."""

    index: int
    normal: str  # a held-out normal image: its path under the data's category root
    k: int
    source: str  # "sia" or "texture"
    ref: str  # SIA sample key or texture file (relative to the texture root)
    strength: float | None  # the SIA sample's strength
    seed: int  # seeds the composition (Perlin mask, opacity, texture jitter)


@dataclass(frozen=True)
class Unit:
    """A group of outputs from one SIA shard or texture chunk, or normal images to write."""

    uid: str
    number: int
    kind: str  # "sia", "texture" or "normals"
    shard_url: str | None = None
    outputs: tuple[Output, ...] = ()
    normals: tuple[str, ...] = ()
    held_out: bool = False  # normals: the held-out (test) ones, else the training ones

    @property
    def size(self) -> int:
        return len(self.outputs) or len(self.normals)


@dataclass(frozen=True)
class Job:
    """What every unit needs: where to read and write, and how to compose."""

    category: str
    data: str  # the category root (contains train/good)
    out: str  # OUT/CATEGORY
    layout: str
    size: int
    rule: ForegroundRule
    textures: str | None = None
    endpoint_url: str | None = None
    spec_hash: str = ""  # of the export's settings; stamped into webdataset shard stats


@dataclass
class UnitResult:
    uid: str
    ok: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


def marker_name(uid: str) -> str:
    return f"{MARKERS}/{uid}.json"


def _normal(job: Job, data, name: str, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """(letterboxed image, content mask) of one normal image, cached per unit."""
    if name not in cache:
        raw = decode_image(data.get_bytes(name), f"normal image {name}")
        h, w = raw.shape[:2]
        cache[name] = (letterbox(raw, job.size), content_mask(h, w, job.size))
    return cache[name]


def _sia_images(job: Job, unit: Unit) -> dict[str, np.ndarray]:
    """The unit's SIA samples, read in one streamed pass over its shard."""
    wanted = {o.ref for o in unit.outputs}
    found: dict[str, np.ndarray] = {}
    for raw in iter_shard_samples(unit.shard_url or "", job.endpoint_url):
        if raw.get("__key__") in wanted:
            image, _ = decode_sample(raw)
            found[raw["__key__"]] = letterbox(image, job.size)
    missing = wanted - set(found)
    if missing:
        msg = f"{unit.shard_url} lacks samples {sorted(missing)[:3]}"
        raise FileNotFoundError(msg)
    return found


def make_pairs(job: Job, unit: Unit) -> list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """Compose every output of ``unit``: (image (S, S, 3) uint8, mask (S, S) uint8, row)."""
    data = open_storage(job.data, job.endpoint_url)
    textures = open_storage(job.textures, job.endpoint_url) if job.textures else None
    sia = _sia_images(job, unit) if unit.kind == "sia" else {}
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pairs = []
    for o in unit.outputs:
        normal, valid = _normal(job, data, o.normal, cache)
        rng = np.random.default_rng(o.seed)
        if o.source == "sia":
            source = sia[o.ref]
        else:
            assert textures is not None
            source = texture_source(decode_image(textures.get_bytes(o.ref)), normal.shape[:2], rng)
        fg = foreground_mask(normal, job.rule) & valid
        c = compose(normal, source, fg, rng, OPACITY_RANGE[o.source], MAX_TRIES)
        if not c.mask.any():
            log.warning("%s k=%d: no Perlin draw met the foreground", o.normal, o.k)
        row = {
            "index": o.index,
            "normal": normal_path(job.layout, o.normal, held_out=True),
            "data_normal": o.normal,
            "k": o.k,
            "source": o.source,
            "sia_key": o.ref if o.source == "sia" else None,
            "texture": o.ref if o.source == "texture" else None,
            "strength": o.strength,
            "opacity": c.opacity,
            "perlin_seed": o.seed,
            "perlin_tries": c.tries,
            "mask_pixels": int(c.mask.sum()),
            "height": job.size,
            "width": job.size,
        }
        pairs.append((c.image, (c.mask * 255).astype(np.uint8), row))
    return pairs


def run_unit(job: Job, unit: Unit) -> UnitResult:
    """Do one unit and write its marker last; errors come back in the result."""
    import cv2

    cv2.setNumThreads(1)
    try:
        out = open_storage(job.out, job.endpoint_url)
        if unit.kind == "normals":
            data = open_storage(job.data, job.endpoint_url)
            rows = []
            for name in unit.normals:
                dst = normal_path(job.layout, name, unit.held_out)
                if dst is not None:  # letterboxed as the outputs: sizes tell nothing apart
                    image = letterbox(decode_image(data.get_bytes(name)), job.size)
                    out.put_bytes(encode_image(image, "png"), dst)
                    rows.append({"data_normal": name, "image": dst, "held_out": unit.held_out})
        else:
            pairs = make_pairs(job, unit)
            rows = write_pairs(out, job.layout, job.category, unit.number, pairs, job.spec_hash)
        out.put_bytes(rows_json(rows), marker_name(unit.uid))
        return UnitResult(unit.uid, True, rows)
    except Exception as e:  # noqa: BLE001 - reported per unit, retried by the runner
        return UnitResult(unit.uid, False, error=f"{type(e).__name__}: {e}"[:500])


def read_marker(out, uid: str) -> list[dict[str, Any]] | None:
    """A finished unit's rows, or None if it has not finished."""
    try:
        data = out.get_bytes(marker_name(uid))
    except FileNotFoundError:
        return None
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def run_local(job: Job, units: Sequence[Unit], on_done: Callable[[UnitResult, Unit], None]) -> None:
    """Run units one after another in this process (``--workers 0``)."""
    for unit in units:
        on_done(run_unit(job, unit), unit)


def run_ray(
    job: Job,
    units: Sequence[Unit],
    on_done: Callable[[UnitResult, Unit], None],
    workers: int,
    max_attempts: int = 3,
    stall_timeout_s: float = 600.0,
) -> None:
    """Run units as Ray tasks, ``2 * workers`` in flight, retrying failed ones.

    Raises:
        TimeoutError: no unit finished within ``stall_timeout_s`` seconds.
    """
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(run_unit)
    job_ref = ray.put(job)
    queue = list(reversed(units))
    attempts: dict[str, int] = {}
    inflight: dict[Any, Unit] = {}
    while queue or inflight:
        while queue and len(inflight) < 2 * max(1, workers):
            unit = queue.pop()
            inflight[task.remote(job_ref, unit)] = unit
        t0 = time.monotonic()
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=stall_timeout_s)
        if not ready:
            waited = time.monotonic() - t0
            msg = f"no export unit finished in {waited:.0f} s ({len(inflight)} running)"
            raise TimeoutError(msg)
        unit = inflight.pop(ready[0])
        try:
            result: UnitResult = ray.get(ready[0])
        except ray.exceptions.RayError as e:
            result = UnitResult(unit.uid, False, error=str(e).strip().splitlines()[0][:300])
        if not result.ok:
            n = attempts[unit.uid] = attempts.get(unit.uid, 0) + 1
            if n < max_attempts:
                log.warning("retrying export unit %s: %s", unit.uid, result.error)
                queue.append(unit)
                continue
        on_done(result, unit)
