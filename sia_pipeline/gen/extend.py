"""``sia-gen --extend``: grow ``--per-category`` of an existing dataset in place.

The earlier shards and their samples stay exactly as they are: the extended spec records
the earlier counts (``GenSpec.extends``), each count's shards keep their sample ranges, and
the new samples (whose seeds never depended on the count) go to new shards after them. Only
the earlier shards' stats files are restamped with the new spec hash, so that one dataset
has one spec; their tars are not touched.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sia_pipeline.format.genspec import GenSpec, PlanError
from sia_pipeline.format.spec import read_spec
from sia_pipeline.format.v1 import FormatError, ShardStats, read_index, shard_stats_name
from sia_pipeline.io.storage import Storage

log = logging.getLogger(__name__)

_MAY_CHANGE = ("per_category", "extends")


def earlier_hashes(spec: GenSpec) -> frozenset[str]:
    """Spec hashes of the datasets ``spec`` grew from (one per earlier ``--per-category``)."""
    return frozenset(
        dataclasses.replace(spec, per_category=n, extends=spec.extends[:i]).spec_hash
        for i, n in enumerate(spec.extends)
    )


def recorded_spec(storage: Storage) -> dict[str, Any] | None:
    """The spec the root records (``spec.json``, else ``index.json``); None if unreadable."""
    try:
        doc = read_spec(storage)
    except FormatError:
        doc = None
    if doc is not None:
        return doc["spec"]
    try:
        index = read_index(storage)
    except FormatError:
        return None
    return (index or {}).get("spec") or None


def spec_differences(spec: GenSpec, old: dict[str, Any]) -> list[str]:
    """``key=old (this run: new)`` for each field but those an extension may change."""
    new = spec.to_dict()
    keys = sorted((set(new) | set(old)) - set(_MAY_CHANGE))
    return [
        f"{k}={old.get(k)!r} (this run: {new.get(k)!r})" for k in keys if new.get(k) != old.get(k)
    ]


def layered_spec(storage: Storage, spec: GenSpec, extend: bool) -> GenSpec:
    """``spec`` with the layers of the dataset it extends (or resumes).

    With ``extend``: the root's recorded spec must match ``spec`` in everything but
    ``per_category``, which may only grow. Without it, a rerun of an extended dataset's
    own command (same ``per_category``) picks up the recorded layers, so it resumes.

    Raises:
        PlanError: ``extend`` on a root with no recorded spec, a spec that differs in
            more than ``per_category``, or a smaller ``per_category``.
    """
    old = recorded_spec(storage)
    if not extend:
        if old and old.get("extends") and old.get("per_category") == spec.per_category:
            grown = dataclasses.replace(spec, extends=tuple(old["extends"]))
            if grown.to_dict() == old:
                return grown
        return spec
    if not old:
        msg = f"--extend: {storage.url} holds no dataset to extend (no spec.json or index.json)"
        raise PlanError(msg)
    diffs = spec_differences(spec, old)
    if diffs:
        msg = (
            f"--extend: the dataset at {storage.url} was made with {'; '.join(diffs[:3])};"
            " only --per-category may change"
        )
        raise PlanError(msg)
    have, layers = int(old["per_category"]), tuple(int(n) for n in old.get("extends", ()))
    if spec.per_category < have:
        msg = (
            f"--extend: the dataset at {storage.url} has {have} images per category;"
            f" --per-category {spec.per_category} would shrink it"
        )
        raise PlanError(msg)
    if spec.per_category == have:
        return dataclasses.replace(spec, extends=layers)
    return dataclasses.replace(spec, extends=(*layers, have))


def restamp(storage: Storage, done: dict[str, ShardStats], spec_hash: str) -> int:
    """Give done shards of an earlier layer the current spec hash (stats only); returns
    how many were restamped."""
    n = 0
    for stats in done.values():
        if stats.spec_hash != spec_hash:
            stats.spec_hash = spec_hash
            index = int(stats.shard.rsplit("-", 1)[1])
            storage.put_bytes(stats.to_json(), shard_stats_name(stats.category, index))
            n += 1
    if n:
        log.info("--extend: %d earlier shard(s) now carry spec %s", n, spec_hash)
    return n
