"""Re-sampling one key of a published SIA dataset and comparing it with the stored sample.

Re-sampling uses only what the dataset records (``index.json``'s spec, model and command)
and the generator's own code (:func:`plan.make_tasks` for seeds, strengths and metadata,
:class:`sampler.Sampler`, :func:`writer.encode_image`), so "bit-identical" means the
published image is exactly what the recorded recipe makes.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sia_pipeline.format.genspec import GenSpec, StrengthSpec
from sia_pipeline.format.v1 import decode_image, parse_key
from sia_pipeline.gen.options import RUN
from sia_pipeline.gen.plan import make_tasks
from sia_pipeline.io.storage import Storage
from sia_pipeline.publish.inspection import InspectError, find_sample, load_index


def spec_from_index(index: dict[str, Any]) -> GenSpec:
    """The :class:`GenSpec` recorded in index.json, checked against its ``spec_hash``."""
    d = dict(index.get("spec") or {})
    try:
        s = d.pop("strengths")
        d["strengths"] = StrengthSpec(s["kind"], tuple(s["values"]), s["spec"])
        d["categories"] = tuple(d["categories"])
        d["class_ids"] = tuple(d["class_ids"])
        spec = GenSpec(**d)
    except (KeyError, TypeError) as e:
        msg = f"index.json has no usable generation spec ({type(e).__name__}: {e})"
        raise InspectError(msg) from None
    if index.get("spec_hash") and spec.spec_hash != index["spec_hash"]:
        msg = f"index.json spec hashes to {spec.spec_hash}, not its spec_hash {index['spec_hash']}"
        raise InspectError(msg)
    return spec


def recorded_batch_size(index: dict[str, Any]) -> int:
    """``--batch-size`` from the recorded sia-gen command (sia-gen's default if absent)."""
    for arg in shlex.split(index.get("command", "")):
        if arg.startswith("--batch-size="):
            return int(arg.split("=", 1)[1])
    return RUN.batch_size  # sia-gen's default, for datasets whose command is not recorded


def recorded_model(index: dict[str, Any]) -> str | None:
    """The model location recorded in index.json; None = the bundled demo model."""
    model = index.get("model") or {}
    return None if model.get("bundled", False) else model.get("source")


@dataclass
class RegenResult:
    """How a re-sampled key compares with the stored one."""

    key: str
    bit_identical: bool
    meta_identical: bool
    max_abs_diff: int
    differing_pixels: int
    model_id: str
    batch: tuple[int, int]  # positions [first, last) in the shard sampled together
    device: str
    meta_diff: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    image: np.ndarray | None = None

    def describe(self) -> str:
        where = f"(batch of {self.batch[1] - self.batch[0]} on {self.device}, {self.model_id})"
        if self.bit_identical and self.meta_identical:
            return f"{self.key}: bit-identical: image and metadata {where}"
        parts = []
        if not self.bit_identical:
            why = (
                f"{self.differing_pixels} pixel values differ, max |diff| {self.max_abs_diff}"
                if self.differing_pixels
                else "pixels equal: only the encoding differs"
            )
            parts.append(f"image bytes differ ({why})")
        if not self.meta_identical:
            fields = ", ".join(f"{k}: {a!r} != {b!r}" for k, (a, b) in self.meta_diff.items())
            parts.append(f"metadata differs ({fields})")
        return f"{self.key}: NOT identical: {'; '.join(parts)} {where}"


def _recorded_guidance(index: dict[str, Any], spec: GenSpec, loaded, device, endpoint_url):
    """The classifier guidance a guided spec records (its classifier folder, checked), or None."""
    if not spec.classifier_id:
        return None
    from sia_pipeline.diffusion.guidance import GuidanceError, load_guidance
    from sia_pipeline.diffusion.model import ModelError

    source = (index.get("classifier") or {}).get("source")
    if not source:
        msg = "index.json records a guided spec but not where its classifier is"
        raise InspectError(msg)
    try:
        guidance, card = load_guidance(
            source,
            spec.classifier_scale,
            loaded.categories,
            loaded.resolution,
            device,
            endpoint_url,
        )
    except (ModelError, GuidanceError) as e:
        msg = f"cannot load the recorded classifier: {e}"
        raise InspectError(msg) from None
    if card["classifier_id"] != spec.classifier_id:
        got, want = card["classifier_id"], spec.classifier_id
        msg = f"classifier {source} is {got}; the dataset needs {want}"
        raise InspectError(msg)
    return guidance


def regenerate(
    storage: Storage,
    key: str,
    model: str | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    endpoint_url: str | None = None,
) -> RegenResult:
    """Re-sample ``key`` from the recorded spec and model and compare it with the stored one.

    The key is sampled inside the same batch positions it had in its shard (``batch_size``
    from the recorded command), as sia-gen did; a tail batch is padded to the batch size
    with throw-away samples when the recorded command compiled (as sia-gen's workers did).
    """
    from sia_pipeline.diffusion.model import ModelError, load_model
    from sia_pipeline.diffusion.sampler import Sampler
    from sia_pipeline.format.writer import encode_image, sample_json

    index = load_index(storage)
    spec = spec_from_index(index)
    stored = find_sample(storage, key, endpoint_url)
    category, shard, j = parse_key(key)
    if category not in spec.categories:
        msg = f"category {category!r} of {key!r} is not in this dataset's spec"
        raise InspectError(msg)
    bs = batch_size or recorded_batch_size(index)
    i = spec.categories.index(category)
    one_cat = dataclasses.replace(
        spec, categories=(category,), class_ids=(spec.class_ids[i],)
    )  # seeds and strengths depend on the category name, not on the others
    tasks = make_tasks(one_cat, bs)
    if shard >= len(tasks) or j >= tasks[shard].count:
        msg = f"key {key!r} is outside the recorded spec ({spec.per_category} per category)"
        raise InspectError(msg)
    task = tasks[shard]
    model_url = model if model is not None else recorded_model(index)
    try:
        loaded = load_model(model_url, device=device, endpoint_url=endpoint_url)
    except ModelError as e:
        msg = f"cannot load the recorded model: {e}"
        raise InspectError(msg) from None
    if loaded.model_id != spec.model_id:
        name = model_url or "the bundled model"
        msg = f"model {name} is {loaded.model_id}; the dataset needs {spec.model_id}"
        raise InspectError(msg)
    guidance = _recorded_guidance(index, spec, loaded, device, endpoint_url)
    first = (j // bs) * bs
    last = min(first + bs, task.count)
    try:
        sampler = Sampler(
            loaded,
            spec.sampler,
            spec.steps,
            spec.eta,
            guidance=guidance,
            precision=spec.precision,
            strength_min_t=spec.strength_min_t,
        )
    except ValueError as e:  # a recorded strength_min_t beyond this model's T
        msg = f"cannot sample the recorded spec with this model: {e}"
        raise InspectError(msg) from None
    compiled = "--compile" in shlex.split(index.get("command", ""))  # sia-gen padded its tails
    images = sampler.sample(
        [category] * (last - first),
        task.strengths[first:last],
        task.seeds[first:last],
        pad_to=bs if compiled else None,
    )
    image = images[j - first]
    expected_meta = {k: v for k, v in task.sample_row(j).items() if k not in ("key", "shard")}
    old = decode_image(stored.image)
    diff = np.abs(old.astype(np.int16) - image.astype(np.int16))
    meta_diff = {
        k: (stored.meta.get(k), expected_meta.get(k))
        for k in sorted(set(stored.meta) | set(expected_meta))
        if stored.meta.get(k) != expected_meta.get(k)
    }
    return RegenResult(
        key=key,
        bit_identical=encode_image(image, stored.ext) == stored.image,
        meta_identical=sample_json(expected_meta) == stored.json_bytes,
        max_abs_diff=int(diff.max()) if diff.size else 0,
        differing_pixels=int(np.count_nonzero(diff)),
        model_id=loaded.model_id,
        batch=(first, last),
        device=device,
        meta_diff=meta_diff,
        image=image,
    )
