"""Ray orchestration: long-lived sampling actors, fed shard tasks, with retries and progress.

The only module that imports Ray. The driver moves :class:`ShardTask` objects and gets
:class:`ShardResult` objects back; image bytes go from the actors straight to storage.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sia_pipeline.plan import ShardTask
from sia_pipeline.worker import SamplerWorker, ShardResult

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
    seconds: float = 0.0
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
    """Size the actor pool from the cluster: one actor per ``gpus_per_worker`` GPUs when
    GPUs exist (``workers`` caps it), else ``workers`` CPU actors sharing the CPUs."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus > 0 and gpus_per_worker > 0:
        count = max(1, math.floor(gpus / gpus_per_worker + 1e-9))
        if workers:
            count = min(count, workers)
        threads = threads_per_worker or max(1, cpus // count)
        return ActorPlan(count, num_cpus=1, num_gpus=gpus_per_worker, threads=threads)
    count = workers or 1
    threads = threads_per_worker or max(1, cpus // count)
    return ActorPlan(count, num_cpus=threads, num_gpus=0, threads=threads)


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

    def _start_actor(self) -> bool:
        if self.report.actors_started >= self.max_actor_starts:
            return False
        self.actors[self._next_actor] = self._actor_cls.remote(**self._worker_kwargs)
        self._next_actor += 1
        self.report.actors_started += 1
        return True

    def run(self, tasks: list[ShardTask]) -> RunReport:
        """Run every task once to success (or until it has failed ``max_attempts`` times)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        t0 = time.perf_counter()
        queue: deque[ShardTask] = deque(tasks)
        attempts: dict[str, int] = {}
        last_error: dict[str, str] = {}
        inflight: dict[Any, tuple[int, ShardTask]] = {}
        load: dict[int, int] = {}
        for _ in range(self.plan.count):
            self._start_actor()
        bar = tqdm(
            total=sum(t.count for t in tasks),
            unit="img",
            desc="sia-gen",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        n_done = 0

        def retry(task: ShardTask, error: str) -> None:
            attempts[task.shard_id] = attempts.get(task.shard_id, 0) + 1
            last_error[task.shard_id] = error
            if attempts[task.shard_id] >= self.max_attempts:
                log.error(
                    "shard %s failed %d times: %s", task.shard_id, attempts[task.shard_id], error
                )
                self.report.failed.append(ShardResult(task.shard_id, ok=False, error=error))
            else:
                log.warning("retrying shard %s: %s", task.shard_id, error)
                self.report.retries += 1
                queue.appendleft(task)

        try:
            while queue or inflight:
                for a, actor in list(self.actors.items()):
                    while queue and load.get(a, 0) < self.max_in_flight:
                        task = queue.popleft()
                        inflight[actor.__call__.remote(task)] = (a, task)
                        load[a] = load.get(a, 0) + 1
                if not inflight:
                    break  # tasks left but no actor could be started
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                a, task = inflight.pop(ref)
                load[a] -= 1
                try:
                    result: ShardResult = ray.get(ref)
                except RayActorError as e:
                    if a in self.actors:  # first loss reported for this actor
                        del self.actors[a]
                        self.report.actors_lost += 1
                        log.warning("sampling actor %d died; starting a replacement", a)
                        self._start_actor()
                    retry(task, f"actor died: {type(e).__name__}")
                    continue
                except RayError as e:
                    retry(task, f"{type(e).__name__}: {str(e).splitlines()[0]}")
                    continue
                if not result.ok:
                    retry(task, result.error)
                    continue
                n_done += 1
                self.report.done.append(result)
                self.report.images += result.count
                bar.update(result.count)
                bar.set_postfix_str(f"shards {n_done}/{len(tasks)}")
                if self.on_result is not None:
                    self.on_result(result, self)
            for task in queue:  # only when every actor is gone
                msg = last_error.get(task.shard_id, "no sampling actor could be started")
                self.report.failed.append(ShardResult(task.shard_id, ok=False, error=msg))
        finally:
            bar.close()
            for actor in self.actors.values():
                ray.kill(actor)
            self.actors.clear()
            self.report.seconds = time.perf_counter() - t0
        return self.report
