"""Ray orchestration: long-lived sampling actors, fed shard tasks, with retries and progress.

The only module that imports Ray. The driver moves :class:`ShardTask` objects and gets
:class:`ShardResult` objects back; image bytes go from the actors straight to storage.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sia_pipeline.gen.plan import ShardTask
from sia_pipeline.gen.worker import SamplerWorker, ShardResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPlan:
    """How many sampling actors to start, and what each one reserves."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def describe(self) -> str:
        if self.num_gpus:
            return f"{self.count} GPU worker(s), {self.num_gpus:g} GPU each"
        return f"{self.count} CPU worker(s), {self.threads} thread(s) each"


@dataclass
class RunReport:
    """What a run did: finished and failed shards, images, wall time, actor churn."""

    done: list[ShardResult] = field(default_factory=list)
    failed: list[ShardResult] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0  # from all actors ready to the last shard
    startup_seconds: float = 0.0  # starting the actors and loading the model in each
    actors_started: int = 0
    actors_lost: int = 0
    retries: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start a local Ray; returns True if this call started it.

    An already initialised Ray (tests, notebooks) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,  # worker failures come back as ShardResult errors
        "logging_level": logging.WARNING,
        "configure_logging": False,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
    return True


def plan_actors(
    workers: int | None = None,
    gpus_per_worker: float = 1.0,
    threads_per_worker: int | None = None,
) -> ActorPlan:
    """Size the actor pool from the cluster's resources.

    With GPUs: one actor per ``gpus_per_worker`` GPUs (``workers`` caps it). Without:
    by default one single-threaded actor per CPU: for small models about as fast as
    fewer multi-threaded actors, and much less hurt when other jobs share the cores
    (see ``bench/sia_gen_throughput.py``).
    """
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus > 0 and gpus_per_worker > 0:
        count = max(1, math.floor(gpus / gpus_per_worker + 1e-9))
        if workers:
            count = min(count, workers)
        threads = threads_per_worker or max(1, cpus // count)
        return ActorPlan(count, num_cpus=1, num_gpus=gpus_per_worker, threads=threads)
    if workers:
        threads = threads_per_worker or max(1, cpus // workers)
    else:
        threads = threads_per_worker or 1
        workers = max(1, cpus // threads)
    return ActorPlan(workers, num_cpus=threads, num_gpus=0, threads=threads)


class ShardRunner:
    """Keeps every actor fed with up to ``max_in_flight`` tasks until all shards are done.

    A task that fails is retried (up to ``max_attempts`` in all); a task whose actor died
    goes back to the queue and a fresh actor takes the dead one's place.

    Args:
        worker_kwargs: :class:`SamplerWorker` arguments except ``device`` and ``threads``.
        actors: the pool to start (see :func:`plan_actors`).
        on_result: called as ``on_result(result, runner)`` after each finished task
            (tests use it to kill an actor mid-run).
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        actors: ActorPlan,
        max_in_flight: int = 2,
        max_attempts: int = 3,
        progress: bool = True,
        on_result: Callable[[ShardResult, ShardRunner], None] | None = None,
    ) -> None:
        import ray

        self.plan = actors
        self.max_in_flight = max(1, max_in_flight)
        self.max_attempts = max(1, max_attempts)
        self.progress = progress
        self.on_result = on_result
        self.max_actor_starts = actors.count * 3
        self._actor_cls = ray.remote(SamplerWorker).options(
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            max_concurrency=self.max_in_flight,
            max_restarts=0,
        )
        self._worker_kwargs = dict(worker_kwargs, device=actors.device, threads=actors.threads)
        self.actors: dict[int, Any] = {}
        self._next_actor = 0
        self.report = RunReport()
        self._queue: deque[ShardTask] = deque()
        self._inflight: dict[Any, tuple[int, ShardTask]] = {}
        self._load: Counter[int] = Counter()
        self._attempts: dict[str, int] = {}
        self._errors: dict[str, str] = {}

    def busy_actors(self) -> list[int]:
        """Ids (keys of ``actors``) of live actors that hold unfinished tasks."""
        return [a for a in self.actors if self._load[a] > 0]

    def _start_actor(self) -> bool:
        if self.report.actors_started >= self.max_actor_starts:
            return False
        self.actors[self._next_actor] = self._actor_cls.remote(**self._worker_kwargs)
        self._next_actor += 1
        self.report.actors_started += 1
        return True

    def _await_ready(self) -> str:
        """Wait until every actor has loaded its model; replace actors that die doing it.

        Returns the last start-up error ("" if none), for the report when none started.
        """
        import ray
        from ray.exceptions import RayActorError

        error = ""
        pending = {a: actor.ping.remote() for a, actor in self.actors.items()}
        while pending:
            a, ref = pending.popitem()
            try:
                ray.get(ref)
            except RayActorError as e:
                error = str(e).strip().splitlines()[-1][:300]
                log.error("sampling actor %d failed to start: %s", a, error)
                self.actors.pop(a, None)
                self.report.actors_lost += 1
                if self._start_actor():
                    pending[self._next_actor - 1] = self.actors[self._next_actor - 1].ping.remote()
        return error

    def run(self, tasks: list[ShardTask]) -> RunReport:
        """Run every task once to success (or until it has failed ``max_attempts`` times)."""
        import ray

        t0 = t1 = time.perf_counter()
        self._queue = deque(tasks)
        try:
            for _ in range(self.plan.count):
                self._start_actor()
            startup_error = self._await_ready()
            t1 = time.perf_counter()
            self.report.startup_seconds = t1 - t0
            total = sum(t.count for t in tasks)
            with tqdm(total=total, unit="img", desc="sia-gen", disable=not self.progress) as bar:
                while self._queue or self._inflight:
                    self._feed()
                    if not self._inflight:
                        break  # tasks left but no actor could be started
                    result = self._next_result()
                    if result is None:
                        continue
                    self.report.done.append(result)
                    self.report.images += result.count
                    bar.update(result.count)
                    bar.set_postfix_str(f"shards {len(self.report.done)}/{len(tasks)}")
                    if self.on_result is not None:
                        self.on_result(result, self)
            for task in self._queue:  # only when every actor is gone
                msg = self._errors.get(task.shard_id, f"no sampling actor started: {startup_error}")
                self.report.failed.append(ShardResult(task.shard_id, ok=False, error=msg))
        finally:
            for actor in self.actors.values():
                ray.kill(actor)
            self.actors.clear()
            self.report.seconds = time.perf_counter() - t1
        return self.report

    def _feed(self) -> None:
        """Top every live actor up to ``max_in_flight`` tasks, level by level, so that
        a short queue is spread over all actors instead of piling onto the first."""
        for level in range(1, self.max_in_flight + 1):
            for a, actor in list(self.actors.items()):
                if self._queue and self._load[a] < level:
                    task = self._queue.popleft()
                    self._inflight[actor.__call__.remote(task)] = (a, task)
                    self._load[a] += 1

    def _next_result(self) -> ShardResult | None:
        """The next successful result; None when a task failed (and was requeued or given up)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        [ref], _ = ray.wait(list(self._inflight), num_returns=1)
        a, task = self._inflight.pop(ref)
        self._load[a] -= 1
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as e:
            if a in self.actors:  # the first of its tasks to report the death
                del self.actors[a]
                self.report.actors_lost += 1
                log.warning("sampling actor %d died; starting a replacement", a)
                self._start_actor()
            self._retry(task, f"actor died: {type(e).__name__}")
            return None
        except RayError as e:
            self._retry(task, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
            return None
        if not result.ok:
            self._retry(task, result.error)
            return None
        return result

    def _retry(self, task: ShardTask, error: str) -> None:
        """Requeue a failed task at the front, or give it up after ``max_attempts``."""
        n = self._attempts[task.shard_id] = self._attempts.get(task.shard_id, 0) + 1
        self._errors[task.shard_id] = error
        if n >= self.max_attempts:
            log.error("shard %s failed %d times: %s", task.shard_id, n, error)
            self.report.failed.append(ShardResult(task.shard_id, ok=False, error=error))
        else:
            log.warning("retrying shard %s: %s", task.shard_id, error)
            self.report.retries += 1
            self._queue.appendleft(task)
