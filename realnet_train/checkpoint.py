"""Checkpoint files: plain tensors, numbers, strings, lists and dicts, read with ``weights_only``.

A checkpoint holds the trainable weights (never the frozen backbone's: those come from their
package or file), AFS buffers, optimiser state, step, ``model_args`` (everything needed to
rebuild the model), the run's config, and the decision threshold calibrated on held-out good
images. Reading uses ``torch.load(weights_only=True)``: a foreign or crafted file, e.g. a
pickle that would run code, is refused with one line and nothing of it is executed.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from realnet_train.model.realnet import RealNet, RealNetConfig
from sia_pipeline.format.schema import REALNET_CHECKPOINT, validate

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
REQUIRED_KEYS = ("model_args", "model", "step", "category", "image_size")


class CheckpointError(ValueError):
    """A file that is not a readable RealNet checkpoint (one-line message)."""


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` atomically (a temp file beside ``path``, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def checkpoint_fit(ckpt: dict[str, Any]) -> str:
    """How the run fitted images to its square size (checkpoints before the option: letterbox)."""
    return str((ckpt.get("train_config") or {}).get("resize", "letterbox"))


def checkpoint_dict(model: RealNet, **fields: Any) -> dict[str, Any]:
    """Trainable weights and buffers (not the backbone's) and ``model_args``, plus ``fields``."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    return {"model_args": model.config.to_dict(), "model": state, **fields}


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``; ``CheckpointError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found: {path}"
        raise CheckpointError(msg)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        msg = f"{path} is not a RealNet checkpoint (a weights-only load refused it: {_why(e)})"
        raise CheckpointError(msg) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        msg = f"{path} is not a RealNet checkpoint (needs {list(REQUIRED_KEYS)}, has {have})"
        raise CheckpointError(msg)
    # step, category, image size and calibration: types, ranges, finite numbers
    return validate(ckpt, REALNET_CHECKPOINT, str(path), CheckpointError)


def _why(err: Exception) -> str:
    """The reason in torch's long refusal text (never its advice to drop weights_only)."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    if found:
        text = rest.split("Check the documentation")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    return first.split(" was not an allowed global")[0][:200]  # drop the allow-list advice


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[RealNet, dict[str, Any]]:
    """Rebuild a RealNet from a checkpoint file alone. Returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, map_location)
    try:
        model = RealNet(RealNetConfig(**ckpt["model_args"]))
    except (TypeError, ValueError) as e:
        msg = f"checkpoint {path} has model_args this version cannot build: {e}"
        raise CheckpointError(msg) from None
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
    if bad:
        msg = f"checkpoint {path} does not match its model_args: {bad[:5]}"
        raise CheckpointError(msg)
    return model, ckpt
