"""The anomaly sources of the training stream, and the mix that picks among them.

Kept free of torch: ``realnet-train`` checks ``--mix`` and ``--textures`` with these before it
imports torch, so a refusal stays quick and small.
"""

from __future__ import annotations

import numpy as np

from realnet_train.data.mvtec import IMAGE_SUFFIXES, decode_rgb
from sia_pipeline.compose import texture_source
from sia_pipeline.io.storage import iter_files, open_storage

SOURCES = ("normal", "sia", "texture")
SOURCE_ID = {name: i for i, name in enumerate(SOURCES)}


def parse_mix(spec: str) -> dict[str, float]:
    """``"normal=0.5,sia=0.5"`` -> probabilities over :data:`SOURCES` (must sum to 1)."""
    mix = dict.fromkeys(SOURCES, 0.0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in mix:
            msg = f"unknown source {name!r} in mix {spec!r}; choose from {SOURCES}"
            raise ValueError(msg)
        try:
            mix[name] = float(value)
        except ValueError:
            msg = f"mix entry {part!r} is not NAME=PROBABILITY"
            raise ValueError(msg) from None
    total = sum(mix.values())
    if not all(0 <= v <= 1 for v in mix.values()) or not abs(total - 1.0) <= 1e-6:
        msg = f"mix {spec!r} must have non-negative probabilities summing to 1 (got {total})"
        raise ValueError(msg)
    return mix


class TextureSource:
    """Random images from a folder tree (DTD: ``images/<class>/*.jpg``), resized and jittered."""

    def __init__(self, root: str, size: int, endpoint_url: str | None = None) -> None:
        self.url = root
        self.storage = open_storage(root, endpoint_url)
        self.names = list(iter_files(self.storage, "", IMAGE_SUFFIXES))
        if not self.names:
            msg = f"no texture images under {root}"
            raise FileNotFoundError(msg)
        self.size = size

    def name(self, rng: np.random.Generator) -> str:
        return self.names[int(rng.integers(len(self.names)))]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A random texture, (size, size, 3) uint8; raises on an unreadable file."""
        return self.sample_named(self.name(rng), rng)

    def sample_named(self, name: str, rng: np.random.Generator) -> np.ndarray:
        """Texture ``name``: as the authors, the whole texture resized, then colour-jittered."""
        data = self.storage.get_bytes(name)
        return texture_source(decode_rgb(data), (self.size, self.size), rng)
