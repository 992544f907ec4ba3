"""``generate()``: the whole of ``sia-gen`` as one Python function (the CLI only parses).

Order: validate everything (strengths, numbers, categories, model, storage, what the root
already holds) before Ray starts; then sample only the shards not yet done; then write
``manifest.parquet`` and ``index.json`` (last, per the format's commit rules) and the card.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sia_pipeline.dataset.card import write_card
from sia_pipeline.dataset.format import (
    FormatError,
)
from sia_pipeline.dataset.manifest import rebuild_from_stats
from sia_pipeline.dataset.spec import write_spec
from sia_pipeline.dataset.storage import (
    LocalStorage,
    Storage,
    StorageError,
    open_storage,
)
from sia_pipeline.gen.extend import earlier_hashes, layered_spec, restamp
from sia_pipeline.gen.lease import DEFAULT_TTL, LeaseHeld, LeaseLost, LeaseSlot
from sia_pipeline.gen.plan import (
    PlanError,
    ShardTasks,
    describe_plan,
    make_spec,
    make_tasks,
    parse_strengths,
)
from sia_pipeline.gen.provenance import command_line, model_record
from sia_pipeline.gen.raycluster import (
    DEFAULT_RAY_TIMEOUT_S,
    ActorPlan,
    ClusterError,
    connect_pool,
)
from sia_pipeline.gen.root import RootState, check_creatable, clear_root, scan_root

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DEFAULT_OUT = "./sia-data"
DEFAULT_PER_CATEGORY = 128


class GenError(ValueError):
    """Bad input or an unusable root/model/endpoint: nothing was written (CLI exit 2)."""


class GenFailed(RuntimeError):
    """Some shards failed after their retries; the dataset has no index yet (CLI exit 1)."""


@dataclass
class GenReport:
    """What a ``generate`` call did; ``plan`` is the ``--dry-run`` text."""

    out: str
    spec_hash: str
    plan: str
    shards_total: int
    shards_skipped: int = 0
    shards_written: int = 0
    images_written: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    indexed: bool = False
    dry_run: bool = False
    workers: str = ""
    retries: int = 0
    actors_lost: int = 0
    reuploads: int = 0
    resamplings: int = 0
    actors: list[dict] = field(default_factory=list)  # where each sampling actor ran
    failed: list[str] = field(default_factory=list)

    def churn(self) -> str:
        """``retries 2, actors lost 1, re-uploads 3, re-samplings 0``."""
        return (
            f"retries {self.retries}, actors lost {self.actors_lost},"
            f" re-uploads {self.reuploads}, re-samplings {self.resamplings}"
        )

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing written to {self.out}"
        if not self.shards_written:
            done = f"all {self.shards_total} shards already done under {self.out}"
            if self.indexed:
                return f"{done}; wrote manifest.parquet, index.json and README.md"
            return f"{done}; nothing written"
        return (
            f"{self.shards_written} shards ({self.images_written} images) written by"
            f" {self.workers} at {self.images_per_s:.1f} images/s ({self.seconds:.1f} s in all);"
            f" {self.shards_skipped} were already done; {self.churn()}; dataset at {self.out}"
        )


def _refuse_other_spec(storage: Storage, state: RootState, spec_hash: str, overwrite: bool) -> None:
    if state.other_spec and not overwrite:
        msg = (
            f"{storage.url} holds a dataset of a different spec ({state.other_spec}; this run"
            f" is {spec_hash}): use another --out, or --overwrite to replace it"
        )
        raise GenError(msg)


def _absolute(url: str | None) -> str | None:
    """A local model path made absolute, so actors find it whatever their directory."""
    if not url or "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def _check_numbers(**values: Any) -> None:
    rules = {
        "batch_size": ("--batch-size", 1),
        "workers": ("--workers", 1),
        "threads_per_worker": ("--threads-per-worker", 1),
        "max_in_flight": ("--max-in-flight", 1),
    }
    for name, (flag, low) in rules.items():
        v = values.get(name)
        if v is not None and v < low:
            msg = f"{flag} must be >= {low}, got {v}"
            raise GenError(msg)
    g = values.get("gpus_per_worker")
    if g is not None and not 0 < g <= 1:
        # a worker samples on one device (cuda:0 of those Ray gives it): more would idle
        msg = f"--gpus-per-worker must be in (0, 1] (a worker uses one GPU), got {g}"
        raise GenError(msg)


def _check_local_cpus(workers: int, threads: int) -> None:
    """A local Ray cannot place more CPU reservations than the machine has."""
    cpus = os.cpu_count() or 1
    if workers * threads > cpus:
        msg = (
            f"--workers {workers} x --threads-per-worker {threads} needs"
            f" {workers * threads} CPUs; this machine has {cpus}"
        )
        raise GenError(msg)


def generate(*, lease_ttl: float = DEFAULT_TTL, **kwargs: Any) -> GenReport:
    """Generate (or finish) an SIA dataset under ``out``; see ``sia-gen --help``.

    The keyword arguments are :func:`_generate`'s; the run holds the root's lease
    (``_lease.json``, one writer per root) from just before its first write to its end,
    renewed every ``lease_ttl / 3`` seconds, so a crashed run blocks a rerun for at most
    ``lease_ttl`` seconds (not at all on the same host).

    Raises:
        GenError: as :func:`_generate`, or another live driver holds the root's lease.
        GenFailed: as :func:`_generate`, or this run lost its lease.
    """
    try:
        slot = LeaseSlot(lease_ttl)
    except ValueError as e:
        raise GenError(str(e)) from None
    try:
        return _generate(slot=slot, **kwargs)
    except LeaseHeld as e:
        raise GenError(str(e)) from None
    except LeaseLost as e:
        raise GenFailed(str(e)) from None
    finally:
        slot.release()


def _generate(
    *,
    slot: LeaseSlot,
    categories: str = "all",
    strengths: str = "0.1:0.5",
    per_category: int = DEFAULT_PER_CATEGORY,
    shard_size: int = 1000,
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int = 20,
    eta: float = 0.0,
    batch_size: int = 16,
    image_format: str = "png",
    model: str | None = None,
    classifier: str | None = None,
    classifier_scale: float = 1.0,
    precision: str = "fp32",
    compile: bool = False,
    out: str = DEFAULT_OUT,
    s3_endpoint_url: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 1.0,
    threads_per_worker: int | None = None,
    ray_address: str | None = None,
    ray_timeout: float = DEFAULT_RAY_TIMEOUT_S,
    max_in_flight: int = 2,
    max_attempts: int = 3,
    max_uploads: int = 5,
    overwrite: bool = False,
    extend: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    progress_interval: float = 10.0,
    device: str | None = None,
    spill_dir: str | None = None,
    on_result: Callable | None = None,
) -> GenReport:
    """Generate (or finish) an SIA dataset under ``out``; see ``sia-gen --help``.

    ``progress`` draws a bar on a terminal; without one (or with ``progress=False``)
    a log line every ``progress_interval`` seconds. ``device`` overrides the actors'
    torch device (tests run the model on CPU on logical GPUs); ``spill_dir`` the
    node-local spill for failed uploads.

    Raises:
        GenError: bad input, model, endpoint, bucket or credentials, a root holding a
            dataset of another spec (without ``overwrite``), a Ray cluster that does not
            answer within ``ray_timeout`` or cannot place the actors. Nothing was written.
        GenFailed: shards still failing after their retries.
        StorageError: a transient storage outage outlasted its retries (``.transient``).
    """
    from sia_pipeline.diffusion.guidance import GuidanceError, check_scale, load_guidance
    from sia_pipeline.diffusion.model import ModelError, load_model

    t0 = time.perf_counter()
    # Resolved here so that actors on any node use the driver's endpoint (never credentials:
    # those come from each node's own AWS chain).
    s3_endpoint_url = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # Inside a Ray job (or with RAY_ADDRESS set) join that cluster, as ray.init() would.
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray_address == "local":  # Ray's own spelling of "start one here"
        ray_address = None
    try:
        parse_strengths(strengths)
        _check_numbers(
            batch_size=batch_size,
            workers=workers,
            threads_per_worker=threads_per_worker,
            max_in_flight=max_in_flight,
            gpus_per_worker=gpus_per_worker,
        )
        if not ray_timeout > 0:
            msg = f"--ray-timeout must be > 0, got {ray_timeout}"
            raise GenError(msg)
        if not ray_address and threads_per_worker and workers:
            _check_local_cpus(workers, threads_per_worker)
        if classifier:
            check_scale(classifier_scale)
        loaded = load_model(model, device="cpu", endpoint_url=s3_endpoint_url)
        guidance, classifier_card = (
            load_guidance(
                classifier,
                classifier_scale,
                loaded.categories,
                loaded.resolution,
                endpoint_url=s3_endpoint_url,
            )
            if classifier
            else (None, None)
        )
        spec = make_spec(
            model_id=loaded.model_id,
            model_categories=loaded.categories,
            resolution=loaded.resolution,
            categories=categories,
            strengths=strengths,
            per_category=per_category,
            shard_size=shard_size,
            seed=seed,
            sampler=sampler,
            steps=steps,
            eta=eta,
            image_format=image_format,
            max_steps=int(loaded.scheduler_config.get("num_train_timesteps", 1000)),
            classifier_id=guidance.classifier_id if guidance else "",
            classifier_scale=classifier_scale,
            precision=precision,
        )
        tasks = make_tasks(spec, batch_size)
        storage = open_storage(out, s3_endpoint_url)
        if isinstance(storage, LocalStorage):  # actors may run in another directory
            storage = LocalStorage(storage.root.resolve())
            if ray_address:
                log.warning("a local --out with --ray-address needs a folder every node shares")
            if not dry_run:
                check_creatable(storage.root)  # created only once Ray has placed the actors
        elif not dry_run:
            storage.check_writable()
        spec = layered_spec(storage, spec, extend)
        if spec.extends:  # the shard layout of a grown dataset
            tasks = make_tasks(spec, batch_size)
        earlier = earlier_hashes(spec)
        state = scan_root(storage, spec.spec_hash, spec.to_dict(), earlier)
        if not dry_run:
            slot.refuse_if_held(storage, spec.spec_hash)  # names the holder, before all else
    except StorageError as e:
        if e.transient:  # an outage, not bad input: already retried, so exit 1
            raise
        raise GenError(str(e).splitlines()[0]) from None
    except (PlanError, ModelError, GuidanceError, FormatError) as e:
        raise GenError(str(e).splitlines()[0]) from None

    plan = describe_plan(spec, tasks, done=len(state.done))
    report = GenReport(
        out=storage.url, spec_hash=spec.spec_hash, plan=plan, shards_total=len(tasks)
    )
    _refuse_other_spec(storage, state, spec.spec_hash, overwrite)
    if dry_run:
        report.dry_run = True
        if state.other_spec:
            report.plan += f"\n--overwrite would first delete the dataset at {storage.url}"
        return report

    done = {} if state.other_spec else state.done
    pending = tasks.only(skip=set(done))  # lazy: each task is built when an actor needs it
    report.shards_skipped = len(tasks) - len(pending)
    cluster = None
    if pending:  # before anything is written: a cluster that cannot run us is bad input
        try:
            verbose = logging.getLogger("sia_pipeline").isEnabledFor(logging.DEBUG)
            cluster = connect_pool(
                ray_address,
                ray_timeout,
                workers,
                gpus_per_worker,
                threads_per_worker,
                verbose=verbose,
            )
        except ClusterError as e:
            raise GenError(str(e)) from None
    try:
        try:
            storage.check_writable()
        except StorageError as e:
            raise GenError(str(e).splitlines()[0]) from None
        slot.take(storage, spec.spec_hash)  # one writer per root from here to the end
        again = scan_root(storage, spec.spec_hash, spec.to_dict(), earlier)
        if bool(again.other_spec) != bool(state.other_spec):
            msg = f"{storage.url} changed while this run started (another driver?): rerun"
            raise GenFailed(msg)
        restamp(storage, done, spec.spec_hash)  # --extend: earlier shards join this spec
        on_result = slot.checked(on_result)
        if state.other_spec:
            log.warning(
                "--overwrite: deleting the dataset at %s (%s)", storage.url, state.other_spec
            )
            clear_root(storage)
            state = RootState({}, None, False)
        extra = {
            "model": model_record(loaded, model),
            "created_by": f"sia-gen {VERSION}",
            "command": command_line(spec, out, model, batch_size, classifier, compile),
        }
        if classifier_card is not None:
            extra["classifier"] = {
                "id": classifier_card["classifier_id"],
                "source": str(classifier),
                "categories": classifier_card["categories"],
                "image_size": classifier_card["image_size"],
            }
        # Before the first shard: a root that loses its index can still be rebuilt exactly.
        write_spec(storage, spec.to_dict(), spec.spec_hash, extra)
        if pending:
            worker_kwargs = {
                "model_url": _absolute(model),
                "out_url": storage.url,
                "endpoint_url": s3_endpoint_url,
                "spill_dir": spill_dir,
                "classifier_url": _absolute(classifier),
                "compile": compile,
                "warmup": pending[0],
            }
            _run(
                pending,
                report,
                worker_kwargs,
                cluster[1],
                max_in_flight=max_in_flight,
                max_attempts=max_attempts,
                max_uploads=max_uploads,
                device=device,
                progress=progress,
                progress_interval=progress_interval,
                on_result=on_result,
            )
    finally:
        if cluster is not None and cluster[0]:
            import ray

            ray.shutdown()
    if pending or not state.index_current:
        slot.check()
        table, index = rebuild_from_stats(storage, spec.to_dict(), extra)
        write_card(storage, index, table)
        report.indexed = True
    report.seconds = time.perf_counter() - t0
    return report


def _run(
    pending: ShardTasks,
    report: GenReport,
    worker_kwargs: dict[str, Any],
    actors: ActorPlan,
    *,
    max_in_flight: int,
    max_attempts: int,
    max_uploads: int,
    device: str | None,
    progress: bool,
    progress_interval: float,
    on_result: Callable | None,
) -> None:
    """Sample ``pending`` shards on Ray actors; fills ``report``; raises GenFailed."""
    from sia_pipeline.gen.progress import ProgressView
    from sia_pipeline.gen.runner import ShardRunner

    report.workers = actors.describe()
    log.info(
        "%d shards to write (%d done) with %s", len(pending), report.shards_skipped, report.workers
    )
    view = ProgressView(pending.images(), len(pending), bar=progress, interval=progress_interval)
    runner = ShardRunner(
        worker_kwargs,
        actors,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        max_uploads=max_uploads,
        device=device,
        view=view,
        on_result=on_result,
    )
    try:
        run = runner.run(pending)
    finally:
        view.close()
    report.shards_written = len(run.done)
    report.images_written = run.images
    report.images_per_s = run.images_per_s
    report.retries = run.retries
    report.actors_lost = run.actors_lost
    report.reuploads = run.reuploads
    report.resamplings = run.resamplings
    report.actors = run.actors
    report.failed = [f"{r.shard_id} ({r.error})" for r in run.failed]
    if run.not_started:
        report.failed.append(f"{run.not_started} more shard(s) not started")
    if run.failed or run.not_started:
        n = len(run.failed) + run.not_started
        msg = (
            f"{n} shard(s) failed ({report.churn()}): "
            f"{'; '.join(report.failed[:3])}; rerun the same command to finish them"
        )
        raise GenFailed(msg)
