"""SDAS diffusion models on disk: the diffusers-format folder, its model card and id.

A model folder is what diffusers writes (``unet/`` and ``scheduler/``) plus
``model_card.json``: categories -> class ids, resolution, training steps, a fingerprint of
the training data, and ``model_id``, a content hash of the weights, the configs and the card's
semantic fields (:data:`CARD_HASHED_FIELDS`), so every SIA sample can name exactly the model
that made it and an edited card (a 32 px model labelled 64 px) is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from sia_pipeline.diffusion.presets import PRESETS, Preset
from sia_pipeline.io.storage import StorageError, is_s3, open_storage

log = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo_model"
CARD_NAME = "model_card.json"
_HASHED_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
)
# Card fields that change what the model means (class ids, image size, what the UNet
# predicts, the training data): part of model_id. Descriptive ones (steps, timings) are not.
CARD_HASHED_FIELDS = (
    "categories",
    "resolution",
    "prediction_type",
    "variance_type",
    "learn_sigma",
    "data_fingerprint",
    "grey_categories",
)


class ModelError(ValueError):
    """A model folder that is missing, incomplete or corrupt (the message names it)."""


def build_unet(
    preset: Preset, num_classes: int, resolution: int | None = None, learn_sigma: bool = False
) -> UNet2DModel:
    """A class-conditional ``UNet2DModel`` (one class embedding per category)."""
    return UNet2DModel(
        sample_size=resolution or preset.resolution,
        in_channels=3,
        out_channels=6 if learn_sigma else 3,
        block_out_channels=preset.block_out_channels,
        down_block_types=preset.down_block_types,
        up_block_types=preset.up_block_types,
        layers_per_block=preset.layers_per_block,
        norm_num_groups=preset.norm_num_groups,
        num_class_embeds=num_classes,
        **dict(preset.unet_options),
    )


def build_scheduler(learn_sigma: bool = False, num_train_timesteps: int = 1000) -> DDPMScheduler:
    """Linear betas over T = 1000, as in the official SDAS release."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


@dataclass
class SDASModel:
    """A loaded model: the UNet, its scheduler config and its card."""

    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    card: dict[str, Any]
    path: str = ""
    categories: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.categories = {str(k): int(v) for k, v in self.card["categories"].items()}

    @property
    def model_id(self) -> str:
        return self.card["model_id"]

    @property
    def resolution(self) -> int:
        return int(self.card["resolution"])

    @property
    def num_train_timesteps(self) -> int:
        """The scheduler's T: timesteps run over ``[0, T)``."""
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def grey_categories(self) -> frozenset[str]:
        """Categories trained on greyscale images only: their samples are made grey."""
        return frozenset(self.card.get("grey_categories", ()))

    def class_id(self, category: str) -> int:
        if category not in self.categories:
            msg = f"unknown category {category!r}; this model knows {sorted(self.categories)}"
            raise ValueError(msg)
        return self.categories[category]


def content_hash(folder: Path, card: dict[str, Any]) -> str:
    """``sdas-`` + 16 hex digits of sha256 over the weights, the configs and the card's
    :data:`CARD_HASHED_FIELDS` (those present, canonical JSON)."""
    h = hashlib.sha256()
    for rel in _HASHED_FILES:
        h.update(rel.encode())
        h.update((folder / rel).read_bytes())
    semantic = {k: card[k] for k in CARD_HASHED_FIELDS if k in card}
    h.update(CARD_NAME.encode())
    h.update(json.dumps(semantic, sort_keys=True, separators=(",", ":")).encode())
    return "sdas-" + h.hexdigest()[:16]


def _weights_only_hash(folder: Path) -> str:
    """The model id as earlier versions computed it (weights and configs only)."""
    h = hashlib.sha256()
    for rel in _HASHED_FILES:
        h.update(rel.encode())
        h.update((folder / rel).read_bytes())
    return "sdas-" + h.hexdigest()[:16]


def card_problems(card: dict[str, Any], unet_config: dict[str, Any], scheduler_config: dict) -> str:
    """Why the card contradicts the UNet or scheduler configs ("" if it does not)."""
    size = unet_config.get("sample_size")
    if isinstance(size, int) and int(card["resolution"]) != size:
        return f"the card says {card['resolution']} px but the UNet is {size} px"
    n_classes = unet_config.get("num_class_embeds")
    ids = list(card["categories"].values())
    if n_classes is not None and any(not 0 <= int(i) < n_classes for i in ids):
        return f"the card's class ids {sorted(ids)} do not fit the UNet's {n_classes} classes"
    for key in ("prediction_type", "variance_type"):
        if key in card and key in scheduler_config and card[key] != scheduler_config[key]:
            return f"the card says {key} {card[key]!r}, the scheduler {scheduler_config[key]!r}"
    return ""


def save_model(
    folder: str | os.PathLike,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    card: dict[str, Any],
    half: bool = False,
) -> str:
    """Write the diffusers folder and the card; returns the new ``model_id``.

    ``half`` stores fp16 weights (the bundled model, to stay small); loading upcasts.
    """
    folder = Path(folder)
    # The temp folder sits beside the target so the final os.replace never crosses devices.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=folder.parent))
    to_save = unet
    if half:
        to_save = UNet2DModel.from_config(unet.config)
        to_save.load_state_dict(unet.state_dict())
        to_save = to_save.to(torch.float16)
    to_save.save_pretrained(tmp / "unet", safe_serialization=True)
    scheduler.save_config(tmp / "scheduler")
    card = dict(card)
    card["model_id"] = content_hash(tmp, card)
    (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True))
    # Replace the model's own parts only (a training folder also holds checkpoints);
    # the card goes last, and load_model checks the weights against its model_id.
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("unet", "scheduler", CARD_NAME):
        dst = folder / part
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp / part, dst)
    shutil.rmtree(tmp)
    return card["model_id"]


def init_model(
    folder: str | os.PathLike, categories: dict[str, int], preset: str = "test", seed: int = 0
) -> str:
    """An untrained model folder, so the pipeline runs end to end (tests, benchmarks) without
    training first; returns its ``model_id``. The global torch RNG is left as it was."""
    p = PRESETS[preset]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = build_unet(p, num_classes=len(categories))
    card = {
        "categories": categories,
        "resolution": p.resolution,
        "train_steps": 0,
        "preset": preset,
    }
    return save_model(folder, unet, build_scheduler(), card)


def _fetch_s3_model(url: str, endpoint_url: str | None) -> Path:
    cache = Path(os.environ.get("SIA_CACHE", Path.home() / ".cache" / "sia-realnet")) / "models"
    dst = cache / hashlib.sha256(url.encode()).hexdigest()[:16]
    storage = open_storage(url, endpoint_url)
    names = [n for n in storage.list("") if n in (*_HASHED_FILES, CARD_NAME)]
    if not names:
        msg = f"no SDAS model at {url}"
        raise ModelError(msg)
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: several actors on one node may fetch and hash the same model at once.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(storage.get_bytes(name))
        os.replace(tmp, target)
    return dst


def load_model(
    url: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    endpoint_url: str | None = None,
    verify: bool = True,
) -> SDASModel:
    """Load a model folder (local path, ``file://`` or ``s3://``); None = the bundled demo model.

    Raises:
        ModelError: the folder is missing, lacks a file, or its content hash does not match
            its card (a corrupt or tampered model).
    """
    url = str(url or BUNDLED_MODEL)
    try:
        folder = (
            _fetch_s3_model(url, endpoint_url)
            if is_s3(url)
            else Path(url.removeprefix("file://")).expanduser()
        )
    except StorageError as e:
        raise ModelError(str(e)) from None
    if not folder.is_dir():
        msg = f"model folder not found: {url}"
        raise ModelError(msg)
    missing = [r for r in (*_HASHED_FILES, CARD_NAME) if not (folder / r).is_file()]
    if missing:
        msg = f"{url} is not an SDAS model folder: missing {', '.join(missing)}"
        raise ModelError(msg)
    try:
        card = json.loads((folder / CARD_NAME).read_text())
        scheduler_config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
        for key in ("categories", "resolution", "model_id"):
            if key not in card:
                msg = f"model card lacks {key!r}"
                raise KeyError(msg)
        unet_config = json.loads((folder / "unet/config.json").read_text())
        problem = card_problems(card, unet_config, scheduler_config)
        if problem:
            raise ValueError(problem)
        if verify and content_hash(folder, card) != card["model_id"]:
            fields = ", ".join(CARD_HASHED_FIELDS)
            msg = (
                "content hash does not match model_id in model_card.json (weights, configs"
                f" or the card's {fields} were changed after saving)"
            )
            if _weights_only_hash(folder) == card["model_id"]:
                msg = (
                    "model_id in model_card.json covers the weights but not the card (saved"
                    " by an older version): check the card, then save the model again"
                    " (diffusion.model.save_model) to give it an id that covers it"
                )
            raise ValueError(msg)
        # low_cpu_mem_usage=False: a plain load. The default asks for `accelerate` and, without
        # it, warns every user to install it; the small UNets here gain nothing from it.
        unet = UNet2DModel.from_pretrained(
            folder / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    except Exception as e:
        msg = f"corrupt model at {url}: {e}".splitlines()[0]
        raise ModelError(msg) from None
    unet.to(device).eval().requires_grad_(False)
    return SDASModel(unet=unet, scheduler_config=scheduler_config, card=card, path=url)
