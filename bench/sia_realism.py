"""How close SDAS samples are to the real parts: KID in EfficientNet-Lite0 feature space.

For each category (default: the shared bottle and magnetic_tile; ``--data ROOT
--categories a,b`` for any MVTec-layout set), side by side in one run:

- every ``--model LABEL=PATH`` (default: the bundled model): ``--n`` samples at s = 0
  (ordinary sampling, ``sia-gen``'s sampler and steps, or each ``--sampling`` setting, e.g.
  ``ddpm:20,ddpm:50``, as its own column), upscaled to the feature size;
- DTD textures (``--textures``, default the shared ``dtd/images``): what the texture-only
  anomaly source looks like to the same features;
- two floors: real vs other real images (about 0), and real images scaled down to each
  model's resolution and back up (what a perfect model of that size would score);
- a strength sweep of ``--sweep-model`` (default the last ``--model``): KID at each of
  ``--sweep`` (s = 0, 0.1, 0.2, 0.3, 0.5), which should rise with s.

KID (Binkowski et al. 2018) is the unbiased squared MMD with the cubic polynomial kernel,
averaged over random subsets (``torchmetrics``' ``KernelInceptionDistance`` with the Lite0
feature extractor in place of Inception); reported x1000, lower is closer. Features are
Lite0's pooled 1280-d pre-logits at 224 px from the packaged ImageNet weights (nothing is
downloaded). Real images keep their aspect ratio: the centre square of the short side, as the
SDAS trainer crops them. Writes ``bench/results/sia_realism.json`` and ``.md``.

    nice .venv/bin/python bench/sia_realism.py \\
        --model old=runs/model-tiny-cpu-32 --model new=sia_pipeline/assets/demo_model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from realnet_train.model.backbone import build_classifier
from sia_pipeline.diffusion.model import BUNDLED_MODEL, load_model
from sia_pipeline.diffusion.sampler import Sampler
from sia_pipeline.format.genspec import SAMPLERS
from sia_pipeline.io.storage import IMAGE_SUFFIXES

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_CATEGORIES = {"bottle": SHARED / "mvtec_ad", "magnetic_tile": SHARED / "magnetic_tile"}
RESULTS = ROOT / "bench" / "results"
FEATURE_SIZE = 224
log = logging.getLogger("sia_realism")


class Lite0Features(nn.Module):
    """uint8 (B, 3, H, W) at :data:`FEATURE_SIZE` -> (B, 1280) pooled Lite0 features."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_classifier().eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1  # tf_efficientnet_lite0: mean = std = 0.5
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def centre_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def to_batch(images: list[Image.Image], size: int = FEATURE_SIZE) -> torch.Tensor:
    """PIL images -> uint8 (B, 3, size, size), centre square, bicubic."""
    arrs = [
        np.asarray(centre_square(im.convert("RGB")).resize((size, size), Image.BICUBIC))
        for im in images
    ]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def kid(features: nn.Module, real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> dict:
    """KID x1000 (mean and std over 50 subsets) of ``fake`` against ``real``."""
    torch.manual_seed(seed)  # the subsets are drawn with torch's global generator
    subset = min(len(real), len(fake), 100)
    metric = KernelInceptionDistance(feature=features, subsets=50, subset_size=subset)
    for i in range(0, len(real), 64):
        metric.update(real[i : i + 64], real=True)
    for i in range(0, len(fake), 64):
        metric.update(fake[i : i + 64], real=False)
    mean, std = metric.compute()
    return {"kid_x1000": round(1000 * mean.item(), 2), "std_x1000": round(1000 * std.item(), 2)}


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def sample(sampler: Sampler, category: str, n: int, strength: float, batch: int) -> torch.Tensor:
    """``n`` SDAS samples (seeds 0..n-1) as a feature-size uint8 batch."""
    out = []
    for i in range(0, n, batch):
        seeds = list(range(i, min(n, i + batch)))
        imgs = sampler.sample([category] * len(seeds), [strength] * len(seeds), seeds)
        out += [Image.fromarray(a) for a in imgs]
    return to_batch(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=PATH")
    ap.add_argument("--data", type=Path, help="MVTec-layout root [default: the shared sets]")
    ap.add_argument("--categories", default="bottle,magnetic_tile")
    ap.add_argument("--textures", type=Path, default=SHARED / "dtd" / "images")
    ap.add_argument("--n", type=int, default=128, help="images per side of each KID")
    ap.add_argument("--sweep", default="0,0.1,0.2,0.3,0.5", help="strengths ('' skips)")
    ap.add_argument("--sweep-model", help="label of the swept model [default: the last]")
    ap.add_argument("--sweep-n", type=int, default=64, help="samples per swept strength")
    ap.add_argument(
        "--sampling",
        default="ddpm:20",
        help="SAMPLER:STEPS[,...]; each is a column per model [default: sia-gen's ddpm:20]",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="sia_realism", help="results file name")
    args = ap.parse_args(argv)
    models = args.model or [f"bundled={BUNDLED_MODEL}"]
    args.models = dict(m.split("=", 1) if "=" in m else (Path(m).name, m) for m in models)
    args.strengths = [float(s) for s in args.sweep.split(",") if s.strip()]
    args.sweep_model = args.sweep_model or list(args.models)[-1]
    if args.sweep_model not in args.models:
        ap.error(f"--sweep-model {args.sweep_model!r} is not one of {list(args.models)}")
    try:
        args.samplings = [(n, int(k)) for n, k in (x.split(":") for x in args.sampling.split(","))]
    except ValueError:
        ap.error(f"--sampling {args.sampling!r}: want SAMPLER:STEPS[,...], e.g. ddpm:20,ddim:50")
    if bad := [f"{n}:{k}" for n, k in args.samplings if n not in SAMPLERS or k < 1]:
        ap.error(f"--sampling: {bad} (samplers {', '.join(SAMPLERS)}; steps >= 1)")
    cats = [c for c in args.categories.split(",") if c]
    roots = {c: args.data or SHARED_CATEGORIES.get(c) for c in cats}
    missing = [c for c, r in roots.items() if r is None or not (r / c / "train" / "good").is_dir()]
    if missing:
        ap.error(f"no {{root}}/CATEGORY/train/good for {missing}; pass --data ROOT")
    args.roots = roots
    if not args.textures.is_dir() or not list_images(args.textures):
        ap.error(f"no texture images under {args.textures}")
    return args


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    features = Lite0Features()
    rng = np.random.default_rng(args.seed)
    textures = list_images(args.textures)
    chosen = rng.choice(len(textures), min(args.n, len(textures)), replace=False)
    dtd = to_batch([Image.open(textures[i]) for i in chosen])
    # each model loaded once; one column per (model, --sampling setting)
    samplers, swept = {}, None
    for label, path in args.models.items():
        model = load_model(path)
        for name, steps in args.samplings:
            key = label if len(args.samplings) == 1 else f"{label} {name}:{steps}"
            samplers[key] = Sampler(model, name, steps)
            if label == args.sweep_model and swept is None:
                swept = samplers[key]  # the sweep: the first setting
    results: dict = {"categories": {}}
    for cat, root in args.roots.items():
        files = list_images(root / cat / "train" / "good")
        order = rng.permutation(len(files))
        pil = [Image.open(files[i]) for i in order]
        real = to_batch(pil[: args.n])
        rows: dict = {"n_real": len(real), "n": args.n}
        other = pil[args.n :]
        if other:
            rows["real_vs_other_real"] = {**kid(features, real, to_batch(other)), "n": len(other)}
        rows["dtd"] = kid(features, real, dtd)
        rows["models"] = {}
        for label, sampler in samplers.items():
            model = sampler.model
            if cat not in model.categories:
                rows["models"][label] = {"unavailable": f"{model.model_id} lacks {cat}"}
                continue
            res = model.resolution
            small = [
                centre_square(im.convert("RGB")).resize((res, res), Image.BICUBIC) for im in pil
            ]
            t0 = time.perf_counter()
            fake = sample(sampler, cat, args.n, 0.0, args.batch)
            wall = time.perf_counter() - t0
            rows["models"][label] = {
                "model_id": model.model_id,
                "resolution": res,
                "s0": kid(features, real, fake),
                "sample_s_per_image": round(wall / args.n, 3),
                "floor_real_at_resolution": kid(features, real, to_batch(small[args.n :] or small)),
            }
            log.info("%s %s: %s", cat, label, rows["models"][label])
        if args.strengths and cat in swept.model.categories:
            sweep = {}
            for s in args.strengths:
                fake = sample(swept, cat, args.sweep_n, s, args.batch)
                sweep[str(s)] = kid(features, real, fake)
                log.info("%s sweep s=%s: %s", cat, s, sweep[str(s)])
            rows["sweep"] = {
                "model": args.sweep_model,
                "sampling": f"{swept.sampler}:{swept.steps}",
                "n": args.sweep_n,
                "kid": sweep,
            }
        results["categories"][cat] = rows
    results["settings"] = {
        "models": args.models,
        "columns": list(samplers),
        "n": args.n,
        "feature": f"tf_efficientnet_lite0 pooled pre-logits, {FEATURE_SIZE} px, packaged weights",
        "sampling": [f"{n}:{k}" for n, k in args.samplings],
        "kid": "unbiased MMD^2, cubic polynomial kernel, 50 subsets, x1000",
        "textures": str(args.textures),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
    }
    return results


def markdown(results: dict) -> str:
    labels = results["settings"].get("columns") or list(results["settings"]["models"])
    lines = [
        "# SIA realism: KID x1000 of s = 0 samples vs the real training images",
        "",
        "Lower is closer; mean +- std over 50 subsets. Floor: real images scaled down to the "
        "model's resolution and back up (a perfect model of that size).",
        "",
        "| category | real vs real | "
        + " | ".join(f"{lab} (floor)" for lab in labels)
        + " | DTD |",
        "|---|---|" + "---|" * len(labels) + "---|",
    ]
    for cat, r in results["categories"].items():
        rr = r.get("real_vs_other_real")
        cells = [cat, f"{rr['kid_x1000']:.1f}" if rr else "-"]
        for lab in labels:
            m = r["models"][lab]
            if "unavailable" in m:
                cells.append("-")
                continue
            s0, fl = m["s0"], m["floor_real_at_resolution"]
            cells.append(
                f"{s0['kid_x1000']:.1f} +- {s0['std_x1000']:.1f} "
                f"({m['resolution']} px: {fl['kid_x1000']:.1f})"
            )
        d = r["dtd"]
        cells.append(f"{d['kid_x1000']:.1f} +- {d['std_x1000']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    sweeps = {c: r["sweep"] for c, r in results["categories"].items() if "sweep" in r}
    if sweeps:
        first = next(iter(sweeps.values()))
        strengths = list(first["kid"])
        lines += [
            "",
            f"Strength sweep ({first['model']}, {first.get('sampling', 'ddpm:20')}, "
            f"{first['n']} samples per strength):",
            "",
            "| category | " + " | ".join(f"s = {s}" for s in strengths) + " |",
            "|---|" + "---|" * len(strengths),
        ]
        for cat, sw in sweeps.items():
            vals = [f"{sw['kid'][s]['kid_x1000']:.1f}" for s in strengths]
            lines.append(f"| {cat} | " + " | ".join(vals) + " |")
    lines += ["", f"Settings: `{json.dumps(results['settings'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    results = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
