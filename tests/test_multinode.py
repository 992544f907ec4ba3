"""Multi-node placement, GPU pinning and a lost node, on a real multi-node Ray cluster.

The cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes declaring logical
GPUs) runs in a helper process, ``multinode_run.py``, apart from the session's local Ray.
The model runs on CPU; what is tested is placement, ``CUDA_VISIBLE_DEVICES`` per actor,
and that losing a node mid-run costs neither a shard nor a bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # three Ray nodes and three actors: about a minute on 2 cores
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def multinode(tiny_model, tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(tiny_model), str(work)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=work,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("MULTINODE ")), work


def test_gpus_beyond_one_per_worker_are_refused_before_sampling(multinode):
    """A worker samples on one GPU, so 4 per worker is refused before the cluster is asked
    (more CPUs than any node has: test_gen_robust)."""
    out, _ = multinode
    assert "--gpus-per-worker must be in (0, 1]" in out["refused"]
    assert not out["refused_out_exists"]


def test_one_actor_per_gpu_each_pinned_to_its_own(multinode):
    out, _ = multinode
    first = out["actors"][:3]  # the pool as first placed (a replacement may follow)
    by_node: dict[str, list[str]] = {}
    for info in first:
        by_node.setdefault(info["node_id"], []).append(info["cuda_visible_devices"])
    assert set(by_node) == {out["node_a"], out["node_b"]}  # spread over both GPU nodes
    assert sorted(by_node[out["node_a"]]) == ["0", "1"]  # two actors, one GPU each
    assert by_node[out["node_b"]] == ["0"]
    assert all(info["device"] == "cpu" for info in out["actors"])


def test_losing_a_node_mid_run_loses_no_shard_and_no_bit(multinode):
    out, work = multinode
    assert out["ok"] and out["removed"] and out["clean_ok"]
    assert out["actors_lost"] >= 1 and out["retries"] >= 1
    assert not out["failed"] and out["shards_written"] == 16 and out["images"] == 32
    lost, clean = work / "lost" / "shards", work / "clean" / "shards"
    names = sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file())
    assert len(names) == 32  # 16 tars + 16 stats
    got = sorted(p.relative_to(lost).as_posix() for p in lost.rglob("*") if p.is_file())
    assert got == names  # every shard exactly once, nothing else
    for name in names:
        assert (lost / name).read_bytes() == (clean / name).read_bytes(), name
    assert not [p for p in (work / "spill").rglob("*") if p.is_file()]
