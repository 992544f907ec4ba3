"""GPU SDAS sampling speed: images/s for fp32, bf16 and bf16 + torch.compile, and the
fraction of the GPU's bf16 compute bound that this reaches.

The model is the paper architecture (the ``paper-gpu`` preset, learned sigma, 15 classes) with
random weights, or ``--model DIR`` (e.g. a converted checkpoint). Every configuration runs the
production path (:class:`sia_pipeline.diffusion.sampler.Sampler`; channels_last on CUDA). The
UNet's FLOPs per forward are counted with ``torch.utils.flop_counter`` on the meta device;
FLOPs per image = forward FLOPs x steps. The bound is the GPU's dense bf16 peak from a small
table (or ``--peak-tflops``). Writes JSON and markdown to bench/results/.

    # the GPU run (one H100/H200/A100/L4):
    python bench/gpu_sampling.py --device cuda --image-size 256 --steps 20 --batch-size 16
    # CPU smoke test of the script itself:
    python bench/gpu_sampling.py --device cpu --image-size 64 --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sia_pipeline.diffusion.model import PRESETS, SDASModel, build_scheduler, build_unet, load_model
from sia_pipeline.diffusion.sampler import Sampler

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (half
# the "with sparsity" figure). First match wins; a bare "H100"/"H200" is told apart by memory.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (80 GB); see peak_tflops for a 94 GB NVL named plainly
    ("A100", 312.0),
    ("L4", 121.0),
)
NVL_H100_MIN_GIB = 90  # the H100 NVL has 94 GB, the SXM and PCIe 80 GB
CONFIGS = {
    "fp32": {"precision": "fp32", "compile": False},
    "bf16": {"precision": "bf16", "compile": False},
    "bf16+compile": {"precision": "bf16", "compile": True},
}
NUM_CLASSES = 15  # MVTec AD


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak, device name) of a CUDA device from the table; None if unknown."""
    if device.type != "cuda":
        return None, platform.processor() or platform.machine()
    name = torch.cuda.get_device_name(device)
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return peak_for(name, gib), name


def peak_for(name: str, memory_gib: float) -> float | None:
    """Dense bf16 peak of a device called ``name`` with ``memory_gib`` of memory."""
    plain = "NVL" not in name and "PCIe" not in name
    if "H100" in name and plain and memory_gib > NVL_H100_MIN_GIB:
        name += " NVL"
    for key, tflops in PEAK_BF16_TFLOPS:
        if all(part in name for part in key.split()):
            return tflops
    return None


def paper_model(image_size: int, device: torch.device) -> SDASModel:
    """The paper-gpu architecture with random weights (learned sigma, like the authors')."""
    preset = PRESETS["paper-gpu"]
    torch.manual_seed(0)
    unet = build_unet(preset, NUM_CLASSES, resolution=image_size, learn_sigma=True)
    card = {
        "categories": {f"c{i}": i for i in range(NUM_CLASSES)},
        "resolution": image_size,
        "model_id": "bench-random-paper-gpu",
    }
    unet.to(device).eval().requires_grad_(False)
    return SDASModel(unet=unet, scheduler_config=dict(build_scheduler(True).config), card=card)


def unet_forward_flops(model: SDASModel) -> int:
    """FLOPs of one UNet forward on one image, counted on the meta device (no compute)."""
    cfg = model.unet.config
    with torch.device("meta"):
        unet = type(model.unet).from_config(cfg)
    x = torch.empty(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, device="meta")
    t = torch.tensor([500], device="meta")
    y = torch.tensor([0], device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, class_labels=y)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(model: SDASModel, name: str, args, device: torch.device) -> dict:
    opts = CONFIGS[name]
    sampler = Sampler(model, args.sampler, args.steps, **opts)
    b = args.batch_size
    cat = next(iter(model.categories))
    strengths = [0.1 + 0.1 * (i % 5) for i in range(b)]

    def once(seed0: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        sampler.sample([cat] * b, strengths, list(range(seed0, seed0 + b)))
        _sync(device)
        return time.perf_counter() - t0

    warmup = once(10_000)  # includes torch.compile's compilation
    times = [once(i * b) for i in range(args.repeats)]
    best = min(times)
    return {
        "precision": opts["precision"],
        "compile": opts["compile"],
        "warmup_s": round(warmup, 3),
        "best_batch_s": round(best, 4),
        "images_per_s": round(b / best, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="model folder [paper-gpu, random weights]")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, batch 1, one repeat")
    ap.add_argument("--out", default="bench/results/gpu_sampling.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.steps, args.batch_size, args.repeats = 2, 1, 1
    device = torch.device(args.device)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    # fp32 runs as production does: the Sampler turns TF32 and cudnn.benchmark on for CUDA

    if args.model:
        model = load_model(args.model, device=device)
    else:
        model = paper_model(args.image_size, device)
    size = model.unet.config.sample_size
    params = sum(p.numel() for p in model.unet.parameters())
    flops_fwd = unet_forward_flops(model)
    flops_image = flops_fwd * args.steps
    peak, device_name = peak_tflops(device)
    if args.peak_tflops is not None:
        peak = args.peak_tflops
    print(
        f"{device_name}: UNet {params / 1e6:.1f} M params, {size} px, "
        f"{flops_fwd / 1e9:.1f} GFLOP per forward, {flops_image / 1e12:.3f} TFLOP per image "
        f"({args.steps} steps); bf16 peak {peak or '?'} TFLOP/s"
    )
    results = {}
    for name in names:
        r = run_config(model, name, args, device)
        achieved = r["images_per_s"] * flops_image / 1e12
        r["achieved_tflops"] = round(achieved, 4)
        r["fraction_of_bf16_peak"] = round(achieved / peak, 4) if peak else None
        results[name] = r
        frac = f"{100 * achieved / peak:.1f}% of bf16 peak" if peak else "peak unknown"
        print(
            f"{name:>13}: {r['images_per_s']:8.2f} images/s  "
            f"({achieved:.3g} TFLOP/s, {frac}; warm-up {r['warmup_s']:.1f} s)"
        )
    record = {
        "benchmark": "gpu_sampling",
        "device": device_name,
        "device_type": device.type,
        "model": args.model or "paper-gpu preset, random weights, learned sigma",
        "params": params,
        "image_size": size,
        "steps": args.steps,
        "sampler": args.sampler,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "quick": args.quick,
        "unet_gflops_per_forward": round(flops_fwd / 1e9, 3),
        "tflops_per_image": round(flops_image / 1e12, 5),
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# GPU sampling: {device_name}",
        "",
        f"{record['model']}; {params / 1e6:.1f} M params, {size} px, {args.sampler} "
        f"{args.steps} steps, batch {args.batch_size}; {flops_fwd / 1e9:.1f} GFLOP per UNet "
        f"forward; bf16 peak {peak or '?'} TFLOP/s; torch {torch.__version__}"
        + (" (quick smoke run)" if args.quick else ""),
        "",
        "| config | images/s | TFLOP/s | of bf16 peak | warm-up s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        frac = r["fraction_of_bf16_peak"]
        lines.append(
            f"| {name} | {r['images_per_s']:.2f} | {r['achieved_tflops']:.3g} | "
            f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {r['warmup_s']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"-> {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
