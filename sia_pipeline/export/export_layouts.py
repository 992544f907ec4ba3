"""Where ``sia-export`` puts each anomaly image and mask, for the three layouts it writes.

All paths are relative to ``OUT/CATEGORY`` (the export root). Normal images are split into
training and held-out ones (``--holdout``); anomalies are composed only into held-out ones.
Every image is letterboxed to the export's size and written as PNG (``<stem>.png``).

- ``mvtec``: ``train/good/`` (training normals), ``test/good/`` (all held-out normals),
  ``test/synthetic/NNNNNN.png`` and ``ground_truth/synthetic/NNNNNN_mask.png``: an MVTec
  AD-style data set (anomalib ``MVTecAD``);
- ``folder``: anomalib's Folder layout, ``normal/`` (training), ``normal_test/`` (held out),
  ``abnormal/NNNNNN.png``, ``mask/NNNNNN.png`` (``Folder(normal_test_dir="normal_test")``);
- ``webdataset``: ``shards/CATEGORY-UUUUUU.tar`` with ``KEY.png``, ``KEY.mask.png`` and
  ``KEY.json`` members and a stats file ``shards/CATEGORY-UUUUUU.json`` (count, size, sha256,
  keys, strength span, per-sample rows, spec hash) as in SIA format v1; no normal images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from sia_pipeline.format.v1 import ShardStats, sample_key, shard_id
from sia_pipeline.format.writer import encode_image, sample_json
from sia_pipeline.io.storage import Storage

LAYOUTS = ("mvtec", "folder", "webdataset")
DEFECT = "synthetic"


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) mask (nonzero = anomaly) -> single-channel 0/255 PNG bytes."""
    ok, buf = cv2.imencode(".png", np.where(mask > 0, 255, 0).astype(np.uint8))
    if not ok:
        msg = f"OpenCV could not encode a {mask.shape} mask"
        raise RuntimeError(msg)
    return buf.tobytes()


def decode_png(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """PNG bytes -> (H, W, 3) RGB or (H, W) gray uint8."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB) if arr.ndim == 3 else arr


NORMAL_DIRS = {"mvtec": ("train/good", "test/good"), "folder": ("normal", "normal_test")}


def normal_path(layout: str, name: str, held_out: bool = False) -> str | None:
    """Where normal image ``name`` goes: the training or the held-out folder, as ``<stem>.png``
    (``None``: the layout writes no normal images)."""
    dirs = NORMAL_DIRS.get(layout)
    if dirs is None:
        return None
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{dirs[held_out]}/{stem}.png"


def pair_paths(layout: str, index: int) -> tuple[str, str]:
    """(image, mask) paths of output ``index`` in the file layouts."""
    if layout == "mvtec":
        return f"test/{DEFECT}/{index:06d}.png", f"ground_truth/{DEFECT}/{index:06d}_mask.png"
    if layout == "folder":
        return f"abnormal/{index:06d}.png", f"mask/{index:06d}.png"
    msg = f"layout {layout!r} keeps pairs in shards, not files"
    raise ValueError(msg)


def shard_paths(category: str, number: int) -> tuple[str, str]:
    """(tar, stats) paths of webdataset shard ``number``."""
    sid = shard_id(category, number)
    return f"shards/{sid}.tar", f"shards/{sid}.json"


def write_pairs(
    storage: Storage,
    layout: str,
    category: str,
    number: int,
    pairs: Sequence[tuple[np.ndarray, np.ndarray, dict[str, Any]]],
    spec_hash: str = "",
) -> list[dict[str, Any]]:
    """Write one unit's (image, mask, row) triples; returns the rows with their locations.

    Files are written atomically one by one; a shard is built in a local temp file and
    uploaded whole, its stats after it. A webdataset row names its ``tar`` (relative to the
    export root), its ``key`` and the ``image`` and ``mask`` members in that tar.
    """
    rows = []
    if layout != "webdataset":
        for image, mask, row in pairs:
            img_path, mask_path = pair_paths(layout, row["index"])
            storage.put_bytes(encode_image(image, "png"), img_path)
            storage.put_bytes(encode_mask(mask), mask_path)
            rows.append({**row, "image": img_path, "mask": mask_path})
        return rows
    from webdataset import TarWriter

    tar_path, stats_path = shard_paths(category, number)
    fd, tmp = tempfile.mkstemp(suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = TarWriter(f, user="sia", group="sia", mode=0o444, encoder=False, mtime=0)
            for j, (image, mask, row) in enumerate(pairs):
                key = sample_key(category, number, j)
                out = {**row, "tar": tar_path, "key": key}
                out |= {"image": f"{key}.png", "mask": f"{key}.mask.png"}
                writer.write(
                    {
                        "__key__": key,
                        "png": encode_image(image, "png"),
                        "mask.png": encode_mask(mask),
                        "json": sample_json(out),
                    }
                )
                rows.append(out)
            writer.close()
        data = open(tmp, "rb").read()  # noqa: SIM115 - small, read at once
        storage.put_file(tmp, tar_path)
    finally:
        os.unlink(tmp)
    strengths = [r["strength"] for r in rows if r.get("strength") is not None]
    stats = ShardStats(
        shard=shard_id(category, number),
        category=category,
        tar=tar_path,
        count=len(rows),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        keys=[r["key"] for r in rows],
        strength_min=min(strengths, default=0.0),
        strength_max=max(strengths, default=0.0),
        spec_hash=spec_hash,
        samples=rows,
    )
    storage.put_bytes(stats.to_json(), stats_path)
    return rows


def read_pair(storage: Storage, layout: str, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Read back output ``row``: ((H, W, 3) RGB uint8, (H, W) 0/255 uint8)."""
    if layout != "webdataset":
        image = decode_png(storage.get_bytes(row["image"]))
        return image, decode_png(storage.get_bytes(row["mask"]), cv2.IMREAD_GRAYSCALE)
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(row["tar"]))) as tar:
        image = tar.extractfile(row["image"]).read()  # type: ignore[union-attr]
        mask = tar.extractfile(row["mask"]).read()  # type: ignore[union-attr]
    return decode_png(image), decode_png(mask, cv2.IMREAD_GRAYSCALE)


def rows_json(rows: Sequence[dict[str, Any]]) -> bytes:
    """JSON lines, one row each, keys sorted: equal rows give equal bytes."""
    return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows)
