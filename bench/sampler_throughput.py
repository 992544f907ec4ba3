"""SDAS sampler throughput vs. diffusers' plain scheduler loop, side by side in one run.

Measures images/s of ``SDASPipeline`` (per-sample generators and strengths) and of the bare
diffusers DDPM/DDIM loop on the same UNet, batch size, steps and thread count, and prints
the ratio (the cost of SDAS's per-sample machinery). Writes JSON to bench/results/.

    .venv/bin/python bench/sampler_throughput.py --batch-size 16 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sia_pipeline.diffusion.model import load_model
from sia_pipeline.diffusion.sampler import Sampler


def _plain_loop(unet, scheduler, batch: int, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn((batch, 3, size, size), generator=g)
    labels = torch.zeros(batch, dtype=torch.long)
    scheduler.set_timesteps(steps)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            out = unet(x, t, class_labels=labels).sample
            if isinstance(scheduler, DDIMScheduler):  # DDIM takes eps only (learned sigma)
                out = out[:, : x.shape[1]]
            x = scheduler.step(out, t, x, generator=g).prev_sample


def _best_rate(fn, batch: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return batch / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder [bundled demo model]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/sampler_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cat = next(iter(model.categories))
    b = args.batch_size
    results = {}
    for name, plain_cls in (("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)):
        sampler = Sampler(model, name, args.steps)
        plain = plain_cls.from_config(model.scheduler_config)
        strengths = [0.1 + 0.4 * i / max(b - 1, 1) for i in range(b)]
        sampler.sample([cat] * b, strengths, list(range(b)))  # warm-up
        sdas = _best_rate(
            lambda s=sampler, st=strengths: s.sample([cat] * b, st, list(range(b))), b, args.repeats
        )
        bare = _best_rate(
            lambda p=plain: _plain_loop(model.unet, p, b, args.steps, 0), b, args.repeats
        )
        results[name] = {
            "sdas_images_per_s": round(sdas, 2),
            "diffusers_images_per_s": round(bare, 2),
            "ratio_sdas_over_diffusers": round(sdas / bare, 3),
        }
        print(
            f"{name}: SDAS {sdas:.1f} img/s, diffusers loop {bare:.1f} img/s, "
            f"ratio {sdas / bare:.3f}"
        )
    record = {
        "benchmark": "sampler_throughput",
        "model_id": model.model_id,
        "resolution": model.resolution,
        "batch_size": b,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
