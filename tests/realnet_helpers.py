"""Small real data sets and tiny settings shared by the realnet robustness tests."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

TINY_MODEL = ["--levels", "1,2", "--afs-keep", "8,8", "--rrs-counts", "4,4", "--afs-batches", "2"]


def tiny_model_config():
    """:data:`TINY_MODEL` as a ``RealNetConfig`` (the cpu preset's structure, shrunk)."""
    from realnet_train.model.config import RealNetConfig
    from realnet_train.presets import CPU

    return RealNetConfig(
        **{**CPU.model, "levels": (1, 2), "afs_keep": (8, 8), "rrs_counts": (4, 4)}
    )


TINY_RUN = ["--image-size", "32", "--batch-size", "2", "--workers", "0", "--threads", "1"]


def small_mvtec(
    shared: Path, root: Path, n_train: int = 12, masks: bool = True, category: str = "bottle"
) -> Path:
    """``root/category``: ``n_train`` train/good, 2 good + 2 broken_large test images."""
    src = shared / "mvtec_ad" / "bottle"
    dst = root / category
    picks = {
        "train/good": sorted((src / "train/good").glob("*.png"))[:n_train],
        "test/good": sorted((src / "test/good").glob("*.png"))[:2],
        "test/broken_large": sorted((src / "test/broken_large").glob("*.png"))[:2],
    }
    for folder, files in picks.items():
        (dst / folder).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dst / folder / f.name)
    if masks:
        (dst / "ground_truth/broken_large").mkdir(parents=True, exist_ok=True)
        for f in picks["test/broken_large"]:
            mask = src / "ground_truth/broken_large" / f"{f.stem}_mask.png"
            shutil.copy(mask, dst / "ground_truth/broken_large" / mask.name)
    return root


def read_shard(tar: Path) -> list[dict]:
    with tar.open("rb") as f:
        return list(group_by_keys(tar_file_expander([{"url": str(tar), "stream": f}])))


def rewrite_shard(tar: Path, edit: Callable[[int, dict], dict | None]) -> None:
    """Rewrite a shard's samples through ``edit(i, sample)`` (None drops the sample)."""
    samples = read_shard(tar)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as w:
        for i, s in enumerate(samples):
            s = edit(i, {k: v for k, v in s.items() if not k.startswith("__url")})
            if s is not None:
                w.write(s)
    tar.write_bytes(buf.getvalue())


def with_meta(sample: dict, **changes) -> dict:
    meta = json.loads(sample["json"]) | changes
    return {**sample, "json": json.dumps(meta).encode()}


def damaged_sia(tiny_sia: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """A copy of ``tiny_sia`` with four kinds of bad data in its bottle shards.

    bottle-000000: sample 1 has a corrupt PNG, sample 2 claims strength 0.9 (its shard spans
    0.1-0.2), sample 3 claims category magnetic_tile. bottle-000001 is cut off half-way.
    Returns (root, key -> kind of damage).
    """
    shutil.copytree(tiny_sia, dst)
    tar0 = dst / "shards/bottle/bottle-000000.tar"
    tar1 = dst / "shards/bottle/bottle-000001.tar"

    def edit(i: int, s: dict) -> dict:
        if i == 1:
            return {**s, "png": s["png"][:40] + b"\0" * 64}
        if i == 2:
            return with_meta(s, strength=0.9)
        if i == 3:
            return with_meta(s, category="magnetic_tile")
        return s

    rewrite_shard(tar0, edit)
    data = tar1.read_bytes()
    tar1.write_bytes(data[: len(data) // 2 + 100])
    damage = {
        "bottle-000000-000001": "corrupt png",
        "bottle-000000-000002": "strength outside span",
        "bottle-000000-000003": "category",
    }
    return dst, damage


def tiny_train_config(data: Path, sia: Path, out: Path, **overrides):
    """A ``TrainConfig`` for a few single-thread steps of the tiny model on bottle with SIA."""
    from realnet_train.train import TrainConfig

    fields = {
        "category": "bottle",
        "data": str(data),
        "out": str(out),
        "sia": str(sia),
        "image_size": 32,
        "batch_size": 2,
        "steps": 3,
        "time_budget_s": None,
        "afs_batches": 2,
        "num_workers": 0,
        "threads": 1,
        "model": tiny_model_config(),
    }
    return TrainConfig(**(fields | overrides))
