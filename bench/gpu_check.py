"""The one-shot GPU check: everything about the GPU path that a CPU cannot show, in one run.

Phases (each one bounded in time, its failure recorded and the next one run):

* ``sampling``: the paper UNet (``paper-gpu`` preset, random weights, learned sigma, 256 px,
  DDPM 20 steps) through the production :class:`Sampler`; fp32 (with production TF32),
  bf16 and bf16 + compile; batch 16 and 64; unguided and guided (a paper-size noisy
  classifier, random weights). Images/s and the fraction of the bf16 bound (dense bf16
  peak / FLOPs per image, the device told apart by name and memory).
* ``syncs``: host syncs per step of the sampling loop (DDPM, DDIM, guided) with
  ``torch.cuda.set_sync_debug_mode("warn")``: warnings at 6 steps minus at 3, over 3.
* ``sia_gen``: ``sia-gen`` through Ray on one GPU (bf16 + compile, batch 64) into a local
  folder, its images/s against the bare loop's of the same configuration.
* ``realnet``: 50 ``realnet-train`` steps on CUDA, presets cpu and paper (random backbone
  weights written to a file), on a small synthetic MVTec-layout folder.
* ``realnet_syncs``: host syncs per ``realnet-train`` step (expected 1 / SYNC_EVERY: the
  losses read in one transfer every 25 steps), runs of 50 and 100 steps in-process.
* ``train_diffusion``: ``sia-train-diffusion`` under ``torchrun --nproc_per_node 1`` (bf16).
* ``cpu_vs_gpu``: the same keys sampled on CPU and on the GPU (the bundled model, fp32):
  mean and max absolute difference in uint8 levels.

Writes ``bench/results/gpu_check-<device>.json`` and ``.md``. ``--device cpu --dry`` runs the
phases that make sense on CPU with tiny sizes (the script's own test).

    bash bench/gpu_check.sh          # on a GPU machine: at most 8 minutes on one H100
    python bench/gpu_check.py --device cpu --dry --out /tmp/gpu_check-dry.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_sampling import paper_model, peak_tflops, unet_forward_flops  # noqa: E402

from sia_pipeline.diffusion.guidance import ClassifierGuidance  # noqa: E402
from sia_pipeline.diffusion.sampler import Sampler  # noqa: E402

log = logging.getLogger("gpu_check")
CONFIGS = {
    "fp32": {"precision": "fp32", "compile": False},
    "bf16": {"precision": "bf16", "compile": False},
    "bf16+compile": {"precision": "bf16", "compile": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _classifier(size: int, classes: int, device: torch.device, dry: bool) -> torch.nn.Module:
    from sia_pipeline.diffusion.classifier import NoisyClassifier

    torch.manual_seed(1)
    kw = {
        "model_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (2,),
        "num_head_channels": 32,
    }  # fmt: skip
    if not dry:  # the authors' classifier config (MVTec): width 128, 2 blocks, attn 32/16/8
        kw = {"model_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4)}
    clf = NoisyClassifier(image_size=size, num_classes=classes, num_res_blocks=2, **kw)
    return clf.to(device).eval().requires_grad_(False)


def _images_per_s(sampler: Sampler, batch: int, repeats: int, device) -> tuple[float, float]:
    cat = next(iter(sampler.model.categories))
    strengths = [0.1 + 0.1 * (i % 5) for i in range(batch)]

    def once(seed0: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        sampler.sample([cat] * batch, strengths, list(range(seed0, seed0 + batch)))
        _sync(device)
        return time.perf_counter() - t0

    warmup = once(10**6)
    best = min(once(i * batch) for i in range(repeats))
    return batch / best, warmup


def phase_sampling(args, device, record) -> None:
    model = paper_model(args.image_size, device)
    flops_image = unet_forward_flops(model) * args.steps
    peak, name = peak_tflops(device)
    bound = peak * 1e12 / flops_image if peak else None
    record.update(
        device=name, peak_bf16_tflops=peak, tflops_per_image=round(flops_image / 1e12, 4),
        bf16_bound_images_per_s=round(bound, 2) if bound else None,
    )  # fmt: skip
    clf = _classifier(args.image_size, len(model.categories), device, args.dry)
    rows = record.setdefault("sampling", [])
    deadline = time.monotonic() + args.sampling_budget_s
    configs = [c for c in CONFIGS if not (args.dry and CONFIGS[c]["compile"])]
    for batch in args.batches:
        for guided in (False, True):
            for cfg in configs:
                row = {"batch": batch, "guided": guided, "config": cfg}
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "sampling time budget spent"})
                    continue
                guidance = ClassifierGuidance(clf, 1.0, "random") if guided else None
                sampler = Sampler(model, "ddpm", args.steps, guidance=guidance, **CONFIGS[cfg])
                rate, warm = _images_per_s(sampler, batch, args.repeats, device)
                row.update(images_per_s=round(rate, 3), warmup_s=round(warm, 2))
                if bound:
                    row["fraction_of_bf16_bound"] = round(rate / bound, 4)
                rows.append(row)
                log.info("sampling %s", row)
                torch._dynamo.reset()  # the next config compiles afresh (no stale guards)


def _host_syncs(fn) -> int:
    """How many host syncs ``fn()`` makes, from torch's CUDA sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def phase_syncs(args, device, record) -> None:
    """Host syncs per step, from torch's own sync debug mode (CUDA only)."""
    model = paper_model(64, device)
    clf = _classifier(64, len(model.categories), device, dry=True)
    out = {}
    for name, sampler_name, guided in (
        ("ddpm", "ddpm", False), ("ddim", "ddim", False), ("guided-ddpm", "ddpm", True),
    ):  # fmt: skip
        counts = []
        for steps in (3, 6):
            g = ClassifierGuidance(clf, 1.0, "random") if guided else None
            s = Sampler(model, sampler_name, steps, guidance=g)
            cat = next(iter(model.categories))
            batch = ([cat] * 4, [0.0, 0.1, 0.2, 0.3], [1, 2, 3, 4])
            s.sample(*batch)  # warm (allocations)
            counts.append(_host_syncs(lambda s=s, batch=batch: s.sample(*batch)))
        out[name] = {"per_step": (counts[1] - counts[0]) / 3, "per_batch_of_3_steps": counts[0]}
        log.info("syncs %s: %s", name, out[name])
    record["host_syncs"] = out


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """(exit status, the output's tail, seconds); 124 when it ran past ``timeout``."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        text = b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")
        return 124, f"timed out after {timeout:.0f} s; {text[-1800:]}", time.perf_counter() - t0
    return proc.returncode, (proc.stdout + proc.stderr)[-2000:], time.perf_counter() - t0


def phase_sia_gen(args, device, record, work: Path) -> None:
    from sia_pipeline.diffusion.model import build_scheduler, save_model

    model = paper_model(args.image_size, torch.device("cpu"))
    folder = work / "paper-model"
    save_model(folder, model.unet, build_scheduler(True), dict(model.card))
    n, batch = args.gen_images, args.batches[-1]
    cmd = [
        sys.executable, "-m", "sia_pipeline.cli.gen", "--model", str(folder),
        "--categories", "c0", "--per-category", str(n), "--shard-size", str(n // 2),
        "--batch-size", str(batch), "--steps", str(args.steps), "--precision", "bf16",
        "--compile", "--out", str(work / "sia"), "--workers", "1", "--gpus-per-worker", "1",
        "--no-progress",
    ]  # fmt: skip
    rc, tail, wall = _run(cmd, args.gen_timeout_s)
    if rc:
        record["errors"]["sia_gen"] = f"exit {rc}: {tail.strip()[-300:]}"
    found = re.findall(r"at ([0-9.]+) images/s", tail)
    rate = float(found[-1]) if found else None
    bare = next(
        (r.get("images_per_s") for r in record.get("sampling", [])
         if r["batch"] == batch and not r["guided"] and r["config"] == "bf16+compile"),
        None,
    )  # fmt: skip
    record["sia_gen"] = {
        "exit": rc, "images": n, "batch": batch, "wall_s": round(wall, 1),
        "reported_images_per_s": rate, "bare_loop_images_per_s": bare,
        "ratio_to_bare_loop": round(rate / bare, 3) if rate and bare else None,
        "tail": tail if rc else "",
    }  # fmt: skip


def _synthetic_mvtec(root: Path, size: int = 256, n: int = 16) -> Path:
    """A small MVTec-layout folder (smooth random images, one square defect per test image)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    cat = root / "bottle"
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (cat / sub).mkdir(parents=True, exist_ok=True)

    def image() -> np.ndarray:
        low = rng.integers(60, 200, (8, 8, 3)).astype(np.uint8)
        return np.array(Image.fromarray(low).resize((size, size), Image.BICUBIC))

    for i in range(n):
        Image.fromarray(image()).save(cat / "train/good" / f"{i:03d}.png")
    for i in range(2):
        Image.fromarray(image()).save(cat / "test/good" / f"{i:03d}.png")
        img, mask = image(), np.zeros((size, size), np.uint8)
        img[size // 3 : size // 2, size // 3 : size // 2] = 255
        mask[size // 3 : size // 2, size // 3 : size // 2] = 255
        Image.fromarray(img).save(cat / "test/broken" / f"{i:03d}.png")
        Image.fromarray(mask).save(cat / "ground_truth/broken" / f"{i:03d}_mask.png")
    return root


def _noise_textures(folder: Path) -> Path:
    """Four random-noise images: the anomaly source of the RealNet phases."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / f"t{i}.png")
    return folder


def phase_realnet_syncs(args, device, record, work: Path) -> None:
    """Host syncs per realnet-train step: whole in-process runs (cpu preset, 128 px) of 2 and
    4 x SYNC_EVERY steps, counted by CUDA's sync debug mode; AFS, calibration and the last
    checkpoint cost both runs alike, so the difference is the loop's. A dry CPU run trains
    2 and 4 steps and counts nothing (the debug mode is CUDA's)."""
    from realnet_train.train import SYNC_EVERY, TrainConfig, train

    data = _synthetic_mvtec(work / "mvtec-syncs", size=128)
    textures = _noise_textures(work / "textures")
    runs = (2, 4) if args.dry else (2 * SYNC_EVERY, 4 * SYNC_EVERY)
    counts = []
    for steps in runs:
        cfg = TrainConfig(
            category="bottle", data=str(data), out=str(work / f"syncs-{steps}"),
            textures=str(textures), mix="normal=0.5,texture=0.5", steps=steps,
            time_budget_s=None, afs_batches=2, checkpoint_every=10**6, device=device.type,
            num_workers=2,
        )  # fmt: skip
        if device.type == "cuda":
            counts.append(_host_syncs(lambda cfg=cfg: train(cfg)))
        else:
            train(cfg)
    res = {"steps": list(runs), "expected_per_step": round(1 / SYNC_EVERY, 4)}
    if counts:
        res |= {"syncs": counts, "per_step": round((counts[1] - counts[0]) / runs[0], 4)}
    record["realnet_syncs"] = res
    log.info("realnet syncs: %s", res)


def phase_realnet(args, device, record, work: Path) -> None:
    import timm

    data = _synthetic_mvtec(work / "mvtec", size=128 if args.dry else 256)
    textures = _noise_textures(work / "textures")
    weights = work / "wrn50-random.pt"
    torch.save(timm.create_model("wide_resnet50_2", pretrained=False).state_dict(), weights)
    out = record["realnet_train"] = {}
    for preset in ("cpu", "paper"):
        cmd = [
            sys.executable, "-m", "realnet_train.cli", "--category", "bottle", "--data", str(data),
            "--out", str(work / f"realnet-{preset}"), "--preset", preset,
            "--steps", str(args.realnet_steps), "--device", device.type, "--afs-batches", "2",
            "--workers", "2", "--checkpoint-every", "1000", "--textures", str(textures),
            "--mix", "normal=0.5,texture=0.5",
        ]  # fmt: skip
        if preset == "paper":
            cmd += ["--backbone-weights", str(weights)]
        if args.dry:
            cmd += ["--image-size", "128", "--batch-size", "2"]
        rc, tail, wall = _run(cmd, args.realnet_timeout_s)
        res = {"exit": rc, "wall_s": round(wall, 1), "tail": tail if rc else ""}
        log_file = work / f"realnet-{preset}" / "train_log.json"
        if rc == 0 and log_file.is_file():
            lg = json.loads(log_file.read_text())
            res.update(
                steps=lg["steps_this_run"], compute_s=round(lg["compute_s"], 2),
                data_wait_s=round(lg["data_wait_s"], 2),
                samples_per_s=round(lg["trainer_samples_per_s"] or 0, 2),
            )  # fmt: skip
        out[preset] = res
        if rc:
            record["errors"][f"realnet {preset}"] = f"exit {rc}: {tail.strip()[-300:]}"
        log.info("realnet %s: %s", preset, {k: v for k, v in res.items() if k != "tail"})


def phase_train_diffusion(args, device, record, work: Path) -> None:
    data = _synthetic_mvtec(work / "mvtec-d", size=64)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", "29533",
        "-m", "sia_pipeline.cli.train_diffusion", "--data", str(data), "--categories", "bottle",
        "--out", str(work / "diffusion"), "--preset", "test" if args.dry else "small-cpu",
        "--resolution", "32" if args.dry else "64", "--steps", "20",
        "--precision", "bf16", "--device", device.type,
    ]  # fmt: skip
    rc, tail, wall = _run(cmd, args.train_timeout_s)
    if rc:
        record["errors"]["train_diffusion"] = f"exit {rc}: {tail.strip()[-300:]}"
    record["train_diffusion"] = {
        "exit": rc, "wall_s": round(wall, 1), "tail": tail if rc else "",
        "note": "torchrun with one process: WORLD_SIZE 1 runs without a process group",
    }  # fmt: skip


def phase_cpu_vs_gpu(args, device, record) -> None:
    from sia_pipeline.diffusion.model import load_model

    cats, strengths, seeds = ["bottle"] * 4, [0.0, 0.1, 0.2, 0.4], [11, 12, 13, 14]
    imgs = {}
    for dev in ("cpu", device.type):
        model = load_model(None, device=dev)
        imgs[dev] = Sampler(model, "ddpm", args.steps).sample(cats, strengths, seeds)
    diff = np.abs(imgs["cpu"].astype(np.int16) - imgs[device.type].astype(np.int16))
    record["cpu_vs_gpu"] = {
        "model": "bundled demo model, fp32, ddpm",
        "keys": len(seeds),
        "mean_abs_diff": round(float(diff.mean()), 4),
        "max_abs_diff": int(diff.max()),
        "identical_pixels": round(float((diff == 0).mean()), 4),
    }


def markdown(record: dict) -> str:
    lines = [
        f"# GPU check: {record.get('device', '?')}",
        "",
        f"torch {record['torch']}; {record['image_size']} px, {record['steps']} steps; bf16 "
        f"bound {record.get('bf16_bound_images_per_s')} images/s (peak "
        f"{record.get('peak_bf16_tflops')} TFLOP/s, {record.get('tflops_per_image')} TFLOP "
        f"per image); {record['wall_s']} s in all" + (" (dry run)" if record["dry"] else ""),
        "",
        "| batch | guided | config | images/s | of bf16 bound | warm-up s |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in record.get("sampling", []):
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['guided']} | {r['config']} | {r['skipped']} | | |")
            continue
        frac = r.get("fraction_of_bf16_bound")
        lines.append(
            f"| {r['batch']} | {r['guided']} | {r['config']} | {r['images_per_s']:.2f} | "
            f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {r['warmup_s']:.1f} |"
        )
    lines.append("")
    keys = ("host_syncs", "sia_gen", "realnet_train", "realnet_syncs", "train_diffusion")
    for key in (*keys, "cpu_vs_gpu"):
        if key in record:
            lines.append(f"- **{key}**: `{json.dumps(record[key], default=str)[:600]}`")
    for phase, err in record.get("errors", {}).items():
        lines.append(f"- **{phase} failed**: {err}")
    return "\n".join(lines) + "\n"


# by priority: a phase that would start past --deadline-s is skipped (and says so)
PHASES = (
    "sampling", "syncs", "sia_gen", "cpu_vs_gpu", "realnet", "realnet_syncs", "train_diffusion",
)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry", action="store_true", help="tiny sizes (the CPU test of the script)")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=450, help="no phase starts after")
    ap.add_argument("--sampling-budget-s", type=float, default=150)
    ap.add_argument("--gen-images", type=int, default=256)
    ap.add_argument("--gen-timeout-s", type=float, default=100)
    ap.add_argument("--realnet-steps", type=int, default=50)
    ap.add_argument("--realnet-timeout-s", type=float, default=60)
    ap.add_argument("--train-timeout-s", type=float, default=45)
    ap.add_argument("--out", default=None, help="[bench/results/gpu_check-<device>.json]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.dry:
        args.image_size, args.steps, args.realnet_steps = 32, 2, 2
        args.realnet_timeout_s = args.train_timeout_s = 300  # a loaded CPU
        args.batches = "2"
    args.batches = [int(b) for b in args.batches.split(",")]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if device.type != "cuda":  # these need a GPU (or a several-minute CPU run)
        phases = [p for p in phases if p not in ("syncs", "sia_gen", "cpu_vs_gpu")]
    t0 = time.perf_counter()
    record: dict = {
        "benchmark": "gpu_check", "torch": torch.__version__, "dry": args.dry,
        "image_size": args.image_size, "steps": args.steps, "errors": {},
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        for phase in phases:
            if time.perf_counter() - t0 > args.deadline_s:
                record["errors"][phase] = f"skipped: past the {args.deadline_s:.0f} s deadline"
                continue
            log.info("phase %s", phase)
            fn = globals()[f"phase_{phase}"]
            try:
                if phase in ("sia_gen", "realnet", "realnet_syncs", "train_diffusion"):
                    fn(args, device, record, work)
                else:
                    fn(args, device, record)
            except Exception as e:  # noqa: BLE001 - recorded, the next phase still runs
                log.exception("phase %s failed", phase)
                record["errors"][phase] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", record.get("device", device.type)).strip("-") or "device"
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_check-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(f"-> {out} and {out.with_suffix('.md')}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
