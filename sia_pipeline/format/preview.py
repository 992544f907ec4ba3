"""Preview grids: rows of same-size RGB images with optional row and column labels, as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

_LABEL_H = 12


def make_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Image.Image:
    """Tile ``rows`` of (H, W, 3) uint8 images (all one size) into one labelled image."""
    if not rows or not rows[0]:
        msg = "make_grid needs at least one image"
        raise ValueError(msg)
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    left = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = _LABEL_H if col_labels else 0
    ncol = max(len(r) for r in rows)
    grid = Image.new(
        "RGB", (left + ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        draw.text((left + pad + j * (w + pad), 0), str(label), fill="black")
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((2, y + h // 2 - 5), str(row_labels[i]), fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(np.asarray(img, dtype=np.uint8))
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (left + pad + j * (w + pad), y))
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
