"""Provenance a ``sia-gen`` run records in ``spec.json``: the command that reproduces it and
the model it sampled from (never an endpoint or credentials)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from sia_pipeline.format.genspec import GenSpec


def command_line(
    spec: GenSpec,
    out: str,
    model: str | None,
    batch_size: int,
    classifier: str | None = None,
    compile: bool = False,
) -> str:
    """A ``sia-gen`` command that reproduces ``spec`` (no endpoint or credentials)."""
    args = [
        "sia-gen",
        f"--categories={','.join(spec.categories)}",
        f"--strengths={spec.strengths.text}",
        f"--per-category={spec.per_category}",
        f"--shard-size={spec.shard_size}",
        f"--seed={spec.seed}",
        f"--sampler={spec.sampler}",
        f"--steps={spec.steps}",
        f"--batch-size={batch_size}",
        f"--image-format={spec.image_format}",
        f"--out={out}",
    ]
    if spec.sampler == "ddim":
        args.insert(8, f"--eta={spec.eta}")
    if model:
        args.append(f"--model={model}")
    if classifier:
        args += [f"--classifier={classifier}", f"--classifier-scale={spec.classifier_scale!r}"]
    if spec.precision != "fp32":
        args.append(f"--precision={spec.precision}")
    if spec.strength_min_t:
        args.append(f"--strength-min-t={spec.strength_min_t}")
    if compile:
        args.append("--compile")
    if spec.extends:
        args.append("--extend")
    return shlex.join(args)


def model_url(model: str) -> str:
    """Where a model can be found again from any folder: ``s3://`` (or another URL) as given,
    a local path as an absolute ``file://`` URL."""
    if "://" in model and not model.startswith("file://"):
        return model
    # Not Path.as_uri(): the readers take file:// paths as they are, without %-decoding.
    return "file://" + str(Path(model.removeprefix("file://")).expanduser().resolve())


def model_record(loaded: Any, model: str | None) -> dict[str, Any]:
    """The model's provenance: its id and an absolute URL (``sia-inspect --regenerate``
    finds it from any folder on any host that can reach it)."""
    card = loaded.card
    rec = {
        "id": loaded.model_id,
        "source": model_url(str(model)) if model else "bundled demo model",
        "bundled": model is None,
        "resolution": loaded.resolution,
        "categories": loaded.categories,
    }
    rec.update({k: card[k] for k in ("preset", "train_steps", "data", "license") if k in card})
    return rec
