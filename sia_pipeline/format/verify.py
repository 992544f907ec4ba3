"""Full verification of a dataset's shards against their stats: the publishing gate.

``sia-gen`` trusts a shard once its stats exist and the tar size matches (one HEAD);
publishing reads every byte instead: sha256, size, sample count and keys, and that every
sample has an image and a ``.json`` member. One streaming pass per tar, nothing on disk;
the bytes of a few chosen samples (the card's previews) are kept on the way.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from sia_pipeline.format.spec import shards_in_layers
from sia_pipeline.format.v1 import (
    IMAGE_EXTS,
    SHARDS_DIR,
    FormatError,
    ShardStats,
    shard_id,
)
from sia_pipeline.io.storage import Storage, StorageError

log = logging.getLogger(__name__)

MAX_MISSING_LISTED = 100  # missing shards named one by one per category, then a count

VERIFY_THREADS = 8
_CHUNK = 1 << 20


@dataclass
class ShardCheck:
    """The verdict on one shard: ``problems`` is empty when it matches its stats."""

    shard: str
    tar: str
    problems: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)  # kept, by key

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return f"{self.shard} ({self.tar}): {'; '.join(self.problems)}"


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n) if n is not None and n >= 0 else self._stream.read()
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last part."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def scan_tar(
    stream: IO[bytes], keep: set[str] = frozenset()
) -> tuple[str, int, list[str], dict[str, set[str]], dict[str, dict[str, bytes]], str]:
    """Read one tar to its end.

    Returns:
        (sha256 hex, size in bytes, keys in order, extensions per key, kept samples,
        error text or "" if the tar parsed cleanly)
    """
    reader = _HashingReader(stream)
    keys: list[str] = []
    exts: dict[str, set[str]] = {}
    kept: dict[str, dict[str, bytes]] = {}
    error = ""
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if key not in exts:
                    keys.append(key)
                    exts[key] = set()
                exts[key].add(ext)
                if key in keep:
                    f = tar.extractfile(member)
                    kept.setdefault(key, {})[ext] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"unreadable tar ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    reader.drain()
    return reader.sha256.hexdigest(), reader.size, keys, exts, kept, error


def verify_shard(storage: Storage, stats: ShardStats, keep: set[str] = frozenset()) -> ShardCheck:
    """Stream the shard's tar and compare it with its stats; never raises for bad data."""
    check = ShardCheck(stats.shard, stats.tar)
    try:
        stream = storage.open_read(stats.tar)
    except FileNotFoundError:
        check.problems.append("tar missing")
        return check
    except StorageError as e:
        check.problems.append(f"tar unreadable ({e})")
        return check
    try:
        sha, size, keys, exts, kept, error = scan_tar(stream, keep)
    finally:
        stream.close()
    check.samples = kept
    if size != stats.size:
        check.problems.append(f"size {size} != {stats.size} in stats (truncated or replaced)")
    if sha != stats.sha256:
        check.problems.append(f"sha256 {sha[:12]}... != {stats.sha256[:12]}... in stats")
    if error:
        check.problems.append(error)
    if len(stats.samples) != stats.count:  # the manifest is built from these rows
        check.problems.append(f"{len(stats.samples)} sample rows != count {stats.count} in stats")
    if len(keys) != stats.count:
        check.problems.append(f"{len(keys)} samples != {stats.count} in stats")
    elif stats.keys and keys != list(stats.keys):
        check.problems.append("sample keys differ from the stats")
    incomplete = [k for k in keys if "json" not in exts[k] or not exts[k] & set(IMAGE_EXTS)]
    if incomplete:
        check.problems.append(f"{len(incomplete)} sample(s) lack an image or json member")
    return check


def load_stats(
    storage: Storage, names: Iterable[str], threads: int = VERIFY_THREADS
) -> tuple[list[ShardStats], list[ShardCheck], dict[str, str]]:
    """Read every stats file; unreadable ones become failed checks instead of exceptions.

    Returns:
        (stats in shard order, failed checks, sha256 of each stats file by name)
    """

    def one(name: str) -> tuple[str, ShardStats | ShardCheck, str]:
        stem = name.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            data = storage.get_bytes(name)
            return name, ShardStats.from_json(data), hashlib.sha256(data).hexdigest()
        except FileNotFoundError:
            return name, ShardCheck(stem, name, ["stats vanished while reading"]), ""
        except FormatError as e:
            return name, ShardCheck(stem, name, [f"unreadable stats ({e})"]), ""

    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(one, names))
    stats = sorted((s for _, s, _ in found if isinstance(s, ShardStats)), key=lambda s: s.shard)
    bad = [c for _, c, _ in found if isinstance(c, ShardCheck)]
    sums = {n: h for n, s, h in found if isinstance(s, ShardStats)}
    return stats, bad, sums


def verify_shards(
    storage: Storage,
    stats: list[ShardStats],
    keep: set[str] = frozenset(),
    threads: int = VERIFY_THREADS,
) -> list[ShardCheck]:
    """Verify shards in parallel (I/O and hashing release the GIL); results in shard order."""
    with ThreadPoolExecutor(threads) as pool:
        checks = list(pool.map(lambda s: verify_shard(storage, s, keep), stats))
    log.info("verified %d shard(s) under %s", len(checks), storage.url)
    return checks


def layout_problems(
    storage: Storage, stats: list[ShardStats], spec: dict | None
) -> list[ShardCheck]:
    """Shards the layout says are wrong: tars without stats (a write that never finished)
    and, when the spec is known, shards it asks for that do not exist."""
    names = storage.list(SHARDS_DIR)
    stat_tars = {s.tar for s in stats}
    stat_names = {n.removesuffix(".json") for n in names if n.endswith(".json")}
    out = [
        ShardCheck(n.rsplit("/", 1)[-1].removesuffix(".tar"), n, ["no stats JSON (incomplete)"])
        for n in names
        if n.endswith(".tar") and n not in stat_tars and n.removesuffix(".tar") not in stat_names
    ]
    if spec and spec.get("categories") and spec.get("per_category") and spec.get("shard_size"):
        have = {s.shard for s in stats}
        listed = {c.tar for c in out}
        # O(layers), not a list of every range: the spec is checked, but the loop below
        # still stops after MAX_MISSING_LISTED named shards per category.
        n = shards_in_layers(spec["per_category"], spec["shard_size"], spec.get("extends", ()))
        for category in spec["categories"]:
            named = 0
            for i in range(n):
                sid = shard_id(category, i)
                if sid in have:
                    continue
                if named == MAX_MISSING_LISTED:
                    later = [h for h in have if h.rpartition("-")[0] == category]
                    rest = n - i - sum(1 for h in later if int(h.rpartition("-")[2]) >= i)
                    why = f"missing: the spec asks for {rest} more {category} shards from here"
                    out.append(ShardCheck(sid, f"{SHARDS_DIR}/{category}/", [why]))
                    break
                tar = f"{SHARDS_DIR}/{category}/{sid}.tar"
                if tar not in listed:
                    out.append(ShardCheck(sid, tar, ["missing: the spec asks for it"]))
                    named += 1
    return out
