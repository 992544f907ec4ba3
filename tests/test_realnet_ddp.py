"""Multi-process training: shards split by rank and worker, DDP under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from local_servers import free_port
from realnet_helpers import TINY_MODEL, TINY_RUN, small_mvtec
from torch.utils.data import DataLoader

from realnet_train.data import sia_stream
from realnet_train.data.sia_stream import epoch_shards, expand_shards, sia_pipeline

ROOT = Path(__file__).resolve().parents[1]


def keys_as_reader(monkeypatch, urls, slot: int, total: int, epochs: int = 1) -> list[str]:
    monkeypatch.setattr(sia_stream, "reader_slot", lambda: (slot, total))
    return [s["__key__"] for s in expand_shards(epoch_shards(urls, seed=3, epochs=epochs))]


@pytest.mark.parametrize("total", [1, 2, 3, 4, 6])
def test_each_epoch_reads_every_sample_once_across_readers(tiny_sia, monkeypatch, total):
    """3 shards x 6 samples, ``total`` = ranks x workers readers (more readers than shards
    switches to splitting samples inside each shard)."""
    urls = [r.url for r in sia_stream.sia_shards(str(tiny_sia))]
    per_reader = [keys_as_reader(monkeypatch, urls, i, total) for i in range(total)]
    seen = Counter(k for keys in per_reader for k in keys)
    assert len(seen) == 18 and set(seen.values()) == {1}
    if total <= 3:  # whole shards per reader: each reader's keys come in shard-sized runs
        assert all(len(keys) % 6 == 0 for keys in per_reader)
    # Two epochs: each sample exactly twice, and the second epoch in another shard order.
    two = keys_as_reader(monkeypatch, urls, 0, 1, epochs=2)
    assert Counter(two) == Counter({k: 2 for k in seen})
    assert two[:18] != two[18:] or len(urls) == 1


def test_ranks_and_dataloader_workers_split_a_pass(tiny_sia, monkeypatch):
    """Real DataLoader workers under two simulated ranks (WebDataset's RANK/WORLD_SIZE)."""
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipe = sia_pipeline(str(tiny_sia), resampled=False)
        loader = DataLoader(pipe, batch_size=None, num_workers=2, collate_fn=lambda s: s)
        keys += [s["key"] for s in loader]
    assert len(keys) == 18 and len(set(keys)) == 18


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += ["-m", "realnet_train.cli", *args]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.slow
def test_two_gloo_processes_train_checkpoint_on_rank_0_and_resume(shared_data, tiny_sia, tmp_path):
    data = small_mvtec(shared_data, tmp_path / "data", n_train=8)
    out = tmp_path / "run"
    args = ["--category", "bottle", "--data", str(data), "--sia", str(tiny_sia)]
    args += ["--out", str(out), "--device", "cpu", "--checkpoint-every", "2", *TINY_RUN]
    args += TINY_MODEL
    first = torchrun([*args, "--steps", "4"])
    assert first.returncode == 0, first.stderr[-3000:]
    reports = [json.loads(x) for x in first.stdout.splitlines() if x.startswith("{")]
    assert len(reports) == 1 and reports[0]["world_size"] == 2  # rank 0 alone reports
    log = json.loads((out / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["step"] == 4
    sums = log["rank_param_sums"]  # DDP keeps both ranks' weights equal
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-9, abs=1e-9)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "train_log.json"]
    assert log["calibration"] is not None  # rank 0 calibrates on held-out good images

    again = torchrun([*args, "--steps", "6", "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["step"] == 6 and log["steps_this_run"] == 2 and len(log["history"]["seg"]) == 6
    assert log["rank_param_sums"][0] == pytest.approx(log["rank_param_sums"][1], rel=1e-9)
