"""``sia-gen`` end to end: real local Ray, real S3 server on loopback, tiny model.

Covers the issue's list: layout and read-back on s3:// and a local folder, rerun with no
writes, one shard redone bit-identically, an actor killed mid-run, and every bad input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner

from sia_pipeline.cli.gen import main
from sia_pipeline.format.manifest import read_manifest
from sia_pipeline.format.v1 import ShardStats, iter_shard_samples, list_shards, read_index
from sia_pipeline.gen.generate import GenError, generate
from sia_pipeline.io.storage import open_storage

SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
SMALL = {"per_category": 6, "shard_size": 4, "batch_size": 2}
SMALL_ARGS = ["--per-category", "6", "--shard-size", "4", "--batch-size", "2", "--no-progress"]


def layout(per_category: int, shard_size: int) -> set[str]:
    names = {"index.json", "manifest.parquet", "README.md", "preview.png", "spec.json"}
    names |= {"index.wids.json", "croissant.json"}
    for cat in ("bottle", "magnetic_tile"):
        for k in range(-(-per_category // shard_size)):
            names |= {f"shards/{cat}/{cat}-{k:06d}.tar", f"shards/{cat}/{cat}-{k:06d}.json"}
    return names


def check_dataset(root: str, tmp: Path, per_category: int, shard_size: int) -> dict:
    """Layout, read-back with webdataset, manifest = spec, unique keys, sha256 per shard."""
    storage = open_storage(root)
    assert set(storage.list("")) == layout(per_category, shard_size)
    index = read_index(storage)
    table = read_manifest(storage)
    keys = table.column("key").to_pylist()
    assert table.num_rows == 2 * per_category == index["num_samples"]
    assert len(set(keys)) == len(keys)
    assert Counter(table.column("category").to_pylist()) == {
        "bottle": per_category,
        "magnetic_tile": per_category,
    }
    tar_keys = []
    for shard in index["shards"]:
        stats = ShardStats.from_json(storage.get_bytes(shard["tar"].replace(".tar", ".json")))
        data = storage.get_bytes(shard["tar"])
        assert hashlib.sha256(data).hexdigest() == stats.sha256 == shard["sha256"]
        local = tmp / Path(shard["tar"]).name
        local.write_bytes(data)
        samples = list(wds.WebDataset(str(local), shardshuffle=False).decode("rgb8"))
        assert [s["__key__"] for s in samples] == stats.keys
        assert all(s["png"].shape == (32, 32, 3) for s in samples)
        assert all(s["json"]["category"] == shard["category"] for s in samples)
        tar_keys += stats.keys
    assert sorted(tar_keys) == sorted(keys)
    for name in storage.list(""):
        assert SECRET.encode() not in storage.get_bytes(name), name
    return index


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory, tiny_model, ray_local) -> Path:
    """One dataset made through the CLI; tests work on copies of it.

    Relative --out and --model, as users type them: the actors run in another directory.
    """
    base = tmp_path_factory.mktemp("gen")
    out = base / "sia-data"
    model = os.path.relpath(tiny_model, base)
    args = ["--model", model, "--out", "sia-data", "--workers", "1", *SMALL_ARGS]
    with contextlib.chdir(base):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "4 shards (12 images) written" in result.stdout
    return out


@pytest.fixture
def dataset_copy(local_dataset, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(local_dataset, dst)
    return dst


def upload_model(model: Path, s3_url: str, client) -> None:
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(model).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def test_end_to_end_to_s3(tiny_model, ray_local, s3_root, s3_client, tmp_path, caplog):
    # The model comes from S3 too: both actors fetch it into their node's cache at once.
    model_url = s3_root.replace("/data", "/models/tiny")
    upload_model(tiny_model, model_url, s3_client)
    report = generate(
        model=model_url,
        out=s3_root,
        workers=2,
        threads_per_worker=1,
        progress=False,
        **SMALL,
    )
    assert report.shards_written == 4 and report.images_written == 12
    index = check_dataset(
        s3_root, tmp_path, **{k: SMALL[k] for k in ("per_category", "shard_size")}
    )
    assert index["format_version"] == 1
    model_id = json.loads((tiny_model / "model_card.json").read_text())["model_id"]
    assert index["model_ids"] == [model_id] and index["model"]["source"] == model_url
    # The reader side of the contract streams the same shards back from S3.
    refs = list_shards(s3_root, categories=["bottle"])
    assert [r.count for r in refs] == [4, 2]
    assert sum(1 for _ in iter_shard_samples(refs[1].url)) == 2
    assert SECRET not in caplog.text and SECRET not in report.summary()


def test_end_to_end_to_local_folder(local_dataset, tmp_path):
    index = check_dataset(str(local_dataset), tmp_path, per_category=6, shard_size=4)
    card = (local_dataset / "README.md").read_text()
    assert "| bottle |" in card and "| 6 |" in card and "preview.png" in card
    assert index["spec"]["strengths"]["spec"] == "0.1:0.5"


def test_rerun_writes_nothing(dataset_copy, tiny_model, ray_local):
    before = snapshot(dataset_copy)
    report = generate(model=str(tiny_model), out=str(dataset_copy), progress=False, **SMALL)
    assert report.shards_written == 0 and report.shards_skipped == 4
    assert not report.indexed and "nothing written" in report.summary()
    assert snapshot(dataset_copy) == before


def test_rerun_after_a_crash_before_the_index_only_indexes(dataset_copy, tiny_model):
    before = snapshot(dataset_copy)
    for name in ("index.json", "README.md"):
        (dataset_copy / name).unlink()
    report = generate(model=str(tiny_model), out=str(dataset_copy), progress=False, **SMALL)
    assert report.shards_written == 0 and report.indexed
    after = snapshot(dataset_copy)
    assert set(after) == set(before)
    assert all(after[n] == before[n] for n in before if n.startswith("shards/"))


def test_lost_stats_redo_only_that_shard_bit_identically(dataset_copy, tiny_model, ray_local):
    before = snapshot(dataset_copy)
    (dataset_copy / "shards/bottle/bottle-000001.json").unlink()
    report = generate(
        model=str(tiny_model), out=str(dataset_copy), workers=1, progress=False, **SMALL
    )
    assert report.shards_written == 1 and report.shards_skipped == 3
    after = snapshot(dataset_copy)
    assert set(after) == set(before)
    for name in before:
        if name.startswith("shards/bottle/bottle-000001."):
            assert after[name][0] != before[name][0], f"{name} was not rewritten"
            assert after[name][1] == before[name][1], f"{name} differs after redo"
        elif name.startswith("shards/"):
            assert after[name] == before[name], f"{name} was touched"
    old, new = (json.loads(x["index.json"][1]) for x in (before, after))
    for key in ("command", "model"):  # they name this run's --out and --model spelling
        old.pop(key), new.pop(key)
    assert new == old
    assert after["manifest.parquet"][1] == before["manifest.parquet"][1]


def test_other_spec_is_refused_unless_overwrite(dataset_copy, tiny_model, ray_local):
    before = snapshot(dataset_copy)
    args = ["--model", str(tiny_model), "--out", str(dataset_copy), *SMALL_ARGS]
    refused = CliRunner().invoke(main, [*args, "--strengths", "0.2:0.3"])
    assert refused.exit_code == 2
    assert "different spec" in refused.stderr and "--overwrite" in refused.stderr
    assert "which differs in strengths=" in refused.stderr  # what differs, from spec.json
    assert snapshot(dataset_copy) == before

    done = CliRunner().invoke(main, [*args, "--strengths", "0.2:0.3", "--overwrite"])
    assert done.exit_code == 0, done.output
    table = read_manifest(open_storage(str(dataset_copy)))
    assert table.num_rows == 12
    assert all(0.2 <= s < 0.3 for s in table.column("strength").to_pylist())


def test_killed_actor_mid_run_every_shard_exactly_once(tiny_model, ray_local, tmp_path):
    out = tmp_path / "killed"
    killed = []

    def kill_one(result, runner):
        if not killed:
            victim = runner.busy_actors()[0]
            killed.append(victim)
            ray_local.kill(runner.actors[victim])

    report = generate(
        model=str(tiny_model),
        out=str(out),
        per_category=8,
        shard_size=2,
        batch_size=2,
        workers=2,
        threads_per_worker=1,
        max_attempts=3,
        progress=False,
        on_result=kill_one,
    )
    assert killed and report.actors_lost >= 1 and report.retries >= 1
    assert report.shards_written == 8 and not report.failed
    index = check_dataset(str(out), tmp_path, per_category=8, shard_size=2)
    ids = [s["shard"] for s in index["shards"]]
    assert len(ids) == len(set(ids)) == 8


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "dry"
    args = ["--model", str(tiny_model), "--out", str(out), "--dry-run", *SMALL_ARGS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "6 per category x 2 categories = 12" in result.stdout
    assert "4 (2 per category" in result.stdout
    assert not out.exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_refused(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sia-gen: error: "), result.stderr
    assert needle in lines[0]
    assert SECRET not in result.output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--strengths", "0.5:0.1"], "must be below"),
        (["--strengths", "abc"], "'abc' is not a number"),
        (["--strengths=-0.1"], ">= 0"),
        (["--strengths", ""], "empty"),
        (["--categories", "screw"], "unknown category 'screw'"),
        (["--categories", "/"], "invalid category name '/'"),
        (["--categories", ".."], "invalid category name '..'"),
        (["--categories", "bottle,../x"], "invalid category name '../x'"),
        (["--batch-size", "0"], "--batch-size"),
        (["--per-category", "0"], "--per-category"),
        (["--gpus-per-worker", "0"], "--gpus-per-worker"),
        (["--workers", "2", "--threads-per-worker", "64"], "needs 128 CPUs"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_model, tmp_path, extra, needle):
    out = tmp_path / "out"
    assert_refused(["--model", str(tiny_model), "--out", str(out), *extra], needle)
    assert not out.exists()


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    assert_refused(["--model", str(tmp_path / "nope"), "--out", str(out)], "no such folder")
    assert not out.exists()


def test_corrupt_model(tiny_model, tmp_path):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model, bad)
    weights = bad / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + b"\0" * 100)
    out = tmp_path / "out"
    assert_refused(["--model", str(bad), "--out", str(out)], "corrupt model")
    assert not out.exists()


def test_unreachable_endpoint(tiny_model, tmp_path):
    port = _closed_port()
    endpoint = f"http://key:topsecret@127.0.0.1:{port}"  # userinfo is never echoed
    args = ["--model", str(tiny_model), "--out", "s3://bucket/x", "--s3-endpoint-url", endpoint]
    assert_refused(args, f"cannot reach S3 endpoint http://127.0.0.1:{port}")
    result = CliRunner().invoke(main, args)
    assert "topsecret" not in result.output


def test_missing_bucket(tiny_model, s3_endpoint, s3_client):
    args = ["--model", str(tiny_model), "--out", "s3://no-such-bucket/x"]
    assert_refused([*args, "--s3-endpoint-url", s3_endpoint], "bucket does not exist")
    assert "no-such-bucket" not in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]


def test_no_credentials(tiny_model, s3_root, s3_client, tmp_path):
    # A fresh process: boto3's default session caches the credentials it found earlier.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    exe = Path(sys.executable).parent / "sia-gen"
    proc = subprocess.run(
        [str(exe), "--model", str(tiny_model), "--out", s3_root],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"sia-gen: error: no S3 credentials found for {s3_root}"
    ]
    bucket = s3_root.split("/")[2]
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_generate_raises_gen_error_for_python_callers(tiny_model, tmp_path):
    with pytest.raises(GenError, match="unknown category"):
        generate(model=str(tiny_model), out=str(tmp_path / "o"), categories="screw")


def test_a_dataset_of_the_old_default_is_told_how_to_resume(tmp_path):
    """Made before --strength-min-t defaulted to 500 (its spec has no strength_min_t): the
    refusal says that --strength-min-t 0 resumes it."""
    from generated_dataset import small_spec

    from sia_pipeline.format.spec import write_spec
    from sia_pipeline.gen.generate import GenError, _refuse_other_spec
    from sia_pipeline.gen.root import RootState

    storage = open_storage(str(tmp_path))
    before = small_spec(strength_min_t=0)
    write_spec(storage, before.to_dict(), before.spec_hash, {})
    state = RootState(done={}, other_spec=f"spec {before.spec_hash}", index_current=False)
    now = small_spec()
    with pytest.raises(GenError, match="--strength-min-t 0 resumes that dataset") as err:
        _refuse_other_spec(storage, state, now, overwrite=False)
    assert "differs in strength_min_t=None (this run: 500)" in str(err.value)
    _refuse_other_spec(storage, state, now, overwrite=True)  # --overwrite: no refusal
