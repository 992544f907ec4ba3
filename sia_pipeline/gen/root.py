"""What a dataset root already holds, seen from one ``sia-gen`` run's spec.

``scan_root`` decides which shards are done (stats of this spec whose tar has the recorded
size), whether the root holds another dataset, and whether its index is current;
``clear_root`` removes a dataset in commit order's reverse (index first).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sia_pipeline.format.card import PREVIEW_NAME
from sia_pipeline.format.interchange import CROISSANT_NAME, WIDS_NAME
from sia_pipeline.format.manifest import IO_THREADS
from sia_pipeline.format.spec import SPEC_NAME, read_spec
from sia_pipeline.format.v1 import (
    CARD_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    FormatError,
    ShardStats,
    list_stats_names,
    read_index,
    read_stats,
)
from sia_pipeline.io.storage import Storage, StorageError, can_create_in, nearest_existing


@dataclass
class RootState:
    """What a dataset root already holds, relative to the spec of this run."""

    done: dict[str, ShardStats]
    other_spec: str | None  # why the root holds another dataset, if it does
    index_current: bool  # index.json exists and is of this spec


def scan_root(
    storage: Storage,
    spec_hash: str,
    spec: dict[str, Any] | None = None,
    earlier: frozenset[str] = frozenset(),
) -> RootState:
    """Done shards (stats of this spec whose tar size matches) and foreign-spec evidence.

    ``earlier``: spec hashes of the datasets this spec extends (``--extend``); their
    shards count as done and their index is not foreign.

    The index counts as current only if it records ``spec`` (when given) and the
    interchange indexes and ``spec.json`` exist: a later run repairs a root whose index
    was rebuilt without its spec.
    """
    other = None
    try:
        index = read_index(storage)
    except FormatError as e:  # a corrupt index is rebuilt; another format version is foreign
        index, other = None, (None if _corrupt_json(storage, INDEX_NAME) else str(e))
    ours = {spec_hash, *earlier}
    if index is not None and index.get("spec_hash") not in ours:
        other = f"its index.json has spec {index.get('spec_hash')!r}"
    try:
        recorded = read_spec(storage)
    except FormatError:
        recorded = None  # rewritten by this run
    if recorded is not None and recorded["spec_hash"] not in ours:
        other = other or f"its {SPEC_NAME} has spec {recorded['spec_hash']!r}"

    def check(name: str) -> tuple[str, ShardStats | None, bool]:
        """(name, stats or None if unreadable, whether its tar has the recorded size)."""
        try:
            stats = read_stats(storage, name)
        except FormatError:
            return name, None, False  # corrupt stats: the shard is simply redone
        if stats is None or stats.spec_hash not in ours:
            return name, stats, False
        return name, stats, storage.size(stats.tar) == stats.size

    with ThreadPoolExecutor(IO_THREADS) as pool:
        found = list(pool.map(check, list_stats_names(storage)))
    done = {}
    for name, stats, complete in found:
        if stats is None:
            continue
        if stats.spec_hash not in ours:
            other = other or f"{name} has spec {stats.spec_hash!r}"
        elif complete:
            done[stats.shard] = stats
    current = (
        index is not None
        and other is None
        and index.get("spec_hash") == spec_hash
        and (spec is None or index.get("spec") == spec)
        and recorded is not None
        and all(storage.exists(n) for n in (MANIFEST_NAME, CARD_NAME, WIDS_NAME, CROISSANT_NAME))
    )
    return RootState(done, other, current)


def _corrupt_json(storage: Storage, name: str) -> bool:
    try:
        json.loads(storage.get_bytes(name))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return True
    return False


def clear_root(storage: Storage) -> None:
    """Remove a dataset (index first, so no reader follows it to deleted shards)."""
    storage.delete(INDEX_NAME)
    storage.delete(f"{SHARDS_DIR}/")
    for name in (MANIFEST_NAME, CARD_NAME, PREVIEW_NAME, WIDS_NAME, CROISSANT_NAME, SPEC_NAME):
        storage.delete(name)


def check_creatable(root: Path) -> None:
    """Whether ``root`` exists as a writable folder or could be made, creating nothing."""
    probe = nearest_existing(root)
    if probe.exists() and not probe.is_dir():
        msg = f"cannot create output folder {root}: {probe} is not a folder"
        raise StorageError(msg)
    if not can_create_in(probe):
        msg = f"cannot create output folder {root}: {probe} is not writable"
        raise StorageError(msg)
