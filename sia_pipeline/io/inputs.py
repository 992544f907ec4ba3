"""One input layer for every command: bounded numbers, strengths, paths, memory and disk.

Every ``sia-*`` and ``realnet-*`` command checks its options here before it creates
anything. A failed check raises :class:`InputError` (a ``ValueError``) with one line naming
the option, the value and what is allowed; the CLIs print it and exit 2.

Bounds come from three places, each named where it is used:

* the format and the models: sample keys have six-digit shard and index fields
  (:data:`MAX_SHARDS_PER_CATEGORY`), schedulers have T = 1000 steps (:data:`MAX_STEPS`),
  SDAS strengths and the other fractions of the paper lie in [0, 1];
* this machine: an image side whose working set fits half the memory a process may use
  (:func:`max_side`), output estimates against free disk (:func:`check_disk`);
* stated limits (:data:`MAX_SIDE`, :data:`MAX_COUNT`...), far above any real use, so that
  nothing sized by a number from the command line can outgrow the machine.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

MAX_SIDE = 8192  # px: one float32 RGB image of this side is 800 MB
MAX_STEPS = 1000  # the schedulers' T: respaced steps are a subset of it
MAX_TIMESTEP = 100_000  # a timestep option's bound here; the model's T is checked at plan time
MAX_SHARDS_PER_CATEGORY = 1_000_000  # keys hold a six-digit shard number
MAX_COUNT = 10_000_000  # images per category, outputs per run: 1000 x the paper's 10k
MAX_BATCH = 4096
MAX_WORKERS = 4096
MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """Bad command-line input, found before any work; printed on one line, exit 2."""


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or a lower ``RLIMIT_AS``."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        phys = 8 << 30
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(phys, soft) if soft != resource.RLIM_INFINITY and soft > 0 else phys


def memory_budget() -> int:
    """Half of :func:`memory_limit`: what one command's working set may take."""
    return memory_limit() // 2


def check_memory(need: float, what: str) -> None:
    """Refuse ``what`` when it needs more than :func:`memory_budget` bytes."""
    budget = memory_budget()
    if need > budget:
        msg = (
            f"{what} needs about {_fmt_bytes(need)} of memory; the limit is"
            f" {_fmt_bytes(budget)} (half of the {_fmt_bytes(memory_limit())} this machine allows)"
        )
        raise InputError(msg)


def max_side(bytes_per_pixel: float, copies: int = 1) -> int:
    """The largest image side whose working set (``bytes_per_pixel`` per pixel, ``copies``
    at once) fits :func:`memory_budget`, capped at :data:`MAX_SIDE`."""
    return max(1, min(MAX_SIDE, math.isqrt(int(memory_budget() / (bytes_per_pixel * copies)))))


def check_disk(url: str, need: float, what: str) -> None:
    """Refuse ``what`` when its estimated ``need`` bytes exceed the free space under a local
    ``url`` (object stores are not checked)."""
    path = local_path(url)
    if path is None:
        return
    probe = path
    while not os.path.isdir(probe) and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if need > free:
        msg = f"{what} needs about {_fmt_bytes(need)}; {probe} has {_fmt_bytes(free)} free"
        raise InputError(msg)


class Number(click.ParamType):
    """A finite int or float within bounds (click's ranges let ``nan`` and ``1e308`` in)."""

    def __init__(
        self,
        kind: type = float,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> None:
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.name = kind.__name__

    def describe(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return " and ".join(x for x in (lo, hi) if x) or "finite"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = self.kind(str(value).strip())
            except (ValueError, OverflowError):
                self.fail(f"{value!r} is not {'an integer' if self.kind is int else 'a number'}")
        bad = not math.isfinite(v)
        bad |= self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        bad |= self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if bad:
            self.fail(f"{value!r} must be {self.describe()}")
        return self.kind(v)


POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
POSITIVE_FLOAT = Number(float, 0, lo_open=True)
PROBABILITY_OPEN = Number(float, 0, 1, lo_open=True, hi_open=True)
SEED = Number(int, 0, MAX_SEED)
STEPS = Number(int, 1, MAX_STEPS)
TIMESTEP = Number(int, 0, MAX_TIMESTEP)
BATCH = Number(int, 1, MAX_BATCH)


def check_number(value: float, option: str, lo: float, hi: float) -> float:
    """``value`` finite and in [lo, hi], else an :class:`InputError` naming ``option``."""
    if not (isinstance(value, int | float) and math.isfinite(value) and lo <= value <= hi):
        msg = f"{option} must be a finite number in [{lo:g}, {hi:g}], got {value!r}"
        raise InputError(msg)
    return value


def parse_strength_range(
    text: str | None, option: str = "--strengths"
) -> tuple[float, float] | None:
    """``"0.1:0.5"`` -> (0.1, 0.5), ``"0.3"`` -> (0.3, 0.3): finite, in [0, 1], LO <= HI.

    [0, 1] is the paper's range of SDAS strengths (the authors sampled 0.1-0.2, DDIM
    0.01-0.03); a filter outside it would match nothing any sia-gen wrote.
    """
    if text is None or not str(text).strip():
        return None
    lo, sep, hi = str(text).partition(":")
    try:
        out = (float(lo), float(hi if sep else lo))
    except ValueError:
        msg = f"{option} {text!r} is not LO:HI (two numbers)"
        raise InputError(msg) from None
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in out):
        msg = f"{option} {text!r}: strengths must be finite and in [0, 1]"
        raise InputError(msg)
    if out[0] > out[1]:
        msg = f"{option} {text!r} has LO > HI"
        raise InputError(msg)
    return out


# --- paths -------------------------------------------------------------------------------


def local_path(url: str) -> Path | None:
    """The filesystem path of a plain path or ``file://`` URL (None for other schemes)."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url).expanduser()


def _stat(path: Path, option: str, url: str) -> os.stat_result | None:
    """``os.stat`` of ``path`` (None when it does not exist); loops and the like refused."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except ValueError:  # an embedded NUL
        msg = f"{option} {url!r} is not a valid path"
        raise InputError(msg) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            msg = f"{option} {url}: symlink loop"
        elif e.errno == errno.ENOTDIR:
            msg = f"{option} {url}: a part of the path is a file, not a folder"
        else:
            msg = f"{option} {url}: {e.strerror or e}"
        raise InputError(msg) from None


def check_input(url: str | None, option: str, kind: str = "folder") -> Path | None:
    """An existing readable local folder / file (``kind``: folder, file or any); remote
    URLs pass through (their storage checks them). Returns the local path, if any."""
    if url is None:
        return None
    if not str(url).strip():
        msg = f"{option} is empty"
        raise InputError(msg)
    path = local_path(url)
    if path is None:
        return None
    st = _stat(path, option, url)
    if st is None:
        what = "file or folder" if kind == "any" else kind
        msg = f"{option} {url}: no such {what}"
        raise InputError(msg)
    is_dir = os.path.isdir(path)
    if kind == "folder" and not is_dir:
        msg = f"{option} {url} is a file, not a folder"
        raise InputError(msg)
    if kind == "file" and is_dir:
        msg = f"{option} {url} is a folder, not a file"
        raise InputError(msg)
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        msg = f"{option} {url} is not readable"
        raise InputError(msg)
    return path


def _key(url: str) -> str:
    """A comparable form of a location: the real local path, or the URL without a slash."""
    path = local_path(url)
    if path is None:
        return str(url).rstrip("/")
    return os.path.realpath(path)


def _inside(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or under it (both :func:`_key` forms)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_output(
    url: str | None,
    option: str,
    inputs: Mapping[str, str | None] = {},  # noqa: B006 - read only
    kind: str = "folder",
    holds_inputs: bool = False,
) -> Path | None:
    """An output location that can be made and overlaps no input.

    Refused: empty, a symlink loop, a file where a folder is wanted (or the reverse), a
    path under a file, an output equal to or inside any of ``inputs`` (option -> URL), and,
    unless ``holds_inputs``, an input inside the output (a command that lists or clears
    its output would read or remove it). Creates nothing.
    """
    if url is None:
        return None
    if not str(url).strip():
        msg = f"{option} is empty"
        raise InputError(msg)
    path = local_path(url)
    if path is not None:
        st = _stat(path, option, url)
        if st is not None:
            if kind == "folder" and not os.path.isdir(path):
                msg = f"{option} {url} is a file, not a folder"
                raise InputError(msg)
            if kind == "file" and os.path.isdir(path):
                msg = f"{option} {url} is a folder, not a file"
                raise InputError(msg)
        parent = path.parent if st is None else path
        while _stat(parent, option, url) is None and parent.parent != parent:
            parent = parent.parent
        if not os.path.isdir(parent):
            msg = f"{option} {url}: {parent} is a file, not a folder"
            raise InputError(msg)
    out = _key(url)
    for other_option, other in inputs.items():
        if not other or not str(other).strip():
            continue
        if local_path(other) is not None:
            _stat(local_path(other), other_option, other)
        src = _key(other)
        if _inside(out, src):
            where = "is" if out == src else "is inside"
            msg = f"{option} {url} {where} {other_option} {other}: write somewhere else"
            raise InputError(msg)
        if not holds_inputs and _inside(src, out):
            msg = f"{other_option} {other} is inside {option} {url}: write somewhere else"
            raise InputError(msg)
    return path
