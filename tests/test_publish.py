"""sia-publish against a local folder and the loopback S3 server, on a dataset made by the
real sia-gen code: full verification naming bad shards, rebuilt index/manifest, the Hub
card (its YAML read by huggingface_hub and its data by the `datasets` WebDataset loader),
histogram, previews and checksums."""

from __future__ import annotations

import hashlib
import io
import json
import re

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from generated_dataset import (
    CATEGORIES,
    PER_CATEGORY,
    SHARD_SIZE,
    flip_bytes,
    s3_bytes,
    s3_delete,
    s3_put,
)
from PIL import Image

from sia_pipeline.cli.publish import main as publish_main

TOTAL = PER_CATEGORY * len(CATEGORIES)
SHARDS = [f"{c}-{i:06d}" for c in CATEGORIES for i in range(-(-PER_CATEGORY // SHARD_SIZE))]


def run(*args: str):
    return CliRunner().invoke(publish_main, list(args), catch_exceptions=False)


def bad_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("BAD ")]


def tar_rel(shard: str) -> str:
    return f"shards/{shard.rsplit('-', 1)[0]}/{shard}.tar"


# --- a sound dataset -----------------------------------------------------------------


def test_publish_local_writes_card_histogram_previews_checksums(local_root, tiny_model):
    res = run(str(local_root))
    assert res.exit_code == 0, res.output
    assert f"verified {len(SHARDS)} shard(s), {TOTAL} samples" in res.output

    from huggingface_hub import DatasetCard

    text = (local_root / "README.md").read_text()
    card = DatasetCard(text)
    configs = {c["config_name"]: c for c in card.data.configs}
    assert configs["default"]["data_files"] == [{"split": "train", "path": "shards/*/*.tar"}]
    for c in CATEGORIES:
        assert configs[c]["data_files"] == [{"split": "train", "path": f"shards/{c}/*.tar"}]
    assert "webdataset" in card.data.tags
    # Counts table: per category rows and an all-row summing to what was generated.
    for c in CATEGORIES:
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {c} |"))
        assert row.rstrip(" |").rsplit("|", 1)[-1].strip() == str(PER_CATEGORY)
    all_row = next(ln for ln in text.splitlines() if ln.startswith("| **all** |"))
    assert all_row.rstrip(" |").rsplit("|", 1)[-1].strip() == str(TOTAL)
    # Provenance: model id, spec hash, package version, the spec itself.
    index = json.loads((local_root / "index.json").read_text())
    assert index["model_ids"][0] in text and index["spec_hash"] in text
    assert re.search(r"published by: sia-publish \(sia-realnet [0-9.]+\)", text)
    assert f'"per_category": {PER_CATEGORY}' in text
    assert "testing-secret" not in text  # the loopback secret never lands in a card

    with Image.open(local_root / "strength_histogram.png") as im:
        assert im.size == (640, 320)
    for c in CATEGORIES:
        assert f"previews/{c}.png" in text
        with Image.open(local_root / "previews" / f"{c}.png") as im:
            assert im.width > 32 and im.height > 32

    # SHA256SUMS covers every published file, and every line is right.
    sums = dict(
        reversed(ln.split("  ", 1)) for ln in (local_root / "SHA256SUMS").read_text().splitlines()
    )
    files = {
        p.relative_to(local_root).as_posix()
        for p in local_root.rglob("*")
        if p.is_file() and p.name != "SHA256SUMS"
    }
    assert set(sums) == files
    for rel, sha in sums.items():
        assert hashlib.sha256((local_root / rel).read_bytes()).hexdigest() == sha, rel


def test_hub_webdataset_loader_reads_the_published_root(local_root, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert run(str(local_root)).exit_code == 0
    manifest = pq.read_table(local_root / "manifest.parquet")

    ds = datasets.load_dataset(str(local_root), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(ds["__key__"]) == sorted(manifest.column("key").to_pylist())
    assert {m["category"] for m in ds["json"]} == set(CATEGORIES)
    assert ds[0]["png"].size == (32, 32)
    one = datasets.load_dataset(
        str(local_root), "bottle", split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert len(one) == PER_CATEGORY and {m["category"] for m in one["json"]} == {"bottle"}


def test_publish_twice_gives_identical_files(local_root):
    assert run(str(local_root)).exit_code == 0
    names = ["README.md", "SHA256SUMS", "strength_histogram.png", "index.json"]
    first = {n: (local_root / n).read_bytes() for n in names}
    res = run(str(local_root))
    assert res.exit_code == 0 and "rebuilt" not in res.output
    assert {n: (local_root / n).read_bytes() for n in names} == first


def test_publish_s3_rebuilds_missing_index_and_manifest(s3_dataset, s3_endpoint):
    s3_delete(s3_dataset, "index.json", s3_endpoint)
    s3_delete(s3_dataset, "manifest.parquet", s3_endpoint)
    res = run(s3_dataset)
    assert res.exit_code == 0, res.output
    assert "rebuilt manifest and index (index.json missing" in res.output

    index = json.loads(s3_bytes(s3_dataset, "index.json", s3_endpoint))
    assert index["format_version"] == 1 and index["num_samples"] == TOTAL
    assert [s["shard"] for s in index["shards"]] == SHARDS
    for s in index["shards"]:
        stats = json.loads(
            s3_bytes(s3_dataset, s["tar"].removesuffix(".tar") + ".json", s3_endpoint)
        )
        assert (
            s["sha256"]
            == stats["sha256"]
            == hashlib.sha256(s3_bytes(s3_dataset, s["tar"], s3_endpoint)).hexdigest()
        )
    manifest = pq.read_table(io.BytesIO(s3_bytes(s3_dataset, "manifest.parquet", s3_endpoint)))
    assert manifest.num_rows == TOTAL
    assert len(set(manifest.column("key").to_pylist())) == TOTAL
    sums = s3_bytes(s3_dataset, "SHA256SUMS", s3_endpoint).decode()
    for line in sums.splitlines():
        sha, rel = line.split("  ", 1)
        assert hashlib.sha256(s3_bytes(s3_dataset, rel, s3_endpoint)).hexdigest() == sha, rel
    card = s3_bytes(s3_dataset, "README.md", s3_endpoint).decode()
    assert card.startswith("---\n") and "config_name: bottle" in card


def test_stale_index_is_rebuilt(local_root):
    index = json.loads((local_root / "index.json").read_text())
    index["shards"] = index["shards"][:-1]  # a shard finished after the index was written
    (local_root / "index.json").write_text(json.dumps(index))
    res = run(str(local_root))
    assert res.exit_code == 0, res.output
    assert "index.json does not match the shard stats" in res.output
    rebuilt = json.loads((local_root / "index.json").read_text())
    assert len(rebuilt["shards"]) == len(SHARDS)
    assert rebuilt["spec"] == index["spec"] and rebuilt["command"] == index["command"]


# --- bad shards are named, nothing is written ----------------------------------------


def test_corrupted_and_truncated_shards_are_named_local(local_root):
    corrupt, truncated = SHARDS[1], SHARDS[2]
    tar = local_root / tar_rel(corrupt)
    data = tar.read_bytes()
    tar.write_bytes(flip_bytes(data, len(data) // 2))
    tar = local_root / tar_rel(truncated)
    tar.write_bytes(tar.read_bytes()[:-1536])
    card_before = (local_root / "README.md").read_bytes()

    res = run(str(local_root))
    assert res.exit_code == 1
    bad = bad_lines(res.output)
    assert len(bad) == 2
    (c_line,) = [ln for ln in bad if corrupt in ln]
    (t_line,) = [ln for ln in bad if truncated in ln]
    assert "sha256" in c_line and "size" not in c_line
    assert "size" in t_line and "truncated" in t_line
    for good in set(SHARDS) - {corrupt, truncated}:
        assert good not in "\n".join(bad)
    assert "nothing published" in res.output
    assert not (local_root / "SHA256SUMS").exists()
    assert (local_root / "README.md").read_bytes() == card_before


def test_corrupted_and_truncated_shards_are_named_s3(s3_dataset, s3_endpoint):
    corrupt, truncated = SHARDS[0], SHARDS[3]
    data = s3_bytes(s3_dataset, tar_rel(corrupt), s3_endpoint)
    s3_put(s3_dataset, tar_rel(corrupt), flip_bytes(data, len(data) // 3), s3_endpoint)
    data = s3_bytes(s3_dataset, tar_rel(truncated), s3_endpoint)
    s3_put(s3_dataset, tar_rel(truncated), data[: len(data) // 2], s3_endpoint)

    res = run(s3_dataset)
    assert res.exit_code == 1
    bad = bad_lines(res.output)
    assert sorted(ln.split()[1] for ln in bad) == sorted([corrupt, truncated])
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        s3_bytes(s3_dataset, "SHA256SUMS", s3_endpoint)


def test_incomplete_and_missing_shards_are_named(local_root):
    (local_root / f"shards/bottle/{SHARDS[0]}.json").unlink()  # tar without stats
    (local_root / tar_rel(SHARDS[3])).unlink()  # stats and tar both gone
    (local_root / f"shards/magnetic_tile/{SHARDS[3]}.json").unlink()
    res = run(str(local_root))
    assert res.exit_code == 1
    text = "\n".join(bad_lines(res.output))
    assert f"{SHARDS[0]} " in text and "no stats JSON" in text
    assert f"{SHARDS[3]} " in text and "missing: the spec asks for it" in text


def test_sample_count_mismatch_is_named(local_root):
    stats_path = local_root / f"shards/bottle/{SHARDS[1]}.json"
    stats = json.loads(stats_path.read_text())
    stats["count"] += 1
    stats_path.write_text(json.dumps(stats))
    res = run(str(local_root))
    assert res.exit_code == 1
    (line,) = bad_lines(res.output)
    assert SHARDS[1] in line and f"{SHARD_SIZE} samples != {SHARD_SIZE + 1} in stats" in line


def test_stats_without_their_sample_rows_are_named(local_root):
    """Stats whose rows do not match their count (the manifest is built from the rows): a
    bad shard, named, nothing written; not a traceback."""
    stats_path = local_root / f"shards/bottle/{SHARDS[1]}.json"
    stats = json.loads(stats_path.read_text())
    stats["samples"] = []
    stats_path.write_text(json.dumps(stats))
    before = sorted(p.name for p in local_root.iterdir())
    res = run(str(local_root))
    assert res.exit_code == 1
    (line,) = bad_lines(res.output)
    assert SHARDS[1] in line and f"0 sample rows != count {SHARD_SIZE} in stats" in line
    assert sorted(p.name for p in local_root.iterdir()) == before


def test_not_a_dataset_and_missing_bucket_exit_2(tmp_path, s3_endpoint, monkeypatch):
    res = run(str(tmp_path))
    assert res.exit_code == 2
    assert f"no shard stats under {tmp_path}/shards" in res.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    res = run("s3://no-such-bucket-sia/x")
    assert res.exit_code == 2
    assert "no-such-bucket-sia" in res.output and "Traceback" not in res.output


def test_a_folder_that_is_not_a_dataset_is_refused_before_the_lease(tmp_path, monkeypatch):
    from sia_pipeline.io.lease import Lease

    def no_lease(self):
        msg = "the lease was taken on a folder that is not a dataset"
        raise AssertionError(msg)

    monkeypatch.setattr(Lease, "acquire", no_lease)
    (tmp_path / "notes.txt").write_text("mine")
    res = run(str(tmp_path))
    assert res.exit_code == 2 and "not an SIA dataset root" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_sample_without_metadata_is_named(local_root):
    """A tar that matches its stats byte for byte can still break the format: named too."""
    import webdataset as wds

    from sia_pipeline.format.v1 import iter_shard_samples

    shard = SHARDS[2]
    tar = local_root / tar_rel(shard)
    samples = list(iter_shard_samples(str(tar)))
    with wds.TarWriter(str(tar), encoder=False, mtime=0) as writer:
        for i, s in enumerate(samples):
            member = {"__key__": s["__key__"], "png": s["png"]}
            if i:
                member["json"] = s["json"]
            writer.write(member)
    stats_path = tar.with_suffix(".json")
    stats = json.loads(stats_path.read_text())
    data = tar.read_bytes()
    stats.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    stats_path.write_text(json.dumps(stats))
    res = run(str(local_root))
    assert res.exit_code == 1
    (line,) = bad_lines(res.output)
    assert shard in line and "1 sample(s) lack an image or json member" in line


# --- one writer per root --------------------------------------------------------------


def test_publish_refused_while_sia_gen_holds_the_lease(local_root):
    from sia_pipeline.io.lease import LEASE_NAME, Lease, LeaseHeld
    from sia_pipeline.io.storage import open_storage

    storage = open_storage(str(local_root))
    with Lease(storage, "spec-of-a-running-sia-gen", ttl=60):
        before = sorted(p.name for p in local_root.iterdir())
        res = run(str(local_root))
        assert res.exit_code == 2, res.output
        assert "is being written by sia-gen" in res.output and "rerun when it ends" in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert sorted(p.name for p in local_root.iterdir()) == before  # nothing written
    # while sia-publish runs, a sia-gen on the root is refused, naming sia-publish
    with Lease(storage, "sia-publish", ttl=60):
        with pytest.raises(LeaseHeld, match="being published by sia-publish"):
            Lease(storage, "spec-of-a-new-sia-gen").acquire()
    res = run(str(local_root))
    assert res.exit_code == 0, res.output
    assert not (local_root / LEASE_NAME).exists()  # released
