"""The generation plan: user input validated into a :class:`GenSpec`, one :class:`ShardTask`
per shard, and the ``--dry-run`` text.

Seeds and strengths come from :func:`sia_pipeline.format.genspec.sample_params`. Guidance,
precision and ``strength_min_t`` change the images (so the spec hash) but not the seeds: a
guided dataset and its unguided twin start from the same noise. Nothing here touches Ray,
storage or the model weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from sia_pipeline.format.genspec import (
    PRECISIONS,
    SAMPLERS,
    GenSpec,
    PlanError,
    human_bytes,
    parse_strengths,
    sample_params,
)
from sia_pipeline.format.schema import MAX_SHARD_SIZE
from sia_pipeline.format.v1 import (
    FORMAT_VERSION,
    IMAGE_EXTS,
    check_category,
    sample_key,
    shard_id,
    shard_stats_name,
    shard_tar_name,
)
from sia_pipeline.gen.options import RUN, DatasetOptions

# Rough compressed size of one image as a fraction of its raw RGB bytes (for --dry-run).
_COMPRESSION = {"png": 0.75, "jpg": 0.15}
_PER_SAMPLE_OVERHEAD = 2 * 512 + 512 + 900  # tar headers + padding, .json member, stats row


def make_spec(
    *,
    model_id: str,
    model_categories: dict[str, int],
    resolution: int,
    max_steps: int = 1000,
    classifier_id: str = "",
    **options: Any,
) -> GenSpec:
    """Validate user input against the model; every problem is a one-line :class:`PlanError`.

    ``max_steps`` is the model's T (``num_train_timesteps``): it bounds ``--steps`` and
    ``--strength-min-t``. ``options`` are :class:`~sia_pipeline.gen.options.DatasetOptions`
    fields (categories, strengths, per_category, ...; defaults there); ``classifier_id`` is
    the loaded classifier's, "" for none.
    """
    opts = DatasetOptions(**options)
    names = _category_names(opts.categories, model_categories)
    _check_values(opts, max_steps)
    return GenSpec(
        model_id=model_id,
        categories=tuple(names),
        class_ids=tuple(model_categories[n] for n in names),
        strengths=parse_strengths(opts.strengths),
        per_category=opts.per_category,
        shard_size=opts.shard_size,
        seed=opts.seed,
        sampler=opts.sampler,
        steps=opts.steps,
        eta=float(opts.eta) if opts.sampler == "ddim" else 0.0,
        image_format=opts.image_format,
        resolution=resolution,
        classifier_id=classifier_id,
        classifier_scale=float(opts.classifier_scale) if classifier_id else 0.0,
        precision=opts.precision,
        strength_min_t=opts.strength_min_t,
    )


def _category_names(categories: str | list[str], model_categories: dict[str, int]) -> list[str]:
    """``--categories`` (``all``, ``a,b`` or a list) as names the model knows, each once."""
    if isinstance(categories, str):
        names = (
            list(model_categories)
            if categories.strip() == "all"
            else [c.strip() for c in categories.split(",")]
        )
    else:
        names = list(categories)
    if not names or any(not n for n in names):
        msg = f"--categories {categories!r} names an empty category: use 'all' or a,b,c"
        raise PlanError(msg)
    for name in names:
        try:
            check_category(name)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if name not in model_categories:
            known = ", ".join(sorted(model_categories))
            msg = f"unknown category {name!r}; the model knows {known}"
            raise PlanError(msg)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        msg = f"--categories names {', '.join(dupes)} more than once"
        raise PlanError(msg)
    return names


def _check_values(opts: DatasetOptions, max_steps: int) -> None:
    """The numbers and choices of the options, each against its bounds."""
    per_category, shard_size, seed, sampler, steps = (
        opts.per_category,
        opts.shard_size,
        opts.seed,
        opts.sampler,
        opts.steps,
    )
    eta, image_format, precision, classifier_scale = (
        opts.eta,
        opts.image_format,
        opts.precision,
        opts.classifier_scale,
    )
    checks = [
        (per_category >= 1, f"--per-category must be >= 1, got {per_category}"),
        (
            1 <= shard_size <= MAX_SHARD_SIZE,
            f"--shard-size must be in [1, {MAX_SHARD_SIZE}], got {shard_size}",
        ),
        (seed >= 0, f"--seed must be >= 0, got {seed}"),
        (sampler in SAMPLERS, f"--sampler must be {' or '.join(SAMPLERS)}, got {sampler!r}"),
        (1 <= steps <= max_steps, f"--steps must be in [1, {max_steps}], got {steps}"),
        (math.isfinite(eta) and eta >= 0, f"--eta must be >= 0, got {eta}"),
        (
            image_format in IMAGE_EXTS,
            f"--image-format must be one of {', '.join(IMAGE_EXTS)}, got {image_format!r}",
        ),
        (
            precision in PRECISIONS,
            f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
        ),
        (
            math.isfinite(classifier_scale) and classifier_scale >= 0,
            f"--classifier-scale must be finite and >= 0, got {classifier_scale}",
        ),
        (
            isinstance(opts.strength_min_t, int) and 0 <= opts.strength_min_t < max_steps,
            f"--strength-min-t must be in [0, {max_steps}) (the model's timesteps), "
            f"got {opts.strength_min_t} (0 applies the strength on every step)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise PlanError(msg)
    if math.ceil(per_category / shard_size) > MAX_SHARD_SIZE:
        msg = f"--per-category {per_category} needs more than {MAX_SHARD_SIZE} shards"
        raise PlanError(msg)


@dataclass(frozen=True)
class ShardTask:
    """One shard to produce: what the driver hands to a worker (no image bytes).

    Sample ``j`` of the shard has category-wide index ``start + j``, key
    ``CATEGORY-SHARD-j``, and the seed and strength at position ``j``.
    """

    category: str
    class_id: int
    shard: int
    start: int
    seeds: tuple[int, ...]
    strengths: tuple[float, ...]
    sampler: str
    steps: int
    eta: float
    image_format: str
    model_id: str
    resolution: int
    spec_hash: str
    batch_size: int = RUN.batch_size
    classifier_id: str = ""
    classifier_scale: float = 0.0
    precision: str = "fp32"
    strength_min_t: int = 0

    @property
    def shard_id(self) -> str:
        return shard_id(self.category, self.shard)

    @property
    def tar_name(self) -> str:
        return shard_tar_name(self.category, self.shard)

    @property
    def stats_name(self) -> str:
        return shard_stats_name(self.category, self.shard)

    @property
    def count(self) -> int:
        return len(self.seeds)

    def key(self, j: int) -> str:
        return sample_key(self.category, self.shard, j)

    def sample_row(self, j: int) -> dict[str, Any]:
        """Manifest row of sample ``j`` (the ``.json`` member is this without key and shard)."""
        return {
            "key": self.key(j),
            "shard": self.shard_id,
            "category": self.category,
            "class_id": self.class_id,
            "strength": self.strengths[j],
            "seed": self.seeds[j],
            "sample_index": self.start + j,
            "sampler": self.sampler,
            "steps": self.steps,
            "eta": self.eta,
            "model_id": self.model_id,
            "height": self.resolution,
            "width": self.resolution,
            "image_format": self.image_format,
            "format_version": FORMAT_VERSION,
            **self.optional_fields(),
        }

    def optional_fields(self) -> dict[str, Any]:
        """Guidance, precision and ``strength_min_t``, recorded only when used (as in
        :meth:`GenSpec.to_dict`)."""
        d: dict[str, Any] = {}
        if self.classifier_id:
            d["classifier_id"] = self.classifier_id
            d["classifier_scale"] = self.classifier_scale
        if self.precision != "fp32":
            d["precision"] = self.precision
        if self.strength_min_t:
            d["strength_min_t"] = self.strength_min_t
        return d


def make_task(
    spec: GenSpec, category_index: int, shard: int, batch_size: int = RUN.batch_size
) -> ShardTask:
    """The task of shard ``shard`` of the ``category_index``-th category (O(shard size))."""
    category, class_id = spec.categories[category_index], spec.class_ids[category_index]
    start, stop = spec.shard_range(shard)
    params = [sample_params(spec, category, i) for i in range(start, stop)]
    return ShardTask(
        category=category,
        class_id=class_id,
        shard=shard,
        start=start,
        seeds=tuple(p[0] for p in params),
        strengths=tuple(p[1] for p in params),
        sampler=spec.sampler,
        steps=spec.steps,
        eta=spec.eta,
        image_format=spec.image_format,
        model_id=spec.model_id,
        resolution=spec.resolution,
        spec_hash=spec.spec_hash,
        batch_size=batch_size,
        classifier_id=spec.classifier_id,
        classifier_scale=spec.classifier_scale,
        precision=spec.precision,
        strength_min_t=spec.strength_min_t,
    )


class ShardTasks(Sequence[ShardTask]):
    """Every shard's task, category by category in shard order, built only when read.

    ``len``, :meth:`shard_ids` and :meth:`images` cost nothing per sample, so a plan of
    10**9 images is described (``--dry-run``) in O(categories) time and memory.
    """

    def __init__(
        self, spec: GenSpec, batch_size: int = RUN.batch_size, indices: Sequence[int] | None = None
    ) -> None:
        self.spec = spec
        self.batch_size = batch_size
        self.per_category = spec.shards_per_category()
        self.indices = indices  # a subset of all shards (see :meth:`only`), or all

    def __len__(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        return self.per_category * len(self.spec.categories)

    def only(self, shard_ids: set[str] | None = None, skip: set[str] | None = None) -> ShardTasks:
        """The tasks whose shard id is in ``shard_ids`` (all if None) and not in ``skip``."""
        keep = [
            i
            for i, sid in enumerate(self.shard_ids())
            if (shard_ids is None or sid in shard_ids) and not (skip and sid in skip)
        ]
        return ShardTasks(self.spec, self.batch_size, keep)

    @overload
    def __getitem__(self, i: int) -> ShardTask: ...

    @overload
    def __getitem__(self, i: slice) -> list[ShardTask]: ...

    def __getitem__(self, i: int | slice) -> ShardTask | list[ShardTask]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        c, shard = divmod(self._index(i), self.per_category)
        return make_task(self.spec, c, shard, self.batch_size)

    def _index(self, i: int) -> int:
        return self.indices[i] if self.indices is not None else i

    def shard_ids(self) -> Iterator[str]:
        """Shard ids in order, without building the tasks."""
        for k in range(len(self)):
            c, shard = divmod(self._index(k), self.per_category)
            yield shard_id(self.spec.categories[c], shard)

    def images(self, i: int | None = None) -> int:
        """Images in the ``i``-th shard (all shards if None), without building tasks."""
        if i is None:
            return sum(self.images(k) for k in range(len(self)))
        start, stop = self.spec.shard_range(self._index(i) % self.per_category)
        return stop - start


def make_tasks(spec: GenSpec, batch_size: int = RUN.batch_size) -> ShardTasks:
    """One task per shard, category by category, in shard order (built lazily)."""
    if batch_size < 1:
        msg = f"--batch-size must be >= 1, got {batch_size}"
        raise PlanError(msg)
    return ShardTasks(spec, batch_size)


def estimate_bytes(spec: GenSpec) -> int:
    """A rough size of the finished dataset (tars + stats), for ``--dry-run``."""
    raw = spec.resolution * spec.resolution * 3
    per_image = int(raw * _COMPRESSION[spec.image_format]) + _PER_SAMPLE_OVERHEAD
    return per_image * spec.total_images


def describe_plan(spec: GenSpec, tasks: Sequence[ShardTask], done: int = 0) -> str:
    """The ``--dry-run`` summary: what would be written, and roughly how much."""
    per_cat = spec.shards_per_category()
    lines = [
        f"model      {spec.model_id} ({spec.resolution} px)",
        f"spec       {spec.spec_hash}",
        f"sampler    {spec.sampler}, {spec.steps} steps"
        + (f", eta {spec.eta:g}" if spec.sampler == "ddim" else ""),
        f"strengths  {spec.strengths.describe()}",
        *(
            [f"guidance   classifier {spec.classifier_id}, scale {spec.classifier_scale:g}"]
            if spec.classifier_id
            else []
        ),
        *([f"precision  {spec.precision}"] if spec.precision != "fp32" else []),
        *(
            [
                f"strength   on timesteps t >= {spec.strength_min_t} only "
                "(--strength-min-t: a departure from the paper)"
            ]
            if spec.strength_min_t
            else []
        ),
        f"images     {spec.per_category} per category x {len(spec.categories)} categories"
        f" = {spec.total_images}",
        f"shards     {len(tasks)} ({per_cat} per category, up to {spec.shard_size} images each)"
        + (f"; {done} already done" if done else ""),
        f"format     {spec.image_format}, about {human_bytes(estimate_bytes(spec))} in all",
    ]
    lines += [
        f"  {c:<20} {spec.per_category} images in {per_cat} shard(s)" for c in spec.categories
    ]
    return "\n".join(lines)
