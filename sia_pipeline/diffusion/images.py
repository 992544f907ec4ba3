"""Normal training images of an MVTec-layout root (``CATEGORY/train/good/*``), local or s3://.

A corrupt or unreadable image is skipped with a warning: one bad file must not stop a
multi-hour training run. The fingerprint names the exact training data in the model card.

Images keep their aspect ratio: each is resized so its SHORT side is the training resolution
(the long side follows, capped at :data:`MAX_ASPECT` times it) and training draws a random
square crop along the long side, so a 113x256 magnetic tile is never squashed into a square.
A category whose every image is greyscale is marked ``grey``: the model card records it and
the sampler keeps that category's samples grey.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sia_pipeline.format.v1 import check_category
from sia_pipeline.io.storage import IMAGE_SUFFIXES, iter_files, open_storage

log = logging.getLogger(__name__)

MAX_ASPECT = 4.0  # a longer side is centre-cropped to this multiple of the short one
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class NormalImages:
    """All normal images: ``images`` N arrays (H, W, 3) uint8 with min(H, W) = R,
    ``labels`` (N,) class ids, ``grey`` the categories whose every image is greyscale."""

    images: list[np.ndarray]
    labels: np.ndarray
    categories: dict[str, int]
    fingerprint: str
    skipped: list[str]
    grey: list[str]

    def crop(self, i: int, offset: float) -> np.ndarray:
        """Image ``i`` as an (R, R, 3) square: the crop at ``offset`` in [0, 1) along the
        long side (0 = left/top)."""
        im = self.images[i]
        h, w = im.shape[:2]
        r = min(h, w)
        y, x = int(offset * (h - r + 1)), int(offset * (w - r + 1))
        return im[y : y + r, x : x + r]


def resize_short_side(im: Image.Image, resolution: int) -> Image.Image:
    """``im`` scaled (bicubic) so its short side is ``resolution``, aspect ratio kept; a long
    side beyond :data:`MAX_ASPECT` times the short one is centre-cropped first."""
    w, h = im.size
    cap = int(min(w, h) * MAX_ASPECT)
    if max(w, h) > cap:
        left, top = (w - min(w, cap)) // 2, (h - min(h, cap)) // 2
        im = im.crop((left, top, left + min(w, cap), top + min(h, cap)))
        w, h = im.size
    s = resolution / min(w, h)
    size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
    return im.resize(size, Image.BICUBIC)


def is_grey(im: Image.Image) -> bool:
    """True for a greyscale image: a grey mode, or RGB(A) whose channels are all equal."""
    if im.mode in _GREY_MODES:
        return True
    if im.mode not in ("RGB", "RGBA"):
        return False
    a = np.asarray(im.convert("RGB"), dtype=np.int16)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def load_normal_images(
    roots: str | list[str],
    categories: list[str],
    resolution: int,
    endpoint_url: str | None = None,
) -> NormalImages:
    """Read ``CATEGORY/train/good/*`` for each category from the first root that has it.

    Class ids follow the order of ``categories``.

    Raises:
        ValueError: a category name is invalid, or no root has a readable image of it.
    """
    roots = [roots] if isinstance(roots, str) else list(roots)
    storages = [open_storage(r, endpoint_url) for r in roots]
    ids = {check_category(c): i for i, c in enumerate(categories)}
    digest = hashlib.sha256()
    images, labels, skipped, grey = [], [], [], []
    for cat, cid in ids.items():
        found = (
            (r, st, list(iter_files(st, f"{cat}/train/good", IMAGE_SUFFIXES)))
            for r, st in zip(roots, storages, strict=True)
        )
        root, storage, names = next(((r, st, n) for r, st, n in found if n), ("", None, []))
        if not names:
            msg = f"no training images for category {cat!r} in {cat}/train/good under {roots}"
            raise ValueError(msg)
        n_ok, all_grey = 0, True
        for name in names:
            data = storage.get_bytes(name)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    all_grey = all_grey and is_grey(im)
                    im = resize_short_side(im.convert("RGB"), resolution)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                log.warning("skipping unreadable image %s/%s: %s", root, name, e)
                skipped.append(name)
                continue
            digest.update(name.encode())
            digest.update(hashlib.sha256(data).digest())
            images.append(arr)
            labels.append(cid)
            n_ok += 1
        if n_ok == 0:
            msg = f"every training image of category {cat!r} under {root} is unreadable"
            raise ValueError(msg)
        if all_grey:
            grey.append(cat)
        log.info(
            "category %s: %d images (%d skipped)%s",
            cat, n_ok, len(names) - n_ok, ", greyscale" if all_grey else "",
        )  # fmt: skip
    return NormalImages(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        categories=ids,
        fingerprint="sha256:" + digest.hexdigest(),
        skipped=skipped,
        grey=grey,
    )
