"""Per-level reconstruction: a small UNet maps (possibly anomalous) features to normal ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ReconstructionUNet(nn.Module):
    """UNet with ``depth`` stride-2 downsamplings; works for any input size (even 1x1)."""

    def __init__(self, channels: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        widths = [width * min(2**i, 4) for i in range(depth + 1)]
        self.inp = conv_block(channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1),
                conv_block(widths[i], widths[i + 1]),
            )
            for i in range(depth)
        )
        self.up = nn.ModuleList(
            conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        skips = [self.inp(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], 1))
        return self.out(y)
