"""``sia-gen``'s options, each default written once.

:class:`DatasetOptions` is what to make and where: the options that decide the images (so
the spec hash) and the root. :class:`RunOptions` is how to run: workers, batches, Ray,
progress; they never change the dataset. ``sia-gen``'s click options, :func:`generate`,
:func:`plan.make_spec` and ``jobs/submit_ray_job.py`` read their defaults from here, and
``jobs/`` keeps every :data:`SCHEDULING_OPTIONS` flag out of its submission id.
Imports nothing heavy (``--help`` and ``jobs/`` load it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sia_pipeline.io.lease import DEFAULT_TTL
from sia_pipeline.io.raycluster import DEFAULT_RAY_TIMEOUT_S


@dataclass(frozen=True)
class DatasetOptions:
    """What to make (every field but ``out`` is part of the spec) and where."""

    categories: str = "all"
    strengths: str = "0.1:0.5"
    per_category: int = 128  # demo-sized; the paper used 10000
    shard_size: int = 1000
    seed: int = 0
    sampler: str = "ddpm"
    steps: int = 20
    eta: float = 0.0
    image_format: str = "png"
    model: str | None = None  # None: the bundled demo model
    classifier: str | None = None
    classifier_scale: float = 1.0
    precision: str = "fp32"
    # The strength term only on timesteps >= this (0: every step, as the paper). 500: SIA so
    # made taught RealNet more (bench/results/realnet_quality-sia-t500.md).
    strength_min_t: int = 500
    out: str = "./sia-data"


@dataclass(frozen=True)
class RunOptions:
    """How to run: none of these changes the dataset (``batch_size`` is recorded in its
    command so that ``sia-inspect --regenerate`` batches a key as it was made)."""

    batch_size: int = 16
    workers: int | None = None
    gpus_per_worker: float = 1.0
    threads_per_worker: int | None = None
    ray_address: str | None = None
    ray_timeout: float = DEFAULT_RAY_TIMEOUT_S
    max_in_flight: int = 2
    lease_ttl: float = DEFAULT_TTL
    progress: bool = True  # the CLI's --no-progress
    progress_interval: float = 10.0
    compile: bool = False
    s3_endpoint_url: str | None = None


@dataclass(frozen=True)
class Actions:
    """What to do with the root: the CLI's flags, all off by default."""

    overwrite: bool = False
    extend: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Hooks:
    """Knobs for tests and benchmarks, not on the command line."""

    max_attempts: int = 3
    max_uploads: int = 5
    device: str | None = None  # the actors' torch device (tests: CPU on logical GPUs)
    spill_dir: str | None = None
    on_result: Callable | None = None


DATASET = DatasetOptions()
RUN = RunOptions()


def flag(name: str) -> str:
    """The click flag of a field: ``per_category`` -> ``--per-category``."""
    return "--" + name.replace("_", "-")


# sia-gen flags that say how to run, not what to make: never in jobs/' submission id.
SCHEDULING_OPTIONS = frozenset(
    [flag(f.name) for f in fields(RunOptions) if f.name != "progress"]
    + ["--no-progress", "--verbose", "-v"]
)


@dataclass(frozen=True)
class GenRequest:
    """One ``generate()`` call's options, grouped."""

    dataset: DatasetOptions
    run: RunOptions
    actions: Actions
    hooks: Hooks

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenRequest:
        """Sort ``generate()``'s keyword arguments into their groups.

        Raises:
            TypeError: an argument no group has.
        """
        groups = {}
        for group in (DatasetOptions, RunOptions, Actions, Hooks):
            names = {f.name for f in fields(group)}
            groups[group] = group(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            msg = f"generate() got unexpected keyword arguments: {', '.join(sorted(kwargs))}"
            raise TypeError(msg)
        return cls(*groups.values())
