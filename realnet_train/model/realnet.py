"""RealNet: frozen backbone -> AFS -> per-level reconstruction -> RRS -> 2-class decoder.

A plain ``nn.Module`` (training lives in :mod:`realnet_train.train`) built as the authors'
``experiments/*/realnet.yaml`` with one backbone level per block. ``RealNetConfig`` is
everything needed to rebuild the model, so checkpoints carry it as ``model_args``; the
defaults are the authors' numbers, :mod:`realnet_train.presets` holds the named settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from realnet_train.model.afs import AFS
from realnet_train.model.backbone import Backbone
from realnet_train.model.config import RealNetConfig
from realnet_train.model.head import SegmentationHead
from realnet_train.model.reconstruction import ReconstructionUNet, feature_residual
from realnet_train.model.rrs import RRS, stacked_residuals


@dataclass
class RealNetOutput:
    """Outputs for a batch of B images of size H x W.

    Attributes:
        logits: (B, 2, H, W) normal/anomalous logits.
        anomaly_map: (B, H, W) anomaly-class probability (the pixel score).
        image_score: (B,) max of the mean-pooled anomaly map.
        features: level -> (B, K, h, w) AFS-selected features of the input.
        reconstructions: level -> (B, K, h, w) reconstructed normal features.
    """

    logits: torch.Tensor
    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    reconstructions: dict[str, torch.Tensor] = field(default_factory=dict)


def image_scores(anomaly_map: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, H, W) -> (B,): max over the ``pool`` x ``pool`` average-pooled map (stride 1)."""
    k = min(pool, *anomaly_map.shape[-2:])
    return F.avg_pool2d(anomaly_map[:, None], k, stride=1).flatten(1).amax(1)


class RealNet(nn.Module):
    def __init__(self, config: RealNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, config.backbone_weights, config.levels)
        keep = dict(zip(config.level_names(), config.afs_keep, strict=True))
        for lv, k in keep.items():
            if not 0 < k <= self.backbone.channels[lv]:
                msg = (
                    f"AFS keeps {k} channels of {lv}, which has {self.backbone.channels[lv]} "
                    f"in {config.backbone}"
                )
                raise ValueError(msg)
        self.afs = AFS(keep)
        widths = config.widths()
        self.reconstruction = nn.ModuleDict(
            {
                lv: ReconstructionUNet(
                    k,
                    widths[lv],
                    config.recon_channel_mult,
                    config.recon_res_blocks,
                    config.recon_attention_ds,
                )
                for lv, k in keep.items()
            }
        )
        self.strides = {lv: self.backbone.strides[lv] for lv in keep}
        self.rrs = RRS(sum(keep.values()), config.rrs_counts)
        self.head = SegmentationHead(self.rrs.out_channels, config.head_residual_layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def selected_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> level -> (B, K, h, w), no gradient (frozen backbone)."""
        return self.afs(self.backbone(images))

    def forward(self, images: torch.Tensor) -> RealNetOutput:
        """Args: images (B, 3, H, W) RGB in [0, 1]."""
        return self.forward_features(self.selected_features(images), images.shape[-2:])

    def forward_features(
        self, feats: dict[str, torch.Tensor], image_size: tuple[int, int]
    ) -> RealNetOutput:
        """Everything after the backbone, from selected features (lets the trainer batch
        clean and anomalous images through one backbone pass)."""
        recons = {lv: self.reconstruction[lv](f) for lv, f in feats.items()}
        residuals = {lv: feature_residual(feats[lv], recons[lv]) for lv in feats}
        selected = self.rrs(stacked_residuals(residuals, self.strides))
        logits = self.head(selected, tuple(image_size))
        amap = logits.softmax(1)[:, 1]
        return RealNetOutput(
            logits, amap, image_scores(amap, self.config.score_pool), feats, recons
        )


def realnet_losses(
    out: RealNetOutput, clean_features: dict[str, torch.Tensor], masks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The authors' losses, weight 1 each: feature MSE summed over levels, pixel cross-entropy.

    Args:
        out: the model's output on the (possibly anomalous) images.
        clean_features: level -> (B, K, h, w) selected features of the clean images.
        masks: (B, H, W) target masks in {0, 1}.
    """
    recon = sum(F.mse_loss(out.reconstructions[lv], clean_features[lv]) for lv in clean_features)
    seg = F.cross_entropy(out.logits, masks.long())
    return {"recon": recon, "seg": seg, "total": recon + seg}
