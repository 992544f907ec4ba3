"""Streaming reader of SIA shards (format v1) with WebDataset's pipeline stages.

Shards are listed from ``index.json`` (filtered by category and strength range), opened
through :func:`sia_pipeline.dataset.format.open_url_stream` (S3 streams through boto3's
``get_object`` body: nothing is downloaded first), and expanded by WebDataset's tar reader.
Training resamples shards forever (each DataLoader worker and node draws its own seeded
sequence); a finite pass splits the shard list across nodes, then workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from sia_pipeline.dataset.format import ShardRef, decode_sample, list_shards, open_url_stream

log = logging.getLogger(__name__)


def open_shards(
    src: Iterable[dict[str, Any]], endpoint_url: str | None = None
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{url}`` -> ``{url, stream}``; each stream is closed once read."""
    for sample in src:
        stream = open_url_stream(sample["url"], endpoint_url)
        try:
            yield {**sample, "stream": stream}
        finally:
            stream.close()


def decode_samples(
    src: Iterable[dict[str, Any]], strength_range: tuple[float, float] | None = None
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: raw tar samples -> ``{key, image (H, W, 3) uint8, meta}``.

    Shards are chosen by their strength span; samples outside ``strength_range`` are
    dropped here, one by one.
    """
    for raw in src:
        image, meta = decode_sample(raw)
        s = float(meta["strength"])
        if strength_range is not None and not strength_range[0] <= s <= strength_range[1]:
            continue
        yield {"key": raw["__key__"], "image": image, "meta": meta}


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
) -> wds.DataPipeline:
    """An iterable of ``{key, image, meta}`` SIA samples, usable as a DataLoader dataset.

    Args:
        root: dataset root (folder, ``file://`` or ``s3://``).
        categories: keep only these categories (``None``: all).
        strength_range: keep shards and samples with strength in ``[lo, hi]``.
        resampled: draw shards with replacement forever (training); else one pass, split
            across nodes and DataLoader workers.
        shuffle: sample shuffle buffer size (0: off).
        seed: seeds shard resampling (mixed with worker and node ids).
        endpoint_url: S3 endpoint override (else ``AWS_ENDPOINT_URL``).
    """
    urls = [s.url for s in sia_shards(root, categories, strength_range, endpoint_url)]
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages += [
        wds.pipelinefilter(open_shards)(endpoint_url),
        wds.pipelinefilter(tar_file_expander)(),
        wds.pipelinefilter(group_by_keys)(),
        wds.pipelinefilter(decode_samples)(strength_range),
    ]
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle, initial=min(shuffle, 16), seed=seed))
    return wds.DataPipeline(*stages)
