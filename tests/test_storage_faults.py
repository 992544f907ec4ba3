"""Flaky S3: retries with backoff, resumed streams, one-line errors after the last retry.

A seeded fault proxy (``tests/fault_proxy.py``) sits between the code and the loopback moto
server and injects 503 SlowDown, 500 InternalError, resets before a response, bodies cut
mid-stream and latency. At 20 % faults every path completes with the same bytes as a
fault-free run; at 100 % it stops with one line naming the URL, the S3 code and "transient";
once the fault clears a rerun completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pytest
from botocore.exceptions import ResponseStreamingError
from click.testing import CliRunner
from generated_dataset import BATCH_SIZE, CATEGORIES, PER_CATEGORY, SHARD_SIZE, upload

from sia_pipeline.io.s3_retry import ResumableBody, RetryPolicy
from sia_pipeline.io.storage import StorageError, open_storage

SECRET = "testing-secret"  # conftest's loopback secret key: must never be printed
FAST = RetryPolicy(max_attempts=4, backoff_s=0.0)


@pytest.fixture
def fast_retries(monkeypatch):
    """Few, quick retries for the runs that are meant to fail (driver-side clients)."""
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- ResumableBody against scripted bodies ----------------------------------------------


class CutBody:
    """A body that yields ``data`` but raises a streaming error after ``cut_after`` bytes."""

    def __init__(self, data: bytes, cut_after: int | None) -> None:
        self.data, self.cut_after, self.pos, self.closed = data, cut_after, 0, False

    def read(self, n: int) -> bytes:
        if self.cut_after is not None and self.pos >= self.cut_after:
            raise ResponseStreamingError(error="Connection broken: IncompleteRead")
        end = self.pos + n if self.cut_after is None else min(self.pos + n, self.cut_after)
        out = self.data[self.pos : end]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True


def scripted(data: bytes, cuts: list[int | None]):
    """(first response, reopen, calls): response ``i`` is cut ``cuts[i]`` bytes after its start."""
    calls: list[tuple[int, str | None]] = []
    bodies: list[CutBody] = []

    def response(offset: int) -> dict:
        i = len(bodies)
        cut = cuts[i] if i < len(cuts) else None
        body = CutBody(data[offset:], cut)
        bodies.append(body)
        return {"Body": body, "ContentLength": len(data) - offset, "ETag": '"e1"'}

    def reopen(offset: int, etag: str | None) -> dict:
        calls.append((offset, etag))
        return response(offset)

    return response(0), reopen, calls, bodies


def fail(err, tries):
    return StorageError(f"cut ({type(err).__name__}) after {tries} attempts", "cut", True)


def test_resumable_body_resumes_at_the_offset_reached():
    data = random.Random(0).randbytes(10_000)
    first, reopen, calls, bodies = scripted(data, [3000, 2500, 0, 1])
    body = ResumableBody(reopen, first, fail, FAST)
    got = body.read(1000) + body.read()
    assert got == data
    # each ranged GET starts where the previous body was cut, pinned to the first ETag
    assert calls == [(3000, '"e1"'), (5500, '"e1"'), (5500, '"e1"'), (5501, '"e1"')]
    assert body.resumes == 4 and all(b.closed for b in bodies[:-1])
    body.close()
    assert bodies[-1].closed


def test_resumable_body_works_with_the_tar_reader():
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(5):
            blob = random.Random(i).randbytes(7000)
            info = tarfile.TarInfo(f"k{i}.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    first, reopen, _, _ = scripted(data, [4000, 9000, 12000])
    with tarfile.open(fileobj=ResumableBody(reopen, first, fail, FAST), mode="r|") as tar:
        sizes = [m.size for m in tar]
    assert sizes == [7000] * 5


def test_resumable_body_gives_up_after_attempts_without_progress():
    data = bytes(5000)
    first, reopen, calls, _ = scripted(data, [100, 0, 0, 0, 0, 0])
    body = ResumableBody(reopen, first, fail, FAST)
    assert body.read(100) == bytes(100)
    with pytest.raises(StorageError, match=r"cut \(ResponseStreamingError\) after 4 attempts"):
        body.read()
    assert [o for o, _ in calls] == [100, 100, 100]  # 4 tries: the cut one and 3 reopens


def test_call_with_retry_covers_only_what_botocore_does_not():
    import urllib3.exceptions
    from botocore.exceptions import ClientError

    from sia_pipeline.io.s3_retry import call_with_retry

    calls = []

    def cut_twice():
        calls.append(1)
        if len(calls) < 3:
            msg = "Connection broken: IncompleteRead"
            raise urllib3.exceptions.ProtocolError(msg)
        return "ok"

    assert call_with_retry(cut_twice, FAST) == ("ok", 3)
    throttled = ClientError({"Error": {"Code": "SlowDown"}}, "GetObject")

    def slow():
        calls.append(1)
        raise throttled

    calls.clear()
    with pytest.raises(ClientError):  # botocore retried it already: not again
        call_with_retry(slow, FAST)
    assert len(calls) == 1


def test_cut_error_responses_are_retried(fault_proxy, s3_root, monkeypatch):
    """A 404's body cut mid-way (urllib3 ProtocolError, not retried by botocore) is retried."""
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")
    st = open_storage(s3_root, fault_proxy.url)
    fault_proxy.set(mode="cut", rate=0.5)
    for _ in range(8):
        with pytest.raises(FileNotFoundError):
            st.get_bytes("no/such/key")
        assert not st.exists("no/such/key")
        assert st.list("no") == []
    assert fault_proxy.counts["cut"] >= 5, fault_proxy.counts


def test_retry_knobs_are_validated(monkeypatch):
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(StorageError, match="SIA_S3_MAX_ATTEMPTS must be a number >= 1"):
        open_storage("s3://bucket/x")
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.25")
    assert open_storage("s3://bucket/x").policy == RetryPolicy(3, 0.25)


# --- Storage through the fault proxy -----------------------------------------------------


def test_storage_round_trip_at_20_percent_faults(fault_proxy, s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")
    rng = random.Random(1)
    blobs = {
        f"d/obj-{i:02d}.bin": rng.randbytes(rng.choice([10, 5_000, 400_000])) for i in range(24)
    }
    fault_proxy.set(mode="mix", rate=0.2)
    st = open_storage(s3_root, fault_proxy.url)
    for name, blob in blobs.items():
        if len(blob) > 100_000:
            (tmp_path / "f").write_bytes(blob)
            st.put_file(tmp_path / "f", name)
        else:
            st.put_bytes(blob, name)
    assert st.list("d") == sorted(blobs)
    assert {n: st.size(n) for n in blobs} == {n: len(b) for n, b in blobs.items()}
    assert {n: sha(st.get_bytes(n)) for n in blobs} == {n: sha(b) for n, b in blobs.items()}
    assert st.put_if_absent("d/lease", b"token-1") is True
    assert st.put_if_absent("d/lease", b"token-2") is False
    # faults of most kinds were injected, bodies among them cut mid-stream
    assert len(fault_proxy.counts) >= 4 and fault_proxy.counts["cut"] >= 1, fault_proxy.counts
    assert sum(fault_proxy.counts.values()) >= 8, (fault_proxy.counts, fault_proxy.requests)


@pytest.mark.parametrize(
    ("mode", "code"),
    [("slowdown", "SlowDown"), ("internal", "InternalError"), ("reset", "ConnectionClosedError")],
)
def test_outage_ends_in_one_line_naming_code_and_transient(
    fault_proxy, s3_root, fast_retries, mode, code
):
    st = open_storage(s3_root, fault_proxy.url)
    st.put_bytes(b"x" * 1000, "a/b.bin")
    fault_proxy.set(mode=mode, rate=1.0)
    for op in (lambda: st.get_bytes("a/b.bin"), lambda: st.put_bytes(b"y", "a/c"), st.list):
        with pytest.raises(StorageError) as info:
            op()
        msg = str(info.value)
        assert "\n" not in msg and SECRET not in msg
        assert code in msg and "transient, gave up after 3 attempts" in msg, msg
        assert s3_root in msg
        assert info.value.transient and info.value.code == code
    fault_proxy.set(rate=0.0)
    assert st.get_bytes("a/b.bin") == b"x" * 1000


def test_permanent_errors_are_not_called_transient(s3_root):
    st = open_storage(s3_root)
    with pytest.raises(FileNotFoundError):
        st.get_bytes("nope")
    with pytest.raises(StorageError, match=r"bucket does not exist") as info:
        open_storage("s3://no-such-bucket-x/y").check_writable()
    assert not info.value.transient


# --- the trainer's shard stream ------------------------------------------------------------


def stream_fingerprint(root: str, endpoint: str | None) -> list[tuple[str, str]]:
    from realnet_train.data.sia_stream import sia_pipeline

    samples = sia_pipeline(root, resampled=False, endpoint_url=endpoint)
    return [(s["key"], sha(s["image"].tobytes())) for s in samples]


def test_trainer_shard_stream_under_faults(
    tiny_sia, s3_root, s3_endpoint, fault_proxy, monkeypatch
):
    upload(tiny_sia, s3_root, s3_endpoint)
    clean = stream_fingerprint(str(tiny_sia), None)
    assert len(clean) == 18
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")
    fault_proxy.set(mode="mix", rate=0.2)
    assert stream_fingerprint(s3_root, fault_proxy.url) == clean
    fault_proxy.set(mode="cut", rate=0.6)  # bodies cut mid-shard: reads resume
    assert stream_fingerprint(s3_root, fault_proxy.url) == clean
    cut_tars = [p for m, p, f in fault_proxy.log if f == "cut" and m == "GET" and ".tar" in p]
    assert cut_tars, fault_proxy.log  # a shard body was cut and the read resumed
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "2")
    fault_proxy.set(mode="internal", rate=1.0)
    with pytest.raises(StorageError, match=r"S3 error InternalError \(transient, gave up after"):
        stream_fingerprint(s3_root, fault_proxy.url)
    fault_proxy.set(rate=0.0)
    assert stream_fingerprint(s3_root, fault_proxy.url) == clean


# --- sia-publish and sia-gen -----------------------------------------------------------------


def s3_snapshot(s3_root: str, endpoint: str) -> dict[str, str]:
    st = open_storage(s3_root, endpoint)
    return {name: sha(st.get_bytes(name)) for name in st.list("")}


def local_snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, result.output
    assert SECRET not in result.output
    return errors[0]


def test_sia_publish_under_faults(dataset, s3_root, s3_endpoint, fault_proxy, monkeypatch):
    from sia_pipeline.cli.publish import main as publish_main

    upload(dataset, s3_root, s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")
    fault_proxy.set(mode="internal", rate=1.0)
    failed = CliRunner().invoke(publish_main, [s3_root])
    assert failed.exit_code == 1, failed.output
    line = one_line_error(failed)
    assert "InternalError (transient" in line and "rerun" in line
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "8")
    fault_proxy.set(mode="mix", rate=0.2)
    flaky = CliRunner().invoke(publish_main, [s3_root])
    assert flaky.exit_code == 0, flaky.output
    assert sum(fault_proxy.counts.values()) >= 5
    after_faults = s3_snapshot(s3_root, s3_endpoint)
    fault_proxy.set(rate=0.0)
    clean = CliRunner().invoke(publish_main, [s3_root])
    assert clean.exit_code == 0, clean.output
    assert s3_snapshot(s3_root, s3_endpoint) == after_faults  # the faulty run wrote the same
    shards = {k: v for k, v in local_snapshot(dataset).items() if k.startswith("shards/")}
    assert {k: after_faults[k] for k in shards} == shards


GEN_ARGS = {
    "categories": ",".join(CATEGORIES),
    "strengths": "0.1:0.5",
    "per_category": PER_CATEGORY,
    "shard_size": SHARD_SIZE,
    "steps": 2,
    "batch_size": BATCH_SIZE,
}


def gen_cli_args(model: Path, out: str) -> list[str]:
    args = ["--model", str(model), "--out", out, "--workers", "1", "--no-progress"]
    for k, v in GEN_ARGS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_sia_gen_under_faults(dataset, tiny_model, ray_local, s3_root, fault_proxy, monkeypatch):
    """The same shards as the fault-free ``dataset`` (made by the same code, locally)."""
    from sia_pipeline.cli.gen import main as gen_main

    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)  # driver and actors
    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("SIA_S3_BACKOFF_S", "0.01")
    fault_proxy.set(mode="slowdown", rate=1.0)
    down = CliRunner().invoke(gen_main, gen_cli_args(tiny_model, s3_root))
    assert down.exit_code == 1, down.output
    line = one_line_error(down)
    assert "HTTP 503 (transient" in line and s3_root in line  # a HEAD: no code

    monkeypatch.setenv("SIA_S3_MAX_ATTEMPTS", "8")
    fault_proxy.set(mode="mix", rate=0.2)
    flaky = CliRunner().invoke(gen_main, gen_cli_args(tiny_model, s3_root))
    assert flaky.exit_code == 0, flaky.output
    assert sum(fault_proxy.counts.values()) >= 5, fault_proxy.counts
    fault_proxy.set(rate=0.0)
    got = s3_snapshot(s3_root, fault_proxy.url)
    want = local_snapshot(dataset)
    tars = sorted(k for k in want if k.endswith(".tar"))
    assert len(tars) == 4
    assert {k: got[k] for k in tars} == {k: want[k] for k in tars}
    index = json.loads(open_storage(s3_root, fault_proxy.url).get_bytes("index.json"))
    assert sorted(s["sha256"] for s in index["shards"]) == sorted(want[k] for k in tars)
