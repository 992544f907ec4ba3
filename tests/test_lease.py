"""One writer per root: the ``_lease.json`` lease, on a local folder and on the loopback S3
server, alone and with drivers racing for it; and ``sia-gen`` refusing a second driver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sia_pipeline.cli.gen import main as gen_cli
from sia_pipeline.io.lease import LEASE_NAME, Lease, LeaseHeld, LeaseInfo, LeaseLost, LeaseSlot
from sia_pipeline.io.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh dataset root: a local folder or an ``s3://`` prefix on the loopback server."""
    if request.param == "local":
        return open_storage(tmp_path / "root")
    s3_root = request.getfixturevalue("s3_root")
    return open_storage(s3_root, request.getfixturevalue("s3_endpoint"))


def _lease(storage) -> LeaseInfo:
    return LeaseInfo.from_bytes(storage.get_bytes(LEASE_NAME))


def _plant(storage, **fields) -> LeaseInfo:
    """A lease written by a driver that is not this process (a crashed one, say)."""
    now = time.time()
    base = dict(driver="x" * 32, host="node-7", pid=4242, spec_hash="aaaa", started=now - 60)
    base.update(expires=now + 60, ttl=60.0)
    info = LeaseInfo(**(base | fields))
    storage.put_bytes(info.to_bytes(), LEASE_NAME)
    return info


def test_acquire_renew_release(root):
    lease = Lease(root, "spec1", ttl=1.5).acquire()
    try:
        info = _lease(root)
        assert (info.spec_hash, info.pid, info.host) == ("spec1", os.getpid(), socket.gethostname())
        assert info.driver == lease.driver and info.ttl == 1.5
        first = info.expires
        time.sleep(1.2)  # > ttl / 3: the thread has renewed it
        assert _lease(root).expires > first and _lease(root).driver == lease.driver
        lease.check()
    finally:
        lease.release()
    assert not root.exists(LEASE_NAME)


def test_second_driver_same_spec_refused(root):
    with Lease(root, "spec1", ttl=30):
        with pytest.raises(LeaseHeld) as e:
            Lease(root, "spec1", ttl=30).acquire()
    msg = str(e.value)
    assert "already being written by another sia-gen of this spec" in msg
    assert f"host {socket.gethostname()} pid {os.getpid()}, started " in msg
    assert "one writer per root" in msg and "\n" not in msg
    Lease(root, "spec1").acquire().release()  # free again once released


def test_second_driver_other_spec_refused(root):
    _plant(root, spec_hash="aaaa")
    with pytest.raises(LeaseHeld) as e:
        Lease(root, "bbbb", ttl=30).acquire()
    msg = str(e.value)
    assert "with a different spec (aaaa; this run is bbbb): host node-7 pid 4242" in msg
    assert "its lease expires in 60 s unless renewed" in msg or "expires in 59 s" in msg


def test_expired_lease_is_taken_over(root):
    _plant(root, expires=time.time() - 1)
    with Lease(root, "bbbb", ttl=30) as lease:
        assert _lease(root).driver == lease.driver
    assert not root.exists(LEASE_NAME)
    assert not [n for n in root.list("") if "takeover" in n]  # markers cleaned


def test_dead_driver_on_this_host_is_taken_over_at_once(root):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _plant(root, host=socket.gethostname(), pid=proc.pid)  # live for another minute
    with Lease(root, "bbbb", ttl=30) as lease:
        assert _lease(root).driver == lease.driver


@pytest.mark.parametrize("expired", [False, True])
def test_racing_drivers_one_wins(root, expired):
    """Eight drivers at once, on a free root or on an expired lease: exactly one holds it."""
    if expired:
        _plant(root, expires=time.time() - 1)
    barrier = threading.Barrier(8)
    won, refused = [], []

    def driver(i: int) -> None:
        storage = open_storage(root.url, getattr(root, "endpoint_url", None))
        lease = Lease(storage, f"spec{i}", ttl=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as e:
            refused.append(e.holder)

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert len(won) == 1 and len(refused) == 7
        assert _lease(root).driver == won[0].driver
    finally:
        for lease in won:
            lease.release()


def test_lease_taken_over_is_lost(root):
    lease = Lease(root, "spec1", ttl=30).acquire()
    try:
        _plant(root, spec_hash="spec2")  # someone replaced it
        with pytest.raises(LeaseLost, match="was taken over by host node-7 pid 4242"):
            lease.renew()
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert _lease(root).spec_hash == "spec2"  # not ours: left alone


def test_stale_takeover_marker_does_not_block(root):
    import hashlib

    current = _plant(root, expires=time.time() - 1).to_bytes()
    marker = f"{LEASE_NAME}.takeover-{hashlib.sha256(current).hexdigest()[:16]}"
    dead = LeaseInfo("y" * 32, "node-8", 1, "cccc", 0.0, time.time() - 1, 1.0)
    root.put_bytes(dead.to_bytes(), marker)  # a taker that died between its two writes
    with Lease(root, "bbbb", ttl=30) as lease:
        assert _lease(root).driver == lease.driver


def test_lease_ttl_is_checked():
    with pytest.raises(ValueError, match="--lease-ttl must be >= 1 s, got 0"):
        LeaseSlot(0)


# --- sia-gen ---------------------------------------------------------------------------

GEN = ["--categories", "bottle", "--per-category", "4", "--shard-size", "1", "--steps", "2"]
GEN += ["--batch-size", "1", "--workers", "1", "--no-progress"]


def _wait_for(path_exists, what: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path_exists():
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.1)


def _driver(ray, model: Path, out: str, *extra: str) -> subprocess.Popen:
    """A ``sia-gen`` process joining the session's Ray (no Ray start of its own)."""
    cmd = [sys.executable, "-m", "sia_pipeline.cli.gen", *GEN, "--model", str(model)]
    cmd += ["--ray-address", ray.get_runtime_context().gcs_address]
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen(
        [*cmd, "--out", out, *extra], env=env, stderr=subprocess.PIPE, text=True
    )


def test_gen_second_driver_refused_while_first_runs(tiny_model, s3_root, s3_endpoint, ray_local):
    """Two concurrent sia-gen drivers on one S3 root: the second (other spec, then same
    spec) exits 2 at once naming the first; the first finishes a clean dataset."""
    storage = open_storage(s3_root, s3_endpoint)
    first = _driver(ray_local, tiny_model, s3_root)
    try:
        _wait_for(lambda: storage.exists(LEASE_NAME), "lease", first)
        for seed, what in (("1", "with a different spec"), ("0", "of this spec")):
            res = CliRunner().invoke(
                gen_cli, [*GEN, "--model", str(tiny_model), "--out", s3_root, "--seed", seed]
            )
            assert res.exit_code == 2, res.output
            assert f"being written by another sia-gen {what}" in res.output, res.output
            assert f"pid {first.pid}, started" in res.output
            assert "Traceback" not in res.output
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    assert not storage.exists(LEASE_NAME)
    index = json.loads(storage.get_bytes("index.json"))
    assert index["num_samples"] == 4 and index["spec"]["seed"] == 0


def test_gen_crashed_driver_blocks_for_at_most_the_ttl(tiny_model, tmp_path, ray_local):
    """A driver killed mid-run leaves its lease; a rerun from another host waits for it to
    expire (refused meanwhile, naming it), then finishes the dataset."""
    from sia_pipeline.gen.generate import GenError, generate

    out = tmp_path / "root"
    crashed = _driver(ray_local, tiny_model, str(out), "--lease-ttl", "3")
    _wait_for(lambda: (out / LEASE_NAME).exists(), "lease", crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=30)
    storage = open_storage(out)
    info = _lease(storage)
    assert info.pid == crashed.pid and info.ttl == 3
    # As if it had run on another node, where its pid cannot be checked.
    storage.put_bytes(LeaseInfo(**(vars(info) | {"host": "node-7"})).to_bytes(), LEASE_NAME)
    kwargs = dict(categories="bottle", per_category=4, shard_size=1, steps=2, batch_size=1)
    kwargs |= dict(workers=1, model=str(tiny_model), out=str(out), progress=False)
    if info.expires > time.time() + 0.5:
        with pytest.raises(GenError, match="already being written by another sia-gen .*node-7"):
            generate(**kwargs)
    time.sleep(max(0.0, info.expires - time.time()) + 0.1)
    report = generate(**kwargs)
    assert report.indexed and report.shards_written + report.shards_skipped == 4
    assert not (out / LEASE_NAME).exists()
