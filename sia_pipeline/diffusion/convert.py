"""Convert the authors' ADM checkpoints into this project's model and classifier folders.

``convert_unet`` turns a diffusion UNet (OpenAI's ``256x256_diffusion.pt`` or a RealNet SDAS
checkpoint) into a diffusers model folder that ``sia-gen`` runs unchanged; ``convert_classifier``
turns a noisy classifier into a classifier folder. Both check every key and shape before
anything is written, and load strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from sia_pipeline.diffusion.adm import (
    ADMArch,
    CheckpointError,
    classifier_pairs,
    convert_state_dict,
    file_sha256,
    read_checkpoint,
    unet_config,
    unet_pairs,
)
from sia_pipeline.diffusion.classifier import NoisyClassifier, save_classifier
from sia_pipeline.diffusion.model import build_scheduler, save_model

log = logging.getLogger(__name__)


def _fill(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``sd`` strictly into a model built on the meta device (no second copy in memory)."""
    model.load_state_dict(sd, strict=True, assign=True)
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        msg = f"internal: not loaded: {still_meta[:3]}"
        raise RuntimeError(msg)
    return model.eval()


def _categories(categories: list[str], num_classes: int) -> dict[str, int]:
    if len(set(categories)) != len(categories):
        msg = f"duplicate categories in {categories}"
        raise ValueError(msg)
    if len(categories) != num_classes:
        msg = (
            f"the checkpoint has {num_classes} classes but {len(categories)} categories were "
            f"given; likely wrong option: --categories or --dataset"
        )
        raise CheckpointError(msg)
    return {c: i for i, c in enumerate(categories)}


def adm_to_unet(sd: dict[str, torch.Tensor], arch: ADMArch, num_classes: int) -> UNet2DModel:
    """A ``UNet2DModel`` holding an ADM UNet state dict (raises ``CheckpointError`` if unfit)."""
    with torch.device("meta"):
        unet = UNet2DModel(**unet_config(arch, num_classes))
    target = {k: v.shape for k, v in unet.state_dict().items()}
    converted = convert_state_dict(sd, unet_pairs(arch), target, arch.num_head_channels, "unet")
    return _fill(unet, converted)


def adm_to_classifier(
    sd: dict[str, torch.Tensor], arch: ADMArch, num_classes: int
) -> NoisyClassifier:
    """A ``NoisyClassifier`` holding an ADM ``EncoderUNetModel`` (attention pool) state dict."""
    with torch.device("meta"):
        clf = NoisyClassifier(
            image_size=arch.image_size,
            model_channels=arch.model_channels,
            channel_mult=tuple(arch.channel_mult),
            num_res_blocks=arch.num_res_blocks,
            attention_resolutions=tuple(arch.attention_resolutions),
            num_head_channels=arch.num_head_channels,
            num_classes=num_classes,
        )
    target = {k: v.shape for k, v in clf.state_dict().items()}
    pairs = classifier_pairs(arch)
    converted = convert_state_dict(sd, pairs, target, arch.num_head_channels, "classifier")
    return _fill(clf, converted)


def _num_classes(sd: dict[str, torch.Tensor], key: str, kind: str) -> int:
    if key not in sd or sd[key].dim() < 1:
        hint = (
            "an unconditional UNet cannot drive SDAS (it needs class labels)"
            if kind == "unet"
            else "not an attention-pool classifier (classifier_pool must be 'attention')"
        )
        msg = f"checkpoint does not fit the {kind} architecture: {key} (missing); {hint}"
        raise CheckpointError(msg)
    return int(sd[key].shape[0])


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    categories: list[str],
    arch: ADMArch,
    kind: str = "unet",
    extra_card: dict[str, Any] | None = None,
) -> str:
    """Convert an ADM checkpoint file into a model (``unet``) or classifier folder.

    Args:
        checkpoint: ``.pt`` / ``.pth.tar`` / ``.safetensors``.
        out: folder to write (written only after every check passed).
        categories: class names in class-id order (their count must match the checkpoint).
        arch: the architecture options.
        kind: ``unet`` or ``classifier``.
        extra_card: more card fields (e.g. the data set).

    Returns:
        The new ``model_id`` or ``classifier_id``.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit (nothing written).
        ValueError: bad categories.
    """
    checkpoint = Path(checkpoint)
    sd = read_checkpoint(checkpoint)
    key = "label_emb.weight" if kind == "unet" else "out.2.c_proj.weight"
    cats = _categories(categories, _num_classes(sd, key, kind))
    model = (adm_to_unet if kind == "unet" else adm_to_classifier)(sd, arch, len(cats))
    card: dict[str, Any] = {
        **(extra_card or {}),
        "categories": cats,
        "architecture": {"family": "adm", "kind": kind, **arch.to_dict()},
        "source": {"file": checkpoint.name, "sha256": file_sha256(checkpoint)},
        "learn_sigma": arch.learn_sigma,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if kind == "classifier":
        ident = save_classifier(model, card, out)
    else:
        card.update(
            resolution=arch.image_size,
            train_steps=0,
            preset="adm",
            prediction_type="epsilon",
            variance_type="learned_range" if arch.learn_sigma else "fixed_small",
        )
        ident = save_model(out, model, build_scheduler(arch.learn_sigma), card)
    log.info("converted %s -> %s (%s)", checkpoint, out, ident)
    return ident
