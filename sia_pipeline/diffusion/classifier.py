"""The noisy classifier for classifier guidance: model, folder format, load and save.

The authors guide SDAS with ADM's encoder half (their ``EncoderUNetModel``, attention pool),
trained on noisy images x_t: ``logits = classifier(x_t, t)``. :class:`NoisyClassifier` computes
the same function from diffusers' own blocks (time embedding, down and mid blocks) plus a small
attention pool of our own (CLIP-style: the mean token, with a learned position embedding,
attends over all positions).

A classifier folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers'
``save_pretrained``) and ``classifier_card.json``: categories -> class ids, image size, source
and ``classifier_id``, a content hash of the weights, the config and the categories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from sia_pipeline.diffusion.model import ModelError
from sia_pipeline.io.storage import StorageError, is_s3, open_storage

CARD_NAME = "classifier_card.json"
_HASHED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


class AttentionPool2d(nn.Module):
    """Pool a feature map to one vector: the mean token attends over mean + all positions.

    Args:
        spatial: side of the input map (tokens = spatial**2 + 1).
        channels: C of the input map.
        head_channels: channels per attention head.
        out_dim: output width (the number of classes).
    """

    def __init__(self, spatial: int, channels: int, head_channels: int, out_dim: int) -> None:
        super().__init__()
        self.heads = channels // head_channels
        self.positional_embedding = nn.Parameter(
            torch.randn(channels, spatial**2 + 1) / channels**0.5
        )
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        b, c = x.shape[:2]
        tokens = x.flatten(2)  # (B, C, HW)
        tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], dim=-1)
        tokens = (tokens + self.positional_embedding.to(x.dtype)).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)  # each (B, L, C), heads contiguous
        q, k, v = (t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        pooled = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, d)
        return self.proj(pooled.transpose(1, 2).reshape(b, c))


class NoisyClassifier(ModelMixin, ConfigMixin):
    """ADM's encoder UNet with an attention pool: (x_t, t) -> class logits.

    The constructor arguments are the authors' classifier config keys (``classifier_width`` is
    ``model_channels``); ``attention_resolutions`` are downsample rates, as in their code.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 256,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        num_head_channels: int = 64,
        num_classes: int = 15,
    ) -> None:
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        temb = model_channels * 4
        self.time_proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(model_channels, temb)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        common = {
            "temb_channels": temb,
            "resnet_eps": 1e-5,
            "resnet_act_fn": "silu",
            "resnet_groups": 32,
            "attention_head_dim": num_head_channels,
            "resnet_time_scale_shift": "scale_shift",
        }
        self.down_blocks = nn.ModuleList()
        prev = widths[0]
        for level, width in enumerate(widths):
            attn = 2**level in attention_resolutions
            self.down_blocks.append(
                get_down_block(
                    "AttnDownBlock2D" if attn else "ResnetDownsampleBlock2D",
                    num_layers=num_res_blocks,
                    in_channels=prev,
                    out_channels=width,
                    add_downsample=level != len(widths) - 1,
                    downsample_padding=1,
                    downsample_type="resnet",
                    **common,
                )
            )
            prev = width
        self.mid_block = UNetMidBlock2D(
            in_channels=prev,
            temb_channels=temb,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=32,
            attn_groups=32,
            resnet_time_scale_shift="scale_shift",
            attention_head_dim=num_head_channels,
        )
        self.norm_out = nn.GroupNorm(32, prev, eps=1e-5)
        spatial = image_size // 2 ** (len(widths) - 1)
        self.pool = AttentionPool2d(spatial, prev, num_head_channels, num_classes)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Logits for noisy images.

        Args:
            x: (B, C, H, W) noisy images x_t in [-1, 1] (H = W = ``image_size``).
            timesteps: (B,) long diffusion steps t.

        Returns:
            (B, num_classes) logits.
        """
        emb = self.time_embedding(self.time_proj(timesteps).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb)
        return self.pool(F.silu(self.norm_out(h)))


def classifier_hash(folder: Path, categories: dict[str, int]) -> str:
    h = hashlib.sha256()
    for rel in _HASHED_FILES:
        h.update(rel.encode())
        h.update((folder / rel).read_bytes())
    h.update(json.dumps(categories, sort_keys=True).encode())
    return "cls-" + h.hexdigest()[:16]


def save_classifier(
    module: NoisyClassifier, card: dict[str, Any], out_dir: str | os.PathLike
) -> str:
    """Write a classifier folder; returns its ``classifier_id``.

    Args:
        module: the classifier.
        card: at least ``categories`` ({name: class id}, ids 0..num_classes-1); ``image_size``
            and ``num_classes`` are filled in from the module's config.
        out_dir: the folder (created; its classifier files are replaced).
    """
    cats = {str(k): int(v) for k, v in card["categories"].items()}
    if sorted(cats.values()) != list(range(module.config.num_classes)):
        msg = f"categories {cats} do not cover the classifier's {module.config.num_classes} classes"
        raise ValueError(msg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-classifier-", dir=out.parent))
    module.save_pretrained(tmp, safe_serialization=True)
    card = dict(
        card,
        categories=cats,
        image_size=module.config.image_size,
        num_classes=module.config.num_classes,
        classifier_id=classifier_hash(tmp, cats),
    )
    (tmp / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True))
    out.mkdir(parents=True, exist_ok=True)
    for part in (*_HASHED_FILES, CARD_NAME):  # the card last: it vouches for the rest
        os.replace(tmp / part, out / part)
    shutil.rmtree(tmp)
    return card["classifier_id"]


def _fetch_s3(url: str, endpoint_url: str | None) -> Path:
    cache = Path(os.environ.get("SIA_CACHE", Path.home() / ".cache" / "sia-realnet"))
    dst = cache / "classifiers" / hashlib.sha256(url.encode()).hexdigest()[:16]
    storage = open_storage(url, endpoint_url)
    for name in (*_HASHED_FILES, CARD_NAME):
        dst.mkdir(parents=True, exist_ok=True)
        tmp = dst / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(storage.get_bytes(name))
        os.replace(tmp, dst / name)
    return dst


def load_classifier(
    url: str, device: str | torch.device = "cpu", endpoint_url: str | None = None
) -> tuple[NoisyClassifier, dict[str, Any]]:
    """Load a classifier folder (local path, ``file://`` or ``s3://``), eval mode, no grads.

    Returns:
        (module, card): ``module(x, timesteps)`` gives (B, num_classes) logits; the card has
        ``categories`` {name: class id}, ``classifier_id`` and ``image_size``.

    Raises:
        ModelError: the folder is missing, incomplete, corrupt or altered after saving.
    """
    url = str(url)
    try:
        folder = _fetch_s3(url, endpoint_url) if is_s3(url) else Path(url.removeprefix("file://"))
    except StorageError as e:
        msg = f"no classifier at {url}: {e}".splitlines()[0]
        raise ModelError(msg) from None
    if not folder.is_dir():
        msg = f"classifier folder not found: {url}"
        raise ModelError(msg)
    missing = [r for r in (*_HASHED_FILES, CARD_NAME) if not (folder / r).is_file()]
    if missing:
        msg = f"{url} is not a classifier folder: missing {', '.join(missing)}"
        raise ModelError(msg)
    try:
        card = json.loads((folder / CARD_NAME).read_text())
        for key in ("categories", "classifier_id", "image_size"):
            if key not in card:
                msg = f"classifier card lacks {key!r}"
                raise KeyError(msg)
        card["categories"] = {str(k): int(v) for k, v in card["categories"].items()}
        if classifier_hash(folder, card["categories"]) != card["classifier_id"]:
            msg = "content hash does not match classifier_id in classifier_card.json"
            raise ValueError(msg)
        module = NoisyClassifier.from_pretrained(
            folder, torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    except Exception as e:
        msg = f"corrupt classifier at {url}: {e}".splitlines()[0]
        raise ModelError(msg) from None
    module.to(device).eval().requires_grad_(False)
    return module, card
