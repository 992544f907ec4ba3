"""Streaming reader of SIA shards (format v1) with WebDataset's pipeline stages.

Shards are listed from ``index.json`` (filtered by category and strength range), opened
through :func:`sia_pipeline.format.v1.open_url_stream` (S3 streams through boto3's
``get_object`` body: nothing is downloaded first), and expanded by WebDataset's tar reader.

Training reads epochs: each epoch shuffles the shard list with the same seed on every rank,
then splits it by node (rank) and DataLoader worker the way WebDataset's ``split_by_node`` /
``split_by_worker`` do, so no sample repeats within an epoch-equivalent. With fewer shards than
readers, every reader opens every shard and keeps every ``total``-th sample instead.

Bad data never stops the stream: a shard that fails to open or read (truncated tar) or a
sample that fails to decode, or whose metadata contradicts ``index.json`` (category, strength
outside its shard's span), becomes a :func:`bad_marker` naming shard and key; consumers count
and skip it. A bad sample is one sample however often it is read: each reader reports it
once (later passes skip it quietly), and a shard that broke off is read up to the break on
later passes, its unread samples reported once each, by the one reader that owns them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import pytorch_worker_info

from sia_pipeline.format.v1 import (
    FormatError,
    ShardRef,
    decode_sample,
    list_shards,
    open_url_stream,
    parse_key,
    sample_key,
)

log = logging.getLogger(__name__)

BAD = "__bad__"
STRENGTH_TOL = 1e-6


def bad_marker(shard: str, key: str | None, reason: str, kind: str = "unreadable") -> dict:
    """A stream item standing for a skipped sample: ``{__bad__: {shard, key, kind, reason}}``."""
    reason = " ".join(str(reason).split())[:300]
    log.warning("skipping bad SIA data (%s): shard %s key %s: %s", kind, shard, key, reason)
    return {BAD: {"shard": shard, "key": key, "kind": kind, "reason": reason}}


def is_bad(sample: dict[str, Any]) -> bool:
    return BAD in sample


def is_good(sample: dict[str, Any]) -> bool:
    return BAD not in sample


def reader_slot() -> tuple[int, int]:
    """(this reader's index, number of readers) over all ranks x DataLoader workers."""
    rank, world, worker, workers = pytorch_worker_info()
    return rank * workers + worker, world * workers


def epoch_shards(
    urls: list[str], seed: int | None = 0, epochs: int | None = None
) -> Iterator[dict[str, Any]]:
    """Pipeline source: ``{url, part}`` for this reader, epoch after epoch (forever: None).

    Each epoch permutes ``urls`` with ``(seed, epoch)`` (equal on every rank; ``seed=None``
    keeps the index order), then gives
    reader ``i`` of ``n`` the shards ``perm[i::n]`` (``part`` is None: read the whole shard).
    With fewer shards than readers, each reader gets every shard with ``part = (i, n)``:
    keep samples ``i, i + n, ...`` of it.
    """
    slot, total = reader_slot()
    for epoch in itertools.count() if epochs is None else range(epochs):
        if seed is None:
            perm = np.arange(len(urls))
        else:
            perm = np.random.default_rng([seed, epoch]).permutation(len(urls))
        if len(urls) >= total:
            for j in perm[slot::total]:
                yield {"url": urls[j], "part": None}
        else:
            for j in perm:
                yield {"url": urls[j], "part": (slot, total)}


def _lost_keys(url: str, last_key: str | None, start: int, count: int | None) -> list[str | None]:
    """Keys of a broken shard's unread samples ``start .. count - 1`` (the cut one first).

    Format-v1 keys are ``CATEGORY-SHARD-INDEX``; when the shard's name or count is unknown,
    only the sample being read at the break is named (``last_key``, possibly None).
    """
    try:
        category, number, _ = parse_key(url.rsplit("/", 1)[-1].removesuffix(".tar") + "-000000")
    except FormatError:
        return [last_key]
    if count is None or count <= start:
        return [last_key if last_key is not None else sample_key(category, number, start)]
    return [sample_key(category, number, j) for j in range(start, count)]


def expand_shards(
    src: Iterable[dict[str, Any]],
    endpoint_url: str | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{url, part}`` -> raw samples ``{__key__, __url__, png, json}``.

    A shard that cannot be opened yields one bad marker (key None) the first time. A shard
    that breaks off (truncated tar, cut stream) yields its samples up to the break, then one
    bad marker per sample it did not deliver (``counts``: shard URL -> samples in its index;
    without it, the sample being read), each only by the reader whose ``part`` holds it.
    Later passes read such a shard up to the break and stop there, reporting nothing again.
    """
    broken: dict[str, int] = {}  # url -> complete samples before the break
    unopened: set[str] = set()
    dead = 0  # shards in a row that gave this reader nothing because they are known bad
    for item in src:
        url, part = item["url"], item.get("part")
        last: dict[str, str | None] = {"key": None}

        def members(stream, url=url, last=last) -> Iterator[dict[str, Any]]:
            for m in tar_file_expander([{"url": url, "stream": stream}]):
                if m:
                    last["key"] = m["fname"].split(".", 1)[0]
                yield m

        def mine(j: int, part=part) -> bool:
            return part is None or j % part[1] == part[0]

        if dead > 2 * len(counts or ()) + 2:
            msg = f"no SIA shard gives readable samples (the last {dead} were all known bad)"
            raise FormatError(msg)
        try:
            stream = open_url_stream(url, endpoint_url)
        except Exception as e:  # noqa: BLE001 - any storage failure is one bad shard
            if url in unopened:
                dead += 1
            elif mine(0):
                yield bad_marker(url, None, f"cannot open shard: {e}")
            unopened.add(url)
            continue
        unopened.discard(url)
        limit = broken.get(url)
        complete = given = 0
        try:
            for raw in group_by_keys(members(stream)):
                if limit is not None and complete >= limit:
                    break  # known to break off here: stop before reading into the break
                if mine(complete):
                    given += 1
                    dead = 0
                    yield raw
                complete += 1
        except Exception as e:  # noqa: BLE001 - tarfile / network errors of many types
            if url not in broken:
                broken[url] = complete
                first = str(e.args[0] if e.args else e).split(" @ ")[0]  # wds appends the stream
                reason = f"shard breaks off: {type(e).__name__}: {first}"
                keys = _lost_keys(url, last["key"], complete, (counts or {}).get(url))
                for j, key in enumerate(keys, start=complete):
                    if mine(j):
                        yield bad_marker(url, key, reason)
        finally:
            stream.close()
        if limit is not None and not given:
            dead += 1


def decode_samples(
    src: Iterable[dict[str, Any]],
    strength_range: tuple[float, float] | None = None,
    index: dict[str, ShardRef] | None = None,
    max_dropped: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: raw tar samples -> ``{key, image (H, W, 3) uint8, meta}``.

    Samples outside ``strength_range`` are dropped one by one; more than ``max_dropped`` in
    a row (a range that no sample falls in) raises ``FormatError`` instead of spinning
    forever. A sample that fails to decode or contradicts ``index`` (shard URL ->
    :class:`ShardRef`) becomes a bad marker the first time; later reads of it are skipped
    quietly (more than ``max_dropped`` of those in a row: ``FormatError``, nothing good left).
    """
    dropped = 0
    reported: set[tuple[str, str | None]] = set()  # bad samples this reader has reported
    skipped = 0
    for raw in src:
        if is_bad(raw):
            yield raw
            continue
        url, key = raw.get("__url__", "?"), raw.get("__key__")
        if (url, key) in reported:  # read again on a later pass: skipped, not reported twice
            skipped += 1
            if max_dropped is not None and skipped > max_dropped:
                msg = f"no readable SIA sample left (read {skipped} known bad ones in a row)"
                raise FormatError(msg)
            continue
        try:
            image, meta = decode_sample(raw)
            s = float(meta["strength"])
        except Exception as e:  # noqa: BLE001 - PIL, json and format errors alike
            reported.add((url, key))
            yield bad_marker(url, key, f"{type(e).__name__}: {e}")
            continue
        problem = contradiction(key, meta, s, index.get(url) if index else None)
        if problem:
            reported.add((url, key))
            yield bad_marker(url, key, problem, kind="rejected")
            continue
        if strength_range is not None and not strength_range[0] <= s <= strength_range[1]:
            dropped += 1
            if max_dropped is not None and dropped > max_dropped:
                msg = f"no SIA sample has a strength in {strength_range} (read {dropped} in a row)"
                raise FormatError(msg)
            continue
        dropped = skipped = 0
        yield {"key": key, "image": image, "meta": meta, "shard": url}


def shuffle_good(
    src: Iterable[dict[str, Any]], bufsize: int, initial: int, seed: int
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: WebDataset's shuffle buffer over the good samples; bad markers pass
    straight through, so each (reported once) reaches the consumer as soon as it is found
    instead of waiting its turn in the buffer."""
    from collections import deque

    markers: deque[dict[str, Any]] = deque()

    def good() -> Iterator[dict[str, Any]]:
        for item in src:
            if is_bad(item):
                markers.append(item)
            else:
                yield item

    for item in wds.shuffle(bufsize, initial=initial, seed=seed)(good()):
        while markers:
            yield markers.popleft()
        yield item
    yield from markers


def contradiction(key: str, meta: dict[str, Any], strength: float, ref: ShardRef | None) -> str:
    """Why a sample disagrees with its shard's ``index.json`` entry ('' when it does not)."""
    if not math.isfinite(strength):
        return f"strength {strength} is not a number"
    if ref is None:
        return ""
    try:
        key_category = parse_key(key)[0]
    except FormatError as e:
        return str(e)
    if meta.get("category") != ref.category or key_category != ref.category:
        return f"category {meta.get('category')!r} (key {key!r}) in a {ref.category!r} shard"
    if not ref.strength_min - STRENGTH_TOL <= strength <= ref.strength_max + STRENGTH_TOL:
        return (
            f"strength {strength:g} outside its shard's indexed span "
            f"[{ref.strength_min:g}, {ref.strength_max:g}]"
        )
    return ""


def sia_shards(
    root: str,
    categories: Iterable[str] | None = None,
    strength_range: tuple[float, float] | None = None,
    endpoint_url: str | None = None,
) -> list[ShardRef]:
    """Shards of an SIA dataset matching the filters (``FormatError`` if none)."""
    shards = list_shards(root, categories, strength_range, endpoint_url)
    log.info("SIA %s: %d shards, %d samples", root, len(shards), sum(s.count for s in shards))
    return shards


def sia_pipeline(
    root: str,
    categories: Iterable[str] | None = None,
    strength_range: tuple[float, float] | None = None,
    resampled: bool = True,
    shuffle: int = 0,
    seed: int = 0,
    endpoint_url: str | None = None,
    keep_bad: bool = False,
) -> wds.DataPipeline:
    """An iterable of ``{key, image, meta, shard}`` SIA samples, usable as a DataLoader dataset.

    Args:
        root: dataset root (folder, ``file://`` or ``s3://``).
        categories: keep only these categories (``None``: all).
        strength_range: keep shards and samples with strength in ``[lo, hi]``.
        resampled: endless epochs in seeded shard orders (training); else one pass in index
            order. Either way split across ranks and DataLoader workers with no sample read
            twice per epoch.
        shuffle: sample shuffle buffer size (0: off).
        seed: seeds each epoch's shard order (the same on every rank) and the shuffle buffer.
        endpoint_url: S3 endpoint override (else ``AWS_ENDPOINT_URL``).
        keep_bad: pass bad markers (:func:`is_bad`) downstream for counting; else drop them
            (they are logged either way).
    """
    refs = sia_shards(root, categories, strength_range, endpoint_url)
    index = {r.url: r for r in refs}
    stages: list[Any] = [
        partial(epoch_shards, [r.url for r in refs], *((seed, None) if resampled else (None, 1))),
        wds.pipelinefilter(expand_shards)(endpoint_url, {r.url: r.count for r in refs}),
        wds.pipelinefilter(decode_samples)(strength_range, index, 2 * sum(r.count for r in refs)),
    ]
    if not keep_bad:
        stages.append(wds.select(is_good))
    if shuffle > 0:
        stages.append(wds.pipelinefilter(shuffle_good)(shuffle, min(shuffle, 16), seed))
    return wds.DataPipeline(*stages)
