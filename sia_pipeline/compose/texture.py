"""Texture (DTD) anomaly sources: resized to the image and colour-jittered as the authors do.

The authors' ``rand_augment`` applies 3 distinct ops, in random order, of 10 imgaug
augmenters (gamma contrast, brightness, sharpness, hue/saturation, solarize, posterize, invert,
autocontrast, equalize, rotation). These are the same ops and parameter ranges written with
OpenCV/PIL (imgaug is unmaintained); they follow imgaug's definitions, not its exact bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from sia_pipeline.compose.perlin import rotate

Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _gamma_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=3)  # per channel
    return np.clip(255.0 * (img / 255.0) ** gamma, 0, 255).astype(np.uint8)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30, 30)
    ycc = cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    ycc[..., 0] = np.clip(ycc[..., 0] * mul + add, 0, 255)
    return cv2.cvtColor(ycc.astype(np.uint8), cv2.COLOR_YCrCb2RGB)


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(0.0, 2.0)
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hue, sat = rng.integers(-50, 51, size=2)  # per channel: one value each
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(round(hue * 180 / 255))) % 180  # imgaug's hue is 0-255
    hsv[..., 1] = np.clip(hsv[..., 1] + sat, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() >= 0.5:
        return img
    threshold = rng.uniform(32, 128)
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 9))
    return (img & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - img).astype(np.uint8)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cutoff = float(rng.uniform(0, 20))
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff))


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rotate(img, float(rng.uniform(-45, 45)))


AUGMENTERS: tuple[Op, ...] = (
    _gamma_contrast,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate,
)


def rand_augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply 3 distinct random ops of :data:`AUGMENTERS` to (H, W, 3) uint8 RGB."""
    out = np.ascontiguousarray(img)
    for i in rng.choice(len(AUGMENTERS), 3, replace=False):
        out = np.ascontiguousarray(AUGMENTERS[int(i)](out, rng))
    return out


def texture_source(img: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A texture image as the authors' DTD source: resized to ``shape`` (H, W), then jittered."""
    h, w = shape
    resized = cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_LINEAR)
    return rand_augment(resized, rng)
