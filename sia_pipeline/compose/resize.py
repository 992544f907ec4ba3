"""Fitting images to a square: squash (resize to it) or letterbox (keep the aspect ratio).

``squash`` is what the RealNet authors, PatchCore and most anomaly tools do; it is the
trainer's default. At a given square size it never keeps fewer pixels than letterboxing on
either axis: the long side is scaled alike, the short side is stretched instead of shrunk,
so a thin crack along a 101x256 image keeps 2-3 rows at 128 px where letterboxing leaves it 1.
What it costs is that shapes are stretched. ``letterbox`` (:func:`letterbox`) resizes the
long side and pads the short one, keeping shapes and one scale across images of mixed aspect;
the padding repeats the edge pixels (so a threshold sees no new dark or bright band) and is
split evenly on both sides. Square images are a plain resize either way.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image

Fit = Literal["letterbox", "squash"]
FITS: tuple[str, ...] = get_args(Fit)


def content_box(
    height: int, width: int, size: int, fit: Fit = "letterbox"
) -> tuple[int, int, int, int]:
    """Where an (H, W) image lands in the ``size`` square: (top, left, new_h, new_w)."""
    if fit == "squash":
        return 0, 0, size, size
    scale = size / max(height, width)
    new_h = max(1, min(size, round(height * scale)))
    new_w = max(1, min(size, round(width * scale)))
    return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def letterbox(
    image: np.ndarray,
    size: int,
    resample: int = Image.Resampling.BILINEAR,
    pad: Literal["edge", "zero"] = "edge",
) -> np.ndarray:
    """(H, W[, C]) uint8 -> (size, size[, C]) uint8: long side to ``size``, then padded.

    Args:
        image: the image (or a 0/255 mask, with ``resample=NEAREST`` and ``pad="zero"``).
        size: side of the square result.
        resample: PIL resampling filter.
        pad: ``edge`` repeats the border pixels; ``zero`` pads with 0 (masks).
    """
    h, w = image.shape[:2]
    top, left, new_h, new_w = content_box(h, w, size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    if (new_h, new_w) == (size, size):
        return resized
    widths = [(top, size - new_h - top), (left, size - new_w - left)]
    widths += [(0, 0)] * (resized.ndim - 2)
    return np.pad(resized, widths, mode="edge" if pad == "edge" else "constant")


def content_mask(height: int, width: int, size: int, fit: Fit = "letterbox") -> np.ndarray:
    """(size, size) bool: True where the fitted image has real pixels, not padding."""
    top, left, new_h, new_w = content_box(height, width, size, fit)
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + new_h, left : left + new_w] = True
    return mask


def fit_square(
    image: np.ndarray,
    size: int,
    fit: Fit = "letterbox",
    resample: int = Image.Resampling.BILINEAR,
    pad: Literal["edge", "zero"] = "edge",
) -> np.ndarray:
    """(H, W[, C]) uint8 -> (size, size[, C]) uint8: :func:`letterbox` (aspect kept, padded
    by ``pad``) for ``fit="letterbox"``, a plain resize to the square for ``fit="squash"``."""
    if fit == "letterbox":
        return letterbox(image, size, resample, pad)
    if fit == "squash":
        return np.asarray(Image.fromarray(image).resize((size, size), resample))
    msg = f"unknown fit {fit!r}; choose from {FITS}"
    raise ValueError(msg)
