"""One WebDataset shard on local disk: ``{__key__, png|jpg, json}`` samples, reproducible bytes.

The tar is written to a temp file with a fixed mtime, user and mode, so the same samples
always give the same bytes (and sha256); uploading it is the caller's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import cv2
import numpy as np

PNG_COMPRESSION = 6
JPEG_QUALITY = 95


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG or JPEG bytes (OpenCV, deterministic for given input)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        msg = f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}"
        raise ValueError(msg)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    elif image_format == "jpg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        msg = f"unknown image format {image_format!r}; choose png or jpg"
        raise ValueError(msg)
    if not ok:
        msg = f"OpenCV could not encode a {image.shape} image as {image_format}"
        raise RuntimeError(msg)
    return buf.tobytes()


def sample_json(meta: dict[str, Any]) -> bytes:
    """The ``.json`` member: sorted keys, so equal metadata gives equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class ShardTarWriter:
    """Append samples to one tar file; :meth:`close` returns its size and sha256."""

    def __init__(self, path: str | os.PathLike) -> None:
        from webdataset import TarWriter  # webdataset's package loads torch: only when writing

        self.path = os.fspath(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._tar = TarWriter(
            self._file, user="sia", group="sia", mode=0o444, encoder=False, mtime=0
        )
        self.count = 0

    def write(self, key: str, image: bytes, image_format: str, meta: dict[str, Any]) -> None:
        self._tar.write({"__key__": key, image_format: image, "json": sample_json(meta)})
        self.count += 1

    def close(self) -> tuple[int, str]:
        """Finish the tar; returns (size in bytes, sha256 hex)."""
        self._tar.close()
        self._file.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return os.path.getsize(self.path), h.hexdigest()

    def abort(self) -> None:
        """Close without caring for the result (the temp file is the caller's to delete)."""
        try:
            self._tar.close()
        finally:
            self._file.close()
