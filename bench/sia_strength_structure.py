"""Where a strength goes: what SDAS's ``s`` changes in a sample, structure or grain.

For each category and sampler setting, the same keys (seeds) are sampled at ``s`` and at
``s = 0``. Both runs start from the same noise and draw the same per-step noise from the
same per-sample generators, so they follow the same trajectory but for the inflated noise;
their difference ``d`` (images in the 0-1 range) is what ``s`` adds. Of ``d``:

- ``low_share@sigma``: the share of its energy below a spatial frequency: with
  ``low = GaussianBlur(d, sigma)`` and ``high = d - low`` (sigma in px at 128 px, scaled
  with the model's resolution), ``|low|^2 / (|low|^2 + |high|^2)``. White noise gives
  about 0.02 at sigma 2 and 0.005 at sigma 4 (the table states it); a smooth blob nearly 1;
- ``visible>t``: the fraction of pixels whose largest channel change exceeds ``t``;
- ``mean_abs``: the mean absolute change;
- ``top5_share@sigma``: the share of the low-passed energy held by the 5 % of pixels that
  hold most of it (one local blob: near 1; a perfectly even change: 0.05; white noise, whose
  blurred energy still fluctuates, about 0.17 in colour and 0.27 in grey: the table states it).

Structure is low-frequency, local and visible; grain is high-frequency and everywhere.

Settings: DDPM 20 steps at s in {0.1, 0.15, 0.2, 0.3, 0.5} (the authors drew 0.1-0.2,
``sia-gen``'s default spans 0.1-0.5), DDIM 20 steps (eta 0) at s in {0.01, 0.02, 0.03} (the
authors' DDIM advice), and, to see what the late low-noise steps make of ``s``, DDPM with
the strength applied only on the first k of the 20 steps (``--first-k``; driven here through
the pipeline's own ``denoise_step``, with ``k = steps`` checked equal to the pipeline's
output). Writes ``bench/results/sia_strength_structure.{json,md,png}``; the picture shows,
for a few keys, ``s = 0 | s | |d| x --amplify`` for each ``--picture`` setting.

    nice -n 10 .venv/bin/python bench/sia_strength_structure.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from sia_pipeline.diffusion.model import BUNDLED_MODEL, load_model
from sia_pipeline.diffusion.sampler import Sampler

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as the sampler's to_grey
log = logging.getLogger("sia_strength_structure")


# ---------------------------------------------------------------- the measure (numpy only)


def low_high(diff: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Split ``diff`` (H, W, C) into a Gaussian low-pass part and the rest (reflected edges)."""
    low = gaussian_filter(diff, sigma=(sigma, sigma, 0), mode="reflect")
    return low, diff - low


def low_share(diff: np.ndarray, sigma: float) -> float:
    """Share of ``diff``'s energy below the blur's cut-off: |low|^2 / (|low|^2 + |high|^2)."""
    low, high = low_high(diff, sigma)
    e_low, e_high = float(np.sum(low**2)), float(np.sum(high**2))
    total = e_low + e_high
    return e_low / total if total > 0 else float("nan")


def top_share(diff: np.ndarray, sigma: float, frac: float = 0.05) -> float:
    """Share of the low-passed energy in the ``frac`` of pixels that hold most of it."""
    low, _ = low_high(diff, sigma)
    energy = np.sort(np.sum(low**2, axis=-1).ravel())[::-1]
    total = float(energy.sum())
    if total <= 0:
        return float("nan")
    n = max(1, round(frac * energy.size))
    return float(energy[:n].sum()) / total


def visible_fraction(diff: np.ndarray, threshold: float) -> float:
    """Fraction of pixels whose largest channel change exceeds ``threshold`` (0-1 range)."""
    return float(np.mean(np.abs(diff).max(axis=-1) > threshold))


def structure_measures(
    base: np.ndarray,
    strong: np.ndarray,
    sigmas: Sequence[float],
    thresholds: Sequence[float] = (0.05, 0.1),
) -> dict[str, float]:
    """All measures of ``d = strong - base``, both (H, W, C) float in the 0-1 range.

    ``sigmas`` are in pixels of these images (already scaled to their size).
    """
    if base.shape != strong.shape or base.ndim != 3:
        msg = f"want two (H, W, C) images of one shape, got {base.shape} and {strong.shape}"
        raise ValueError(msg)
    d = strong.astype(np.float64) - base.astype(np.float64)
    out = {"mean_abs": float(np.mean(np.abs(d)))}
    for t in thresholds:
        out[f"visible>{t:g}"] = visible_fraction(d, t)
    for s in sigmas:
        out[f"low_share@{s:g}"] = low_share(d, s)
        out[f"top5_share@{s:g}"] = top_share(d, s)
    return out


# ---------------------------------------------------------------- sampling


def sample_first_k(
    sampler: Sampler, category: str, seeds: Sequence[int], strength: float, first_k: int | None
) -> np.ndarray:
    """(B, H, W, 3) float images in 0-1, the strength on the first ``first_k`` steps only
    (None: all steps). Drives :class:`SDASPipeline`'s own ``denoise_step`` as its ``__call__``
    does (same initial noise, same per-sample generators), without uint8 rounding."""
    pipe = sampler.pipe
    steps = sampler.steps
    device = pipe.unet.device
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    size = pipe.unet.config.sample_size
    shape = (len(seeds), pipe.unet.config.in_channels, size, size)
    with torch.no_grad():
        image = randn_tensor(shape, generator=generators, device=device, dtype=pipe.unet.dtype)
        labels = torch.full((len(seeds),), sampler.model.class_id(category), device=device)
        on = torch.full((len(seeds),), float(strength), device=device, dtype=pipe.unet.dtype)
        off = torch.zeros_like(on)
        pipe.scheduler.set_timesteps(steps, device=device)
        for i, t in enumerate(pipe.scheduler.timesteps):
            s = on if first_k is None or i < first_k else off
            image = pipe.denoise_step(image, t, labels, generators, s, eta=sampler.eta)
    x = ((image.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    if category in sampler.model.grey_categories:  # as the sampler's to_grey, in float
        x = np.repeat(x @ np.asarray(LUMA, dtype=x.dtype)[:, None], 3, axis=-1)
    return x


def check_loop(sampler: Sampler, category: str, seeds: Sequence[int], strength: float) -> float:
    """Largest uint8 difference between this script's loop and ``Sampler.sample``."""
    ours = np.rint(sample_first_k(sampler, category, seeds, strength, None) * 255)
    theirs = sampler.sample([category] * len(seeds), [strength] * len(seeds), seeds)
    return float(np.abs(ours - theirs.astype(np.float64)).max())


# ---------------------------------------------------------------- the run


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BUNDLED_MODEL), help="SDAS model [default: bundled]")
    ap.add_argument("--categories", default="bottle,magnetic_tile")
    ap.add_argument("--n", type=int, default=8, help="keys (seeds 0..n-1) per category")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ddpm", default="0.1,0.15,0.2,0.3,0.5", help="DDPM strengths")
    ap.add_argument("--ddim", default="0.01,0.02,0.03", help="DDIM (eta 0) strengths")
    ap.add_argument("--first-k", default="5,10,15", help="DDPM: strength on the first k steps")
    ap.add_argument("--first-k-strengths", default="0.15,0.5", help="DDPM strengths for those")
    ap.add_argument("--sigmas", default="2,4", help="blur sigmas, px at 128 px")
    ap.add_argument(
        "--picture",
        default="ddpm:0.15,ddpm:0.5,ddim:0.02,ddpm:0.5:10",
        help="SAMPLER:S[:K],... columns of the picture",
    )
    ap.add_argument("--picture-keys", type=int, default=2, help="picture rows per category")
    ap.add_argument("--amplify", type=float, default=2.0, help="|d| gain in the picture")
    ap.add_argument(
        "--picture-only",
        action="store_true",
        help="sample only the picture's keys and settings; write only the PNG",
    )
    ap.add_argument("--batch", type=int, default=8)
    # one thread: on a shared, loaded machine two threads spent 5x the CPU per image waiting
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="sia_strength_structure", help="results file name")
    args = ap.parse_args(argv)
    try:
        args.ddpm_s = parse_floats(args.ddpm)
        args.ddim_s = parse_floats(args.ddim)
        args.ks = [int(k) for k in args.first_k.split(",") if k.strip()]
        args.k_s = parse_floats(args.first_k_strengths)
        args.sigma_list = parse_floats(args.sigmas)
        args.pictures = []
        for p in (x for x in args.picture.split(",") if x):
            name, s, *k = p.split(":")
            args.pictures.append((name, float(s), int(k[0]) if k else None))
    except ValueError as e:
        ap.error(f"bad number in a list option: {e}")
    if any(s <= 0 for s in args.ddpm_s + args.ddim_s + args.k_s):
        ap.error("strengths must be > 0 (s = 0 is the baseline each is compared with)")
    if any(not 1 <= k < args.steps for k in args.ks):
        ap.error(f"--first-k values must be in [1, {args.steps})")
    if any(s <= 0 for s in args.sigma_list) or args.n < 1 or args.amplify <= 0:
        ap.error("--sigmas, --n and --amplify must be > 0")
    if bad := [n for n, _, _ in args.pictures if n not in ("ddpm", "ddim")]:
        ap.error(f"--picture samplers {bad}: want ddpm or ddim")
    if missing := [p for p in args.pictures if p not in settings(args)]:
        ap.error(f"--picture {missing} not among the measured settings")
    args.cats = [c for c in args.categories.split(",") if c]
    try:
        args.loaded = load_model(args.model)
    except Exception as e:  # noqa: BLE001 - a bad --model is bad input
        ap.error(f"--model {args.model}: {e}")
    if missing := [c for c in args.cats if c not in args.loaded.categories]:
        ap.error(f"categories {missing} not in the model ({sorted(args.loaded.categories)})")
    return args


def settings(args: argparse.Namespace) -> list[tuple[str, float, int | None]]:
    """(sampler, s, first_k) in table order; first_k None = every step (the picture's only
    with ``--picture-only``)."""
    if getattr(args, "picture_only", False):
        return list(args.pictures)
    rows = [("ddpm", s, None) for s in args.ddpm_s]
    rows += [("ddpm", s, k) for s in args.k_s for k in args.ks]
    rows += [("ddim", s, None) for s in args.ddim_s]
    return rows


def noise_reference(res: int, sigmas: Sequence[float]) -> dict[str, float]:
    """The measures of a white-noise difference (colour and grey): what pure grain scores."""
    noise = np.random.default_rng(0).standard_normal((res, res, 3))
    grey = np.repeat(noise[..., :1], 3, axis=-1)
    out = {}
    for s in sigmas:
        out[f"low_share@{s:g}"] = low_share(noise, s)
        out[f"top5_share@{s:g}"] = top_share(noise, s)
        out[f"top5_share_grey@{s:g}"] = top_share(grey, s)
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """Returns (results, picture images keyed (cat, sampler, s, k) -> (B, H, W, 3))."""
    torch.set_num_threads(args.threads)
    model = args.loaded
    res = model.resolution
    sigmas = [s * res / 128 for s in args.sigma_list]
    samplers = {n: Sampler(model, n, args.steps) for n in ("ddpm", "ddim")}
    seeds = list(range(min(args.n, args.picture_keys) if args.picture_only else args.n))
    load0, t0 = loadavg(), time.perf_counter()
    check = {}
    if not args.picture_only:
        check = {n: check_loop(samplers[n], args.cats[0], seeds[:2], 0.5) for n in samplers}
    log.info("loop vs Sampler.sample, max uint8 difference: %s", check)

    def batched(name: str, cat: str, s: float, k: int | None) -> np.ndarray:
        return np.concatenate(
            [
                sample_first_k(samplers[name], cat, seeds[i : i + args.batch], s, k)
                for i in range(0, len(seeds), args.batch)
            ]
        )

    rows, pics, n_images = [], {}, 0
    for cat in args.cats:
        base = {n: batched(n, cat, 0.0, None) for n in samplers}
        n_images += 2 * len(seeds)
        for p in range(min(args.picture_keys, args.n)):
            for n in samplers:
                pics.setdefault((cat, n, 0.0, None), []).append(base[n][p])
        for name, s, k in settings(args):
            strong = batched(name, cat, s, k)
            n_images += len(seeds)
            pairs = zip(base[name], strong, strict=True)
            per_key = [structure_measures(b, x, sigmas) for b, x in pairs]
            summary = {
                m: {
                    "mean": float(np.mean([r[m] for r in per_key])),
                    "std": float(np.std([r[m] for r in per_key])),
                }
                for m in per_key[0]
            }
            row = {
                "category": cat,
                "sampler": name,
                "steps": args.steps,
                "strength": s,
                "first_k": k,
                "n": len(seeds),
                "measures": summary,
                "per_key": per_key,
            }
            rows.append(row)
            log.info(
                "%s %s s=%g k=%s: %s",
                cat,
                name,
                s,
                k,
                {m: round(v["mean"], 4) for m, v in summary.items()},
            )
            if (name, s, k) in args.pictures:
                pics[(cat, name, s, k)] = list(strong[: args.picture_keys])
    wall = time.perf_counter() - t0
    results = {
        "rows": rows,
        "white_noise": noise_reference(res, sigmas),
        "settings": {
            "model": str(args.model),
            "model_id": model.model_id,
            "resolution": res,
            "steps": args.steps,
            "eta": 0.0,
            "keys": f"seeds 0..{args.n - 1} per category",
            "sigmas_px": sigmas,
            "loop_check_max_uint8_diff": check,
            "images": n_images,
            "wall_s": round(wall, 1),
            "loadavg_start": load0,
            "loadavg_end": loadavg(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
        },
    }
    return results, pics


# ---------------------------------------------------------------- outputs


def label(name: str, s: float, k: int | None, steps: int) -> str:
    return f"{name.upper()} s={s:g}" + (f" first {k}/{steps}" if k is not None else "")


def markdown(results: dict) -> str:
    st = results["settings"]
    sig = [f"{s:g}" for s in st["sigmas_px"]]
    noise = results["white_noise"]
    white = ", ".join(f"{noise['low_share@' + s]:.3f} at σ {s}" for s in sig)
    white_top = ", ".join(
        f"{noise['top5_share@' + s]:.2f} (grey {noise['top5_share_grey@' + s]:.2f}) at σ {s}"
        for s in sig
    )
    lines = [
        "# Where a strength goes: the difference between s and s = 0, same keys",
        "",
        f"Model {st['model_id']} at {st['resolution']} px, {st['steps']} steps, "
        f"{st['keys']}; mean (std) over the keys. d = image(s) - image(0), 0-1 range.",
        "low@σ: share of d's energy below a Gaussian blur of σ px "
        f"(white noise: {white}; "
        "a smooth blob: about 1). top5%@σ: share of the low-passed energy in the 5 % of "
        f"pixels holding most (one local blob: near 1; white noise: {white_top}). "
        "vis>t: fraction of pixels changing by more than t. "
        "'first k': the strength on the first k steps only.",
        "",
        "| category | setting | mean abs | vis>0.05 | vis>0.1 | "
        + " | ".join(f"low@{s}" for s in sig)
        + " | "
        + " | ".join(f"top5%@{s}" for s in sig)
        + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(sig)),
    ]
    for r in results["rows"]:
        m = r["measures"]

        def cell(key: str, m: dict = m) -> str:
            return f"{m[key]['mean']:.3f} ({m[key]['std']:.3f})"

        cells = [
            r["category"],
            label(r["sampler"], r["strength"], r["first_k"], r["steps"]),
            cell("mean_abs"),
            cell("visible>0.05"),
            cell("visible>0.1"),
            *(cell(f"low_share@{s}") for s in sig),
            *(cell(f"top5_share@{s}") for s in sig),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += steps_summary(results["rows"], sig[0], noise[f"low_share@{sig[0]}"])
    lines += [
        "",
        f"{st['images']} images in {st['wall_s']} s on {st['machine']} (load average "
        f"{st['loadavg_start']} at the start, {st['loadavg_end']} at the end). The bench's "
        "own step loop matches `Sampler.sample` to "
        f"{st['loop_check_max_uint8_diff']} uint8 levels at s = 0.5 (all steps).",
        "",
    ]
    return "\n".join(lines)


def steps_summary(rows: list[dict], sigma: str, white: float) -> list[str]:
    """Lines saying how the low-frequency share moves as ``s`` reaches later steps."""
    key = f"low_share@{sigma}"
    lines = [
        "",
        f"Low-frequency share (low@{sigma}) by the steps that carry s (white noise: "
        f"{white:.3f}; falling = the later steps turn s into grain):",
        "",
    ]
    for r in rows:
        if r["sampler"] != "ddpm" or r["first_k"] is None:
            continue
        cat, s = r["category"], r["strength"]
        same = [
            x
            for x in rows
            if x["category"] == cat and x["sampler"] == "ddpm" and x["strength"] == s
        ]
        if r is not next(x for x in same if x["first_k"] is not None):
            continue  # one line per (category, strength), written at its first first-k row
        ks = sorted((x for x in same if x["first_k"] is not None), key=lambda x: x["first_k"])
        cells = [f"first {x['first_k']}: {x['measures'][key]['mean']:.2f}" for x in ks]
        cells += [
            f"all {x['steps']}: {x['measures'][key]['mean']:.2f}"
            for x in same
            if x["first_k"] is None
        ]
        lines.append(f"- {cat}, DDPM s = {s:g}: " + ", ".join(cells))
    ddim = [r for r in rows if r["sampler"] == "ddim"]
    if ddim:
        cells = [
            f"{r['category']} s={r['strength']:g}: {r['measures'][key]['mean']:.2f}" for r in ddim
        ]
        lines.append("- DDIM (every step carries s): " + ", ".join(cells))
    return lines


def picture(pics: dict, args: argparse.Namespace) -> Image.Image:
    """Rows: keys of each category; per --picture setting three columns: s = 0 | s | |d| x A."""
    res = args.loaded.resolution
    head, gap = 28, 6
    cols = len(args.pictures)
    n_rows = sum(min(args.picture_keys, args.n) for _ in args.cats)
    width = cols * (3 * res + gap)
    canvas = Image.new("RGB", (width, head + n_rows * res), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, s, k) in enumerate(args.pictures):
        x0 = j * (3 * res + gap)
        draw.text((x0 + 2, 2), label(name, s, k, args.steps), fill="black")
        draw.text((x0 + 2, 14), f"s=0 | s | |d| x{args.amplify:g}", fill="black")
    row = 0
    for cat in args.cats:
        for p in range(min(args.picture_keys, args.n)):
            y = head + row * res
            for j, (name, s, k) in enumerate(args.pictures):
                x0 = j * (3 * res + gap)
                b = pics[(cat, name, 0.0, None)][p]
                x = pics[(cat, name, s, k)][p]
                d = np.clip(np.abs(x - b) * args.amplify, 0, 1)
                for c, im in enumerate((b, x, d)):
                    arr = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
                    canvas.paste(Image.fromarray(arr), (x0 + c * res, y))
            row += 1
    return canvas


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    results, pics = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    picture(pics, args).save(RESULTS / f"{args.tag}.png", optimize=True)
    if args.picture_only:
        return 0
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
