"""Perlin-noise blob masks, drawn as the RealNet authors draw them.

The noise is the authors' ``rand_perlin_2d_np`` (same arithmetic, same draws: one
``random((res0 + 1, res1 + 1))`` call for the gradient angles), so with the same RNG state it
gives the same array. The mask follows their ``generate_perlin_noise_mask``: scales ``2**a`` and
``2**b`` with ``a, b`` uniform in ``[0, 6)``, a rotation uniform in [-90, 90] degrees about the
image centre (bilinear, zero outside, as imgaug's ``Affine``), then ``noise > 0.5``.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

PERLIN_SCALE = 6
PERLIN_THRESHOLD = 0.5
ROTATION_RANGE = (-90.0, 90.0)


class UniformSource(Protocol):
    """What the noise needs from an RNG (``np.random.Generator`` and ``RandomState`` have it)."""

    def random(self, size: tuple[int, ...]) -> np.ndarray: ...


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def _lerp(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (y - x) * w + x


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: UniformSource) -> np.ndarray:
    """2-D gradient (Perlin) noise, (H, W) float64 in about [-1, 1].

    Args:
        shape: (H, W), each divisible by the matching ``res``.
        res: number of noise periods along each axis.
        rng: source of the gradient angles (one ``random`` call).
    """
    if shape[0] % res[0] or shape[1] % res[1]:
        msg = f"perlin shape {shape} is not divisible by res {res}"
        raise ValueError(msg)
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    grid = grid[: shape[0], : shape[1]]
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows, cols], d[0], axis=0), d[1], axis=1)

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offset = np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1)
        return (offset * grad[: shape[0], : shape[1]]).sum(axis=-1)

    n00 = dot(tile(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile(slice(1, None), slice(1, None)), (-1, -1))
    t = _fade(grid)
    return np.sqrt(2) * _lerp(_lerp(n00, n10, t[..., 0]), _lerp(n01, n11, t[..., 0]), t[..., 1])


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre like imgaug's ``Affine(rotate=...)``: bilinear, zeros outside.

    Args:
        image: (H, W) or (H, W, C) array.
        degrees: positive turns clockwise on screen (imgaug's convention).
    """
    h, w = image.shape[:2]
    theta = np.deg2rad(degrees)
    cx, cy = w / 2.0 - 0.5, h / 2.0 - 0.5
    cos, sin = np.cos(theta), np.sin(theta)
    # Forward map: shift the centre to the origin, rotate, shift back (imgaug's matrix).
    matrix = np.array([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]])
    return cv2.warpAffine(
        image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    threshold: float = PERLIN_THRESHOLD,
    max_scale: int = PERLIN_SCALE,
) -> np.ndarray:
    """(H, W) bool blobs: thresholded, randomly rotated Perlin noise at a random scale.

    The noise is drawn on the smallest multiple of ``2**max_scale`` covering the shape and
    cropped (for the authors' 256 px that is the shape itself).
    """
    sx, sy = (2 ** int(rng.integers(0, max_scale)) for _ in range(2))
    step = 2**max_scale
    side = (int(np.ceil(shape[0] / step)) * step, int(np.ceil(shape[1] / step)) * step)
    noise = perlin_noise(side, (sx, sy), rng)
    noise = rotate(noise, float(rng.uniform(*ROTATION_RANGE)))
    return noise[: shape[0], : shape[1]] > threshold
