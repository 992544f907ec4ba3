"""One validator for the metadata files a command reads but did not write this run.

``spec.json``, ``index.json``, shard stats, model cards and RealNet checkpoints' configs
come from storage anyone may have edited. Each is parsed by :func:`load_json` (``NaN`` and
``Infinity`` refused anywhere in the document, nesting bounded) and checked against a small
declarative :class:`Schema`: types, ranges, finite numbers, list lengths, names, and paths
that stay inside the dataset root. Fields a schema does not name are kept and ignored
(format v1 grows by adding fields); the ones it names must be right. A failure raises the
caller's error class with one line naming the file and the field.

Example:
    >>> doc = load_json(b'{"format_version": 1, "shards": []}', "index.json", FormatError)
    >>> validate(doc, INDEX, "index.json", FormatError)
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sia_pipeline.io.inputs import MAX_SHARDS_PER_CATEGORY, MAX_SIDE, MAX_STEPS, MAX_TIMESTEP

MAX_LIST = 1_000_000  # entries of one list: shards of a root, samples of a shard
MAX_DEPTH = 32
MAX_SHARD_SIZE = 999_999  # six-digit sample indexes in keys
MAX_PER_CATEGORY = MAX_SHARDS_PER_CATEGORY * 1000
INT64 = 2**63 - 1

CATEGORY_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SchemaError(ValueError):
    """A metadata document that does not match its schema (the default error class)."""


def _reject_constant(name: str) -> Any:
    msg = f"{name} is not a finite number"
    raise ValueError(msg)


def load_json(data: bytes | str, where: str, error: type[Exception] = SchemaError) -> Any:
    """Parse untrusted JSON: ``NaN``/``Infinity`` refused, bad UTF-8 or deep nesting too.

    Raises:
        error: one line, ``WHERE is not valid JSON: ...``.
    """
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"{where} is not valid JSON: {why}"
        raise error(msg) from None
    _depth(doc, where, error)
    return doc


def _depth(doc: Any, where: str, error: type[Exception]) -> None:
    stack = [(doc, 0)]
    while stack:
        node, d = stack.pop()
        if d > MAX_DEPTH:
            msg = f"{where} nests deeper than {MAX_DEPTH} levels"
            raise error(msg)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)


def inside_root(rel: str) -> str | None:
    """Why ``rel`` is not a relative path that stays inside a root (None when it is)."""
    if not rel or "\\" in rel or "\x00" in rel or "://" in rel:
        return "not a plain relative path"
    if rel.startswith("/"):
        return "an absolute path"
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{rel}/":
        return "a path leading out of the root"
    return None


@dataclass(frozen=True)
class Field:
    """One field: its JSON type, whether it must be there, and its allowed values.

    ``kind``: ``int``, ``float`` (ints accepted), ``str``, ``bool``, ``list`` or ``dict``.
    ``lo``/``hi`` bound numbers, and lengths of strings and lists; ``items`` checks each
    list element (or dict value), ``schema`` a nested object, ``pattern`` and ``choices``
    strings, ``path`` a relative path inside the root.
    """

    kind: type
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    items: Field | None = None
    schema: Schema | None = None
    path: bool = False
    nullable: bool = False  # null counts as absent


@dataclass(frozen=True)
class Schema:
    """An object's fields, plus cross-field ``rules`` (each returns a problem or None)."""

    fields: dict[str, Field]
    rules: tuple[Callable[[dict[str, Any]], str | None], ...] = field(default=())


def _problem(value: Any, f: Field, name: str) -> str | None:
    kinds = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}
    kinds |= {list: (list,), dict: (dict,)}
    if isinstance(value, bool) and f.kind is not bool or not isinstance(value, kinds[f.kind]):
        return f"{name} must be {f.kind.__name__}, got {type(value).__name__}"
    if f.kind in (int, float):
        if not math.isfinite(value):
            return f"{name} must be finite, got {value!r}"
        if f.lo is not None and value < f.lo:
            return f"{name} must be >= {f.lo:g}, got {value!r}"
        if f.hi is not None and value > f.hi:
            return f"{name} must be <= {f.hi:g}, got {value!r}"
    if f.kind in (str, list, dict) and f.hi is not None and len(value) > f.hi:
        return f"{name} holds {len(value)} entries (at most {f.hi:g})"
    if f.kind in (str, list, dict) and f.lo is not None and len(value) < f.lo:
        return f"{name} must hold at least {f.lo:g} entries"
    if f.choices is not None and value not in f.choices:
        return f"{name} must be one of {list(f.choices)}, got {value!r}"
    if f.pattern is not None and not re.match(f.pattern, value):
        return f"{name} {value!r} is not allowed here"
    if f.path:
        why = inside_root(value)
        if why:
            return f"{name} {value!r} is {why}"
    if f.items is not None:
        values = value.values() if isinstance(value, dict) else value
        for i, item in enumerate(values):
            p = _problem(item, f.items, f"{name}[{i}]")
            if p:
                return p
    if f.schema is not None:
        return _object_problem(value, f.schema, name)
    return None


def _object_problem(doc: Any, schema: Schema, prefix: str = "") -> str | None:
    if not isinstance(doc, dict):
        return f"{prefix or 'the document'} must be an object, got {type(doc).__name__}"
    for name, f in schema.fields.items():
        label = f"{prefix}.{name}" if prefix else name
        if name not in doc or (f.nullable and doc[name] is None):
            if f.required:
                return f"{label} is missing"
            continue
        p = _problem(doc[name], f, label)
        if p:
            return p
    for rule in schema.rules:
        p = rule(doc)
        if p:
            return f"{prefix}: {p}" if prefix else p
    return None


def validate(doc: Any, schema: Schema, where: str, error: type[Exception] = SchemaError) -> Any:
    """Return ``doc`` if it matches ``schema``, else raise ``error`` naming ``where``."""
    p = _object_problem(doc, schema)
    if p:
        msg = f"{where}: {p}"
        raise error(msg)
    return doc


# --- the schemas -----------------------------------------------------------------------

FINITE = Field(float)
STRENGTH = Field(float, lo=0.0)  # the format's s >= 0 (sia-gen now writes [0, 1])
CATEGORY = Field(str, pattern=CATEGORY_RE)
COUNT = Field(int, lo=0, hi=MAX_SHARD_SIZE)


def _shards_bounded(spec: dict[str, Any]) -> str | None:
    """The spec's layout must fit six-digit shard numbers (a bound on every list built
    from it: a doctored ``per_category`` of 1e18 is refused here)."""
    per, size = spec.get("per_category"), spec.get("shard_size")
    if not isinstance(per, int) or not isinstance(size, int) or size < 1:
        return None
    layers = [0, *spec.get("extends", []), per]
    if any(b < a for a, b in zip(layers, layers[1:], strict=False)):
        return f"extends {spec.get('extends')} must grow up to per_category {per}"
    n = sum(-(-(b - a) // size) for a, b in zip(layers, layers[1:], strict=False))
    if n > MAX_SHARDS_PER_CATEGORY:
        return f"per_category {per} / shard_size {size} makes {n} shards per category"
    return None


def _strengths_ok(s: dict[str, Any]) -> str | None:
    if s.get("kind") == "uniform" and len(s.get("values", [])) != 2:
        return "a uniform strength spec needs two values"
    return None


STRENGTHS = Schema(
    {
        "kind": Field(str, choices=("uniform", "grid", "list")),
        "spec": Field(str, hi=10_000),
        "values": Field(list, lo=1, hi=10_000, items=STRENGTH),
    },
    (_strengths_ok,),
)

SPEC = Schema(
    {
        "model_id": Field(str, hi=200),
        "categories": Field(list, lo=1, hi=10_000, items=CATEGORY),
        "class_ids": Field(list, hi=10_000, items=Field(int, lo=0, hi=INT64)),
        "strengths": Field(dict, schema=STRENGTHS),
        "per_category": Field(int, lo=1, hi=MAX_PER_CATEGORY),
        "shard_size": Field(int, lo=1, hi=MAX_SHARD_SIZE),
        "seed": Field(int, lo=-INT64, hi=INT64),
        "sampler": Field(str, choices=("ddpm", "ddim")),
        "steps": Field(int, lo=1, hi=MAX_STEPS),
        "eta": Field(float, lo=0.0, hi=1.0),
        "image_format": Field(str, choices=("png", "jpg")),
        "resolution": Field(int, lo=1, hi=MAX_SIDE),
        "classifier_id": Field(str, required=False, hi=200),
        "classifier_scale": Field(float, required=False, lo=0.0, hi=1e6),
        "precision": Field(str, required=False, choices=("fp32", "bf16", "fp16")),
        "strength_min_t": Field(int, required=False, lo=0, hi=MAX_TIMESTEP),
        "extends": Field(list, required=False, hi=1000, items=Field(int, lo=1, hi=INT64)),
    },
    (_shards_bounded,),
)

SPEC_DOC = Schema(
    {
        "format_version": Field(int, choices=(1,)),
        "spec_hash": Field(str, hi=200),
        "spec": Field(dict),  # checked against SPEC when not empty (see spec.read_spec)
        "index_fields": Field(dict, required=False),
    }
)

INDEX_SHARD = Schema(
    {
        "tar": Field(str, hi=1000, path=True),
        "category": CATEGORY,
        "count": COUNT,
        "strength_min": STRENGTH,
        "strength_max": STRENGTH,
        "size": Field(int, required=False, lo=0, hi=INT64),
        "sha256": Field(str, required=False, hi=128),
        "shard": Field(str, required=False, hi=200),
    }
)

INDEX = Schema(
    {
        "format_version": Field(int),  # its value is checked by format.read_index
        "shards": Field(list, hi=MAX_LIST, items=Field(dict, schema=INDEX_SHARD)),
        "spec": Field(dict, required=False),
        "spec_hash": Field(str, required=False, hi=200),
        "num_samples": Field(int, required=False, lo=0, hi=INT64),
        "num_shards": Field(int, required=False, lo=0, hi=MAX_LIST),
        "strength_min": Field(float, required=False),
        "strength_max": Field(float, required=False),
    }
)

STATS = Schema(
    {
        "shard": Field(str, hi=200),
        "category": CATEGORY,
        "tar": Field(str, hi=1000, path=True),
        "count": COUNT,
        "size": Field(int, lo=0, hi=INT64),
        "sha256": Field(str, hi=128),
        "keys": Field(list, required=False, hi=MAX_SHARD_SIZE, items=Field(str, hi=200)),
        "strength_min": Field(float, required=False, lo=0.0),
        "strength_max": Field(float, required=False, lo=0.0),
        "spec_hash": Field(str, required=False, hi=200),
        "format_version": Field(int, required=False),
        "samples": Field(list, required=False, hi=MAX_SHARD_SIZE, items=Field(dict)),
    }
)

MODEL_CARD = Schema(
    {
        "model_id": Field(str, hi=200),
        "categories": Field(dict, lo=1, hi=10_000, items=Field(int, lo=0, hi=INT64)),
        "resolution": Field(int, lo=1, hi=MAX_SIDE),
        "train_steps": Field(int, required=False, lo=0, hi=INT64),
        "preset": Field(str, required=False, hi=200),
    }
)

REALNET_CALIBRATION = Schema(
    {
        "threshold": FINITE,
        "target_fpr": Field(float, lo=0.0, hi=1.0),
        "scores": Field(list, lo=1, hi=MAX_LIST, items=FINITE),
    }
)

REALNET_CHECKPOINT = Schema(
    {
        "model_args": Field(dict),
        "step": Field(int, lo=0, hi=INT64),
        "category": Field(str, hi=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"),
        "image_size": Field(int, lo=1, hi=MAX_SIDE),
        "calibration": Field(dict, required=False, nullable=True, schema=REALNET_CALIBRATION),
        "train_config": Field(dict, required=False, nullable=True),
    }
)
