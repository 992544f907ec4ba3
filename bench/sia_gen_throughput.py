"""Images/s of the full ``sia-gen`` (Ray actors, PNG, tars, uploads to a loopback S3 server)
against a bare in-process loop calling the same sampler on the same model, steps, batch
size and thread count. Prints the ratio (goal >= 0.9) and 1 vs 2 workers; writes JSON.

    .venv/bin/python bench/sia_gen_throughput.py [--per-category 192] [--model PATH]

The bare loop runs before and after the sia-gen runs and the mean of the two is the
reference, so a drift in machine load shows up as a spread rather than a biased ratio.
"total" rates include starting the actors (each loads the model) and writing the
manifest, index and card; "steady" rates count from all actors ready to the last upload.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from local_servers import start_moto  # noqa: E402

from sia_pipeline.diffusion.model import BUNDLED_MODEL, init_model, load_model  # noqa: E402
from sia_pipeline.diffusion.sampler import Sampler  # noqa: E402
from sia_pipeline.gen.generate import generate  # noqa: E402
from sia_pipeline.gen.plan import make_spec, make_tasks  # noqa: E402
from sia_pipeline.io.raycluster import init_ray  # noqa: E402

log = logging.getLogger("bench")


def bench_model(path: str | None, tmp: Path) -> str:
    """The bundled demo model if present, else an untrained model of the same preset."""
    if path:
        return path
    if (BUNDLED_MODEL / "model_card.json").is_file():
        return str(BUNDLED_MODEL)
    folder = tmp / "tiny-cpu"
    init_model(folder, {"bottle": 0, "magnetic_tile": 1}, preset="tiny-cpu")
    return str(folder)


def bare_loop(model_path: str, args: argparse.Namespace) -> dict:
    """The same samples as sia-gen, sampled in-process with nothing else around them."""
    torch.set_num_threads(args.threads)
    model = load_model(model_path)
    spec = make_spec(
        model_id=model.model_id,
        model_categories=model.categories,
        resolution=model.resolution,
        per_category=args.per_category,
        shard_size=args.shard_size,
        steps=args.steps,
    )
    sampler = Sampler(model, "ddpm", args.steps)
    n, t0 = 0, time.perf_counter()
    for task in make_tasks(spec, args.batch_size):
        for i in range(0, task.count, args.batch_size):
            j = min(i + args.batch_size, task.count)
            sampler.sample([task.category] * (j - i), task.strengths[i:j], task.seeds[i:j])
            n += j - i
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 2)}


def full_gen(model_path: str, out: str, workers: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    report = generate(
        model=model_path,
        out=out,
        per_category=args.per_category,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        steps=args.steps,
        workers=workers,
        threads_per_worker=max(1, args.threads // workers),
        progress=False,
    )
    dt = time.perf_counter() - t0
    return {
        "workers": report.workers,
        "images": report.images_written,
        "shards": report.shards_written,
        "seconds_total": round(dt, 2),
        "images_per_s_total": round(report.images_written / dt, 2),
        "images_per_s_steady": round(report.images_per_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-category", type=int, default=192)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--model", default=None)
    p.add_argument("--out-json", default=str(ROOT / "bench/results/sia_gen_throughput.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()

    tmp = Path(tempfile.mkdtemp(prefix="sia-bench-"))
    moto, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
        AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "bench-secret"),
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    load_before = os.getloadavg()
    try:
        model_path = bench_model(args.model, tmp)
        t0 = time.perf_counter()
        init_ray(num_cpus=args.threads)
        ray_start = time.perf_counter() - t0
        bare: list[dict] = []

        def run_bare() -> None:
            bare.append(bare_loop(model_path, args))
            print(f"bare loop: {bare[-1]}", flush=True)

        run_bare()
        gen1 = full_gen(model_path, "s3://bench/w1", 1, args)
        print(f"sia-gen 1 worker: {gen1}", flush=True)
        gen2 = full_gen(model_path, "s3://bench/w2", 2, args)
        print(f"sia-gen 2 workers: {gen2}", flush=True)
        run_bare()
    finally:
        moto.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    ref = sum(r["images_per_s"] for r in bare) / len(bare)
    best = max(gen1, gen2, key=lambda g: g["images_per_s_total"])
    result = {
        "benchmark": "sia_gen_throughput",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "params": {
            **vars(args),
            "model": args.model
            or (
                "bundled demo model" if model_path == str(BUNDLED_MODEL) else "tiny-cpu (untrained)"
            ),
        },
        "ray_start_s": round(ray_start, 2),
        "bare": {"runs": bare, "mean_images_per_s": round(ref, 2)},
        "sia_gen_1_worker": gen1,
        "sia_gen_2_workers": gen2,
        "ratio_total_1_worker": round(gen1["images_per_s_total"] / ref, 3),
        "ratio_total_2_workers": round(gen2["images_per_s_total"] / ref, 3),
        "ratio_steady_1_worker": round(gen1["images_per_s_steady"] / ref, 3),
        "ratio_steady_2_workers": round(gen2["images_per_s_steady"] / ref, 3),
        "ratio_best_total": round(best["images_per_s_total"] / ref, 3),
        "workers_2_vs_1_steady": round(
            gen2["images_per_s_steady"] / max(gen1["images_per_s_steady"], 1e-9), 3
        ),
    }
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    runs = ", ".join(str(r["images_per_s"]) for r in bare)
    print(
        f"\nbare {ref:.2f} img/s (mean of {runs}) | sia-gen 1 worker "
        f"{gen1['images_per_s_total']:.2f} total, {gen1['images_per_s_steady']:.2f} steady | "
        f"2 workers {gen2['images_per_s_total']:.2f} total, "
        f"{gen2['images_per_s_steady']:.2f} steady\n"
        f"ratio (sia-gen / bare, total incl. actor start-up): 1 worker "
        f"{result['ratio_total_1_worker']:.3f}, 2 workers {result['ratio_total_2_workers']:.3f}"
        f" (goal >= 0.9)\nratio (steady state): 1 worker {result['ratio_steady_1_worker']:.3f},"
        f" 2 workers {result['ratio_steady_2_workers']:.3f}; 2 vs 1 workers "
        f"{result['workers_2_vs_1_steady']:.3f}\nwrote {out}"
    )


if __name__ == "__main__":
    main()
