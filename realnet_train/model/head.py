"""The 2-class (normal / anomalous) segmentation decoder on selected residuals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from realnet_train.model.reconstruction import conv_block


class SegmentationHead(nn.Module):
    """(B, 2k, h, w) residuals -> (B, 2, H, W) logits at the image size."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.body = conv_block(in_channels, width)
        self.refine = conv_block(width, width // 2)
        self.out = nn.Conv2d(width // 2, 2, 1)

    def forward(self, x: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        y = self.body(x)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = self.out(self.refine(y))
        return F.interpolate(y, size=image_size, mode="bilinear", align_corners=False)
