"""``generate()``: the whole of ``sia-gen`` as one Python function (the CLI only parses).

Order: validate everything (strengths, numbers, categories, model, storage, what the root
already holds) before Ray starts; then sample only the shards not yet done; then write
``manifest.parquet`` and ``index.json`` (last, per the format's commit rules) and the card.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sia_pipeline.format.card import write_card
from sia_pipeline.format.genspec import GenSpec, PlanError, parse_strengths
from sia_pipeline.format.manifest import rebuild_from_stats
from sia_pipeline.format.spec import write_spec
from sia_pipeline.format.v1 import (
    FormatError,
)
from sia_pipeline.gen.extend import (
    earlier_hashes,
    layered_spec,
    recorded_spec,
    restamp,
    spec_differences,
)
from sia_pipeline.gen.options import DatasetOptions, GenRequest, RunOptions
from sia_pipeline.gen.plan import (
    ShardTasks,
    describe_plan,
    estimate_bytes,
    make_spec,
    make_tasks,
)
from sia_pipeline.gen.provenance import command_line, model_record, model_url
from sia_pipeline.gen.root import RootState, check_creatable, clear_root, scan_root
from sia_pipeline.io.inputs import MAX_SHARDS_PER_CATEGORY, InputError, check_disk
from sia_pipeline.io.lease import LeaseHeld, LeaseLost, LeaseSlot
from sia_pipeline.io.raycluster import (
    ActorPlan,
    ClusterError,
    connect_pool,
)
from sia_pipeline.io.storage import (
    LocalStorage,
    Storage,
    StorageError,
    open_storage,
)

log = logging.getLogger(__name__)

VERSION = "0.1.0"


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


def _refuse_other_spec(storage: Storage, state: RootState, spec: GenSpec, overwrite: bool) -> None:
    if state.other_spec and not overwrite:
        msg = (
            f"{storage.url} holds a dataset of a different spec ({state.other_spec}; this run"
            f" is {spec.spec_hash})"
        )
        old = recorded_spec(storage)
        if old and (diffs := spec_differences(spec, old)):
            msg += f", which differs in {'; '.join(diffs[:3])}"
            if "strength_min_t" not in old and spec.strength_min_t:
                msg += (
                    " (sia-gen's default --strength-min-t was 0 before it became "
                    f"{DatasetOptions.strength_min_t}: --strength-min-t 0 resumes that dataset)"
                )
        raise GenError(msg + ": use another --out, or --overwrite to replace it")


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


def _check_size(spec: GenSpec, out: str, dry_run: bool) -> None:
    """Shards per category fit the keys' six digits; a local dataset fits the free disk."""
    n = spec.shards_per_category()
    if n > MAX_SHARDS_PER_CATEGORY:
        msg = (
            f"--per-category {spec.per_category} / --shard-size {spec.shard_size} makes {n}"
            f" shards per category (at most {MAX_SHARDS_PER_CATEGORY}: keys hold six digits)"
        )
        raise GenError(msg)
    if not dry_run:
        try:
            check_disk(out, estimate_bytes(spec), f"{spec.total_images} images")
        except InputError as e:
            raise GenError(str(e)) from None


def _check_local_cpus(workers: int, threads: int) -> None:
    """A local Ray cannot place more CPU reservations than the machine has."""
    cpus = os.cpu_count() or 1
    if workers * threads > cpus:
        msg = (
            f"--workers {workers} x --threads-per-worker {threads} needs"
            f" {workers * threads} CPUs; this machine has {cpus}"
        )
        raise GenError(msg)


def generate(**kwargs: Any) -> GenReport:
    """Generate (or finish) an SIA dataset under ``out``; see ``sia-gen --help``.

    The keyword arguments are the fields of :mod:`sia_pipeline.gen.options` (defaults
    there). ``progress`` draws a bar on a terminal; without one (or with ``progress=False``)
    a log line every ``progress_interval`` seconds. ``device`` overrides the actors' torch
    device (tests run the model on CPU on logical GPUs); ``spill_dir`` the node-local spill
    for failed uploads. The run holds the root's lease (``_lease.json``, one writer per
    root) from just before its first write to its end, renewed every ``lease_ttl / 3``
    seconds, so a crashed run blocks a rerun for at most ``lease_ttl`` seconds (not at all
    on the same host).

    Raises:
        GenError: bad input, model, endpoint, bucket or credentials, a root holding a
            dataset of another spec (without ``overwrite``), a Ray cluster that does not
            answer within ``ray_timeout`` or cannot place the actors, or another live
            driver holding the root's lease. Nothing was written.
        GenFailed: shards still failing after their retries, or this run lost its lease.
        StorageError: a transient storage outage outlasted its retries (``.transient``).
    """
    req = _from_environment(GenRequest.from_kwargs(**kwargs))
    try:
        slot = LeaseSlot(req.run.lease_ttl)
    except ValueError as e:
        raise GenError(str(e)) from None
    try:
        return _generate(req, slot)
    except LeaseHeld as e:
        raise GenError(str(e)) from None
    except LeaseLost as e:
        raise GenFailed(str(e)) from None
    finally:
        slot.release()


def _from_environment(req: GenRequest) -> GenRequest:
    """The endpoint and Ray address the environment gives when the options do not."""
    # Resolved here so that actors on any node use the driver's endpoint (never credentials:
    # those come from each node's own AWS chain).
    endpoint = req.run.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # Inside a Ray job (or with RAY_ADDRESS set) join that cluster, as ray.init() would.
    address = req.run.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":  # Ray's own spelling of "start one here"
        address = None
    run = dataclasses.replace(req.run, s3_endpoint_url=endpoint, ray_address=address)
    return dataclasses.replace(req, run=run)


@dataclass
class _Plan:
    """What validation found: the model, the spec, its tasks and the root's state."""

    loaded: Any  # diffusion.model.SDASModel
    classifier_card: dict[str, Any] | None
    spec: GenSpec
    tasks: ShardTasks
    storage: Storage
    state: RootState
    earlier: frozenset[str]


def _generate(req: GenRequest, slot: LeaseSlot) -> GenReport:
    """Validate, prepare the root, sample the missing shards, index (see :func:`generate`)."""
    t0 = time.perf_counter()
    plan = _validate(req, slot)
    spec, tasks, storage, state = plan.spec, plan.tasks, plan.storage, plan.state
    report = GenReport(
        out=storage.url,
        spec_hash=spec.spec_hash,
        plan=describe_plan(spec, tasks, done=len(state.done)),
        shards_total=len(tasks),
    )
    _refuse_other_spec(storage, state, spec, req.actions.overwrite)
    if req.actions.dry_run:
        report.dry_run = True
        if state.other_spec:
            report.plan += f"\n--overwrite would first delete the dataset at {storage.url}"
        return report
    done = {} if state.other_spec else state.done
    pending = tasks.only(skip=set(done))  # lazy: each task is built when an actor needs it
    report.shards_skipped = len(tasks) - len(pending)
    cluster = _connect(req.run) if pending else None  # a cluster that cannot run us is bad input
    try:
        extra, index_current = _prepare_root(req, plan, slot, done)
        if pending:
            on_result = slot.checked(req.hooks.on_result)
            _run(
                pending,
                report,
                _worker_kwargs(req, storage, pending[0]),
                cluster[1],
                req,
                on_result,
            )
    finally:
        if cluster is not None and cluster[0]:
            import ray

            ray.shutdown()
    if pending or not index_current:
        slot.check()
        _index(storage, spec, extra)
        report.indexed = True
    report.seconds = time.perf_counter() - t0
    return report


def _validate(req: GenRequest, slot: LeaseSlot) -> _Plan:
    """Every check before Ray starts or anything is written; bad input is a GenError."""
    from sia_pipeline.diffusion.guidance import GuidanceError
    from sia_pipeline.diffusion.model import ModelError

    try:
        _check_options(req)
        loaded, guidance, classifier_card = _load_model(req)
        spec = _make_spec(req.dataset, loaded, guidance)
        _check_size(spec, req.dataset.out, req.actions.dry_run)
        storage = _open_root(req, spec)
        spec = layered_spec(storage, spec, req.actions.extend)
        tasks = make_tasks(spec, req.run.batch_size)  # after --extend: the grown layout
        earlier = earlier_hashes(spec)
        state = scan_root(storage, spec.spec_hash, spec.to_dict(), earlier)
        if not req.actions.dry_run:
            slot.refuse_if_held(storage, spec.spec_hash)  # names the holder, before all else
    except StorageError as e:
        if e.transient:  # an outage, not bad input: already retried, so exit 1
            raise
        raise GenError(str(e).splitlines()[0]) from None
    except (PlanError, ModelError, GuidanceError, FormatError) as e:
        raise GenError(str(e).splitlines()[0]) from None
    return _Plan(loaded, classifier_card, spec, tasks, storage, state, earlier)


def _check_options(req: GenRequest) -> None:
    """The options that need no model: strengths, counts, the Ray timeout, local CPUs."""
    from sia_pipeline.diffusion.guidance import check_scale

    run = req.run
    parse_strengths(req.dataset.strengths)
    _check_numbers(
        batch_size=run.batch_size,
        workers=run.workers,
        threads_per_worker=run.threads_per_worker,
        max_in_flight=run.max_in_flight,
        gpus_per_worker=run.gpus_per_worker,
    )
    if not run.ray_timeout > 0:
        msg = f"--ray-timeout must be > 0, got {run.ray_timeout}"
        raise GenError(msg)
    if not run.ray_address and run.threads_per_worker and run.workers:
        _check_local_cpus(run.workers, run.threads_per_worker)
    if req.dataset.classifier:
        check_scale(req.dataset.classifier_scale)


def _load_model(req: GenRequest) -> tuple[Any, Any, dict[str, Any] | None]:
    """(the model on CPU, the classifier guidance or None, the classifier's card or None)."""
    from sia_pipeline.diffusion.guidance import load_guidance
    from sia_pipeline.diffusion.model import load_model

    opts, endpoint = req.dataset, req.run.s3_endpoint_url
    loaded = load_model(opts.model, device="cpu", endpoint_url=endpoint)
    if not opts.classifier:
        return loaded, None, None
    guidance, card = load_guidance(
        opts.classifier,
        opts.classifier_scale,
        loaded.categories,
        loaded.resolution,
        endpoint_url=endpoint,
    )
    return loaded, guidance, card


def _make_spec(opts: DatasetOptions, loaded: Any, guidance: Any) -> GenSpec:
    """The spec of these options on this model (and classifier)."""
    return make_spec(
        model_id=loaded.model_id,
        model_categories=loaded.categories,
        resolution=loaded.resolution,
        max_steps=loaded.num_train_timesteps,
        classifier_id=guidance.classifier_id if guidance else "",
        **dataclasses.asdict(opts),
    )


def _open_root(req: GenRequest, spec: GenSpec) -> Storage:
    """The root's storage, checked writable (a local root: creatable) unless a dry run."""
    storage = open_storage(req.dataset.out, req.run.s3_endpoint_url)
    dry_run = req.actions.dry_run
    if isinstance(storage, LocalStorage):  # actors may run in another directory
        storage = LocalStorage(storage.root.resolve())
        if req.run.ray_address:
            log.warning("a local --out with --ray-address needs a folder every node shares")
        if not dry_run:
            check_creatable(storage.root)  # created only once Ray has placed the actors
    elif not dry_run:
        storage.check_writable()
    return storage


def _connect(run: RunOptions) -> tuple[bool, ActorPlan]:
    """Join or start Ray and size the actor pool (a GenError if it cannot be placed)."""
    try:
        verbose = logging.getLogger("sia_pipeline").isEnabledFor(logging.DEBUG)
        return connect_pool(
            run.ray_address,
            run.ray_timeout,
            run.workers,
            run.gpus_per_worker,
            run.threads_per_worker,
            verbose=verbose,
        )
    except ClusterError as e:
        raise GenError(str(e)) from None


def _prepare_root(
    req: GenRequest, plan: _Plan, slot: LeaseSlot, done: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Take the lease, clear another spec's dataset (``--overwrite``), write ``spec.json``.

    Returns the index's extra fields and whether the root's index is current.
    """
    storage, spec, state = plan.storage, plan.spec, plan.state
    try:
        storage.check_writable()
    except StorageError as e:
        raise GenError(str(e).splitlines()[0]) from None
    slot.take(storage, spec.spec_hash)  # one writer per root from here to the end
    again = scan_root(storage, spec.spec_hash, spec.to_dict(), plan.earlier)
    if bool(again.other_spec) != bool(state.other_spec):
        msg = f"{storage.url} changed while this run started (another driver?): rerun"
        raise GenFailed(msg)
    restamp(storage, done, spec.spec_hash)  # --extend: earlier shards join this spec
    index_current = state.index_current
    if state.other_spec:
        log.warning("--overwrite: deleting the dataset at %s (%s)", storage.url, state.other_spec)
        clear_root(storage)
        index_current = False
    extra = _index_fields(req, plan)
    # Before the first shard: a root that loses its index can still be rebuilt exactly.
    write_spec(storage, spec.to_dict(), spec.spec_hash, extra)
    return extra, index_current


def _index_fields(req: GenRequest, plan: _Plan) -> dict[str, Any]:
    """What ``index.json`` records besides the spec: model, command, classifier."""
    opts = req.dataset
    extra: dict[str, Any] = {
        "model": model_record(plan.loaded, opts.model),
        "created_by": f"sia-gen {VERSION}",
        "command": command_line(
            plan.spec, opts.out, opts.model, req.run.batch_size, opts.classifier, req.run.compile
        ),
    }
    card = plan.classifier_card
    if card is not None:
        extra["classifier"] = {
            "id": card["classifier_id"],
            "source": model_url(str(opts.classifier)),
            "categories": card["categories"],
            "image_size": card["image_size"],
        }
    return extra


def _worker_kwargs(req: GenRequest, storage: Storage, warmup: Any) -> dict[str, Any]:
    """What every sampling actor is built with (``warmup``: the task it compiles on first)."""
    return {
        "model_url": _absolute(req.dataset.model),
        "out_url": storage.url,
        "endpoint_url": req.run.s3_endpoint_url,
        "spill_dir": req.hooks.spill_dir,
        "classifier_url": _absolute(req.dataset.classifier),
        "compile": req.run.compile,
        "warmup": warmup,
    }


def _index(storage: Storage, spec: GenSpec, extra: dict[str, Any]) -> None:
    """``manifest.parquet`` and ``index.json`` from the shards' stats, then the card."""
    table, index = rebuild_from_stats(storage, spec.to_dict(), extra)
    write_card(storage, index, table)


def _run(
    pending: ShardTasks,
    report: GenReport,
    worker_kwargs: dict[str, Any],
    actors: ActorPlan,
    req: GenRequest,
    on_result: Callable | None,
) -> None:
    """Sample ``pending`` shards on Ray actors; fills ``report``; raises GenFailed."""
    from sia_pipeline.gen.progress import ProgressView
    from sia_pipeline.gen.runner import ShardRunner

    report.workers = actors.describe()
    log.info(
        "%d shards to write (%d done) with %s", len(pending), report.shards_skipped, report.workers
    )
    opts, hooks = req.run, req.hooks
    view = ProgressView(
        pending.images(), len(pending), bar=opts.progress, interval=opts.progress_interval
    )
    runner = ShardRunner(
        worker_kwargs,
        actors,
        max_in_flight=opts.max_in_flight,
        max_attempts=hooks.max_attempts,
        max_uploads=hooks.max_uploads,
        device=hooks.device,
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
