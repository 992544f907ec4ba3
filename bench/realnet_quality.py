"""RealNet quality per category and anomaly source, within a fixed CPU budget.

For each category in ../shared/data (bottle, magnetic_tile) and each source (SIA made by
``sia-gen`` from the bundled model; DTD textures), trains RealNet for a fixed wall-clock
budget on one torch thread plus one DataLoader worker, evaluates on the test split (Image
AUROC, Pixel AUROC, PRO), and measures the data loader alone (samples/s) against the
trainer's consumption (samples per second of compute) as a ratio. Writes
``bench/results/realnet_quality.json``, ``realnet_quality.md`` and per-run panels.

    nice .venv/bin/python bench/realnet_quality.py --budget-s 420 --sia-per-category 256
    nice .venv/bin/python bench/realnet_quality.py --sources dtd   # no SIA dataset needed
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from realnet_train.data.mvtec import MVTecCategory
from realnet_train.evaluate import evaluate
from realnet_train.model.realnet import RealNetConfig
from realnet_train.train import TrainConfig, build_loader, train

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
CATEGORIES = {"bottle": SHARED / "mvtec_ad", "magnetic_tile": SHARED / "magnetic_tile"}
DTD = SHARED / "dtd" / "images"
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("realnet_quality")


def make_sia(out: Path, per_category: int, model: str | None) -> tuple[Path, float]:
    """Generate the SIA dataset with the real ``sia-gen`` command (resumes if present)."""
    exe = shutil.which("sia-gen", path=str(Path(sys.executable).parent)) or "sia-gen"
    cmd = [
        exe,
        "--categories",
        ",".join(CATEGORIES),
        "--strengths",
        "0.1:0.5",
        "--per-category",
        str(per_category),
        "--out",
        str(out),
        "--no-progress",
    ]
    if model:
        cmd += ["--model", model]
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - t0


def loader_rate(cfg: TrainConfig, seconds: float) -> float:
    """Samples/s of the training DataLoader alone (same workers), after its first batch."""
    mvtec = MVTecCategory(cfg.data, cfg.category)
    loader = build_loader(cfg, mvtec, seed=cfg.seed + 12345)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["image"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def run_one(category: str, source: str, args, sia_root: Path | None) -> dict:
    run_dir = Path(args.runs) / f"{category}-{source}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(
        category=category,
        data=str(CATEGORIES[category]),
        out=str(run_dir),
        sia=str(sia_root) if source == "sia" else None,
        textures=str(DTD) if source == "dtd" else None,
        mix="normal=0.5,sia=0.5" if source == "sia" else "normal=0.5,texture=0.5",
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=10**9,
        time_budget_s=args.budget_s,
        lr=1e-3,
        afs_batches=4,
        checkpoint_every=200,
        num_workers=1,
        threads=1,
        seed=0,
        model=RealNetConfig(recon_width=32, head_width=32, rrs_k=16),
    )
    t0 = time.perf_counter()
    tr = train(cfg)
    train_wall = time.perf_counter() - t0
    rate = loader_rate(cfg, args.loader_s)
    ev_dir = RESULTS / "realnet_quality" / f"{category}-{source}"
    shutil.rmtree(ev_dir, ignore_errors=True)
    metrics = evaluate(run_dir / "last.pt", cfg.data, ev_dir, panels=8)
    consume = tr["trainer_samples_per_s"]
    row = {
        "category": category,
        "source": source,
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pro": metrics["pro"],
        "steps": tr["step"],
        "samples": tr["samples_this_run"],
        "train_wall_s": train_wall,
        "data_wait_s": tr["data_wait_s"],
        "eval_s": metrics["eval_s"],
        "loader_samples_per_s": rate,
        "trainer_samples_per_s": consume,
        "loader_to_trainer_ratio": rate / consume if consume else None,
        "first_losses": {k: sum(v[:20]) / 20 for k, v in tr["history"].items()},
        "last_losses": {k: sum(v[-20:]) / 20 for k, v in tr["history"].items()},
    }
    (ev_dir / "run.json").write_text(json.dumps(row, indent=1))
    log.info("%s", json.dumps(row))
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# RealNet quality (CPU budget)",
        "",
        f"Budget: {meta['budget_s']:.0f} s of training per category and source, 1 torch thread "
        f"+ 1 DataLoader worker, {meta['image_size']} px, batch {meta['batch_size']}, backbone "
        f"{meta['backbone']} (levels 1-4). Machine: {meta['machine']}. "
        "Metrics on the full test split at the training size; no model selection.",
        "",
        "| category | source | Image AUROC | Pixel AUROC | PRO | steps | train s | "
        "loader/trainer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['source']} | {r['image_auroc']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['pro']:.3f} | {r['steps']} | "
            f"{r['train_wall_s']:.0f} | {r['loader_to_trainer_ratio']:.1f}x "
            f"({r['loader_samples_per_s']:.1f} vs {r['trainer_samples_per_s']:.1f} samples/s) |"
        )
    if meta.get("sia"):
        lines += ["", f"SIA: {meta['sia']}"]
    lines += [
        "",
        "loader/trainer: samples/s of the training DataLoader alone (1 worker, after its first "
        "batch) over samples/s the trainer consumes (its compute time only); above 1 the "
        "loader keeps up.",
    ]
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--sources", default="sia,dtd")
    p.add_argument("--budget-s", type=float, default=420.0, help="training seconds per run")
    p.add_argument("--loader-s", type=float, default=30.0, help="loader-alone measurement")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sia", default=None, help="existing SIA dataset root (else sia-gen)")
    p.add_argument("--sia-per-category", type=int, default=256)
    p.add_argument("--sia-model", default=None, help="sia-gen --model (default: bundled)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "realnet_quality"))
    p.add_argument("--tag", default="realnet_quality", help="result file name")
    p.add_argument("--note", action="append", default=[], help="a line for the table's notes")
    p.add_argument("--render", action="store_true", help="only rewrite the table from JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        out = json.loads((RESULTS / f"{args.tag}.json").read_text())
        out["meta"]["notes"] = out["meta"].get("notes", []) + args.note
        (RESULTS / f"{args.tag}.json").write_text(json.dumps(out, indent=1))
        (RESULTS / f"{args.tag}.md").write_text(markdown(out["runs"], out["meta"]))
        return
    torch.set_num_threads(1)
    sources = args.sources.split(",")
    meta = {
        "budget_s": args.budget_s,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "backbone": RealNetConfig().backbone,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
    }
    sia_root = None
    if "sia" in sources:
        if args.sia:
            sia_root = Path(args.sia)
            meta["sia"] = f"existing dataset {sia_root}"
        else:
            sia_root, gen_s = make_sia(
                Path(args.runs) / "sia", args.sia_per_category, args.sia_model
            )
            model = f" --model {args.sia_model}" if args.sia_model else " (bundled model)"
            meta["sia"] = (
                f"sia-gen --categories {','.join(CATEGORIES)} --strengths 0.1:0.5 "
                f"--per-category {args.sia_per_category}{model}, {gen_s:.0f} s"
            )
    # Runs of other (category, source) pairs from an earlier invocation are kept, so the
    # DTD and SIA halves can run at different times into one table.
    plan = [(c, s) for c in args.categories.split(",") for s in sources]
    previous = RESULTS / f"{args.tag}.json"
    rows = []
    if previous.is_file():
        old = json.loads(previous.read_text())
        meta = {**old.get("meta", {}), **meta}
        rows = [r for r in old.get("runs", []) if (r["category"], r["source"]) not in plan]
    for category, source in plan:
        rows.append(run_one(category, source, args, sia_root))
        rows.sort(key=lambda r: (r["category"], r["source"]))
        out = {"meta": meta, "runs": rows}
        (RESULTS / f"{args.tag}.json").write_text(json.dumps(out, indent=1))
        (RESULTS / f"{args.tag}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
