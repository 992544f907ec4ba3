"""Ray orchestration: long-lived sampling actors, fed shard tasks, with retries and progress.

The only modules that import Ray are this one and :mod:`sia_pipeline.io.raycluster`. The
driver moves :class:`ShardTask` objects and gets :class:`ShardResult` objects back; image
bytes go from the actors straight to storage, progress through a tiny board actor.

Failure rules: a task that fails while sampling is charged one of its ``max_attempts``;
a failed upload leaves the shard in the node's spill and the retry, sent to an actor on
that node, only uploads (``max_uploads`` per shard, with backoff); an actor's death
charges only the tasks it had started (queued ones go back for free), and a replacement
starts when the cluster has room, unless more than ``max_actor_deaths`` died within the
last ``death_window_s`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sia_pipeline.gen.options import RUN
from sia_pipeline.gen.plan import ShardTask
from sia_pipeline.gen.progress import BoardSink, ProgressBoard, ProgressView
from sia_pipeline.gen.worker import SamplerWorker, ShardResult
from sia_pipeline.io.raycluster import ActorPlan, fits_now, init_ray, plan_actors

__all__ = ["ActorPlan", "RunReport", "ShardRunner", "init_ray", "plan_actors"]

log = logging.getLogger(__name__)

POLL_S = 0.5
STARTUP_TIMEOUT_S = 600.0  # an actor that has not loaded its model by then is given up


@dataclass
class RunReport:
    """What a run did: finished and failed shards, images, wall time, actor churn."""

    done: list[ShardResult] = field(default_factory=list)
    failed: list[ShardResult] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0  # from the first actor ready to the last shard
    startup_seconds: float = 0.0  # until the first actor had loaded its model
    actors_started: int = 0
    actors_lost: int = 0
    retries: int = 0  # task submissions after the first, for any reason
    reuploads: int = 0  # spilled shards uploaded again without sampling
    resamplings: int = 0  # samplings of a shard after its first
    not_started: int = 0  # tasks never handed to an actor (all actors gone)
    actors: list[dict[str, Any]] = field(default_factory=list)  # info() of each ready actor

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class RayWorker(SamplerWorker):
    """The worker as an actor: results and info name the Ray node it runs on."""

    def _node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def info(self) -> dict[str, Any]:
        return dict(super().info(), node_id=self._node())

    def __call__(self, task: ShardTask, tag: str = "") -> ShardResult:
        result = super().__call__(task, tag)
        result.node_id = self._node()
        return result


@dataclass
class _Actor:
    handle: Any
    ready: Any = None  # the pending info() ref until the actor is ready
    deadline: float = 0.0
    node: str = ""
    load: int = 0


class ShardRunner:
    """Keeps every actor fed with up to ``max_in_flight`` tasks until all shards are done.

    Args:
        worker_kwargs: :class:`SamplerWorker` arguments except ``device``, ``threads``
            and ``progress``.
        actors: the pool to start (see :func:`sia_pipeline.io.raycluster.plan_actors`).
        device: the actors' torch device; None: ``actors.device``.
        on_result: called as ``on_result(result, runner)`` after each finished task
            (tests use it to kill an actor or remove a node mid-run).
        view: where progress goes (None: no display).
        worker_cls: the actor class (tests inject storage faults with a subclass).
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        actors: ActorPlan,
        max_in_flight: int = RUN.max_in_flight,
        max_attempts: int = 3,
        max_uploads: int = 5,
        max_actor_deaths: int | None = None,
        death_window_s: float = 600.0,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        device: str | None = None,
        view: ProgressView | None = None,
        on_result: Callable[[ShardResult, ShardRunner], None] | None = None,
        worker_cls: type[RayWorker] = RayWorker,
    ) -> None:
        import ray

        self.plan = actors
        self.max_in_flight = max(1, max_in_flight)
        self.max_attempts = max(1, max_attempts)
        self.max_uploads = max(1, max_uploads)
        self.max_actor_deaths = max_actor_deaths or max(3, 2 * actors.count)
        self.death_window_s = death_window_s
        self.startup_timeout_s = startup_timeout_s
        self.view = view
        self.on_result = on_result
        self._actor_cls = ray.remote(worker_cls).options(
            num_cpus=actors.num_cpus,
            num_gpus=actors.num_gpus,
            max_concurrency=self.max_in_flight,
            max_restarts=0,
        )
        self._board = None
        self._worker_kwargs = dict(
            worker_kwargs, device=device or actors.device, threads=actors.threads
        )
        self.actors: dict[int, Any] = {}  # ready actors (tests kill these)
        self._pool: dict[int, _Actor] = {}
        self._next_actor = 0
        self.report = RunReport()
        self._queue: deque[ShardTask] = deque()
        self._source: Sequence[ShardTask] = []
        self._next_i = 0
        self._inflight: dict[Any, tuple[int, ShardTask, str]] = {}
        self._attempts: Counter[str] = Counter()
        self._uploads: Counter[str] = Counter()
        self._sampled: Counter[str] = Counter()
        self._submits = 0
        self._not_before: dict[str, float] = {}
        self._pin: dict[str, str] = {}  # shard -> node holding its spilled copy
        self._errors: dict[str, str] = {}
        self._deaths: deque[float] = deque()
        self._board_state: dict[str, tuple[int, str]] = {}
        self._done_images = 0
        self._t_ready: float | None = None

    def busy_actors(self) -> list[int]:
        """Ids (keys of ``actors``) of live, ready actors that hold unfinished tasks."""
        return [a for a in self.actors if self._pool[a].load > 0]

    # -- actors -------------------------------------------------------------------------

    def _start_board(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict[str, Any] = {"num_cpus": 0}
        try:  # beside the driver, so that it lives as long as the run
            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=True)
        except Exception:  # e.g. a ray:// client has no node of its own
            log.debug("progress board placed by Ray", exc_info=True)
        self._board = ray.remote(ProgressBoard).options(**options).remote()
        self._worker_kwargs["progress"] = BoardSink(self._board)

    def _deaths_in_window(self) -> int:
        now = time.monotonic()
        while self._deaths and now - self._deaths[0] > self.death_window_s:
            self._deaths.popleft()
        return len(self._deaths)

    def _start_actor(self) -> None:
        handle = self._actor_cls.remote(**self._worker_kwargs)
        a = self._next_actor
        self._next_actor += 1
        deadline = time.monotonic() + self.startup_timeout_s
        self._pool[a] = _Actor(handle, handle.info.remote(), deadline)
        self.report.actors_started += 1

    def _top_up(self) -> None:
        """Start actors up to the plan, while the cluster has room and deaths allow."""
        while len(self._pool) < self.plan.count:
            if self._deaths_in_window() >= self.max_actor_deaths:
                return
            if self.report.actors_started >= self.plan.count and not fits_now(self.plan):
                return  # a replacement waits until a node has room again
            self._start_actor()

    def _lose_actor(self, a: int, error: str) -> None:
        actor = self._pool.pop(a, None)
        if actor is None:
            return
        self.actors.pop(a, None)
        self.report.actors_lost += 1
        self._deaths.append(time.monotonic())
        log.warning("sampling actor %d lost (%s)", a, error)
        self._last_actor_error = error

    def _on_ready(self, a: int, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        actor = self._pool[a]
        actor.ready = None
        try:
            info = ray.get(ref)
        except RayError as e:
            self._lose_actor(a, f"failed to start: {_short(e)}")
            return
        actor.node = info.get("node_id", "")
        self.actors[a] = actor.handle
        self.report.actors.append(dict(info, actor=a))
        if self._t_ready is None:
            self._t_ready = time.perf_counter()
            if self.view is not None:
                self.view.start_clock()
        log.debug("sampling actor %d ready: %s", a, info)

    # -- the loop -----------------------------------------------------------------------

    def run(self, tasks: Sequence[ShardTask]) -> RunReport:
        """Run every task to success, or until its budget is spent.

        ``tasks`` is read in order and only as actors need work (a lazy
        :class:`~sia_pipeline.gen.plan.ShardTasks` builds each task then).
        """
        import ray

        t0 = time.perf_counter()
        self._queue = deque()
        self._source, self._next_i = tasks, 0
        self._last_actor_error = ""
        try:
            self._start_board()
            self._top_up()
            while self._queue or self._inflight or self._next_i < len(self._source):
                self._top_up()
                self._feed()
                if not self._inflight and not self._starting():
                    if not self._pool:
                        break  # tasks left but no actor can be started
                    self._sleep_until_eligible()  # delayed retries only
                    continue
                self._step()
            no_actor = f"no sampling actor could run it ({self._last_actor_error or 'none'})"
            for task in self._queue:
                why = self._errors.get(task.shard_id, no_actor)
                self.report.failed.append(ShardResult(task.shard_id, ok=False, error=why))
            self.report.not_started = len(self._source) - self._next_i
            self._sweep()
        finally:
            for actor in self._pool.values():
                ray.kill(actor.handle)
            if self._board is not None:
                ray.kill(self._board)
            self._pool.clear()
            self.actors.clear()
            t1 = self._t_ready or time.perf_counter()
            self.report.startup_seconds = t1 - t0
            self.report.seconds = time.perf_counter() - t1
            self.report.resamplings = sum(max(0, n - 1) for n in self._sampled.values())
        return self.report

    def _pull(self) -> bool:
        """Move the next task from the (lazy) source to the back of the queue; False if none."""
        if self._next_i >= len(self._source):
            return False
        self._queue.append(self._source[self._next_i])
        self._next_i += 1
        return True

    def _starting(self) -> list[int]:
        return [a for a, actor in self._pool.items() if actor.ready is not None]

    def _sleep_until_eligible(self) -> None:
        now = time.monotonic()
        wait = min((self._not_before.get(t.shard_id, now) for t in self._queue), default=now)
        time.sleep(min(max(0.0, wait - now), POLL_S) or 0.05)

    def _step(self) -> None:
        """Wait for one task result or actor start (or the poll interval), then handle it."""
        import ray

        starting = {actor.ready: a for a, actor in self._pool.items() if actor.ready is not None}
        refs = list(self._inflight) + list(starting)
        ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S) if refs else ([], [])
        for ref in ready:
            if ref in starting:
                self._on_ready(starting[ref], ref)
            else:
                self._on_task(ref)
        now = time.monotonic()
        for a in [a for a in self._starting() if self._pool[a].deadline < now]:
            ray.kill(self._pool[a].handle)
            self._lose_actor(a, f"not ready after {self.startup_timeout_s:.0f} s")
        self._tick()

    def _eligible(self, node: str) -> int | None:
        """Index of the first queued task this node's actor may take now (tasks are
        built from the lazy source only when no queued one fits)."""
        now = time.monotonic()
        live_nodes = {actor.node for actor in self._pool.values()}
        for i, task in enumerate(self._queue):
            if self._not_before.get(task.shard_id, 0.0) > now:
                continue
            pin = self._pin.get(task.shard_id)
            if pin and pin != node and pin in live_nodes:
                continue
            return i
        return len(self._queue) - 1 if self._pull() else None

    def _unsubmitted(self) -> int:
        """Tasks not yet given to any actor: queued ones plus those the source still holds."""
        return len(self._queue) + len(self._source) - self._next_i

    def _feed(self) -> None:
        """Top every ready actor up to ``max_in_flight`` tasks, level by level, so that
        a short queue is spread over all actors instead of piling onto the first.

        An actor's second and later tasks never take one that an actor still starting
        would get: with 2 shards and 2 actors, the first actor ready must not hold both
        while the other (ready seconds later) stays idle for the whole run."""
        for level in range(1, self.max_in_flight + 1):
            for a, handle in list(self.actors.items()):
                actor = self._pool[a]
                if actor.load >= level:
                    continue
                if level > 1 and self._unsubmitted() <= len(self._starting()):
                    return
                i = self._eligible(actor.node)
                if i is None:
                    continue
                task = self._queue[i]
                del self._queue[i]
                self._submits += 1
                tag = f"{task.shard_id}#{self._submits}"
                self._inflight[handle.__call__.remote(task, tag)] = (a, task, tag)
                actor.load += 1

    def _on_task(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError, RayError

        a, task, tag = self._inflight.pop(ref)
        if a in self._pool:
            self._pool[a].load -= 1
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as e:
            started = self._started(tag)
            self._lose_actor(a, f"died: {type(e).__name__}")
            if started == "sample":
                self._sampled[task.shard_id] += 1
            self._retry(task, f"actor died: {type(e).__name__}", charge=started == "sample")
            return
        except RayError as e:
            self._retry(task, f"{type(e).__name__}: {_short(e)}")
            return
        finally:
            self._forget(tag)
        if result.sampled:
            self._sampled[task.shard_id] += 1
        elif result.ok or result.spilled:
            self.report.reuploads += 1
        if result.ok:
            self._pin.pop(task.shard_id, None)
            self.report.done.append(result)
            self.report.images += result.count
            self._done_images += result.count
            if self.on_result is not None:
                self.on_result(result, self)
        elif result.spilled:
            self._pin[task.shard_id] = result.node_id
            self._retry(task, result.error, upload=True)
        else:
            self._pin.pop(task.shard_id, None)
            self._retry(task, result.error)

    def _started(self, tag: str) -> str:
        """``sample``/``upload`` if the task with ``tag`` had started, else ``""``."""
        import ray
        from ray.exceptions import RayError

        try:
            self._board_state = ray.get(self._board.snapshot.remote(), timeout=30)
        except RayError:
            return "sample"  # without the board, assume the worst
        return self._board_state.get(tag, (0, ""))[1]

    def _forget(self, tag: str) -> None:
        self._board_state.pop(tag, None)
        if self._board is not None:
            self._board.forget.remote([tag])

    def _retry(self, task: ShardTask, error: str, charge: bool = True, upload: bool = False):
        """Requeue a failed task at the front (after a backoff), or give it up."""
        sid = task.shard_id
        self._errors[sid] = error
        if upload:
            n = self._uploads[sid] = self._uploads[sid] + 1
            limit, what = self.max_uploads, "uploads"
        elif charge:
            n = self._attempts[sid] = self._attempts[sid] + 1
            limit, what = self.max_attempts, "attempts"
        else:
            n, limit, what = 0, 1, "attempts"
        if n >= limit:
            log.error("shard %s failed after %d %s: %s", sid, n, what, error)
            self.report.failed.append(ShardResult(sid, ok=False, error=error))
            return
        log.warning("retrying shard %s: %s", sid, error)
        self.report.retries += 1
        if n:
            self._not_before[sid] = time.monotonic() + min(30.0, 0.5 * 2 ** (n - 1))
        self._queue.appendleft(task)

    def _tick(self) -> None:
        """Refresh the progress view from the board (one small actor call per poll)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        if self.view is None or self._board is None:
            return
        if self._t_ready is None:
            self.view.waiting(len(self.actors), self.plan.count)
            return
        try:
            self._board_state = ray.get(self._board.snapshot.remote(), timeout=10)
        except (GetTimeoutError, RayError):
            pass
        tags = {tag for _, _, tag in self._inflight.values()}
        running = sum(n for tag, (n, _) in self._board_state.items() if tag in tags)
        self.view.update(self._done_images + running, len(self.report.done))

    def _sweep(self) -> None:
        """Ask each ready actor to clear its node's spill of dead processes' parts."""
        import ray
        from ray.exceptions import RayError

        refs = [handle.sweep.remote() for handle in self.actors.values()]
        try:
            ray.get(refs, timeout=30)
        except RayError as e:
            log.debug("spill sweep failed: %s", e)


def _short(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[-1] if lines else type(err).__name__)[:300]
