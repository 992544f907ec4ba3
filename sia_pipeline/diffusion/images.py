"""Normal training images of an MVTec-layout root (``CATEGORY/train/good/*``), local or s3://.

A corrupt or unreadable image is skipped with a warning: one bad file must not stop a
multi-hour training run. The fingerprint names the exact training data in the model card.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from sia_pipeline.dataset.format import check_category
from sia_pipeline.dataset.storage import iter_files, open_storage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class NormalImages:
    """All normal images, resized: ``images`` (N, R, R, 3) uint8, ``labels`` (N,) class ids."""

    images: np.ndarray
    labels: np.ndarray
    categories: dict[str, int]
    fingerprint: str
    skipped: list[str]


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
    images, labels, skipped = [], [], []
    for cat, cid in ids.items():
        found = (
            (r, st, list(iter_files(st, f"{cat}/train/good", IMAGE_SUFFIXES)))
            for r, st in zip(roots, storages, strict=True)
        )
        root, storage, names = next(((r, st, n) for r, st, n in found if n), ("", None, []))
        if not names:
            msg = f"no training images for category {cat!r} in {cat}/train/good under {roots}"
            raise ValueError(msg)
        n_ok = 0
        for name in names:
            data = storage.get_bytes(name)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
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
        log.info("category %s: %d images (%d skipped)", cat, n_ok, len(names) - n_ok)
    return NormalImages(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        categories=ids,
        fingerprint="sha256:" + digest.hexdigest(),
        skipped=skipped,
    )
