"""The training stream: normal images, some turned into composites with SIA or texture sources.

Each sample is a normal image of the category; with the mixing probabilities it stays
normal, or gets an SIA image (streamed shards) or a texture (e.g. DTD) blended in by
:func:`compose_anomaly`. Workers seed their RNG from (seed, node, worker), so a run is
reproducible for a fixed worker count; normal images are dealt out in per-epoch permutations
split across ranks and workers, so none repeats within an epoch-equivalent.

Bad data does not stop the stream: an SIA item that is a bad marker, or a texture that fails
to read, leaves that sample normal and rides along in its ``bad`` field (a JSON list of
``{shard, key, kind, reason}``; the default collate makes a list of them per batch), so the
trainer counts bad data across DataLoader workers and ranks.

With a crop size (``StreamConfig.crop``), each sample is composed at the full size, then
image, clean image and mask are cut to one random ``crop`` x ``crop`` window: the network
trains at the crop's cost on full-size detail, and is evaluated on whole full-size images
(every part of it is convolutional). A composite's window always holds part of its anomaly
(:func:`crop_window`), so cropping does not turn anomalous samples into normal ones, and
half the windows touch each axis's image edges, which every evaluated image has.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from realnet_train.data.sia_stream import BAD, reader_slot
from realnet_train.data.sources import SOURCE_ID, TextureSource
from sia_pipeline.compose import (
    OPACITY_RANGE,
    ForegroundRule,
    compose_anomaly,
    foreground_mask,
)

log = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    size: int
    mix: dict[str, float]
    foreground: ForegroundRule
    seed: int = 0
    crop: int | None = None  # train on random crop x crop windows of the size x size samples


EDGE_SHARE = 0.25
"""Share of crop windows snapped to each end of an axis (so half touch that axis's edges)."""


def crop_window(mask: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a random ``crop`` x ``crop`` window of a square ``mask``.

    Uniform over the image when the mask is empty; otherwise uniform over the windows that
    hold one mask pixel, itself drawn uniformly from the mask's pixels. Either way each axis
    snaps to the image's first or last window with :data:`EDGE_SHARE` each (where that window
    is allowed): uniform windows of a 2x larger image touch its border in under 2 % of draws,
    yet every whole image the network is evaluated on has one, and a border it never trained
    on glows in the anomaly map.
    """
    size = mask.shape[0]
    last = size - crop
    ys, xs = np.nonzero(mask > 0)
    if len(ys) == 0:
        return _origin(0, last, last, rng), _origin(0, last, last, rng)
    i = int(rng.integers(len(ys)))
    y0 = _origin(max(0, ys[i] - crop + 1), min(ys[i], last), last, rng)
    x0 = _origin(max(0, xs[i] - crop + 1), min(xs[i], last), last, rng)
    return y0, x0


def _origin(lo: int, hi: int, last: int, rng: np.random.Generator) -> int:
    """A window origin in ``[lo, hi]``: 0 or ``last`` (an image edge) with EDGE_SHARE each
    where the range reaches them, else uniform."""
    u = rng.random()
    if lo == 0 and u < EDGE_SHARE:
        return 0
    if hi == last and u >= 1 - EDGE_SHARE:
        return last
    return int(rng.integers(lo, hi + 1))


class CompositeStream(IterableDataset):
    """Endless ``{image, clean, mask, source, bad}`` samples (uint8 HWC images, float32 mask).

    Args:
        normals: (N, S, S, 3) uint8 normal training images.
        config: size, mixing probabilities, foreground setting, seed, crop size.
        sia: an iterable of ``{image, ...}`` SIA samples of this category (resampled).
        textures: a :class:`TextureSource`.
    """

    def __init__(
        self,
        normals: np.ndarray,
        config: StreamConfig,
        sia: Any | None = None,
        textures: TextureSource | None = None,
    ) -> None:
        super().__init__()
        if config.mix["sia"] > 0 and sia is None:
            msg = "mix uses 'sia' but no SIA dataset was given (--sia URL)"
            raise ValueError(msg)
        if config.mix["texture"] > 0 and textures is None:
            msg = "mix uses 'texture' but no texture folder was given (--textures DIR)"
            raise ValueError(msg)
        self.normals = normals
        self.config = config
        self.sia = sia
        self.textures = textures
        self.epoch = 0

    def _rng(self) -> np.random.Generator:
        slot, _ = reader_slot()
        self.epoch += 1
        return np.random.default_rng([self.config.seed, slot, self.epoch])

    def _normals(self) -> Iterator[np.ndarray]:
        """This reader's share of each epoch's permutation of the normal images."""
        slot, total = reader_slot()
        n = len(self.normals)
        for epoch in itertools.count():
            perm = np.random.default_rng([self.config.seed, 1 << 20, epoch]).permutation(n)
            mine = perm[slot::total] if n >= total else perm[slot % n :: n]
            for i in mine:
                yield self.normals[i]

    def _source(self, name: str, sia_iter, rng, bad: list[dict]) -> np.ndarray | None:
        """An anomaly source image, or None after recording why it could not be had."""
        size = self.config.size
        if name == "sia":
            item = next(sia_iter)
            if BAD in item:
                bad.append(item[BAD])
                return None
            img = item["image"]
            if img.shape[:2] != (size, size):
                img = np.asarray(
                    Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
                )
            return img
        texture = self.textures.name(rng)
        try:
            return self.textures.sample_named(texture, rng)
        except Exception as e:  # noqa: BLE001 - PIL / storage errors alike
            log.warning("skipping unreadable texture %s: %s", texture, e)
            bad.append(
                {
                    "shard": self.textures.url,
                    "key": texture,
                    "kind": "unreadable",
                    "reason": f"{type(e).__name__}: {e}"[:300],
                }
            )
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.config
        rng = self._rng()
        names = list(cfg.mix)
        probs = np.array([cfg.mix[n] for n in names])
        sia_iter = iter(self.sia) if self.sia is not None and cfg.mix["sia"] > 0 else None
        size = cfg.size
        for clean in self._normals():
            source = names[int(rng.choice(len(names), p=probs))]
            mask = np.zeros((size, size), dtype=np.float32)
            image = clean
            bad: list[dict] = []
            if source != "normal":
                src = self._source(source, sia_iter, rng, bad)
                if src is None:
                    source = "normal"
                else:
                    fg = foreground_mask(clean, cfg.foreground)
                    image, mask = compose_anomaly(clean, src, fg, rng, OPACITY_RANGE[source])
            if cfg.crop is not None and cfg.crop < size:
                y0, x0 = crop_window(mask, cfg.crop, rng)
                window = np.s_[y0 : y0 + cfg.crop, x0 : x0 + cfg.crop]
                image, clean, mask = image[window], clean[window], mask[window]
            yield {
                "image": image,
                "clean": clean,
                "mask": mask,
                "source": SOURCE_ID[source],
                "bad": json.dumps(bad),
            }
