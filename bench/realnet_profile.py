"""Where a RealNet training step spends its time, per part and per image size, in one run.

Runs the trainer's own step (``TrainStep``: one backbone pass over anomalous + clean
images, reconstruction, RRS, head, losses; then backward and Adam) on random images with
a preset's model, and times each part of the forward through module hooks, plus the
backward pass and the optimiser step. Repeats it for each ``--sizes`` entry, side by side,
and lists the most expensive torch operators (self CPU time) at the first size. Data
loading is not in it: the trainer logs its own wait (``data_wait_s`` in ``train_log.json``,
under 1 % of the wall time in the quality bench). Writes JSON and markdown to
``bench/results/``.

    nice .venv/bin/python bench/realnet_profile.py --sizes 128,256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realnet_train.model.realnet import RealNet, RealNetConfig  # noqa: E402
from realnet_train.presets import PRESETS, resolve  # noqa: E402
from realnet_train.train import TrainStep, make_optimizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("realnet_profile")


class PartTimer:
    """Wall time of each named module's forward, accumulated across calls (hooks)."""

    def __init__(self, parts: dict[str, torch.nn.Module]) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in parts.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, name: str):
        def hook(*_):
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str):
        def hook(*_):
            self.seconds[name] += time.perf_counter() - self._start.pop(name)

        return hook


def build(config: RealNetConfig) -> RealNet:
    """The model with AFS 'fitted' on random errors (channel choice costs nothing)."""
    model = RealNet(config)
    g = torch.Generator().manual_seed(0)
    model.afs.fit(
        {lv: torch.rand(model.backbone.channels[lv], generator=g) for lv in model.afs.levels}
    )
    return model.train()


def random_batch(batch: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Anomalous images, clean images, masks: what ``TrainStep`` takes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    clean = torch.rand(batch, 3, size, size, generator=g)
    return images, clean, (torch.rand(batch, size, size, generator=g) > 0.9).long()


def train_step(step_fn: TrainStep, opt: torch.optim.Optimizer, batch: tuple) -> dict[str, float]:
    """One training step as the trainer runs it; seconds of forward, backward, optimiser."""
    t0 = time.perf_counter()
    losses = step_fn(*batch)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    losses["total"].backward()
    t2 = time.perf_counter()
    opt.step()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": time.perf_counter() - t2}


def profile_size(model: RealNet, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Seconds per step of each part at ``size`` px, averaged over ``steps`` timed steps."""
    parts = {"backbone": model.backbone, "afs": model.afs, "rrs": model.rrs, "head": model.head}
    parts |= {f"reconstruction {lv}": m for lv, m in model.reconstruction.items()}
    timer = PartTimer(parts)
    step_fn = TrainStep(model)
    opt = make_optimizer(model.trainable_parameters(), 1e-4, torch.device("cpu"))
    batch_ = random_batch(batch, size, seed=size)
    totals: dict[str, float] = defaultdict(float)
    for i in range(warmup + steps):
        if i == warmup:
            timer.seconds.clear()
            totals.clear()
        for k, v in train_step(step_fn, opt, batch_).items():
            totals[k] += v
    timer.remove()
    forward_parts = dict(timer.seconds)
    losses_and_glue = totals["forward"] - sum(forward_parts.values())
    rows = {f"forward: {k}": v for k, v in forward_parts.items()}
    rows["forward: residuals, losses, glue"] = losses_and_glue
    rows["backward"] = totals["backward"]
    rows["optimizer (Adam)"] = totals["optimizer"]
    step_s = sum(totals.values()) / steps
    return {
        "image_size": size,
        "batch_size": batch,
        "s_per_step": step_s,
        "parts_s_per_step": {k: v / steps for k, v in rows.items()},
        "parts_share": {k: v / sum(rows.values()) for k, v in rows.items()},
    }


def adam_variants(model: RealNet, repeats: int = 10) -> dict[str, float]:
    """ms per Adam step over the model's trainable parameters: per-parameter loop, foreach,
    fused (the trainer's choice on CPU), on the same random gradients."""
    params = model.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    out = {}
    for name, kw in (("loop", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused", {"fused": True})):  # fmt: skip
        opt = torch.optim.Adam(params, lr=1e-4, **kw)
        opt.step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        out[name] = (time.perf_counter() - t0) * 1000.0 / repeats
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
            p.grad = None
    return out


def top_ops(model: RealNet, size: int, batch: int, n: int = 12) -> list[dict]:
    """The ``n`` torch operators with the most self CPU time over one training step."""
    step_fn = TrainStep(model)
    opt = make_optimizer(model.trainable_parameters(), 1e-4, torch.device("cpu"))
    batch_ = random_batch(batch, size, seed=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(step_fn, opt, batch_)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000.0,
         "share": e.self_cpu_time_total / total}
        for e in events[:n]
    ]  # fmt: skip


def markdown(result: dict) -> str:
    meta = result["meta"]
    sizes = result["sizes"]
    lines = [
        "# Where a RealNet training step spends its time",
        "",
        f"Preset `{meta['preset']}`, batch {meta['batch_size']} (anomalous + clean images, so "
        f"the backbone sees {2 * meta['batch_size']}), {meta['threads']} torch thread(s), random "
        f"images, {meta['steps']} timed steps after {meta['warmup']} warm-up. Machine: "
        f"{meta['machine']}. Seconds per step; share of the step in brackets.",
        "",
        "| part | " + " | ".join(f"{s['image_size']} px" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for part in sizes[0]["parts_s_per_step"]:
        cells = [
            f"{s['parts_s_per_step'][part]:.3f} ({100 * s['parts_share'][part]:.0f} %)"
            for s in sizes
        ]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{s['s_per_step']:.3f}**" for s in sizes) + " |")
    steps = meta["preset_steps"]
    lines.append(
        f"| {steps} steps (min) | "
        + " | ".join(f"{s['s_per_step'] * steps / 60:.1f}" for s in sizes)
        + " |"
    )
    adam = result["adam_ms_per_step"]
    n_params = meta["trainable_parameters"]
    lines += [
        "",
        f"Adam over the {n_params / 1e6:.1f} M trainable parameters, ms per step: "
        + ", ".join(f"{k} {v:.1f}" for k, v in adam.items())
        + " (the trainer uses fused where torch has it).",
    ]
    lines += [
        "",
        f"Top operators by self CPU time, one step at {sizes[0]['image_size']} px:",
        "",
        "| operator | calls | self ms | share |",
        "|---|---|---|---|",
    ]
    for op in result["top_ops"]:
        lines.append(
            f"| `{op['op']}` | {op['calls']} | {op['self_ms']:.1f} | {100 * op['share']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--backbone-weights", default=None, help="needed by --preset paper")
    p.add_argument(
        "--sizes", default="128,256", help="image sizes (multiples of 128), comma-separated"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=5, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="realnet_profile", help="result file name")
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        if any(s < 128 or s % 128 for s in sizes) or args.steps < 1 or args.warmup < 0:
            raise ValueError
    except ValueError:
        p.error(
            "--sizes takes multiples of 128 (the deepest level, stride 32, must split in 4), "
            "--steps >= 1, --warmup >= 0"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        train_kw, config = resolve(args.preset, {}, {"backbone_weights": args.backbone_weights})
    except ValueError as e:
        p.error(str(e))
    batch = args.batch_size or train_kw["batch_size"]
    model = build(config)
    rows = []
    for size in sizes:
        rows.append(profile_size(model, size, batch, args.steps, args.warmup))
        log.info("%d px: %.3f s/step", size, rows[-1]["s_per_step"])
    result = {
        "meta": {
            "preset": args.preset,
            "preset_steps": train_kw["steps"],
            "batch_size": batch,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
            "torch": torch.__version__,
            "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        },
        "sizes": rows,
        "top_ops": top_ops(model, sizes[0], batch),
        "adam_ms_per_step": adam_variants(model),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
