"""On-the-fly anomaly composition: Perlin mask x foreground mask, blended with random opacity.

Framework-free (numpy + OpenCV), like anomalib's ``PerlinAnomalyGenerator``: takes a normal
image, an anomaly source image (an SIA sample or a texture), a foreground mask and an RNG,
and returns ``(image, mask)``. The blend mask is the segmentation target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

OPACITY_RANGE = (0.5, 1.0)

ForegroundMethod = Literal["otsu", "triangle", "everywhere"]
_METHODS = ("otsu", "triangle", "everywhere")


@dataclass(frozen=True)
class ForegroundSpec:
    """How to find the object: a global threshold (which side is the object), or everywhere.

    Textures use ``everywhere``; objects on a plain background use Otsu or triangle.
    """

    method: ForegroundMethod = "everywhere"
    object_is: Literal["dark", "bright"] = "dark"
    blur: int = 5
    close: int = 7

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            msg = f"foreground method {self.method!r} not in {_METHODS}"
            raise ValueError(msg)
        if self.object_is not in ("dark", "bright"):
            msg = f"foreground object_is {self.object_is!r} not in ('dark', 'bright')"
            raise ValueError(msg)


# Per-category settings; unknown categories default to "everywhere" (texture-like).
CATEGORY_FOREGROUND: dict[str, ForegroundSpec] = {
    "bottle": ForegroundSpec("otsu", "dark"),
    "screw": ForegroundSpec("triangle", "dark"),
    "capsule": ForegroundSpec("otsu", "dark"),
    "metal_nut": ForegroundSpec("otsu", "bright"),
    "pill": ForegroundSpec("otsu", "bright"),
    "hazelnut": ForegroundSpec("otsu", "bright"),
    "zipper": ForegroundSpec("otsu", "bright"),
    "magnetic_tile": ForegroundSpec("everywhere"),
}


def foreground_spec(category: str) -> ForegroundSpec:
    return CATEGORY_FOREGROUND.get(category, ForegroundSpec("everywhere"))


def foreground_mask(image: np.ndarray, spec: ForegroundSpec) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool foreground by a global threshold (or all True)."""
    h, w = image.shape[:2]
    if spec.method == "everywhere":
        return np.ones((h, w), dtype=bool)
    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if spec.blur > 1:
        gray = cv2.GaussianBlur(gray, (spec.blur | 1, spec.blur | 1), 0)
    flag = cv2.THRESH_OTSU if spec.method == "otsu" else cv2.THRESH_TRIANGLE
    kind = cv2.THRESH_BINARY_INV if spec.object_is == "dark" else cv2.THRESH_BINARY
    _, fg = cv2.threshold(gray, 0, 1, kind | flag)
    if spec.close > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (spec.close, spec.close))
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    return fg.astype(bool)


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator):
    """Classic 2-D gradient (Perlin) noise in about [-1, 1]; ``shape`` divisible by ``res``."""
    if shape[0] % res[0] or shape[1] % res[1]:
        msg = f"perlin shape {shape} is not divisible by res {res}"
        raise ValueError(msg)
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : res[0] / shape[0], 0 : res[1] : res[1] / shape[1]]
    grid = grid.transpose(1, 2, 0) % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(sl0: slice, sl1: slice) -> np.ndarray:
        return grads[sl0, sl1].repeat(d[0], 0).repeat(d[1], 1)

    def dot(g: np.ndarray, s0: int, s1: int) -> np.ndarray:
        return (np.stack((grid[..., 0] + s0, grid[..., 1] + s1), axis=-1) * g).sum(-1)

    n00 = dot(tile(slice(0, -1), slice(0, -1)), 0, 0)
    n10 = dot(tile(slice(1, None), slice(0, -1)), -1, 0)
    n01 = dot(tile(slice(0, -1), slice(1, None)), 0, -1)
    n11 = dot(tile(slice(1, None), slice(1, None)), -1, -1)
    t = _fade(grid)
    n0 = n00 * (1 - t[..., 0]) + t[..., 0] * n10
    n1 = n01 * (1 - t[..., 0]) + t[..., 0] * n11
    return np.sqrt(2) * ((1 - t[..., 1]) * n0 + t[..., 1] * n1)


def perlin_mask(
    size: int, rng: np.random.Generator, threshold: float = 0.5, max_scale: int = 6
) -> np.ndarray:
    """(size, size) bool blobs: thresholded Perlin noise at a random scale, randomly rotated."""
    sx, sy = (2 ** int(rng.integers(0, max_scale)) for _ in range(2))
    side = int(np.ceil(size / 2**max_scale) * 2**max_scale)
    noise = perlin_noise((side, side), (sx, sy), rng)
    angle = float(rng.uniform(-90, 90))
    rot = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    noise = cv2.warpAffine(
        noise.astype(np.float32), rot, (side, side), borderMode=cv2.BORDER_REFLECT
    )
    return noise[:size, :size] > threshold


def compose_anomaly(
    normal: np.ndarray,
    source: np.ndarray,
    fg_mask: np.ndarray,
    rng: np.random.Generator,
    opacity_range: tuple[float, float] = OPACITY_RANGE,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``source`` into ``normal`` through a Perlin x foreground mask.

    Args:
        normal: (H, W, 3) uint8 normal image, H == W.
        source: (H, W, 3) uint8 anomaly source (SIA image or texture), same size.
        fg_mask: (H, W) bool foreground of ``normal``.
        rng: NumPy generator (all randomness comes from it).
        opacity_range: opacity beta ~ U[lo, hi] for the whole blend.
        max_tries: Perlin draws tried until one overlaps the foreground.

    Returns:
        image (H, W, 3) uint8 = (1 - beta m) normal + beta m source, and the blend mask
        m (H, W) float32 in {0, 1}, which lies inside ``fg_mask``. If no draw overlaps the
        foreground (e.g. an empty one) the mask is empty and the image is ``normal``.
    """
    if normal.shape != source.shape or normal.shape[:2] != fg_mask.shape:
        msg = f"shape mismatch: normal {normal.shape}, source {source.shape}, fg {fg_mask.shape}"
        raise ValueError(msg)
    lo, hi = opacity_range
    if not 0.0 <= lo <= hi <= 1.0:
        msg = f"opacity_range {opacity_range} must satisfy 0 <= lo <= hi <= 1"
        raise ValueError(msg)
    size = normal.shape[0]
    mask = np.zeros(fg_mask.shape, dtype=bool)
    for _ in range(max_tries):
        mask = perlin_mask(size, rng) & fg_mask
        if mask.any():
            break
    m = mask.astype(np.float32)
    beta = float(rng.uniform(lo, hi))
    blend = (beta * m)[..., None]
    out = (1.0 - blend) * normal.astype(np.float32) + blend * source.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), m
