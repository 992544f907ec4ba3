"""Shared fixtures: a real S3 server on loopback (moto standalone), a real local Ray, tiny models.

Nothing here mocks boto3 in-process: S3 tests talk HTTP to ``moto_server`` on a free port.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from local_servers import start_moto

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
TEST_CATEGORIES = {"bottle": 0, "magnetic_tile": 1}

# Credentials for the loopback server only; set before any boto3 client exists.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on loopback, started for this test session."""
    try:
        proc, url = start_moto(timeout_s=30)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def s3_root(s3_endpoint, s3_client, monkeypatch):
    """A fresh ``s3://bucket/prefix`` on the loopback server; AWS_ENDPOINT_URL points at it."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    return f"s3://{bucket}/data"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the session (small num_cpus)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": a new Ray even while a `ray start` or `cluster_utils.Cluster` of
        # another test run on this machine advertises itself in /tmp/ray/ray_current_cluster
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mvtec_ad" / "bottle").is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (CI has it)")
    return SHARED_DATA


def mvtec_subset(
    shared_data: Path, root: Path, per_category: int, non_square_tiles: bool = False
) -> Path:
    """An MVTec-layout ``root`` with the first ``per_category`` real bottle and magnetic-tile
    training images (``non_square_tiles``: only tiles whose sides differ)."""
    sources = {
        "bottle": shared_data / "mvtec_ad/bottle/train/good",
        "magnetic_tile": shared_data / "magnetic_tile/magnetic_tile/train/good",
    }
    for cat, src in sources.items():
        files = sorted(src.iterdir())
        if non_square_tiles and cat == "magnetic_tile":
            from PIL import Image

            files = [f for f in files if len(set(Image.open(f).size)) == 2]
        dst = root / cat / "train" / "good"
        dst.mkdir(parents=True)
        for f in files[:per_category]:
            shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained, tiny (32 px, <1M params) class-conditional SDAS model folder."""
    from sia_pipeline.diffusion.model import init_model

    folder = tmp_path_factory.mktemp("models") / "tiny"
    init_model(folder, TEST_CATEGORIES, preset="test", seed=0)
    return folder


def write_tiny_sia(
    root: Path,
    shared: Path,
    per_shard: int = 6,
    plan: list[tuple[str, int, tuple[float, float]]] | None = None,
) -> Path:
    """A format-v1 SIA dataset written by hand (not by sia-gen) from perturbed real images.

    Shards (default ``plan``): bottle-000000 (strengths 0.10-0.20), bottle-000001 (0.30-0.50),
    magnetic_tile-000000 (0.10-0.50). Images are 64 px training images with a colour shift
    and noise, so they differ from the normal ones.
    """
    import hashlib
    import io
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from sia_pipeline.format.v1 import FORMAT_VERSION, ShardStats, sample_key, shard_tar_name

    sources = {
        "bottle": shared / "mvtec_ad" / "bottle" / "train" / "good",
        "magnetic_tile": shared / "magnetic_tile" / "magnetic_tile" / "train" / "good",
    }
    plan = plan or [
        ("bottle", 0, (0.1, 0.2)),
        ("bottle", 1, (0.3, 0.5)),
        ("magnetic_tile", 0, (0.1, 0.5)),
    ]
    rng = np.random.default_rng(0)
    entries = []
    for category, shard, (lo, hi) in plan:
        files = sorted(sources[category].glob("*.png"))[shard * per_shard : (shard + 1) * per_shard]
        tar = root / shard_tar_name(category, shard)
        tar.parent.mkdir(parents=True, exist_ok=True)
        strengths = np.linspace(lo, hi, len(files))
        keys = []
        with wds.TarWriter(str(tar), mtime=0, encoder=False) as writer:
            for i, (path, s) in enumerate(zip(files, strengths, strict=True)):
                img = np.asarray(Image.open(path).convert("RGB").resize((64, 64)), dtype=np.float32)
                img = img * rng.uniform(0.6, 1.4, 3) + rng.normal(0, 20, img.shape)
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
                key = sample_key(category, shard, i)
                meta = {
                    "category": category,
                    "class_id": TEST_CATEGORIES[category],
                    "strength": float(s),
                    "seed": i,
                    "sample_index": shard * per_shard + i,
                    "sampler": "ddpm",
                    "steps": 20,
                    "eta": 0.0,
                    "model_id": "hand-written-test",
                    "height": 64,
                    "width": 64,
                    "image_format": "png",
                    "format_version": FORMAT_VERSION,
                }
                writer.write(
                    {"__key__": key, "png": buf.getvalue(), "json": json.dumps(meta).encode()}
                )
                keys.append(key)
        data = tar.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        rel = shard_tar_name(category, shard)
        stats = ShardStats(
            shard=f"{category}-{shard:06d}",
            category=category,
            tar=rel,
            count=len(keys),
            size=len(data),
            sha256=sha,
            keys=keys,
            strength_min=lo,
            strength_max=hi,
        )
        tar.with_suffix(".json").write_bytes(stats.to_json())
        entries.append(
            {
                "tar": rel,
                "category": category,
                "count": len(keys),
                "strength_min": lo,
                "strength_max": hi,
                "sha256": sha,
            }
        )
    (root / "index.json").write_text(
        json.dumps({"format_version": FORMAT_VERSION, "shards": entries})
    )
    return root


@pytest.fixture(scope="session")
def tiny_sia(shared_data, tmp_path_factory) -> Path:
    """A small hand-written format-v1 SIA dataset (bottle: 2 shards, magnetic_tile: 1)."""
    return write_tiny_sia(tmp_path_factory.mktemp("sia") / "tiny", shared_data)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tiny_model, ray_local) -> Path:
    """One small SIA dataset made by the real ``generate()`` (read-only: copy it to change it)."""
    from generated_dataset import generated

    return generated(tmp_path_factory.mktemp("sia"), tiny_model)


@pytest.fixture
def local_root(dataset, tmp_path) -> Path:
    """A private local copy of ``dataset`` that a test may damage."""
    from generated_dataset import copy_local

    return copy_local(dataset, tmp_path / "root")


@pytest.fixture
def s3_dataset(dataset, s3_root, s3_endpoint) -> str:
    """``dataset`` uploaded to a fresh bucket on the loopback S3 server."""
    from generated_dataset import upload

    upload(dataset, s3_root, s3_endpoint)
    return s3_root


@pytest.fixture
def fault_proxy(s3_endpoint):
    """A fault-injecting proxy (``tests/fault_proxy.py``) in front of the loopback S3 server.

    Starts with no faults (``rate`` 0); a test sets ``proxy.set(mode=..., rate=...)`` and
    points clients at ``proxy.url``. Seeded, so a sequential client sees the same faults.
    """
    from fault_proxy import FaultProxy

    with FaultProxy(s3_endpoint, rate=0.0, seed=0, latency_s=0.1) as proxy:
        yield proxy
