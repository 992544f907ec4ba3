"""RealNet's model settings (saved in checkpoints) and backbone names: no torch, so that
``realnet-train --help`` and the presets load without it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_LEVELS = (1, 2, 3, 4)
PAPER_BACKBONE = "wide_resnet50_2"


@dataclass
class RealNetConfig:
    """Model arguments (saved in checkpoints). Defaults: the authors' MVTec AD config.

    Attributes:
        backbone: timm model name.
        backbone_weights: local weights file (``None``: the packaged Lite0 file or timm's
            offline cache).
        levels: backbone feature levels, one reconstruction block each (1-4 = strides 4-32).
        afs_keep: channels AFS keeps per level (the authors: 256, 512, 512, 256).
        recon_width: base width of each level's UNet; ``None`` = ``int(recon_hide_ratio *
            keep)`` per level as the authors; an int = that width for every level.
        recon_hide_ratio: see ``recon_width`` (the authors: 0.5).
        recon_channel_mult, recon_res_blocks, recon_attention_ds: UNet shape (the authors:
            (1, 2, 4), 2, attention at downsampling factors (2, 4)).
        rrs_counts: residual channels RRS keeps by spatial max and by spatial mean.
        head_residual_layers: residual layers at the head's input (the authors: 2).
        score_pool: image score = max of the ``score_pool`` x ``score_pool`` mean-pooled map.
    """

    backbone: str = PAPER_BACKBONE
    backbone_weights: str | None = None
    levels: tuple[int, ...] = DEFAULT_LEVELS
    afs_keep: tuple[int, ...] = (256, 512, 512, 256)
    recon_width: int | None = None
    recon_hide_ratio: float = 0.5
    recon_channel_mult: tuple[int, ...] = (1, 2, 4)
    recon_res_blocks: int = 2
    recon_attention_ds: tuple[int, ...] = (2, 4)
    rrs_counts: tuple[int, int] = (256, 256)
    head_residual_layers: int = 2
    score_pool: int = 16

    def __post_init__(self) -> None:
        for name in (
            "levels",
            "afs_keep",
            "recon_channel_mult",
            "recon_attention_ds",
            "rrs_counts",
        ):
            setattr(self, name, tuple(int(i) for i in getattr(self, name)))
        if len(self.afs_keep) != len(self.levels):
            msg = f"afs_keep {self.afs_keep} needs one count per level {self.levels}"
            raise ValueError(msg)

    def level_names(self) -> list[str]:
        return [f"level{i}" for i in self.levels]

    def widths(self) -> dict[str, int]:
        """level -> reconstruction UNet base width."""
        return {
            lv: self.recon_width or int(self.recon_hide_ratio * k)
            for lv, k in zip(self.level_names(), self.afs_keep, strict=True)
        }

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
