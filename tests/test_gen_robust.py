"""sia-gen under failure: spilled uploads, charged actor deaths, placement, timeouts, progress.

Storage faults are injected with a worker subclass whose storage fails the first N
uploads of each shard (counted in files, so every actor sees the same count).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from sia_pipeline.cli.gen import main
from sia_pipeline.format.v1 import ShardStats
from sia_pipeline.gen import runner as runner_mod
from sia_pipeline.gen.generate import generate
from sia_pipeline.gen.plan import make_spec, make_tasks
from sia_pipeline.gen.progress import ProgressView
from sia_pipeline.gen.runner import RayWorker, ShardRunner
from sia_pipeline.gen.spill import Spill
from sia_pipeline.gen.worker import SamplerWorker
from sia_pipeline.io.raycluster import ActorPlan

ROOT = Path(__file__).resolve().parents[1]


def tasks_for(model_id: str, per_category: int = 4, shard_size: int = 2):
    spec = make_spec(
        model_id=model_id,
        model_categories={"bottle": 0, "magnetic_tile": 1},
        resolution=32,
        per_category=per_category,
        shard_size=shard_size,
        steps=2,
    )
    return make_tasks(spec, batch_size=2)


class FailingUploads:
    """A storage whose ``put_file`` fails the first ``n`` times per object (counted in files)."""

    def __init__(self, inner, count_dir: str, n: int) -> None:
        self.inner, self.count_dir, self.n = inner, Path(count_dir), n

    def put_file(self, local, rel):
        marker = self.count_dir / rel.replace("/", "_")
        seen = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(seen + 1))
        if seen < self.n:
            msg = f"injected upload failure {seen + 1} of {rel}"
            raise OSError(msg)
        return self.inner.put_file(local, rel)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _ship_this_module() -> None:
    """Actors cannot import this test module: Ray sends its classes by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def failing_worker_cls(count_dir: Path, n: int) -> type[RayWorker]:
    """A RayWorker subclass whose storage fails the first ``n`` uploads of each shard."""
    _ship_this_module()

    class FailingWorker(RayWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.storage = FailingUploads(self.storage, str(count_dir), n)

    return FailingWorker


@pytest.fixture(scope="module")
def worker(tiny_model):
    return SamplerWorker(str(tiny_model), "/nonexistent-unused", device="cpu", threads=1)


def clean_shas(worker, tasks, out: Path) -> dict[str, str]:
    """sha256 of each shard as a plain, fault-free worker writes it."""
    from sia_pipeline.io.storage import open_storage

    storage, spill = worker.storage, worker.spill
    worker.storage, worker.spill = open_storage(str(out)), Spill(out / "spill")
    try:
        results = [worker(t) for t in tasks]
    finally:
        worker.storage, worker.spill = storage, spill
    assert all(r.ok for r in results)
    return {r.shard_id: r.sha256 for r in results}


def files_under(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file()) if path.exists() else []


# -- the worker and its spill, without Ray -------------------------------------------------


def test_failed_upload_is_spilled_and_retried_without_sampling(worker, tmp_path):
    from sia_pipeline.io.storage import open_storage

    task = tasks_for(worker.model.model_id)[0]
    clean = clean_shas(worker, [task], tmp_path / "clean")
    out = tmp_path / "out"
    worker.storage = FailingUploads(open_storage(str(out)), str(tmp_path), 1)
    worker.spill = Spill(tmp_path / "spill")

    first = worker(task)
    assert not first.ok and first.sampled and first.spilled
    assert "injected upload failure" in first.error
    assert [p.name for p in worker.spill.entries()] == [f"{task.shard_id}.tar"]
    assert not [n for n in files_under(tmp_path / "spill") if ".part-" in n]

    sampler = worker._sampler(task)
    real = sampler.sample
    sampler.sample = lambda *a: pytest.fail("a spilled shard was sampled again")
    try:
        second = worker(task)
    finally:
        sampler.sample = real
    assert second.ok and not second.sampled
    assert second.sha256 == clean[task.shard_id]
    data = (out / task.tar_name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == clean[task.shard_id]
    stats = ShardStats.from_json((out / task.stats_name).read_bytes())
    assert stats.sha256 == clean[task.shard_id] and stats.size == len(data)
    assert files_under(tmp_path / "spill") == []  # uploaded: the spill is cleaned


def test_spill_is_bounded(worker, tmp_path):
    from sia_pipeline.io.storage import open_storage

    task = tasks_for(worker.model.model_id)[1]
    worker.storage = FailingUploads(open_storage(str(tmp_path / "out")), str(tmp_path), 1)
    worker.spill = Spill(tmp_path / "spill", max_bytes=100)  # smaller than one shard
    result = worker(task)
    assert not result.ok and result.sampled and not result.spilled
    assert files_under(tmp_path / "spill") == []
    assert worker(task).sampled  # nothing kept: the retry samples


def test_sweep_removes_what_killed_processes_left(tmp_path):
    spill = Spill(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    folder = tmp_path / "spec"
    folder.mkdir()
    orphan = folder / f"bottle-000000.tar.part-{dead_pid}-abcd1234"
    mine = folder / f"bottle-000001.tar.part-{os.getpid()}-abcd1234"
    kept = folder / "bottle-000002.tar"
    stale = folder / "bottle-000003.tar"
    for p in (orphan, mine, kept, stale):
        p.write_bytes(b"x")
    os.utime(stale, (1, 1))
    assert spill.sweep() == 2
    assert sorted(p.name for p in folder.iterdir()) == [mine.name, kept.name]


# -- the runner on the session's local Ray ---------------------------------------------------


def test_upload_faults_are_paid_in_uploads_not_samplings(tiny_model, worker, ray_local, tmp_path):
    tasks = tasks_for(worker.model.model_id)  # 4 shards of 2 images
    clean = clean_shas(worker, tasks, tmp_path / "clean")
    out, spill = tmp_path / "out", tmp_path / "spill"
    kwargs = {"model_url": str(tiny_model), "out_url": str(out), "spill_dir": str(spill)}
    (tmp_path / "fails").mkdir()
    cls = failing_worker_cls(tmp_path / "fails", 2)  # every shard's first 2 uploads fail
    runner = ShardRunner(kwargs, ActorPlan(2, 1, 0, 1), max_uploads=5, device="cpu", worker_cls=cls)
    report = runner.run(tasks)
    assert not report.failed and len(report.done) == 4
    assert report.resamplings == 0
    assert report.reuploads == 8 and report.retries == 8
    assert sorted(r.shard_id for r in report.done) == sorted(clean)
    for task in tasks:
        assert (
            hashlib.sha256((out / task.tar_name).read_bytes()).hexdigest() == clean[task.shard_id]
        )
    assert files_under(spill) == []

    # Storage down for good: each shard gives up after its upload budget, kept in the spill;
    # once storage is back, a rerun uploads them all without sampling any.
    out2 = tmp_path / "out2"
    (tmp_path / "fails2").mkdir()
    kwargs2 = dict(kwargs, out_url=str(out2))
    down = ShardRunner(
        kwargs2,
        ActorPlan(1, 1, 0, 1),
        max_uploads=2,
        device="cpu",
        worker_cls=failing_worker_cls(tmp_path / "fails2", 10**6),
    )
    failed = down.run(tasks)
    assert len(failed.failed) == 4 and not failed.done and failed.resamplings == 0
    assert len(Spill(spill).entries()) == 4
    again = ShardRunner(kwargs2, ActorPlan(1, 1, 0, 1), device="cpu").run(tasks)
    assert len(again.done) == 4 and not again.failed
    assert again.reuploads == 4 and again.resamplings == 0
    assert not any(r.sampled for r in again.done)
    assert files_under(spill) == []


def dying_worker_cls(marker: Path) -> type[RayWorker]:
    """Exits its process when the first task (ever, across actors) starts sampling."""
    _ship_this_module()

    class DyingWorker(RayWorker):
        def _report(self, tag, images, phase):
            super()._report(tag, images, phase)
            if images == 0 and phase == "sample" and not marker.exists():
                marker.write_text(tag)
                import ray

                ray.get(self.progress.board.snapshot.remote())  # the report has landed
                os._exit(1)

    return DyingWorker


def test_actor_death_charges_only_the_task_it_was_running(tiny_model, ray_local, tmp_path):
    tasks = tasks_for(_model_id(tiny_model))
    out, spill, marker = tmp_path / "out", tmp_path / "spill", tmp_path / "died"
    kwargs = {"model_url": str(tiny_model), "out_url": str(out), "spill_dir": str(spill)}
    runner = ShardRunner(
        kwargs,
        ActorPlan(1, 1, 0, 1),
        max_in_flight=2,
        max_attempts=2,
        device="cpu",
        worker_cls=dying_worker_cls(marker),
    )
    report = runner.run(tasks)
    victim = marker.read_text().split("#")[0]
    assert report.actors_lost == 1 and len(report.done) == 4 and not report.failed
    # Two tasks were on the actor; only the one sampling is charged and resampled.
    assert report.retries == 2
    assert dict(runner._attempts) == {victim: 1}
    assert report.resamplings == 1
    assert files_under(spill) == []  # the killed task's part file was swept


def _model_id(model: Path) -> str:
    import json

    return json.loads((model / "model_card.json").read_text())["model_id"]


def test_actor_deaths_are_budgeted_per_time_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(runner_mod.time, "monotonic", lambda: clock[0])
    runner = ShardRunner({}, ActorPlan(2, 1, 0, 1), max_actor_deaths=2, death_window_s=600)
    runner._deaths.extend([clock[0], clock[0]])
    assert runner._deaths_in_window() == 2  # the budget is spent now...
    clock[0] += 601
    assert runner._deaths_in_window() == 0  # ...and back an hour later


# -- nothing hangs, nothing is created -------------------------------------------------------


def assert_refused(args: list[str], needle: str, out: Path) -> str:
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sia-gen: error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--workers", "100"], "100 sampling actors (--workers 100) of 1 CPU each do not fit"),
        (["--threads-per-worker", "8"], "no node can hold a sampling actor of 8 CPUs"),
    ],
)
def test_actors_that_cannot_be_placed_are_refused(tiny_model, ray_local, tmp_path, extra, needle):
    assert_refused(["--model", str(tiny_model), *extra], needle, tmp_path / "out")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "sia_pipeline.cli.gen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_unreachable_or_silent_cluster_is_refused_in_time(tiny_model, tmp_path):
    port = _closed_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    cases = [
        (f"127.0.0.1:{port}", f"cannot reach the Ray cluster at 127.0.0.1:{port}"),
        (f"ray://127.0.0.1:{port}", f"cannot reach the Ray cluster at ray://127.0.0.1:{port}"),
        (f"ray://127.0.0.1:{silent.getsockname()[1]}", "did not answer within 3 s"),
    ]
    try:
        for address, needle in cases:
            out = tmp_path / "out"
            args = ["--model", str(tiny_model), "--out", str(out), "--ray-address", address]
            proc = run_cli([*args, "--ray-timeout", "3", "--per-category", "2"])
            assert proc.returncode == 2, proc.stderr
            # (a warning that a local --out must be shared by all nodes may come first)
            last = proc.stderr.strip().splitlines()[-1]
            assert ": error: " in last and needle in last, proc.stderr
            assert "Traceback" not in proc.stderr
            assert not out.exists()
    finally:
        silent.close()


def test_dry_run_of_a_billion_images_is_o_categories(tiny_model, tmp_path):
    tracemalloc.start()
    try:
        report = generate(
            model=str(tiny_model),
            out=str(tmp_path / "dry"),
            per_category=10**9,
            shard_size=10**4,
            dry_run=True,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "1000000000 per category x 2 categories = 2000000000" in report.plan
    assert report.shards_total == 2 * 10**5
    assert peak < 64 * 2**20, peak
    assert not (tmp_path / "dry").exists()


# -- what the operator sees ------------------------------------------------------------------


def test_progress_without_a_terminal_logs_lines_with_rate_and_eta(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr("sia_pipeline.gen.progress.time.perf_counter", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="sia_pipeline.gen.progress")
    view = ProgressView(total=100, shards=10, bar=True, interval=5)  # stderr is no TTY here
    view.waiting(0, 2)
    clock[0] = 6.0
    view.waiting(1, 2)
    view.start_clock()
    clock[0] = 8.0
    view.update(10, 1)  # under the interval: no line
    clock[0] = 16.0
    view.update(40, 4)
    view.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "sampling 100 images in 10 shards",
        "starting sampling actors (loading the model): 1/2 ready",
        "40/100 images (40%), 4.0 images/s, ETA 15s, shards 4/10",
        "40/100 images (40%), 4.0 images/s, ETA 15s, shards 4/10",
    ]


def test_cli_run_has_no_ray_banner_and_reports_churn(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--out", str(out), "--categories", "bottle"]
    proc = run_cli(
        [*args, "--per-category", "2", "--batch-size", "1", "--workers", "1", "--steps", "2"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Ray" not in proc.stderr and "Token" not in proc.stderr, proc.stderr
    assert "sia_pipeline.gen.progress: sampling 2 images in 1 shards" in proc.stderr
    assert "2/2 images (100%)" in proc.stderr and "\r" not in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 shards (2 images) written by 1 CPU worker(s)")
    assert "retries 0, actors lost 0, re-uploads 0, re-samplings 0" in summary


def test_storage_outage_mid_run_fails_cleanly_and_rerun_only_uploads(
    tiny_model, ray_local, s3_root, s3_client, tmp_path
):
    """The bucket vanishes after the first shard: the run exits with GenFailed (the
    shards sampled meanwhile wait in the spill); with the bucket back, the rerun
    uploads those without sampling them again."""
    from sia_pipeline.gen.generate import GenFailed

    bucket = s3_root.split("/")[2]
    spill = tmp_path / "spill"
    gone: list[str] = []

    def drop_bucket(result, runner):
        from botocore.exceptions import ClientError

        if gone:
            return
        for _ in range(100):  # the actor may upload the next shard between list and delete
            for obj in s3_client.list_objects_v2(Bucket=bucket).get("Contents", []):
                s3_client.delete_object(Bucket=bucket, Key=obj["Key"])
            try:
                s3_client.delete_bucket(Bucket=bucket)
                break
            except ClientError as e:
                if e.response["Error"]["Code"] != "BucketNotEmpty":
                    raise
        gone.append(result.shard_id)

    args = {
        "model": str(tiny_model),
        "out": s3_root,
        "per_category": 4,
        "shard_size": 2,
        "batch_size": 2,
        "steps": 2,
        "workers": 1,
        "threads_per_worker": 1,
        "spill_dir": str(spill),
        "progress": False,
    }
    with pytest.raises(GenFailed, match=r"re-samplings 0\): .*bucket does not exist") as err:
        generate(max_uploads=2, on_result=drop_bucket, **args)
    assert "rerun the same command" in str(err.value)
    spilled = len(Spill(spill).entries())
    assert spilled >= 1

    s3_client.create_bucket(Bucket=bucket)
    report = generate(**args)
    assert report.shards_written == 4 and not report.failed
    assert report.reuploads == spilled and report.resamplings == 0
    assert files_under(spill) == []


def test_a_short_queue_waits_for_actors_still_starting():
    """2 shards, 2 actors, one ready first: it takes one shard, not both (the demo's case)."""
    from types import SimpleNamespace

    submitted: list[tuple[int, str]] = []

    def handle(a: int) -> SimpleNamespace:
        def remote(task, tag):
            submitted.append((a, task.shard_id))
            return f"ref-{tag}"

        return SimpleNamespace(__call__=SimpleNamespace(remote=remote))

    def runner_with(per_category: int) -> ShardRunner:
        """Actor 0 ready, actor 1 still starting; shards of 2 images over both categories."""
        runner = ShardRunner({}, ActorPlan(2, 1, 0, 1), max_in_flight=2)
        runner._pool = {
            0: runner_mod._Actor(handle(0)),
            1: runner_mod._Actor(handle(1), ready="r1"),
        }
        runner.actors = {0: runner._pool[0].handle}
        runner._source = list(tasks_for("sdas-0", per_category=per_category, shard_size=2))
        return runner

    runner = runner_with(2)  # 2 shards
    runner._feed()
    assert [a for a, _ in submitted] == [0]  # the second shard is kept for actor 1
    runner._pool[1].ready = None  # actor 1 is ready now
    runner.actors[1] = runner._pool[1].handle
    runner._feed()
    assert sorted(a for a, _ in submitted) == [0, 1]
    assert len({shard for _, shard in submitted}) == 2

    # With more shards than starting actors, the ready one still keeps two in flight.
    submitted.clear()
    runner = runner_with(4)  # 4 shards
    runner._feed()
    assert [a for a, _ in submitted] == [0, 0]
