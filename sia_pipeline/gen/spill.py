"""A node-local spill of sampled shards, so a failed upload is retried without resampling.

Layout under the spill root (one per user and node, ``$TMPDIR/sia-spill-UID`` by default)::

    SPEC_HASH/SHARD_ID.tar.part-PID-XXXX   a tar being written by process PID
    SPEC_HASH/SHARD_ID.tar                 a finished tar whose upload failed
    SPEC_HASH/SHARD_ID.json                its stats (written last: the entry is complete)

Entries are bounded (``max_bytes`` for all finished tars), removed once uploaded, and
parts left by killed processes are swept when the next worker on the node starts and
when a run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from sia_pipeline.format.v1 import ShardStats
from sia_pipeline.gen.plan import ShardTask

log = logging.getLogger(__name__)

DEFAULT_SPILL_BYTES = 2 * 1024**3
MAX_AGE_S = 7 * 24 * 3600  # finished entries nobody came back for
EMPTY_DIR_AGE_S = 600  # an empty spec folder younger than this may be about to be used


def default_spill_root() -> Path:
    """``$SIA_SPILL_DIR``, else ``$TMPDIR/sia-spill-UID`` on this node."""
    env = os.environ.get("SIA_SPILL_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(env) if env else Path(tempfile.gettempdir()) / f"sia-spill-{uid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (no init to reap it, e.g. a container without one) is dead too
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Spill:
    """Finished shards waiting for a successful upload, on this node's disk.

    Args:
        root: the spill folder (created on first use).
        max_bytes: most bytes of finished tars kept; a shard that does not fit is dropped
            (and sampled again later) rather than filling the disk.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_SPILL_BYTES):
        self.root = Path(root) if root else default_spill_root()
        self.max_bytes = max_bytes

    def _dir(self, task: ShardTask) -> Path:
        return self.root / task.spec_hash

    def part_path(self, task: ShardTask) -> Path:
        """A fresh path for the tar this process is about to write."""
        folder = self._dir(task)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder / f"{task.shard_id}.tar.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def find(self, task: ShardTask) -> tuple[Path, bytes] | None:
        """(tar, stats JSON) of a complete, intact spilled copy of ``task``'s shard, if any."""
        folder = self._dir(task)
        tar, meta = folder / f"{task.shard_id}.tar", folder / f"{task.shard_id}.json"
        if not tar.exists() and not meta.exists():
            return None
        try:
            data = meta.read_bytes()
            stats = ShardStats.from_json(data)
            if stats.spec_hash == task.spec_hash and tar.stat().st_size == stats.size:
                if _sha256(tar) == stats.sha256:
                    return tar, data
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.drop(task)  # half-written or damaged: sample again
        return None

    def keep(self, task: ShardTask, part: Path, stats_json: bytes) -> bool:
        """Move a finished tar into the spill; False (and the part removed) if it does not fit."""
        size = part.stat().st_size
        if self.usage() + size > self.max_bytes:
            log.warning(
                "spill %s is full; shard %s will be sampled again", self.root, task.shard_id
            )
            part.unlink(missing_ok=True)
            return False
        folder = self._dir(task)
        os.replace(part, folder / f"{task.shard_id}.tar")
        tmp = folder / f"{task.shard_id}.json.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(stats_json)
        os.replace(tmp, folder / f"{task.shard_id}.json")
        return True

    def drop(self, task: ShardTask) -> None:
        """Forget ``task``'s spilled copy (stats first, so a reader never sees a lone stats)."""
        folder = self._dir(task)  # left in place: another task may be writing into it
        for name in (f"{task.shard_id}.json", f"{task.shard_id}.tar"):
            (folder / name).unlink(missing_ok=True)

    def usage(self) -> int:
        """Bytes of finished spilled tars."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob("*/*.tar") if p.is_file())

    def entries(self) -> list[Path]:
        """Finished spilled tars (for tests and reports)."""
        return sorted(self.root.glob("*/*.tar")) if self.root.is_dir() else []

    def sweep(self, max_age_s: float = MAX_AGE_S) -> int:
        """Remove parts of dead processes, stale entries and empty folders; returns a count."""
        if not self.root.is_dir():
            return 0
        removed, now = 0, time.time()
        for path in self.root.glob("*/*"):
            name = path.name
            stale = False
            if ".part-" in name:
                try:
                    pid = int(name.rsplit(".part-", 1)[-1].split("-")[0])
                except ValueError:
                    pid = 0
                stale = pid != os.getpid() and not (pid and _pid_alive(pid))
            else:
                with contextlib.suppress(OSError):
                    stale = now - path.stat().st_mtime > max_age_s
            if stale:
                with contextlib.suppress(OSError):
                    path.unlink() if path.is_file() else shutil.rmtree(path)
                    removed += 1
        for folder in self.root.iterdir():
            with contextlib.suppress(OSError):
                if now - folder.stat().st_mtime > EMPTY_DIR_AGE_S:
                    folder.rmdir()  # only when empty, and not just made by a live task
        return removed
