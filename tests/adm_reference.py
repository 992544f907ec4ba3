"""The authors' ADM networks as the reference side of equality tests (never used by the package).

``reference_models()`` imports ``models/sdas/unets.py`` (torch only) from
``../shared/reference/realnet-official`` or returns None; ``realistic_`` gives random weights
at realistic scales, so that attention is sharp and the per-head qkv order and every GroupNorm
matter.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import torch

REFERENCE = Path(
    os.environ.get(
        "SIA_REFERENCE",
        Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "realnet-official",
    )
)


def reference_models():
    """The ``unets`` module of the authors' code, or None when it is not here."""
    if not (REFERENCE / "models" / "sdas" / "unets.py").is_file():
        return None
    if str(REFERENCE) not in sys.path:
        sys.path.insert(0, str(REFERENCE))
    return importlib.import_module("models.sdas.unets")


@torch.no_grad()
def realistic_(model: torch.nn.Module, seed: int = 0, qkv_gain: float = 4.0) -> torch.nn.Module:
    """Norm weights near 1 (biases near 0), default-scale weights where the authors zero-init,
    and qkv weights scaled up for a sharp attention softmax. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if p.abs().max() == 0:  # zero_module'd by the authors: give it a default-init scale
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        if "qkv" in name and name.endswith("weight"):
            p.mul_(qkv_gain)
    return model
