"""The generation spec: what decides a dataset's images, and each sample's seed and strength.

:class:`GenSpec` is what ``spec.json`` and ``index.json`` record; its hash names "the same
spec". Every sample's seed and strength are a hash of (model id, category, sample index,
global seed, strength spec, sampler config), never of worker order, so any shard can be
rerun alone and comes out the same. Pure Python: no Ray, storage, torch or model weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sia_pipeline.format.spec import shard_range, shards_in_layers

StrengthKind = Literal["uniform", "grid", "list"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")  # the sampler's autocast dtypes
MAX_GRID_VALUES = 10_000
# The paper's range of SDAS strengths (the authors sampled 0.1-0.2; DDIM 0.01-0.03): above
# 1 the reverse noise is more than doubled in variance and samples are noise, not defects.
MAX_STRENGTH = 1.0


class PlanError(ValueError):
    """Bad generation input; the message is one line naming the value and what is allowed."""


@dataclass(frozen=True)
class StrengthSpec:
    """Parsed ``--strengths``: ``a:b`` uniform, ``a:b:step`` a grid, ``a,b,c`` a list.

    ``values`` holds (lo, hi) for ``uniform`` and every value otherwise; ``text`` is the
    canonical spelling, so ``0.10:0.5`` and ``0.1:0.50`` are the same spec.
    """

    kind: StrengthKind
    values: tuple[float, ...]
    text: str

    def value(self, u: float, index: int) -> float:
        """Strength of sample ``index`` given its hash-derived uniform ``u`` in [0, 1).

        Grid and list values go round-robin over the sample index, so each value occurs
        equally often (to within one per category).
        """
        if self.kind == "uniform":
            lo, hi = self.values
            return lo + (hi - lo) * u
        return self.values[index % len(self.values)]

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform in [{self.values[0]:g}, {self.values[1]:g})"
        vals = ", ".join(f"{v:g}" for v in self.values[:8])
        more = f", ... ({len(self.values)} values)" if len(self.values) > 8 else ""
        return f"{self.kind} of {vals}{more}, round-robin"


def _number(part: str, text: str) -> float:
    try:
        v = float(part)
    except ValueError:
        msg = f"--strengths {text!r}: {part.strip()!r} is not a number"
        raise PlanError(msg) from None
    if not math.isfinite(v):
        msg = f"--strengths {text!r}: {part.strip()!r} is not finite"
        raise PlanError(msg)
    if not 0 <= v <= MAX_STRENGTH:
        msg = f"--strengths {text!r}: strengths must be >= 0 and <= {MAX_STRENGTH:g}, got {v:g}"
        raise PlanError(msg)
    return v


def parse_strengths(text: str) -> StrengthSpec:
    """Parse ``a:b`` (uniform per sample), ``a:b:step`` (grid) or ``a,b,c`` (list).

    Raises:
        PlanError: empty, not numbers, negative, not finite, or a reversed/empty range.
    """
    text = (text or "").strip()
    usage = "use a:b (uniform), a:b:step (grid) or a,b,c (list)"
    if not text:
        msg = f"--strengths is empty: {usage}"
        raise PlanError(msg)
    if ":" in text and "," in text:
        msg = f"--strengths {text!r} mixes ':' and ',': {usage}"
        raise PlanError(msg)
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            msg = f"--strengths {text!r} has {len(parts)} ':'-parts: {usage}"
            raise PlanError(msg)
        lo, hi = _number(parts[0], text), _number(parts[1], text)
        if lo >= hi:
            msg = f"--strengths {text!r}: start {lo:g} must be below end {hi:g}"
            raise PlanError(msg)
        if len(parts) == 2:
            return StrengthSpec("uniform", (lo, hi), f"{lo!r}:{hi!r}")
        step = _number(parts[2], text)
        if step <= 0:
            msg = f"--strengths {text!r}: step must be > 0"
            raise PlanError(msg)
        n = math.floor((hi - lo) / step + 1e-9) + 1
        if n > MAX_GRID_VALUES:
            msg = f"--strengths {text!r} gives {n} grid values (at most {MAX_GRID_VALUES})"
            raise PlanError(msg)
        values = tuple(round(lo + i * step, 12) for i in range(n))
        return StrengthSpec("grid", values, f"{lo!r}:{hi!r}:{step!r}")
    values = tuple(_number(p, text) for p in text.split(","))
    return StrengthSpec("list", values, ",".join(repr(v) for v in values))


@dataclass(frozen=True)
class GenSpec:
    """Everything that decides the images of a dataset; its hash names "the same spec"."""

    model_id: str
    categories: tuple[str, ...]
    class_ids: tuple[int, ...]
    strengths: StrengthSpec
    per_category: int
    shard_size: int
    seed: int
    sampler: str
    steps: int
    eta: float
    image_format: str
    resolution: int
    # Optional parts: in the dict (and so in the hash) only when used, so that specs
    # without guidance in fp32 with the strength on every step keep the hashes they had
    # before these existed.
    classifier_id: str = ""
    classifier_scale: float = 0.0
    precision: str = "fp32"
    # The strength term only on timesteps >= this (0: every step, the paper).
    strength_min_t: int = 0
    # Earlier --per-category values of a dataset grown by --extend (its shard layers).
    extends: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.classifier_id:
            del d["classifier_id"], d["classifier_scale"]
        if self.precision == "fp32":
            del d["precision"]
        if not self.strength_min_t:
            del d["strength_min_t"]
        d["categories"] = list(self.categories)
        d["class_ids"] = list(self.class_ids)
        if self.extends:
            d["extends"] = list(self.extends)
        else:
            del d["extends"]  # specs never extended hash as before
        d["strengths"] = {
            "kind": self.strengths.kind,
            "spec": self.strengths.text,
            "values": list(self.strengths.values),
        }
        return d

    @property
    def spec_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def shards_per_category(self) -> int:
        return shards_in_layers(self.per_category, self.shard_size, self.extends)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Sample-index range [start, stop) of a category's shard ``shard`` (the layers of
        an ``--extend``-ed dataset keep their own shards)."""
        return shard_range(self.per_category, self.shard_size, self.extends, shard)

    @property
    def total_images(self) -> int:
        return self.per_category * len(self.categories)


def sample_params(spec: GenSpec, category: str, index: int) -> tuple[int, float]:
    """(seed, strength) of sample ``index`` of ``category``: a pure function of the spec."""
    parts = [
        spec.model_id,
        category,
        index,
        spec.seed,
        spec.strengths.text,
        spec.sampler,
        spec.steps,
        spec.eta,
    ]
    blob = json.dumps(parts, separators=(",", ":")).encode()
    digest = hashlib.blake2b(blob, digest_size=16).digest()
    seed = int.from_bytes(digest[:8], "big") & (2**63 - 1)
    u = int.from_bytes(digest[8:], "big") / 2**64
    return seed, spec.strengths.value(u, index)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
