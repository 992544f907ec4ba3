"""MVTec-layout category reader from a folder or ``s3://``.

Layout under ``ROOT/CATEGORY``: ``train/good/*``, ``test/<type>/*`` (``good`` is normal) and,
optionally, ``ground_truth/<type>/<stem>_mask.png`` for defective test images. A test split
whose defective images do not all have masks (many real sets are labelled per image only) is
read with ``has_masks = False``: it can be evaluated at image level only.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from sia_pipeline.compose.resize import Fit, content_mask, fit_square
from sia_pipeline.io.storage import (
    IMAGE_SUFFIXES,
    Storage,
    iter_files,
    join_url,
    open_storage,
)

log = logging.getLogger(__name__)

GOOD = "good"


@dataclass(frozen=True)
class MVTecItem:
    """One image of a split: path relative to the category root, label 0/1, its mask path."""

    image: str
    label: int
    defect: str
    mask: str | None = None


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def decode_rgb(data: bytes, size: int | None = None, fit: Fit = "letterbox") -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8 RGB (grayscale becomes 3 equal channels).

    By default a non-square image keeps its aspect ratio: the long side becomes ``size`` and
    the short one is edge-padded; ``fit="squash"`` resizes it to the square instead
    (:func:`sia_pipeline.compose.resize.fit_square`).
    """
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return rgb if size is None else fit_square(rgb, size, fit)


def decode_mask(data: bytes, size: int | None = None, fit: Fit = "letterbox") -> np.ndarray:
    """Mask PNG bytes -> (size, size) bool, nearest-neighbour, fitted as its image (padding 0)."""
    with Image.open(io.BytesIO(data)) as im:
        mask = np.asarray(im.convert("L"), dtype=np.uint8)
    if size is not None:
        mask = fit_square(mask, size, fit, Image.Resampling.NEAREST, pad="zero")
    return mask > 127


class MVTecCategory:
    """The train and test splits of one category, read lazily through :mod:`storage`.

    Images and masks are fitted to the square sizes asked for by ``fit`` (letterbox or squash).
    """

    def __init__(
        self,
        root: str,
        category: str,
        endpoint_url: str | None = None,
        require_train: bool = True,
        fit: Fit = "letterbox",
    ) -> None:
        self.url = join_url(str(root), category)
        self.fit = fit
        self.category = category
        self.storage: Storage = open_storage(self.url, endpoint_url)
        self.train_items = self._list("train")
        self._test: list[MVTecItem] | None = None
        self.has_masks = True
        self.skipped: list[dict[str, str]] = []
        if require_train and not self.train_items:
            msg = f"no training images under {join_url(self.url, 'train/good')}"
            raise FileNotFoundError(msg)

    @property
    def test_items(self) -> list[MVTecItem]:
        """The test split, listed on first use (training never lists it)."""
        if self._test is None:
            self._test = self._list("test")
            missing = [it for it in self._test if it.label and it.mask is None]
            self.has_masks = not missing
            if missing:
                log.warning(
                    "%d of %d defective test images under %s have no ground_truth mask "
                    "(e.g. %s): image-level evaluation only",
                    len(missing),
                    sum(it.label for it in self._test),
                    self.url,
                    missing[0].image,
                )
        return self._test

    @test_items.setter
    def test_items(self, items: list[MVTecItem]) -> None:
        self._test = items

    def _list(self, split: Literal["train", "test"]) -> list[MVTecItem]:
        names = list(iter_files(self.storage, split, IMAGE_SUFFIXES))
        masks = set(iter_files(self.storage, "ground_truth", (".png",))) if split == "test" else ()
        items = []
        for name in names:
            parts = name.split("/")
            if len(parts) != 3:
                continue
            defect = parts[1]
            if split == "train" and defect != GOOD:
                continue
            mask = None
            if defect != GOOD:
                mask = f"ground_truth/{defect}/{_stem(name)}_mask.png"
                mask = mask if mask in masks else None
            items.append(MVTecItem(name, int(defect != GOOD), defect, mask))
        return items

    def image(self, item: MVTecItem, size: int | None = None) -> np.ndarray:
        """(size, size, 3) uint8 RGB."""
        return decode_rgb(self.storage.get_bytes(item.image), size, self.fit)

    def image_and_content(self, item: MVTecItem, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(size, size, 3) uint8 RGB and (size, size) bool: where it holds the image's own
        pixels (all of it when squashed; letterbox padding is False)."""
        full = self.image(item)
        h, w = full.shape[:2]
        return fit_square(full, size, self.fit), content_mask(h, w, size, self.fit)

    def mask(self, item: MVTecItem, size: int) -> np.ndarray:
        """(size, size) bool ground truth; all False for normal images."""
        if item.mask is None:
            return np.zeros((size, size), dtype=bool)
        return decode_mask(self.storage.get_bytes(item.mask), size, self.fit)

    def load_train(self, size: int, items: list[MVTecItem] | None = None) -> np.ndarray:
        """Training images at one size, (N, size, size, 3) uint8: they fit in memory.

        An image that fails to read or decode is skipped with a warning and recorded in
        :attr:`skipped`; ``FileNotFoundError`` when none is left.
        """
        images = []
        for it in self.train_items if items is None else items:
            try:
                images.append(self.image(it, size))
            except Exception as e:  # noqa: BLE001 - PIL and storage errors alike
                where = join_url(self.url, it.image)
                log.warning("skipping unreadable training image %s: %s", where, e)
                self.skipped.append(
                    {
                        "shard": self.url,
                        "key": it.image,
                        "kind": "unreadable",
                        "reason": f"{type(e).__name__}: {e}"[:300],
                    }
                )
        if not images:
            msg = f"no readable training image under {join_url(self.url, 'train/good')}"
            raise FileNotFoundError(msg)
        return np.stack(images)
