"""The authors' ADM networks (guided-diffusion layout) in diffusers form: architecture and keys.

RealNet's SDAS models are OpenAI's ADM UNet (``256x256_diffusion.pt``, fine-tuned per data set)
and a noisy classifier (ADM's encoder half with an attention pool). This module knows their
architecture options (named after the authors' config keys), how each ADM state-dict key maps
onto diffusers' ``UNet2DModel`` (or our ``NoisyClassifier``), and how to read their checkpoint
files safely. Nothing here imports the authors' code.

Two details decide exactness: ADM's attention (``QKVAttentionLegacy``) stores q, k and v
interleaved per head in one 1x1-conv weight, so the split is per head, not a plain chunk; and
under scale-shift norm the mid block's attention needs ``attn_norm_num_groups=32`` explicitly.
"""

from __future__ import annotations

import collections
import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The authors' category order per data set (their utils/categories.py): class id = position.
DATASET_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec": (
        "bottle",
        "cable",
        "capsule",
        "carpet",
        "grid",
        "hazelnut",
        "leather",
        "metal_nut",
        "pill",
        "screw",
        "tile",
        "toothbrush",
        "transistor",
        "wood",
        "zipper",
    ),
    "visa": (
        "candle",
        "capsules",
        "cashew",
        "chewinggum",
        "fryum",
        "macaroni1",
        "macaroni2",
        "pcb1",
        "pcb2",
        "pcb3",
        "pcb4",
        "pipe_fryum",
    ),
    "mpdd": (
        "bracket_black",
        "bracket_brown",
        "bracket_white",
        "connector",
        "metal_plate",
        "tubes",
    ),
    "btad": ("01", "02", "03"),
    # OpenAI's class-conditional ImageNet model (the authors' starting point): 1000 classes.
    "imagenet": tuple(f"imagenet_{i:03d}" for i in range(1000)),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture (message says why)."""


@dataclass(frozen=True)
class ADMArch:
    """ADM architecture, with the authors' config keys and their MVTec values as defaults.

    ``attention_resolutions`` are downsample rates, as the authors' ``UNetModel`` reads them
    (attention where ``ds in attention_resolutions``); at 256 px, (32, 16, 8) puts attention at
    8, 16 and 32 px, the same places as OpenAI's ``--attention_resolutions 32,16,8``.
    """

    image_size: int = 256
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        if self.channel_mult[0] != 1:
            msg = f"channel_mult must start with 1 (got {self.channel_mult})"
            raise ValueError(msg)
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            msg = f"image_size {self.image_size} is not divisible by the UNet's downsampling"
            raise ValueError(msg)
        bad = [m for m in self.channel_mult if (m * self.model_channels) % 32]
        if bad or self.num_res_blocks < 1:
            msg = "model_channels * channel_mult must be multiples of 32 and num_res_blocks >= 1"
            raise ValueError(msg)
        widths = {
            m * self.model_channels
            for level, m in enumerate(self.channel_mult)
            if 2**level in self.attention_resolutions
        } | {self.channel_mult[-1] * self.model_channels}
        if any(w % self.num_head_channels for w in widths):
            msg = f"num_head_channels {self.num_head_channels} does not divide the widths {widths}"
            raise ValueError(msg)

    def attention_levels(self) -> list[bool]:
        return [2**level in self.attention_resolutions for level in range(len(self.channel_mult))]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


MVTEC_UNET = ADMArch()
MVTEC_CLASSIFIER = ADMArch(model_channels=128, learn_sigma=False)


def unet_config(arch: ADMArch, num_classes: int) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments that make it compute exactly the ADM UNet."""
    levels = arch.attention_levels()
    return {
        "sample_size": arch.image_size,
        "in_channels": 3,
        "out_channels": 6 if arch.learn_sigma else 3,
        "block_out_channels": tuple(arch.model_channels * m for m in arch.channel_mult),
        "down_block_types": tuple(
            "AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in levels
        ),
        "up_block_types": tuple(
            "AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in levels[::-1]
        ),
        "layers_per_block": arch.num_res_blocks,
        "attention_head_dim": arch.num_head_channels,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # else the scale-shift mid block's attention has no norm
        "norm_eps": 1e-5,  # torch's GroupNorm default, as ADM's GroupNorm32
        "resnet_time_scale_shift": "scale_shift",
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "num_class_embeds": num_classes,
    }


# --- key layout: (ADM prefix, diffusers prefix, kind) --------------------------------------

_RES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)


def _encoder_pairs(arch: ADMArch) -> list[tuple[str, str, str]]:
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    k = 1
    last = len(arch.channel_mult) - 1
    for level, attn in enumerate(arch.attention_levels()):
        for j in range(arch.num_res_blocks):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != last:
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", "res"))
            k += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    return pairs


def unet_pairs(arch: ADMArch) -> list[tuple[str, str, str]]:
    """ADM ``UNetModel`` prefixes -> ``UNet2DModel`` prefixes."""
    pairs = [("label_emb", "class_embedding", "plain"), *_encoder_pairs(arch)]
    k = 0
    levels = arch.attention_levels()
    for u, level in enumerate(reversed(range(len(levels)))):
        for i in range(arch.num_res_blocks + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{i}", "res"))
            n = 1
            if levels[level]:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{i}", "attn"))
                n = 2
            if level and i == arch.num_res_blocks:
                pairs.append((f"output_blocks.{k}.{n}", f"up_blocks.{u}.upsamplers.0", "res"))
            k += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def classifier_pairs(arch: ADMArch) -> list[tuple[str, str, str]]:
    """ADM ``EncoderUNetModel`` (attention pool) prefixes -> ``NoisyClassifier`` prefixes."""
    return [*_encoder_pairs(arch), ("out.0", "norm_out", "plain"), ("out.2", "pool", "pool")]


@dataclass(frozen=True)
class _Rule:
    src: str  # ADM key
    shape: tuple[int, ...]  # its expected shape
    dst: tuple[str, ...]  # diffusers key(s)
    op: str  # copy | squeeze (1x1 conv -> linear) | qkv (per-head interleaved -> q, k, v)


def _rules(
    pairs: list[tuple[str, str, str]], target: dict[str, torch.Size], head_channels: int
) -> list[_Rule]:
    rules: list[_Rule] = []

    def add(src: str, dst: str, op: str = "copy") -> None:
        for p in ("weight", "bias"):
            if f"{dst}.{p}" in target:
                shape = tuple(target[f"{dst}.{p}"])
                shape = shape + (1,) if op == "squeeze" and p == "weight" else shape
                rules.append(_Rule(f"{src}.{p}", shape, (f"{dst}.{p}",), op))

    for src, dst, kind in pairs:
        if kind == "plain":
            add(src, dst)
        elif kind == "res":
            for a, b in _RES:
                add(f"{src}.{a}", f"{dst}.{b}")
        elif kind == "attn":
            add(f"{src}.norm", f"{dst}.group_norm")
            add(f"{src}.proj_out", f"{dst}.to_out.0", "squeeze")
            for p in ("weight", "bias"):
                qkv = tuple(f"{dst}.to_{n}.{p}" for n in "qkv")
                c = target[qkv[0]][0]
                shape = (3 * c, c, 1) if p == "weight" else (3 * c,)
                rules.append(_Rule(f"{src}.qkv.{p}", shape, qkv, f"qkv{head_channels}"))
        elif kind == "pool":
            pe = f"{dst}.positional_embedding"
            rules.append(_Rule(f"{src}.positional_embedding", tuple(target[pe]), (pe,), "copy"))
            add(f"{src}.qkv_proj", f"{dst}.qkv", "squeeze")
            add(f"{src}.c_proj", f"{dst}.proj", "squeeze")
    covered = {d for r in rules for d in r.dst}
    if covered != set(target):  # a diffusers change we do not know about: fail loudly
        msg = f"internal: unmapped diffusers keys {sorted(set(target) - covered)[:5]}"
        raise RuntimeError(msg)
    return rules


def _apply(rule: _Rule, t: torch.Tensor) -> dict[str, torch.Tensor]:
    t = t.float()
    if rule.op == "copy":
        return {rule.dst[0]: t}
    if rule.op == "squeeze":
        return {rule.dst[0]: t.reshape(t.shape[:2]) if t.dim() == 3 else t}
    # qkv: ADM rows are [head][q|k|v][head_channels]; diffusers wants q, k, v with heads contiguous
    d = int(rule.op[3:])
    c = t.shape[0] // 3
    parts = t.reshape(c // d, 3, d, -1)
    return {
        name: parts[:, i].reshape(c, *t.shape[1:]).squeeze(-1).contiguous()
        for i, name in enumerate(rule.dst)
    }


def _blocks(keys: Any) -> tuple[int, int]:
    """How many input and output blocks a key set has."""
    idx = [re.match(r"(input|output)_blocks\.(\d+)\.", k) for k in keys]
    n_in = max((int(m[2]) + 1 for m in idx if m and m[1] == "input"), default=0)
    return n_in, max((int(m[2]) + 1 for m in idx if m and m[1] == "output"), default=0)


def _hint(
    problems: list[tuple[str, str]], sd: dict[str, torch.Tensor], expected: Any, kind: str
) -> str:
    keys = " ".join(k for k, _ in problems)
    te = sd.get("time_embed.0.weight")
    if te is not None and "time_embed.0.weight" in keys:
        return f"--model-channels should be {te.shape[1]}"
    if "label_emb.weight" in sd and "label_emb.weight" in keys:
        n = sd["label_emb.weight"].shape[0]
        return f"the checkpoint has {n} classes: give {n} categories (--categories or --dataset)"
    if kind == "unet" and "label_emb.weight" not in sd:
        return "an unconditional checkpoint: SDAS needs a class-conditional model"
    if "out.2.weight" in keys and kind == "unet" and "out.2.weight" in sd:
        return "--fixed-sigma" if sd["out.2.weight"].shape[0] == 3 else "--learn-sigma"
    if "out.2." in keys and kind == "classifier":
        return "--image-size (the attention pool's size) or --channel-mult"
    if _blocks(sd) != _blocks(expected):
        n_in = _blocks(sd)[0]
        return f"--channel-mult or --num-res-blocks (the checkpoint has {n_in} input blocks)"
    if ".qkv." in keys or ".norm." in keys or ".proj_out." in keys:
        return "--attention-resolutions"
    return "--channel-mult or --num-res-blocks"


def _natural(key: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def convert_state_dict(
    sd: dict[str, torch.Tensor],
    pairs: list[tuple[str, str, str]],
    target: dict[str, torch.Size],
    head_channels: int,
    kind: str = "unet",
) -> dict[str, torch.Tensor]:
    """Map an ADM state dict onto diffusers keys, refusing anything that does not fit exactly.

    Args:
        sd: the ADM state dict (prefix-free keys).
        pairs: from :func:`unet_pairs` or :func:`classifier_pairs`.
        target: the diffusers model's ``{key: shape}`` (it may live on the meta device).
        head_channels: ADM's ``num_head_channels`` (for the per-head qkv split).
        kind: ``unet`` or ``classifier`` (for the hint).

    Raises:
        CheckpointError: missing, unexpected or wrongly shaped keys, naming the first few and
            the architecture option that is most likely wrong.
    """
    rules = _rules(pairs, target, head_channels)
    expected = {r.src: r.shape for r in rules}
    problems = [(k, "missing") for k in expected if k not in sd]
    problems += [(k, "unexpected") for k in sd if k not in expected]
    problems += [
        (k, f"shape {tuple(sd[k].shape)}, expected {s}")
        for k, s in expected.items()
        if k in sd and tuple(sd[k].shape) != s
    ]
    if problems:
        problems.sort(key=lambda p: _natural(p[0]))
        first = "; ".join(f"{k} ({why})" for k, why in problems[:3])
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        msg = (
            f"checkpoint does not fit the {kind} architecture: {first}{more}; "
            f"likely wrong option: {_hint(problems, sd, expected, kind)}"
        )
        raise CheckpointError(msg)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        out.update(_apply(rule, sd[rule.src]))
    return out


# --- reading checkpoint files safely -------------------------------------------------------


# The authors store their config (an ``easydict.EasyDict``) beside the weights; weights-only
# loading reads it as a plain OrderedDict instead of importing easydict.
_SAFE_STAND_INS = [(collections.OrderedDict, "easydict.EasyDict")]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch_load(path: Path) -> Any:
    import torch

    with torch.serialization.safe_globals(_SAFE_STAND_INS):
        try:  # memory-mapped: a 2 GB checkpoint is not read into memory twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt``/``.pth.tar`` or ``.safetensors`` file, without unpickling code.

    Reads a bare state dict (OpenAI's release) or ``{"state_dict": ...}`` (the authors' saves,
    keys optionally prefixed ``module.`` by DDP).

    Raises:
        CheckpointError: unreadable path, not a checkpoint, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"checkpoint not found or not a file: {path}"
        raise CheckpointError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = _torch_load(path)
    except Exception as e:  # torch raises many types for a bad file
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "Unsupported" in ln or "Can only" in ln), lines[0])
        why = why.removeprefix("WeightsUnpickler error: ")[:200]
        msg = f"{path} is not a readable PyTorch checkpoint: {why}"
        raise CheckpointError(msg) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        msg = f"{path} holds no state dict"
        raise CheckpointError(msg)
    import torch

    sd = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        msg = f"{path} is not a state dict (it holds non-tensor values)"
        raise CheckpointError(msg)
    return sd
