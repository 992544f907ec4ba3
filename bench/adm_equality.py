"""Converted ADM networks vs the authors' own, at the full paper width (float32).

Builds the authors' MVTec UNet (553M parameters: experiments/MVTec-AD/diffusion.yaml) and noisy
classifier (classifier.yaml) from ``../shared/reference/realnet-official`` with random weights
at realistic scales (tests/adm_reference.py), converts them with this project's converter, and
reports the max abs difference of eps, variance and logits for several t and labels. TF32 is
off. Writes bench/results/adm_equality.json and .md.

    PYTHONPATH=. .venv/bin/python bench/adm_equality.py --timesteps 0,999 --out \
        bench/results/adm_equality_256px
    PYTHONPATH=. .venv/bin/python bench/adm_equality.py --device cuda    # 256 px, 3 t

On the project's shared 2-core CPU that 256 px run took 10 min (128 px: 3.5 min; 64 px: 2.5).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from adm_reference import realistic_, reference_models  # noqa: E402

from sia_pipeline.diffusion.adm import MVTEC_CLASSIFIER, MVTEC_UNET, ADMArch  # noqa: E402
from sia_pipeline.diffusion.convert import adm_to_classifier, adm_to_unet  # noqa: E402

QKV_GAIN = 2.0  # as the suite: a sharp attention softmax


def _unet_pair(unets, arch: ADMArch, classes: int, device: str):
    torch.manual_seed(0)
    ref = unets.UNetModel(
        image_size=arch.image_size, in_channels=3, model_channels=arch.model_channels,
        out_channels=6, num_res_blocks=arch.num_res_blocks,
        attention_resolutions=list(arch.attention_resolutions),
        channel_mult=list(arch.channel_mult), num_classes=classes, num_heads=4,
        num_head_channels=arch.num_head_channels, use_scale_shift_norm=True, resblock_updown=True,
    )  # fmt: skip
    realistic_(ref, 0, QKV_GAIN).eval()
    ours = adm_to_unet(ref.state_dict(), arch, classes)
    return ref.to(device), ours.to(device)


def _classifier_pair(unets, arch: ADMArch, classes: int, device: str):
    torch.manual_seed(1)
    ref = unets.EncoderUNetModel(
        image_size=arch.image_size, in_channels=3, model_channels=arch.model_channels,
        out_channels=classes, num_res_blocks=arch.num_res_blocks,
        attention_resolutions=list(arch.attention_resolutions),
        channel_mult=list(arch.channel_mult), num_head_channels=arch.num_head_channels,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
    )  # fmt: skip
    realistic_(ref, 1, QKV_GAIN).eval()
    ours = adm_to_classifier(ref.state_dict(), arch, classes)
    return ref.to(device), ours.to(device)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--timesteps", default="0,250,999", help="one image per t")
    ap.add_argument("--classes", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adm_equality_256px"))
    args = ap.parse_args()
    unets = reference_models()
    if unets is None:
        sys.exit("the authors' code (../shared/reference/realnet-official) is absent")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t = torch.tensor([int(v) for v in args.timesteps.split(",")], device=args.device)
    y = torch.arange(len(t), device=args.device) * 7 % args.classes
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(t), 3, args.image_size, args.image_size, generator=g).clamp(-1, 1)
    x = x.to(args.device)
    result = {
        "image_size": args.image_size,
        "timesteps": t.tolist(),
        "labels": y.tolist(),
        "dtype": "float32",
        "device": args.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "qkv_gain": QKV_GAIN,
    }
    t0 = time.perf_counter()
    arch = ADMArch(**{**MVTEC_UNET.__dict__, "image_size": args.image_size})
    ref, ours = _unet_pair(unets, arch, args.classes, args.device)
    a, b = ref(x, t, y), ours(x, t, class_labels=y).sample
    result["unet"] = {
        "parameters": sum(p.numel() for p in ours.parameters()),
        "eps_max_abs_diff": (a[:, :3] - b[:, :3]).abs().max().item(),
        "variance_max_abs_diff": (a[:, 3:] - b[:, 3:]).abs().max().item(),
        "output_max_abs": a.abs().max().item(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    del ref, ours, a, b
    t0 = time.perf_counter()
    arch = ADMArch(**{**MVTEC_CLASSIFIER.__dict__, "image_size": args.image_size})
    ref, ours = _classifier_pair(unets, arch, args.classes, args.device)
    a, b = ref(x, t), ours(x, t)
    result["classifier"] = {
        "parameters": sum(p.numel() for p in ours.parameters()),
        "logits_max_abs_diff": (a - b).abs().max().item(),
        "logits_max_abs": a.abs().max().item(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    u, c = result["unet"], result["classifier"]
    md = [
        f"# ADM conversion vs the authors' networks ({args.image_size} px, float32, {args.device})",
        "",
        "| network | parameters | output | max abs diff | output max abs |",
        "|---|---|---|---|---|",
        f"| UNet | {u['parameters']:,} | eps | {u['eps_max_abs_diff']:.2e} | "
        f"{u['output_max_abs']:.2f} |",
        f"| UNet | | variance | {u['variance_max_abs_diff']:.2e} | |",
        f"| classifier | {c['parameters']:,} | logits | {c['logits_max_abs_diff']:.2e} | "
        f"{c['logits_max_abs']:.2f} |",
        "",
        f"t = {result['timesteps']}, labels = {result['labels']}",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
