"""Joining or starting Ray, and sizing the actor pool so that it can really be placed.

Every wait here has a bound: connecting gives up after ``timeout_s`` with one line, and a
pool the cluster cannot place is refused before any sampling, naming what is missing.
Ray's own start-up notices go to a log file in the Ray session folder, not to the user.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RAY_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """Ray cannot be reached, or cannot place the actors asked for (CLI exit 2)."""


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


def _quiet_ray_logger(verbose: bool) -> logging.handlers.MemoryHandler | None:
    """Hold Ray's driver-side notices (token auth, "SIGTERM handler is not set"...).

    ``ray.init(configure_logging=False)`` clears the ``ray`` logger's handlers, and that
    logger does not propagate, so its records reach :data:`logging.lastResort` (stderr).
    For the length of ``ray.init`` that last resort is a buffer; afterwards the ``ray``
    logger writes to a file in the Ray session (``-v`` keeps Ray's own stderr handler).
    """
    if verbose:
        return None
    buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    buffer._previous = logging.lastResort  # type: ignore[attr-defined]
    logging.lastResort = buffer
    return buffer


def _flush_ray_notices(buffer: logging.handlers.MemoryHandler | None) -> None:
    """Write the held notices to ``<ray session>/logs/sia-gen-driver.log``; later ones too."""
    if buffer is None:
        return
    logging.lastResort = buffer._previous  # type: ignore[attr-defined]
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001
        target: logging.Handler = logging.FileHandler(
            os.path.join(session, "logs", "sia-gen-driver.log")
        )
    except Exception:  # ray:// clients have no local session folder
        target = logging.NullHandler()
    target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    buffer.setTarget(target)
    buffer.flush()
    ray_log = logging.getLogger("ray")
    for handler in list(ray_log.handlers):
        ray_log.removeHandler(handler)
    ray_log.addHandler(target)
    ray_log.propagate = False


def _split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for ``auto`` and the like."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _probe(address: str, timeout_s: float) -> None:
    hp = _split_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        if isinstance(e, TimeoutError):
            why = f"no answer within {timeout_s:g} s (--ray-timeout)"
        else:
            why = e.strerror or type(e).__name__
        msg = f"cannot reach the Ray cluster at {address}: {why}"
        raise ClusterError(msg) from None


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    timeout_s: float = DEFAULT_RAY_TIMEOUT_S,
    verbose: bool = False,
) -> bool:
    """Join ``address`` (within ``timeout_s``) or start a local Ray; True if this call did it.

    An already initialised Ray (tests, notebooks) is used as it is.

    Raises:
        ClusterError: the address does not answer, or not as a Ray cluster, in time.
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
    buffer = _quiet_ray_logger(verbose)
    try:
        if not address:
            # In this thread: Ray ties the processes it starts to the starting thread.
            # address="local": always a fresh instance, never a stray cluster on this host.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
            return True
        _probe(address, timeout_s)
        _join(address, timeout_s, kwargs)
        return True
    finally:
        _flush_ray_notices(buffer)


def _join(address: str, timeout_s: float, kwargs: dict[str, Any]) -> None:
    """``ray.init(address)`` on a helper thread, so that a silent peer cannot hang us."""
    import ray

    box: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=connect, name="sia-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        msg = (
            f"the Ray cluster at {address} did not answer within {timeout_s:g} s"
            " (--ray-timeout); is it a Ray head node (port 6379, or ray:// port 10001)?"
        )
        raise ClusterError(msg)
    if "error" in box:
        e = box["error"]
        lines = str(e).strip().splitlines()
        msg = f"cannot join the Ray cluster at {address}: {lines[0] if lines else type(e).__name__}"
        raise ClusterError(msg[:400]) from None


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


def _fit(resources: dict[str, float], plan: ActorPlan) -> int:
    """How many of ``plan``'s actors fit in ``resources`` (one node)."""
    counts = []
    for key, need in (("CPU", plan.num_cpus), ("GPU", plan.num_gpus)):
        if need > 0:
            counts.append(math.floor(float(resources.get(key, 0)) / need + 1e-9))
    return min(counts) if counts else plan.count


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _n(x: float, unit: str) -> str:
    return f"{x:g} {unit}" + ("" if x == 1 else "s")


def check_placement(plan: ActorPlan, flags: str = "") -> None:
    """Refuse a pool that the cluster's nodes can never hold (each actor on one node).

    Raises:
        ClusterError: naming what one actor needs, the largest node and how many fit.
    """
    nodes = _alive_nodes()
    room = sum(_fit(n.get("Resources", {}), plan) for n in nodes)
    if room >= plan.count:
        return
    cpu = max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0)
    gpu = max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0)
    each = _n(plan.num_cpus, "CPU") + (f" + {_n(plan.num_gpus, 'GPU')}" if plan.num_gpus else "")
    if room == 0:
        largest = _n(gpu, "GPU") if plan.num_gpus > gpu else _n(cpu, "CPU")
        msg = (
            f"no node can hold a sampling actor of {each}{flags}: the largest of"
            f" {len(nodes)} node(s) has {largest}"
        )
    else:
        msg = (
            f"{plan.count} sampling actors{flags} of {each} each do not fit: the cluster"
            f" ({len(nodes)} node(s), largest {cpu:g} CPUs / {gpu:g} GPUs) holds {room};"
            " ask for fewer --workers"
        )
    raise ClusterError(msg)


def fits_now(plan: ActorPlan) -> bool:
    """Whether one more actor would be placed at once (free resources on some node)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
    except Exception:  # an older or newer Ray without it: the cluster-wide sum
        return _fit(ray.available_resources(), plan) >= 1
    return any(_fit(res, plan) >= 1 for res in free.values())


def connect_pool(
    ray_address: str | None,
    ray_timeout: float,
    workers: int | None,
    gpus_per_worker: float,
    threads_per_worker: int | None,
    verbose: bool = False,
) -> tuple[bool, ActorPlan]:
    """Join or start Ray and size a pool the cluster can place; (started here, plan).

    Raises:
        ClusterError: unreachable cluster or actors that cannot be placed (Ray is shut
            down again if this call started it).
    """
    import ray

    started = init_ray(ray_address, timeout_s=ray_timeout, verbose=verbose)
    try:
        actors = plan_actors(workers, gpus_per_worker, threads_per_worker)
        flags = []
        if workers:
            flags.append(f"--workers {workers}")
        if threads_per_worker:
            flags.append(f"--threads-per-worker {threads_per_worker}")
        if actors.num_gpus:
            flags.append(f"--gpus-per-worker {gpus_per_worker:g}")
        check_placement(actors, f" ({', '.join(flags)})" if flags else "")
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started, actors
