"""Checks of the ``realnet-*`` commands' inputs, made before anything is created or trained.

Each check reads only what it must (a folder listing, ``index.json``, a checkpoint's header
through ``weights_only``) and raises :class:`InputError` with a one-line message naming the
option. Nothing here writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from realnet_train.cli_common import InputError
from realnet_train.data.mvtec import MVTecCategory
from realnet_train.data.sources import TextureSource, parse_mix
from sia_pipeline.format.v1 import FormatError, list_shards
from sia_pipeline.io.inputs import check_input, check_output, local_path, parse_strength_range
from sia_pipeline.io.storage import (
    StorageError,
    can_create_in,
    is_s3,
    nearest_existing,
    open_storage,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
READ_ERRORS = (FileNotFoundError, PermissionError, OSError, StorageError, FormatError, ValueError)


def check_readable(url: str, option: str, folder: bool = True, endpoint: str | None = None) -> None:
    """``url`` names an existing readable folder (file) or a well-formed remote URL."""
    if not url:
        msg = f"{option} is empty"
        raise InputError(msg)
    if local_path(url) is None:
        try:
            open_storage(url, endpoint)
        except (StorageError, ValueError) as e:
            msg = f"{option} {url}: {e}"
            raise InputError(msg) from None
        return
    check_input(url, option, "folder" if folder else "file")


def check_out(out: str, option: str = "--out", inputs: Mapping[str, str | None] = {}) -> Path:  # noqa: B006
    """``out`` is a folder or can become one (checked without creating it), and overlaps
    none of ``inputs`` (option -> URL): neither equal to, inside, nor holding one."""
    if "://" in out:
        msg = f"{option} {out}: the run folder must be a local path"
        raise InputError(msg)
    path = check_output(out, option, inputs)
    parent = nearest_existing(path)
    if not can_create_in(parent):
        msg = f"{option} {out}: {parent} is not a writable folder"
        raise InputError(msg)
    return path


def check_name(name: str, option: str) -> str:
    if not _NAME_RE.match(name or ""):
        msg = f"{option} {name!r} is not a folder name (letters, digits, _ . -)"
        raise InputError(msg)
    return name


def open_category(
    data: str, category: str, endpoint: str | None = None, require_train: bool = True
) -> MVTecCategory:
    """The MVTec-layout category, or an ``InputError`` naming what is missing."""
    check_readable(data, "--data", endpoint=endpoint)
    check_name(category, "--category")
    path = local_path(data)
    if path is not None and not (path / category).is_dir():
        msg = f"--category {category}: no folder {path / category}"
        raise InputError(msg)
    try:
        return MVTecCategory(data, category, endpoint, require_train)
    except READ_ERRORS as e:
        msg = f"--category {category} under --data {data}: {e}"
        raise InputError(msg) from None


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"0.1:0.5"`` -> (0.1, 0.5); ``"0.3"`` -> (0.3, 0.3); finite, in [0, 1], LO <= HI."""
    return parse_strength_range(text)


def check_sia(
    sia: str, category: str, strengths: tuple[float, float] | None, endpoint: str | None
) -> int:
    """An SIA dataset with shards of ``category`` in the range; returns their sample count."""
    check_readable(sia, "--sia", endpoint=endpoint)
    try:
        shards = list_shards(sia, [category], strengths, endpoint)
    except READ_ERRORS as e:
        msg = f"--sia {sia}: {e}"
        raise InputError(msg) from None
    return sum(s.count for s in shards)


def check_mix(mix: str, sia: str | None, textures: str | None) -> dict[str, float]:
    try:
        probs = parse_mix(mix)
    except ValueError as e:
        msg = f"--mix: {e}"
        raise InputError(msg) from None
    if probs["sia"] > 0 and not sia:
        msg = f"--mix {mix!r} uses sia but no --sia dataset was given"
        raise InputError(msg)
    if probs["texture"] > 0 and not textures:
        msg = f"--mix {mix!r} uses texture but no --textures folder was given"
        raise InputError(msg)
    return probs


def check_textures(textures: str, size: int, endpoint: str | None) -> None:
    check_readable(textures, "--textures", endpoint=endpoint)
    try:
        TextureSource(textures, size, endpoint)
    except READ_ERRORS as e:
        msg = f"--textures {textures}: {e}"
        raise InputError(msg) from None


def check_checkpoint(path: str, option: str = "--checkpoint") -> dict[str, Any]:
    """The checkpoint dict (read with ``weights_only``); refuses foreign files."""
    check_readable(path, option, folder=False)
    from realnet_train.checkpoint import CheckpointError, read_checkpoint  # torch: only now

    try:
        return read_checkpoint(path)
    except CheckpointError as e:
        msg = f"{option}: {e}"
        raise InputError(msg) from None


def check_resume(out: Path, category: str) -> None:
    """A checkpoint a ``--resume`` would continue from must be ours and of this category."""
    ckpt_path = out / "last.pt"
    if not ckpt_path.is_file():
        return
    ckpt = check_checkpoint(str(ckpt_path), "--resume")
    if ckpt["category"] != category:
        msg = f"--resume: {ckpt_path} was trained on {ckpt['category']!r}, not {category!r}"
        raise InputError(msg)


def check_inputs_exist(inputs: list[str], endpoint: str | None) -> None:
    """Every ``realnet-predict`` INPUT is an existing file, folder, or a well-formed URL."""
    if not inputs:
        msg = "give at least one INPUT (image, folder or s3:// prefix)"
        raise InputError(msg)
    for url in inputs:
        path = local_path(url)
        if path is None and not is_s3(url):
            msg = f"INPUT {url}: unsupported URL (use a path, file:// or s3://)"
            raise InputError(msg)
        if path is None:
            check_readable(url, "INPUT", endpoint=endpoint)
        else:
            check_readable(url, "INPUT", folder=path.is_dir(), endpoint=endpoint)
