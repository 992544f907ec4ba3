"""Where anomalies may go: the RealNet authors' foreground rule for each known category.

Each rule is a global threshold (Otsu or triangle) on one channel, which side is the object,
and a binary closing/opening with a square of the authors' size, as in their
``generate_target_foreground_mask`` (MVTec AD, VisA, MPDD, BTAD). Sizes are in pixels of the
image the rule sees (the authors train at 256 px). A category the table does not know gets a
rule chosen by :func:`choose_rule` (``auto``, ``otsu``, ``triangle`` or ``everywhere``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

log = logging.getLogger(__name__)

Method = Literal["otsu", "triangle", "everywhere"]
Channel = Literal["gray", "red", "green", "blue"]
METHODS = ("otsu", "triangle", "everywhere")
CHANNELS = ("gray", "red", "green", "blue")
CHOICES = ("auto", "otsu", "triangle", "everywhere")


@dataclass(frozen=True)
class ForegroundRule:
    """A global-threshold foreground rule.

    Attributes:
        method: ``otsu`` or ``triangle`` threshold, or ``everywhere`` (textures).
        object_is: the side of the threshold that is the object.
        channel: the channel thresholded (``gray`` = OpenCV's RGB->gray).
        close: side of the square closing (0: none), applied first.
        open: side of the square opening (0: none), applied second.
        source: where the rule comes from (the authors' table, or how it was chosen).
    """

    method: Method = "everywhere"
    object_is: Literal["dark", "bright"] = "bright"
    channel: Channel = "gray"
    close: int = 0
    open: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            msg = f"foreground method {self.method!r} not in {METHODS}"
            raise ValueError(msg)
        if self.object_is not in ("dark", "bright"):
            msg = f"foreground object_is {self.object_is!r} not in ('dark', 'bright')"
            raise ValueError(msg)
        if self.channel not in CHANNELS:
            msg = f"foreground channel {self.channel!r} not in {CHANNELS}"
            raise ValueError(msg)

    def describe(self) -> str:
        """One line for logs and cards, e.g. ``otsu, dark object, gray, close 6, open 6``."""
        if self.method == "everywhere":
            text = "everywhere"
        else:
            text = f"{self.method}, {self.object_is} object, {self.channel}"
            text += f", close {self.close}" if self.close else ""
            text += f", open {self.open}" if self.open else ""
        return f"{text} ({self.source})" if self.source else text

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _table() -> dict[str, ForegroundRule]:
    every = ForegroundRule("everywhere")
    table: dict[str, ForegroundRule] = {}

    def add(names: Sequence[str], rule: ForegroundRule, dataset: str) -> None:
        for name in names:
            table[name] = ForegroundRule(**{**rule.to_dict(), "source": f"authors' {dataset} rule"})

    # MVTec AD: closing then opening with a 6 px square.
    add(("carpet", "leather", "tile", "wood", "cable", "transistor"), every, "MVTec AD")
    add(("pill",), ForegroundRule("otsu", "bright", close=6, open=6), "MVTec AD")
    add(
        ("hazelnut", "metal_nut", "toothbrush"),
        ForegroundRule("triangle", "bright", close=6, open=6),
        "MVTec AD",
    )
    add(
        ("bottle", "capsule", "grid", "screw", "zipper"),
        ForegroundRule("otsu", "dark", close=6, open=6),
        "MVTec AD",
    )
    # VisA: PCBs by the blue channel (triangle), the rest bright by Otsu.
    add(("capsules",), every, "VisA")
    add(
        ("pcb1", "pcb2", "pcb3", "pcb4"),
        ForegroundRule("triangle", "bright", "blue", close=8, open=3),
        "VisA",
    )
    add(
        ("candle", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pipe_fryum"),
        ForegroundRule("otsu", "bright", close=3, open=3),
        "VisA",
    )
    # MPDD: Otsu on a per-category channel, closing only.
    add(
        ("bracket_black", "bracket_brown", "connector"),
        ForegroundRule("otsu", "dark", "green", 6),
        "MPDD",
    )
    add(("bracket_white", "tubes"), ForegroundRule("otsu", "bright", "blue", 6), "MPDD")
    add(("metal_plate",), ForegroundRule("otsu", "dark", "gray", 6), "MPDD")
    # BTAD: product 02 is a texture; 01 and 03 are bright by Otsu.
    add(("02",), every, "BTAD")
    add(("01", "03"), ForegroundRule("otsu", "bright", close=15, open=6), "BTAD")
    return table


CATEGORY_RULES: dict[str, ForegroundRule] = _table()


def _channel(image: np.ndarray, channel: Channel) -> np.ndarray:
    image = np.ascontiguousarray(image)
    if channel == "gray":
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(image[..., CHANNELS.index(channel) - 1])


def _square(mask: np.ndarray, side: int, op: Literal["close", "open"]) -> np.ndarray:
    """Binary closing/opening with a ``side`` x ``side`` square, as scikit-image computes it.

    For an even side scikit-image anchors the square at ``side // 2 - 1`` for the first
    operation and at ``side // 2`` for the second (so the pair is a true closing/opening);
    pixels outside the image never count.
    """
    kernel = np.ones((side, side), np.uint8)
    first, second = (side - 1 - side // 2,) * 2, (side // 2,) * 2
    if op == "close":
        return cv2.erode(cv2.dilate(mask, kernel, anchor=first), kernel, anchor=second)
    return cv2.dilate(cv2.erode(mask, kernel, anchor=first), kernel, anchor=second)


def foreground_mask(image: np.ndarray, rule: ForegroundRule) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) bool foreground by ``rule``."""
    h, w = image.shape[:2]
    if rule.method == "everywhere":
        return np.ones((h, w), dtype=bool)
    plane = _channel(image, rule.channel)
    flag = cv2.THRESH_OTSU if rule.method == "otsu" else cv2.THRESH_TRIANGLE
    _, above = cv2.threshold(plane, 100, 1, cv2.THRESH_BINARY | flag)
    fg = above if rule.object_is == "bright" else (1 - above).astype(np.uint8)
    if rule.close > 1:
        fg = _square(fg, rule.close, "close")
    if rule.open > 1:
        fg = _square(fg, rule.open, "open")
    return fg.astype(bool)


def _border(mask: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate(
        [
            mask[:width].ravel(),
            mask[-width:].ravel(),
            mask[:, :width].ravel(),
            mask[:, -width:].ravel(),
        ]
    )


def _polarity(images: Sequence[np.ndarray], method: Method) -> tuple[str, float, float]:
    """Which side of the threshold is the object: the side the image border is not.

    Returns (object_is, share of the border on the background side, object area share).
    """
    flag = cv2.THRESH_OTSU if method == "otsu" else cv2.THRESH_TRIANGLE
    bright_border, bright_area = [], []
    for image in images:
        _, above = cv2.threshold(_channel(image, "gray"), 100, 1, cv2.THRESH_BINARY | flag)
        width = max(1, min(above.shape) // 32)
        bright_border.append(_border(above, width).mean())
        bright_area.append(above.mean())
    border, area = float(np.mean(bright_border)), float(np.mean(bright_area))
    if border <= 0.5:
        return "bright", 1.0 - border, area
    return "dark", border, 1.0 - area


def choose_rule(
    category: str, choice: str | None, samples: Sequence[np.ndarray] = ()
) -> ForegroundRule:
    """The foreground rule for ``category``.

    Args:
        category: the category name; the authors' table is used when it knows it and
            ``choice`` is None.
        choice: None (table, else auto), ``auto``, ``otsu``, ``triangle`` or ``everywhere``.
        samples: a few (H, W, 3) uint8 normal images; ``auto``, ``otsu`` and ``triangle`` read
            which side is the object from them (the side the image border is not).

    Returns:
        The rule, with ``source`` saying why it was chosen. ``auto`` picks Otsu when its
        background side fills at least 90% of the image border and the object covers 5-95%
        of the image, else ``everywhere`` (a texture, or no plain background).
    """
    if choice is None:
        if category in CATEGORY_RULES:
            return CATEGORY_RULES[category]
        choice = "auto"
    if choice not in CHOICES:
        msg = f"foreground {choice!r} not in {CHOICES}"
        raise ValueError(msg)
    if choice == "everywhere":
        return ForegroundRule("everywhere", source="--foreground everywhere")
    if not samples:
        msg = f"--foreground {choice} needs sample images to decide which side is the object"
        raise ValueError(msg)
    method: Method = "triangle" if choice == "triangle" else "otsu"
    object_is, border, area = _polarity(samples, method)
    evidence = f"border {border:.0%} background, object {area:.0%} of the image"
    if choice == "auto" and not (border >= 0.9 and 0.05 <= area <= 0.95):
        rule = ForegroundRule("everywhere", source=f"auto: no plain background ({evidence})")
    else:
        rule = ForegroundRule(
            method, object_is, close=6, open=6, source=f"{choice}: {object_is} object ({evidence})"
        )
    log.info("foreground for %s: %s", category, rule.describe())
    return rule
