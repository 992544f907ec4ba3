"""The shard writer and the sampling worker, called directly (no Ray)."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import webdataset as wds

from sia_pipeline.format.v1 import ShardStats, decode_image
from sia_pipeline.format.writer import ShardTarWriter, encode_image
from sia_pipeline.gen.plan import make_spec, make_tasks
from sia_pipeline.gen.worker import SamplerWorker


def tasks_for(model_id, **kw):
    args = {
        "model_id": model_id,
        "model_categories": {"bottle": 0, "magnetic_tile": 1},
        "resolution": 32,
        "per_category": 5,
        "shard_size": 5,
    }
    args.update(kw)
    return make_tasks(make_spec(**args), batch_size=2)


@pytest.fixture(scope="module")
def worker_factory(tiny_model):
    def make(out):
        return SamplerWorker(str(tiny_model), str(out), device="cpu", threads=1)

    return make


def test_png_round_trips_exactly():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(img, "png")), img)
    jpg = decode_image(encode_image(img, "jpg"))
    assert jpg.shape == (32, 32, 3)


def test_encode_refuses_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32), "png")
    with pytest.raises(ValueError, match="webp"):
        encode_image(np.zeros((4, 4, 3), np.uint8), "webp")


def test_tar_bytes_are_reproducible(tmp_path):
    digests = []
    for name in ("a.tar", "b.tar"):
        w = ShardTarWriter(tmp_path / name)
        w.write("bottle-000000-000000", b"\x89PNG fake", "png", {"strength": 0.1})
        digests.append(w.close())
    assert digests[0] == digests[1]
    assert digests[0][1] == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()


def test_worker_writes_a_complete_shard(worker_factory, tmp_path):
    worker = worker_factory(tmp_path)
    task = tasks_for(worker.model.model_id)[0]
    result = worker(task)
    assert result.ok, result.error
    assert result.count == 5
    tar = tmp_path / task.tar_name
    stats = ShardStats.from_json((tmp_path / task.stats_name).read_bytes())
    assert stats.size == tar.stat().st_size
    assert stats.sha256 == result.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert stats.spec_hash == task.spec_hash
    assert [r["key"] for r in stats.samples] == stats.keys == [task.key(j) for j in range(5)]

    samples = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in samples] == stats.keys
    for j, s in enumerate(samples):
        meta = json.loads(s["json"])
        assert meta["strength"] == task.strengths[j]
        assert meta["seed"] == task.seeds[j]
        assert meta["model_id"] == worker.model.model_id
        assert meta["format_version"] == 1
        assert decode_image(s["png"]).shape == (32, 32, 3)


def test_same_task_gives_identical_bytes_and_images_do_not_depend_on_batch(
    worker_factory, tmp_path
):
    worker = worker_factory(tmp_path / "a")
    task = tasks_for(worker.model.model_id)[1]
    first = worker(task)
    second = worker(task)
    assert first.ok and second.ok
    assert first.sha256 == second.sha256
    # Per-sample generators: one image sampled alone equals the same image in its batch.
    img = worker._sampler(task).sample([task.category], [task.strengths[3]], [task.seeds[3]])[0]
    samples = list(wds.WebDataset(str(tmp_path / "a" / task.tar_name), shardshuffle=False))
    assert np.abs(decode_image(samples[3]["png"]).astype(int) - img.astype(int)).max() <= 1


def test_worker_reports_failures_as_values(worker_factory, tmp_path):
    worker = worker_factory(tmp_path)
    wrong = tasks_for("sdas-someone-else")[0]
    result = worker(wrong)
    assert not result.ok
    assert "sdas-someone-else" in result.error
    assert not (tmp_path / wrong.tar_name).exists()


def test_worker_reports_storage_errors(tiny_model, s3_endpoint, s3_root):
    bucket_gone = s3_root.replace("s3://", "s3://missing-")
    worker = SamplerWorker(str(tiny_model), bucket_gone, endpoint_url=s3_endpoint, device="cpu")
    task = tasks_for(worker.model.model_id, per_category=2)[0]
    result = worker(task)
    assert not result.ok
    assert "bucket does not exist" in result.error


def test_upload_of_one_shard_overlaps_sampling_of_the_next(worker_factory, tmp_path):
    """Two in-flight tasks (as a Ray actor with max_concurrency=2 runs them): the first
    one's upload waits until the second has started sampling, which only works if the
    sampling lock is released before the upload."""
    worker = worker_factory(tmp_path)
    first, second = tasks_for(worker.model.model_id)[:2]
    sampler = worker._sampler(first)
    first_sampling, second_sampling = threading.Event(), threading.Event()
    real_sample, real_put = sampler.sample, worker.storage.put_file
    overlapped = []

    def sample(categories, strengths, seeds):
        if seeds[0] == first.seeds[0]:
            first_sampling.set()
        if seeds[0] == second.seeds[0]:
            second_sampling.set()
        return real_sample(categories, strengths, seeds)

    def put_file(local, rel):
        if rel == first.tar_name:
            overlapped.append(second_sampling.wait(timeout=120))
        return real_put(local, rel)

    sampler.sample = sample
    worker.storage.put_file = put_file
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(worker, first)
        assert first_sampling.wait(timeout=120)  # the first task holds the sampling lock
        b = pool.submit(worker, second)
        results = [a.result(), b.result()]
    assert all(r.ok for r in results), results
    assert overlapped == [True]
