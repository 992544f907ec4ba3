"""SIA dataset format, version 1: the one contract between the generator and the trainer.

``realnet_train`` imports this module (and, through it, :mod:`storage`) and nothing else
of ``sia_pipeline``. Layout::

    ROOT/shards/CATEGORY/CATEGORY-000000.tar   WebDataset shard (one category per shard)
    ROOT/shards/CATEGORY/CATEGORY-000000.json  per-shard stats, written after the tar
    ROOT/manifest.parquet                      one row per sample
    ROOT/index.json                            spec, model ids, shard list (sha256, counts)
    ROOT/README.md                             dataset card
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sia_pipeline.format.schema import INDEX, SPEC, STATS, load_json, validate
from sia_pipeline.io.storage import Storage, open_storage

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.parquet"
CARD_NAME = "README.md"
SHARDS_DIR = "shards"
IMAGE_EXTS = ("png", "jpg")

_CATEGORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)-(\d{6})-(\d{6})$")

# Fields of every sample's ``.json`` member; the manifest adds ``shard`` and ``key``.
SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("strength", pa.float64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("eta", pa.float64(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("image_format", pa.string(), nullable=False),
        pa.field("format_version", pa.int32(), nullable=False),
    ]
)
REQUIRED_SAMPLE_FIELDS = (
    "category",
    "class_id",
    "strength",
    "seed",
    "sampler",
    "steps",
    "model_id",
    "height",
    "width",
    "format_version",
)


class FormatError(ValueError):
    """A dataset root or sample that does not follow format v1."""


def check_category(name: str) -> str:
    """Category names become path parts and key prefixes: plain identifiers only."""
    if not isinstance(name, str) or not _CATEGORY_RE.match(name):
        msg = f"invalid category name {name!r}: use letters, digits and '_' only"
        raise FormatError(msg)
    return name


def shard_id(category: str, shard: int) -> str:
    return f"{check_category(category)}-{shard:06d}"


def shard_tar_name(category: str, shard: int) -> str:
    return f"{SHARDS_DIR}/{category}/{shard_id(category, shard)}.tar"


def shard_stats_name(category: str, shard: int) -> str:
    return f"{SHARDS_DIR}/{category}/{shard_id(category, shard)}.json"


def sample_key(category: str, shard: int, index: int) -> str:
    """WebDataset ``__key__``: ``CATEGORY-SHARD-INDEX``, no dots."""
    return f"{shard_id(category, shard)}-{index:06d}"


def parse_key(key: str) -> tuple[str, int, int]:
    m = _KEY_RE.match(key)
    if not m:
        msg = f"not a format-v1 sample key: {key!r} (expected CATEGORY-000000-000000)"
        raise FormatError(msg)
    return m.group(1), int(m.group(2)), int(m.group(3))


@dataclass
class ShardStats:
    """Contents of ``CATEGORY-NNNNNN.json``: proof that a shard's tar is complete."""

    shard: str
    category: str
    tar: str
    count: int
    size: int
    sha256: str
    keys: list[str] = field(default_factory=list)
    strength_min: float = 0.0
    strength_max: float = 0.0
    spec_hash: str = ""
    format_version: int = FORMAT_VERSION
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "shard stats") -> ShardStats:
        """Parse and check (:data:`~sia_pipeline.format.schema.STATS`) a stats file.

        Raises:
            FormatError: not JSON, or a field of the wrong type or range (a ``tar`` that
                leads out of the root included).
        """
        d = validate(load_json(data, where, FormatError), STATS, where, FormatError)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def read_stats(storage: Storage, stats_name: str) -> ShardStats | None:
    """A shard's stats (None when the file does not exist); ``FormatError`` if malformed."""
    try:
        data = storage.get_bytes(stats_name)
    except FileNotFoundError:
        return None
    return ShardStats.from_json(data, f"{stats_name} under {storage.url}")


def shard_done(storage: Storage, stats_name: str) -> ShardStats | None:
    """The shard's stats if it counts as done: stats exist and the tar size matches (a HEAD)."""
    try:
        stats = read_stats(storage, stats_name)
    except FormatError:
        return None
    if stats is None:
        return None
    return stats if storage.size(stats.tar) == stats.size else None


def list_stats_names(storage: Storage) -> list[str]:
    return [n for n in storage.list(SHARDS_DIR) if n.endswith(".json")]


def read_index(storage: Storage) -> dict[str, Any] | None:
    """The root's ``index.json`` checked against :data:`~sia_pipeline.format.schema.INDEX`
    (shard ``tar`` paths stay inside the root), or None if there is none.

    Raises:
        FormatError: not JSON, another format version, or a field out of its schema.
    """
    try:
        raw = storage.get_bytes(INDEX_NAME)
    except FileNotFoundError:
        return None
    where = f"{INDEX_NAME} under {storage.url}"
    data = load_json(raw, where, FormatError)
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        msg = (
            f"{storage.url} has format_version {version!r}; "
            f"this reader understands {FORMAT_VERSION}"
        )
        raise FormatError(msg)
    validate(data, INDEX, where, FormatError)
    if data.get("spec"):
        validate(data["spec"], SPEC, f"{where}, spec", FormatError)
    return data


@dataclass(frozen=True)
class ShardRef:
    """One shard as a reader sees it, from ``index.json``."""

    url: str
    category: str
    count: int
    strength_min: float
    strength_max: float


def list_shards(
    root: str,
    categories: Iterable[str] | None = None,
    strength_range: tuple[float, float] | None = None,
    endpoint_url: str | None = None,
) -> list[ShardRef]:
    """Shards of a published dataset, filtered by category and overlapping strength range."""
    storage = open_storage(root, endpoint_url)
    index = read_index(storage)
    if index is None:
        msg = f"no {INDEX_NAME} under {root}: not a finished SIA dataset"
        raise FormatError(msg)
    cats = set(categories) if categories else None
    out = []
    for s in index["shards"]:
        if cats is not None and s["category"] not in cats:
            continue
        if strength_range is not None and (
            s["strength_max"] < strength_range[0] or s["strength_min"] > strength_range[1]
        ):
            continue
        out.append(
            ShardRef(
                url=f"{storage.url.rstrip('/')}/{s['tar']}",
                category=s["category"],
                count=int(s["count"]),
                strength_min=float(s["strength_min"]),
                strength_max=float(s["strength_max"]),
            )
        )
    if not out:
        msg = f"no shards under {root} match categories={sorted(cats) if cats else 'all'} "
        msg += f"strengths={strength_range}"
        raise FormatError(msg)
    return out


def open_url_stream(url: str, endpoint_url: str | None = None):
    """A readable byte stream for one shard URL (S3 streams; nothing is downloaded first).

    On S3 the stream survives throttling, 5xx and connections cut mid-body: it resumes with a
    ranged GET at the byte reached (see :class:`sia_pipeline.io.s3_retry.ResumableBody`);
    what still fails after the retries is a one-line ``StorageError``.
    """
    base, _, name = url.rpartition("/")
    return open_storage(base, endpoint_url).open_read(name)


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8 RGB.

    Raises:
        FormatError: the bytes are not a decodable image (empty, text, truncated, or over
            PIL's decompression-bomb limit).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        msg = f"{where} is not a decodable PNG/JPEG image ({type(e).__name__}: {e})"
        raise FormatError(msg.splitlines()[0]) from None


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A raw WebDataset sample (``{__key__, png|jpg, json}`` bytes) -> (RGB uint8, metadata)."""
    meta = sample.get("json")
    if isinstance(meta, bytes | str):
        meta = json.loads(meta)
    if not isinstance(meta, dict):
        msg = f"sample {sample.get('__key__')!r} has no json member"
        raise FormatError(msg)
    missing = [f for f in REQUIRED_SAMPLE_FIELDS if f not in meta]
    if missing:
        msg = f"sample {sample.get('__key__')!r} lacks fields {missing}"
        raise FormatError(msg)
    for ext in IMAGE_EXTS:
        if ext in sample:
            return decode_image(sample[ext]), meta
    msg = f"sample {sample.get('__key__')!r} has no image member ({'/'.join(IMAGE_EXTS)})"
    raise FormatError(msg)


def iter_shard_samples(url: str, endpoint_url: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, in order, streamed with WebDataset's tar reader."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = open_url_stream(url, endpoint_url)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()
