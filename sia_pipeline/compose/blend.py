"""Blend an anomaly source into a normal image through a Perlin x foreground mask.

As the authors' ``anomaly_source``: ``out = beta m src + (1 - beta) m img + (1 - m) img`` in
float, truncated to uint8, with one opacity ``beta`` per image, uniform in 0.5-1 for SIA
sources and 0.2-1 for textures (their ``sdas_`` / ``dtd_transparency_range``). Outside the
mask the result is the normal image exactly. One departure: when a Perlin draw misses the
foreground, a new one is drawn (up to ``max_tries``) instead of keeping an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sia_pipeline.compose.perlin import perlin_mask

OPACITY_RANGE = {"sia": (0.5, 1.0), "texture": (0.2, 1.0)}


@dataclass(frozen=True)
class Composite:
    """A composed anomaly.

    Attributes:
        image: (H, W, 3) uint8 result.
        mask: (H, W) float32 in {0, 1}, inside the foreground; empty if no draw hit it.
        opacity: the blend opacity beta.
        tries: Perlin draws made.
    """

    image: np.ndarray
    mask: np.ndarray
    opacity: float
    tries: int


def compose(
    normal: np.ndarray,
    source: np.ndarray,
    fg_mask: np.ndarray,
    rng: np.random.Generator,
    opacity_range: tuple[float, float] = OPACITY_RANGE["sia"],
    max_tries: int = 10,
) -> Composite:
    """Blend ``source`` into ``normal`` through a Perlin x foreground mask.

    Args:
        normal: (H, W, 3) uint8 normal image.
        source: (H, W, 3) uint8 anomaly source (SIA image or texture), same size.
        fg_mask: (H, W) bool foreground of ``normal``.
        rng: NumPy generator (all randomness comes from it).
        opacity_range: opacity beta ~ U[lo, hi] for the whole blend.
        max_tries: Perlin draws tried until one overlaps the foreground.
    """
    if normal.shape != source.shape or normal.shape[:2] != fg_mask.shape:
        msg = f"shape mismatch: normal {normal.shape}, source {source.shape}, fg {fg_mask.shape}"
        raise ValueError(msg)
    lo, hi = opacity_range
    if not 0.0 <= lo <= hi <= 1.0:
        msg = f"opacity_range {opacity_range} must satisfy 0 <= lo <= hi <= 1"
        raise ValueError(msg)
    mask = np.zeros(fg_mask.shape, dtype=bool)
    tries = 0
    while tries < max_tries:
        tries += 1
        mask = perlin_mask(fg_mask.shape, rng) & fg_mask
        if mask.any():
            break
    m = mask.astype(np.float64)[..., None]
    beta = float(rng.uniform(lo, hi))
    img = normal.astype(np.float64)
    out = beta * (m * source) + (1 - beta) * (m * img)
    out = (1 - m) * img + out
    return Composite(out.astype(np.uint8), mask.astype(np.float32), beta, tries)


def compose_anomaly(
    normal: np.ndarray,
    source: np.ndarray,
    fg_mask: np.ndarray,
    rng: np.random.Generator,
    opacity_range: tuple[float, float] = OPACITY_RANGE["sia"],
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`compose` returning ``(image (H, W, 3) uint8, mask (H, W) float32)``."""
    c = compose(normal, source, fg_mask, rng, opacity_range, max_tries)
    return c.image, c.mask
