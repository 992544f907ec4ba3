"""One small SIA dataset made by the real ``sia-gen`` code (tiny model, local Ray), shared by
the publish and inspect tests, plus helpers to copy it to a folder or the loopback S3 and
a small generation spec."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3

PER_CATEGORY = 6
SHARD_SIZE = 3
BATCH_SIZE = 2  # a shard of 3 is sampled as batches [0, 2) and [2, 3)
CATEGORIES = ("bottle", "magnetic_tile")

_made: dict[str, Path] = {}


def generated(base: Path, model: Path) -> Path:
    """Generate the dataset once per test session (``base`` is a session temp dir)."""
    key = str(model)
    if key not in _made:
        from sia_pipeline.gen.generate import generate

        root = base / "generated"
        generate(
            categories=",".join(CATEGORIES),
            strengths="0.1:0.5",
            per_category=PER_CATEGORY,
            shard_size=SHARD_SIZE,
            steps=2,
            batch_size=BATCH_SIZE,
            model=str(model),
            out=str(root),
            workers=1,
            progress=False,
        )
        _made[key] = root
    return _made[key]


def copy_local(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def upload(src: Path, s3_url: str, endpoint_url: str) -> None:
    """Copy a local dataset folder to ``s3://bucket/prefix`` on the loopback server."""
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(src).as_posix()}".lstrip("/")
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def s3_bytes(s3_url: str, rel: str, endpoint_url: str) -> bytes:
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    return client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}".lstrip("/"))["Body"].read()


def s3_put(s3_url: str, rel: str, data: bytes, endpoint_url: str) -> None:
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}".lstrip("/"), Body=data)


def s3_delete(s3_url: str, rel: str, endpoint_url: str) -> None:
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    client.delete_object(Bucket=bucket, Key=f"{prefix}/{rel}".lstrip("/"))


def flip_bytes(data: bytes, at: int, n: int = 16) -> bytes:
    """``data`` with ``n`` bytes inverted from offset ``at`` (same size, wrong content)."""
    out = bytearray(data)
    for i in range(at, min(at + n, len(out))):
        out[i] ^= 0xFF
    return bytes(out)


TINY_MODEL_CATEGORIES = {"bottle": 0, "magnetic_tile": 1}  # those of the tiny_model fixture


def small_spec(**kw):
    """A generation spec for the tiny model at 32 px (4 per category, shards of 2); ``kw``
    overrides or adds ``make_spec`` arguments."""
    from sia_pipeline.gen.plan import make_spec

    args = {
        "model_id": "sdas-x",
        "model_categories": TINY_MODEL_CATEGORIES,
        "resolution": 32,
        "per_category": 4,
        "shard_size": 2,
    }
    return make_spec(**{**args, **kw})
