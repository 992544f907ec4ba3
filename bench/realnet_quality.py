"""RealNet beside PatchCore: per category and anomaly source, equal training steps, 3 seeds.

For each category (``--data ROOT --categories a,b``, any MVTec-layout set; default: the
shared bottle and magnetic_tile) and each anomaly source, RealNet is trained with one preset
(default ``cpu``) for the SAME number of steps in every run (no time budget), once per seed,
and evaluated on the test split (Image AUROC, Pixel AUROC, PRO, model-only and end-to-end
ms/image). Sources:

- ``sia``: SIA images (``--sia ROOT``, else made by ``sia-gen`` from the bundled model with
  ``--sia-per-category``, ``--sia-strengths``, ``--sia-sampler``, ``--sia-steps`` and
  ``--sia-strength-min-t``: its SIA setting; default 192 per category, DDPM 20 steps, s in
  0.1:0.5 on timesteps >= 500, :data:`DEFAULT_SIA`);
- ``dtd``: DTD textures (``--textures``, default the shared ``dtd/images``);
- ``perlin``: Perlin noise only: colour Perlin-noise images (made here, seeded) as the
  texture source, so the anomaly is the noise pattern inside the Perlin mask;
- ``sia+dtd``: both, as the authors' third configuration (normal 0.5, SIA 0.25, DTD 0.25;
  ``realnet-train``'s default mix when given ``--sia`` and ``--textures``).

PatchCore runs on the same split through ``../shared/tools/patchcore_baseline.py`` (anomalib,
Lite0, 256 px) in a SEPARATE virtual environment (``--patchcore-venv``, made on first use:
a venv that sees this interpreter's packages plus ``pip install anomalib==2.7.0``), so
anomalib never enters the project's dependencies. When it cannot be installed or run, the
table says why; nothing is made up. Its coreset selection grows with the square of the train
images, so a fit that earlier fits predict to pass ``--patchcore-timeout-s`` is refused up
front, and ``--patchcore-coreset-ratio`` trades coreset size for time and memory (the rows say
the ratio). On magnetic_tile (762 train images) anomalib 2.7.0's selection at its 1 % default
also grows in memory by a float per patch per selected patch (19 GiB at 70 % of it), so a fit
whose memory would pass 80 % of the machine's is refused up front too; 0.1 % takes 7 minutes.

Writes ``bench/results/<tag>.json`` and ``<tag>.md`` (mean and standard deviation over
seeds) and per-run panels under ``bench/results/<tag>/``; runs already in the JSON are kept
and skipped, so an interrupted bench resumes; runs of other training settings (preset, steps,
``--image-size``, ``--crop-size``, ``--lr-schedule``, ``--resize``: the trainer's options) are
not mixed in but run again, so give such a run its own ``--tag``. The one exception: rows of
a category whose images are all square stay when only ``--resize`` differs (a square image is
resized alike either way), and ``--reuse TAG`` takes such rows, or rows of the same settings,
from another results file instead of training them again. A results file holds one SIA
setting (rows record theirs; files from before hold :data:`LEGACY_SIA`'s): a run of another
is refused unless it has its own ``--tag``, and ``--reuse`` takes no SIA rows of another.
The full bench (3 seeds x 3 sources x 2 categories + PatchCore) needs hours on 2 CPU cores:

    nice .venv/bin/python bench/realnet_quality.py --seeds 0,1,2 --sources sia,dtd,perlin
    nice .venv/bin/python bench/realnet_quality.py --data ~/my_mvtec --categories screw,pill \\
        --sources dtd,perlin --patchcore off
    nice .venv/bin/python bench/realnet_quality.py --categories magnetic_tile --sources sia \\
        --resize letterbox --tag realnet_quality-letterbox
    nice .venv/bin/python bench/realnet_quality.py --categories magnetic_tile --sources sia \\
        --sia-strengths 0.1:0.2 --sia-strength-min-t 0 --tag realnet_quality-sdas-authors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from realnet_train.cli import parse_int_list
from realnet_train.cli_common import InputError
from realnet_train.data.mvtec import IMAGE_SUFFIXES
from realnet_train.evaluate import evaluate
from realnet_train.model.config import RealNetConfig
from realnet_train.presets import DEFAULT_PRESET, LR_SCHEDULES, PRESETS, resolve
from realnet_train.train import TrainConfig, train
from sia_pipeline.compose import perlin_noise
from sia_pipeline.compose.resize import FITS
from sia_pipeline.diffusion.model import BUNDLED_MODEL, load_model
from sia_pipeline.format.genspec import SAMPLERS, PlanError, parse_strengths
from sia_pipeline.gen.options import DATASET

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIA_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_CATEGORIES = {"bottle": SHARED / "mvtec_ad", "magnetic_tile": SHARED / "magnetic_tile"}
PATCHCORE_TOOL = ROOT.parent / "shared" / "tools" / "patchcore_baseline.py"
ANOMALIB = "anomalib==2.7.0"
RESULTS = ROOT / "bench" / "results"
SOURCES = ("sia", "dtd", "perlin", "sia+dtd")
# Each source's training mix and what it reads (the authors' three configurations + Perlin).
MIXES = {
    "sia": ("normal=0.5,sia=0.5", "sia", None),
    "dtd": ("normal=0.5,texture=0.5", None, "dtd"),
    "perlin": ("normal=0.5,texture=0.5", None, "perlin"),
    "sia+dtd": ("normal=0.5,sia=0.25,texture=0.25", "sia", "dtd"),
}
CORESET_RATIO = 0.01  # anomalib's default, and that of every fit made before the option
METRICS = ("image_auroc", "pixel_auroc", "pro")
log = logging.getLogger("realnet_quality")
# The training settings a row depends on; rows made under others are run again.
COMPARED = (
    "preset", "steps", "image_size", "crop_size", "lr_schedule", "resize", "levels", "afs_keep",
)  # fmt: skip
# The sia-gen settings of the SIA this bench makes (--sia-*), and those every results file
# made before they were options used (their rows carry no "sia_setting").
LEGACY_SIA = {
    "per_category": 192,
    "strengths": "0.1:0.5",
    "sampler": "ddpm",
    "steps": 20,
    "strength_min_t": 0,
}
# The SIA this bench makes when not told otherwise: LEGACY_SIA's amount and strengths with
# sia-gen's default --strength-min-t (the setting that won, realnet_quality-sia-t500.md).
DEFAULT_SIA = {**LEGACY_SIA, "strength_min_t": DATASET.strength_min_t}


def int_list(option: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: realnet-train's own parsing of ``option`` (e.g. ``--levels 1,2,3``)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return parse_int_list(text, option)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def all_square(folder: Path) -> bool:
    """Every image under ``folder`` is square, so ``--resize`` fits it alike either way."""
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as im:
                if im.size[0] != im.size[1]:
                    return False
    return True


def settings_of(meta: dict) -> dict:
    """A results file's training settings, filled in for files from before an option."""
    meta = dict(meta)
    if meta.get("preset") in PRESETS and "image_size" not in meta:
        meta |= {"image_size": PRESETS[meta["preset"]].train["image_size"]}
        meta |= {"crop_size": None, "lr_schedule": "constant"}
    if meta.get("preset") in PRESETS and "levels" not in meta:  # before --levels
        model = PRESETS[meta["preset"]].model
        meta |= {"levels": list(model["levels"]), "afs_keep": list(model["afs_keep"])}
    return {"resize": "letterbox", **{k: meta.get(k) for k in COMPARED if k in meta}}


def reusable_rows(old: dict, meta: dict, square: Callable[[str], bool]) -> list[dict]:
    """The rows of an earlier results file that this run's settings would train again alike.

    All of them when the training settings match; when only ``--resize`` differs, those of
    categories whose images are all square (``square(category)``): a square image is resized
    alike by letterbox and squash, so the run is the same one (``tests/test_realnet_resize``).
    """
    before, now = settings_of(old.get("meta", {})), settings_of(meta)
    differ = {k for k in COMPARED if before.get(k) != now.get(k)}
    rows = old.get("runs", [])
    if not differ:
        return list(rows)
    if differ == {"resize"}:  # the row records the fit it ran with
        return [{"resize": before["resize"], **r} for r in rows if square(r["category"])]
    return []


def reuse_note(rows: list[dict], meta: dict) -> str:
    """A sentence on the rows trained under another ``--resize`` or taken from another file."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        fit = r.get("resize", meta["resize"])
        if r.get("from_tag") or fit != meta["resize"]:
            how = f"run with --resize {fit}" if fit != meta["resize"] else "run alike"
            how += f", taken from {r['from_tag']}.json" if r.get("from_tag") else ""
            groups.setdefault(how, []).append(r)
    if not groups:
        return ""
    parts = [
        f"{', '.join(sorted({r['category'] for r in rs}))} ({len(rs)} runs) {how}"
        for how, rs in sorted(groups.items())
    ]
    note = "Runs made earlier: " + "; ".join(parts) + "."
    if any(r.get("resize", meta["resize"]) != meta["resize"] for r in rows):
        note += (
            " Their categories' images are square, and a square image is resized alike by "
            "letterbox and squash: they are the runs these settings make."
        )
    return note


def sia_spec(root: Path) -> dict | None:
    """The spec of the SIA dataset (finished or being written) at ``root``, if any."""
    for name in ("index.json", "spec.json"):
        if (root / name).is_file():
            return json.loads((root / name).read_text())["spec"]
    return None


def sia_setting(
    per_category: int,
    strengths: str = LEGACY_SIA["strengths"],
    sampler: str = LEGACY_SIA["sampler"],
    steps: int = LEGACY_SIA["steps"],
    strength_min_t: int = LEGACY_SIA["strength_min_t"],
) -> dict:
    """The sia-gen settings an SIA row depends on (the strengths in canonical spelling).

    Raises:
        PlanError: strengths sia-gen would refuse.
    """
    return {
        "per_category": per_category,
        "strengths": parse_strengths(strengths).text,
        "sampler": sampler,
        "steps": steps,
        "strength_min_t": strength_min_t,
    }


def setting_of_spec(spec: dict) -> dict:
    """The :func:`sia_setting` an SIA dataset's spec was made with (sia-gen's defaults for
    fields a spec leaves out: ``strength_min_t`` is only written when not 0)."""
    strengths = spec.get("strengths", {}).get("spec", LEGACY_SIA["strengths"])
    return sia_setting(
        spec["per_category"],
        strengths,
        spec.get("sampler", LEGACY_SIA["sampler"]),
        spec.get("steps", LEGACY_SIA["steps"]),
        spec.get("strength_min_t", 0),
    )


def setting_of_row(row: dict) -> dict | None:
    """The SIA setting of a results row (None for a row without SIA; rows from before the
    settings were recorded were all made with :data:`LEGACY_SIA`)."""
    if not MIXES[row["source"]][1]:
        return None
    return row.get("sia_setting", LEGACY_SIA)


def describe_setting(setting: dict) -> str:
    """The sia-gen flags of a setting, as the sources note gives them."""
    out = f"--per-category {setting['per_category']} --strengths {setting['strengths']}"
    if (setting["sampler"], setting["steps"]) != (LEGACY_SIA["sampler"], LEGACY_SIA["steps"]):
        out += f" --sampler {setting['sampler']} --steps {setting['steps']}"
    if setting["strength_min_t"]:
        out += f" --strength-min-t {setting['strength_min_t']}"
    return out


def setting_slug(setting: dict) -> str:
    """A folder-name suffix for a setting ("" for :data:`LEGACY_SIA`'s, whose folder is the
    one earlier benches made)."""
    if setting == LEGACY_SIA:
        return ""
    strengths = setting["strengths"].replace(":", "_").replace(",", "_")
    slug = f"-{setting['sampler']}{setting['steps']}-s{strengths}-n{setting['per_category']}"
    return slug + (f"-t{setting['strength_min_t']}" if setting["strength_min_t"] else "")


def setting_clash(old: dict, setting: dict) -> dict | None:
    """The SIA setting of a results file's SIA rows when it is not ``setting`` (else None).

    A results file holds one SIA setting: rows of another would mix in its table.
    """
    for row in old.get("runs", []):
        theirs = setting_of_row(row)
        if theirs is not None and theirs != setting:
            return theirs
    return None


def make_sia(
    out: Path, categories: list[str], per_category: int, setting: dict | None = None
) -> Path:
    """An SIA dataset made by the real ``sia-gen`` command (resumes if present).

    ``setting`` (:func:`sia_setting`, default :data:`LEGACY_SIA`'s at ``per_category``)
    gives sia-gen's strengths, sampler, steps and ``--strength-min-t``. A finished one
    made for more categories (an earlier bench over bottle and magnetic_tile, say, then a
    run of magnetic_tile alone) is reused as it is. One of another spec stays as it is too:
    this spec's dataset goes to a folder named after it.
    """
    setting = setting or sia_setting(per_category)
    spec = sia_spec(out)
    same = spec is not None and setting_of_spec(spec) == {**setting, "per_category": per_category}
    if same and (out / "index.json").is_file():
        if set(categories) <= set(spec["categories"]):
            log.info("reusing the SIA dataset %s (%s)", out, ", ".join(spec["categories"]))
            return out
    if spec and (not same or sorted(spec["categories"]) != sorted(categories)):
        out = out.with_name(f"{out.name}-{'+'.join(sorted(categories))}-{per_category}")
    cmd = [sys.executable, "-m", "sia_pipeline.cli.gen", "--categories", ",".join(categories)]
    cmd += ["--strengths", setting["strengths"], "--per-category", str(per_category)]
    if (setting["sampler"], setting["steps"]) != (LEGACY_SIA["sampler"], LEGACY_SIA["steps"]):
        cmd += ["--sampler", setting["sampler"], "--steps", str(setting["steps"])]
    if setting["strength_min_t"]:
        cmd += ["--strength-min-t", str(setting["strength_min_t"])]
    cmd += ["--out", str(out)]
    log.info("running %s", " ".join(cmd))
    subprocess.run([*cmd, "--no-progress"], check=True)
    return out


def make_perlin_textures(out: Path, n: int = 64, size: int = 256, seed: int = 0) -> Path:
    """``n`` colour Perlin-noise PNGs (one noise field per channel, scales 2..32)."""
    if out.is_dir() and len(list(out.glob("*.png"))) >= n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        channels = []
        for _ in range(3):
            res = 2 ** int(rng.integers(1, 6))
            noise = perlin_noise((size, size), (res, res), rng)
            channels.append((noise - noise.min()) / max(np.ptp(noise), 1e-8))
        img = (np.stack(channels, -1) * 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"perlin_{i:03d}.png")
    return out


def patchcore_venv(venv: Path) -> tuple[Path | None, str]:
    """(python of a venv with anomalib, "") or (None, why not). Made on first use."""
    python = venv / "bin" / "python"
    ok = [str(python), "-c", "import anomalib"]
    if python.is_file() and subprocess.run(ok, capture_output=True).returncode == 0:
        return python, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        # See this interpreter's packages (torch, timm, ...) so only anomalib's own are added.
        site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        parent = [p for p in sys.path if p.endswith("site-packages")]
        (site / "site-packages" / "_bench_parent.pth").write_text("\n".join(parent) + "\n")
        pip = [str(python), "-m", "pip", "install", "-q", ANOMALIB]
        res = subprocess.run(pip, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
            return None, f"pip install {ANOMALIB} failed: {' '.join(tail)}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not make the PatchCore venv {venv}: {e}"
    if subprocess.run(ok, capture_output=True).returncode != 0:
        return None, f"{ANOMALIB} installed but does not import in {venv}"
    return python, ""


def coreset_estimate_s(n_train: int, ratio: float, earlier: list[dict]) -> float | None:
    """Seconds the coreset selection of ``n_train`` images should take, from earlier fits.

    anomalib's k-center greedy selection costs (patches) x (coreset size), both linear in
    the number of training images, so the time scales as ``n_train ** 2 * ratio``. Scaled
    from the fastest earlier fit on this machine (slower ones shared it with other jobs;
    ``None`` without one).
    """
    fits = [
        pc["coreset_s"] / (pc["n_train_good"] ** 2 * pc["settings"]["coreset_sampling_ratio"])
        for pc in earlier
        if pc.get("coreset_s") and pc.get("n_train_good")
    ]
    return min(fits) * n_train**2 * ratio if fits else None


def coreset_memory_bytes(n_train: int, ratio: float, image_size: int = 256) -> float:
    """Memory anomalib 2.7.0's coreset selection grows to on CPU: a float32 distance per patch
    per selected patch (``patchcore_baseline.py`` keeps stride-8 patches: 32 x 32 an image at
    256 px). Measured on magnetic_tile at 1 %: 19 GiB at 5,450 of 7,801 selections."""
    patches = n_train * (image_size // 8) ** 2
    return 4.0 * patches * max(1, int(patches * ratio))


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_patchcore(category_dir: Path, out: Path, args, earlier: list[dict]) -> dict:
    """PatchCore metrics on ``category_dir`` (or ``{"unavailable": reason}``): a new fit.

    ``main`` reuses an earlier fit's ``out`` JSON instead, also under ``--patchcore off``
    (the coreset fit takes minutes for 200 images and grows with their square; it does not
    depend on RealNet's settings). The fit is refused when the estimate from
    ``earlier`` fits exceeds ``--patchcore-timeout-s`` or its memory would pass 80 % of the
    machine's (:func:`coreset_memory_bytes`), and stopped when it runs past the timeout;
    its output goes to ``--runs``/patchcore-<category>.log.
    """
    if args.patchcore == "off":
        return {"unavailable": "not run (--patchcore off)"}
    if not PATCHCORE_TOOL.is_file():
        return {"unavailable": f"{PATCHCORE_TOOL} is absent"}
    good = (category_dir / "train" / "good").iterdir()
    n_train = sum(f.suffix.lower() in IMAGE_SUFFIXES for f in good)
    ratio, timeout = args.patchcore_coreset_ratio, args.patchcore_timeout_s
    what = f"not run: its coreset selection ({n_train} train images, coreset {ratio:.1%})"
    estimate = coreset_estimate_s(n_train, ratio, earlier)
    if estimate is not None:
        log.info(
            "PatchCore %s: coreset selection estimated at %.0f min",
            category_dir.name,
            estimate / 60,
        )
        if estimate > timeout:
            return {
                "unavailable": f"{what} is estimated at {estimate / 3600:.1f} h from earlier "
                f"fits here, over --patchcore-timeout-s {timeout:.0f}; lower "
                "--patchcore-coreset-ratio"
            }
    need, have = coreset_memory_bytes(n_train, ratio), physical_memory_bytes()
    if need > 0.8 * have:
        return {
            "unavailable": f"{what} would grow to about {need / 2**30:.1f} GiB, this machine "
            f"has {have / 2**30:.1f}; lower --patchcore-coreset-ratio"
        }
    python, why = patchcore_venv(Path(args.patchcore_venv))
    if python is None:
        return {"unavailable": why}
    cmd = [str(python), str(PATCHCORE_TOOL), "--data", str(category_dir), "--out", str(out)]
    cmd += ["--hf-home", str(Path(args.patchcore_venv) / "hf_offline"), "--threads", "2"]
    cmd += ["--coreset-ratio", str(ratio)]
    log_path = Path(args.runs) / f"patchcore-{category_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("running %s (output: %s, at most %.0f s)", " ".join(cmd), log_path, timeout)
    with log_path.open("w") as f:
        try:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"unavailable": f"stopped after --patchcore-timeout-s {timeout:.0f} s"}
    if res.returncode != 0 or not out.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        return {"unavailable": f"patchcore_baseline.py failed: {' '.join(tail)} (see {log_path})"}
    return patchcore_metrics(json.loads(out.read_text()))


def patchcore_metrics(pc: dict) -> dict:
    """The bench's fields from ``patchcore_baseline.py``'s JSON."""
    return {
        "image_auroc": pc["image_AUROC"],
        "pixel_auroc": pc["pixel_AUROC"],
        "pro": pc["pixel_AUPRO"],
        "fit_s": pc["fit_s"],
        "model_ms_per_image_batch1": pc["infer_ms_per_image_bs1"],
        "image_size": pc["settings"]["image_size"],
        "coreset_ratio": pc["settings"]["coreset_sampling_ratio"],
    }


def run_name(category: str, source: str, seed: int) -> str:
    """A run's folder name, under ``--runs`` and under ``bench/results/<tag>/``."""
    return f"{category}-{source}-seed{seed}"


def training_settings(args) -> tuple[dict, RealNetConfig]:
    """The preset with the bench's options over it: every run's TrainConfig fields and model."""
    train_kw, model = resolve(
        args.preset,
        {
            "steps": args.steps,
            "afs_batches": args.afs_batches,
            "image_size": args.image_size,
            "crop_size": args.crop_size,
            "lr_schedule": args.lr_schedule,
            "resize": args.resize,
        },
        {
            "backbone_weights": args.backbone_weights,
            "levels": args.levels,
            "afs_keep": args.afs_keep,
        },
    )
    return {**train_kw, "time_budget_s": None}, model  # equal steps, not equal seconds


def run_realnet(
    category: str,
    data: Path,
    source: str,
    seed: int,
    args,
    srcs: dict,
    settings: tuple[dict, RealNetConfig],
) -> dict:
    """Train one RealNet run with ``settings`` (:func:`training_settings`) and evaluate it."""
    name = run_name(category, source, seed)
    run_dir = Path(args.runs) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    train_kw, model = settings
    mix, sia, textures = MIXES[source]
    cfg = TrainConfig(
        category=category,
        data=str(data),
        out=str(run_dir),
        sia=str(srcs[sia]) if sia else None,
        textures=str(srcs[textures]) if textures else None,
        mix=mix,
        num_workers=1,
        threads=args.threads,
        seed=seed,
        device="cpu",
        model=model,
        **train_kw,
    )
    t0 = time.perf_counter()
    tr = train(cfg)
    train_s = time.perf_counter() - t0
    ev_dir = RESULTS / args.tag / name
    shutil.rmtree(ev_dir, ignore_errors=True)
    metrics = evaluate(run_dir / "last.pt", str(data), ev_dir, panels=8)
    return {
        "category": category,
        "source": source,
        "seed": seed,
        **{k: metrics[k] for k in METRICS},
        "image_auroc_per_type": metrics["image_auroc_per_type"],
        "steps": tr["step"],
        "train_s": train_s,
        "data_wait_s": tr["data_wait_s"],
        "model_ms_per_image": metrics["model_ms_per_image"],
        "model_ms_per_image_batch1": metrics["model_ms_per_image_batch1"],
        "end_to_end_ms_per_image": metrics["end_to_end_ms_per_image"],
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (category, source)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["category"], r["source"]), []).append(r)
    out = []
    for (category, source), runs in sorted(groups.items()):
        s = {"category": category, "source": source, "seeds": [r["seed"] for r in runs]}
        for k in (*METRICS, "train_s", "steps", "model_ms_per_image_batch1"):
            vals = [r[k] for r in runs if r.get(k) is not None]
            s[k] = statistics.fmean(vals) if vals else None
            s[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        per_type = [r["image_auroc_per_type"] for r in runs if r.get("image_auroc_per_type")]
        types = sorted({t for p in per_type for t in p})
        s["image_auroc_per_type"] = {
            t: statistics.fmean(p[t] for p in per_type if t in p) for t in types
        }
        out.append(s)
    return out


def with_per_type(rows: list[dict], tag: str) -> list[dict]:
    """Rows with their per-defect-type Image AUROC, read from the run's metrics.json when the
    row was saved before the bench kept it."""
    out = []
    for r in rows:
        path = RESULTS / tag / run_name(r["category"], r["source"], r["seed"]) / "metrics.json"
        if "image_auroc_per_type" not in r and path.is_file():
            r = {**r, "image_auroc_per_type": json.loads(path.read_text())["image_auroc_per_type"]}
        out.append(r)
    return out


def per_type_table(summary: list[dict]) -> list[str]:
    """Markdown lines: Image AUROC per defect type, one table per category."""
    lines = []
    for category in sorted({s["category"] for s in summary}):
        rows = [s for s in summary if s["category"] == category and s["image_auroc_per_type"]]
        types = sorted({t for s in rows for t in s["image_auroc_per_type"]})
        if not rows or len(types) < 2:
            continue
        lines += [
            "",
            f"Image AUROC per defect type, {category} (each type's images against all good "
            "ones; mean over seeds):",
            "",
            "| source | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
        ]
        for s in rows:
            aurocs = s["image_auroc_per_type"]
            cells = [f"{aurocs[t]:.3f}" if t in aurocs else "-" for t in types]
            lines.append(f"| {s['source']} | " + " | ".join(cells) + " |")
    return lines


def _cell(s: dict, k: str) -> str:
    return "-" if s.get(k) is None else f"{s[k]:.3f} ± {s[f'{k}_sd']:.3f}"


def _size_note(meta: dict) -> str:
    size, crop = meta.get("image_size"), meta.get("crop_size")
    if crop and crop < size:
        note = f"trained on random {crop} px crops of {size} px images, evaluated at {size} px"
    else:
        note = f"{size} px"
    note = f"{note} ({meta.get('resize', 'letterbox')})"
    preset = PRESETS.get(meta.get("preset"))
    if preset and meta.get("levels", list(preset.model["levels"])) != list(preset.model["levels"]):
        keep = "/".join(str(k) for k in meta["afs_keep"])
        note += f", backbone levels {','.join(map(str, meta['levels']))} (AFS keeps {keep})"
    return note


def markdown(summary: list[dict], patchcore: dict, meta: dict) -> str:
    lines = [
        "# RealNet beside PatchCore (equal training steps)",
        "",
        f"RealNet preset `{meta['preset']}`, {meta['steps']} steps per run (no time budget), "
        f"{_size_note(meta)}, lr {meta.get('lr_schedule', 'constant')}, "
        f"seeds {meta['seeds']}, {meta['threads']} torch thread(s) + 1 DataLoader worker. "
        f"Machine: {meta['machine']}. Mean ± standard deviation over seeds; metrics on the "
        "full test split at the training size; no model selection. PatchCore: anomalib 2.7.0 "
        "through ../shared/tools/patchcore_baseline.py (Lite0, seed 0; image size and coreset "
        "ratio in its rows).",
        "",
        "| category | method / source | Image AUROC | Pixel AUROC | PRO | train s | "
        "model ms/img (batch 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for category in sorted({s["category"] for s in summary} | set(patchcore)):
        for s in (s for s in summary if s["category"] == category):
            lines.append(
                f"| {category} | RealNet / {s['source']} (n={len(s['seeds'])}) | "
                f"{_cell(s, 'image_auroc')} | {_cell(s, 'pixel_auroc')} | {_cell(s, 'pro')} | "
                f"{s['train_s']:.0f} | {s['model_ms_per_image_batch1']:.1f} |"
            )
        pc = patchcore.get(category)
        if pc and "unavailable" in pc:
            lines.append(f"| {category} | PatchCore | {pc['unavailable']} | | | | |")
        elif pc:
            lines.append(
                f"| {category} | PatchCore ({pc['image_size']} px, coreset "
                f"{pc.get('coreset_ratio', CORESET_RATIO):.1%}) | {pc['image_auroc']:.3f} | "
                f"{pc['pixel_auroc']:.3f} | {pc['pro']:.3f} | {pc['fit_s']:.0f} (fit) | "
                f"{pc['model_ms_per_image_batch1']} |"
            )
    lines += per_type_table(summary)
    lines += ["", f"Sources: {meta['sources_note']}"]
    if meta.get("reused"):
        lines += ["", meta["reused"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="MVTec-layout root holding the categories")
    p.add_argument("--categories", default=",".join(SHARED_CATEGORIES))
    p.add_argument("--sources", default="sia,dtd,perlin")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: preset's)")
    p.add_argument("--afs-batches", type=int, default=None, help="default: preset's")
    p.add_argument("--image-size", type=int, default=None, help="default: preset's")
    p.add_argument("--crop-size", type=int, default=None, help="train crops; default: preset's")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None)
    p.add_argument("--resize", choices=FITS, default=None, help="default: preset's")
    p.add_argument(
        "--levels", type=int_list("--levels"), default=None, help="backbone levels, e.g. 0,1,2,3"
    )
    p.add_argument(
        "--afs-keep", type=int_list("--afs-keep"), default=None, help="channels kept per level"
    )
    p.add_argument("--backbone-weights", default=None, help="needed by --preset paper")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sia", default=None, help="existing SIA dataset root (else sia-gen)")
    p.add_argument("--sia-per-category", type=int, default=DEFAULT_SIA["per_category"])
    p.add_argument(
        "--sia-strengths",
        default=None,
        help=f"sia-gen --strengths of the SIA made here (default {DEFAULT_SIA['strengths']})",
    )
    p.add_argument("--sia-sampler", choices=SAMPLERS, default=None, help="default ddpm")
    p.add_argument("--sia-steps", type=int, default=None, help="default 20")
    p.add_argument(
        "--sia-strength-min-t",
        type=int,
        default=None,
        help=f"sia-gen --strength-min-t (default {DEFAULT_SIA['strength_min_t']}, sia-gen's; 0: "
        "the strength on every step, as the paper). A results file holds one SIA setting: "
        "another needs its own --tag",
    )
    p.add_argument("--textures", default=str(SHARED / "dtd" / "images"))
    p.add_argument("--patchcore", choices=["auto", "off"], default="auto")
    p.add_argument("--patchcore-venv", default=str(ROOT / "runs" / "patchcore-venv"))
    p.add_argument(
        "--patchcore-coreset-ratio",
        type=float,
        default=CORESET_RATIO,
        help="PatchCore's coreset fraction (anomalib's default 1 %%; its selection time grows "
        "with the square of the train images)",
    )
    p.add_argument(
        "--patchcore-timeout-s",
        type=float,
        default=4 * 3600,
        help="longest PatchCore fit (refused up front when earlier fits predict longer)",
    )
    p.add_argument("--runs", default=str(ROOT / "runs" / "realnet_quality"))
    p.add_argument("--tag", default="realnet_quality", help="result file name")
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="TAG",
        help="take the rows of bench/results/TAG.json that this run would train alike (same "
        "settings; or only --resize differs and the category's images are square) instead of "
        "training them again (repeatable)",
    )
    args = p.parse_args()
    if missing := [t for t in args.reuse if not (RESULTS / f"{t}.json").is_file()]:
        p.error(f"--reuse: no results file bench/results/{missing[0]}.json")
    if args.tag in args.reuse:
        p.error(f"--reuse {args.tag}: that is this run's own --tag (its rows are kept anyway)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    categories = [c for c in args.categories.split(",") if c]
    sources = [s for s in args.sources.split(",") if s]
    if bad := set(sources) - set(SOURCES):
        p.error(f"unknown sources {sorted(bad)}; choose from {', '.join(SOURCES)}")
    roots = {c: Path(args.data) if args.data else SHARED_CATEGORIES.get(c) for c in categories}
    if missing := [c for c, r in roots.items() if r is None or not (r / c).is_dir()]:
        p.error(f"no category folder for {missing} (give --data ROOT holding them)")
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        settings = training_settings(args)
    except ValueError as e:
        p.error(str(e))
    train_kw = settings[0]
    result_json = RESULTS / f"{args.tag}.json"
    old = json.loads(result_json.read_text()) if result_json.is_file() else {}
    setting = None  # this run's SIA setting, when it trains with SIA
    gen_flags = ("sia_strengths", "sia_sampler", "sia_steps", "sia_strength_min_t")
    if any(MIXES[s][1] for s in sources):
        if args.sia:
            if given := [f for f in gen_flags if getattr(args, f) is not None]:
                flag = "--" + given[0].replace("_", "-")
                p.error(f"{flag} sets up the SIA made here; --sia {args.sia} is made already")
            spec = sia_spec(Path(args.sia))
            if spec is None:
                p.error(f"--sia {args.sia}: no index.json or spec.json there")
            setting = setting_of_spec(spec)
        else:
            try:
                setting = sia_setting(
                    args.sia_per_category,
                    args.sia_strengths or DEFAULT_SIA["strengths"],
                    args.sia_sampler or DEFAULT_SIA["sampler"],
                    DEFAULT_SIA["steps"] if args.sia_steps is None else args.sia_steps,
                    DEFAULT_SIA["strength_min_t"]
                    if args.sia_strength_min_t is None
                    else args.sia_strength_min_t,
                )
            except PlanError as e:
                p.error(f"--sia-strengths: {e}")
            if not 1 <= setting["steps"] <= 1000 or not 0 <= setting["strength_min_t"] < 1000:
                p.error("--sia-steps must be in [1, 1000] and --sia-strength-min-t in [0, 1000)")
        if theirs := setting_clash(old, setting):
            slug = setting_slug(setting) or "-legacy-sia"
            p.error(
                f"bench/results/{args.tag}.json holds SIA rows made with "
                f"{describe_setting(theirs)}; this run's SIA is {describe_setting(setting)}: "
                f"give it its own --tag (e.g. --tag {args.tag}{slug})"
            )

    srcs: dict[str, Path] = {"dtd": Path(args.textures)}
    notes = [f"dtd = {args.textures}"]
    if "perlin" in sources:
        srcs["perlin"] = make_perlin_textures(Path(args.runs) / "perlin_textures")
        notes.append("perlin = 64 colour Perlin-noise images (seed 0) as the texture source")
    if any(MIXES[s][1] for s in sources):
        if args.sia:
            srcs["sia"] = Path(args.sia)
            notes.append(f"sia = existing dataset {args.sia} ({describe_setting(setting)})")
        else:
            bundled = load_model(BUNDLED_MODEL)
            if unknown := sorted(set(categories) - set(bundled.categories)):
                p.error(
                    f"the bundled SDAS model knows {', '.join(sorted(bundled.categories))}, "
                    f"not {', '.join(unknown)}: give --sia ROOT (an SIA dataset made for them) "
                    "or leave sia out of --sources"
                )
            sia_root = Path(args.runs) / f"sia-{bundled.model_id}{setting_slug(setting)}"
            srcs["sia"] = make_sia(sia_root, categories, args.sia_per_category, setting)
            notes.append(
                f"sia = sia-gen {describe_setting(setting)} "
                f"(bundled model {bundled.model_id}, {bundled.card.get('preset')}, "
                f"{bundled.resolution} px, resized to the training size for blending)"
            )
    sia_model_id = None
    if "sia" in srcs:
        index = json.loads((srcs["sia"] / "index.json").read_text())
        sia_model_id = ",".join(index["model_ids"])
    meta = {
        "preset": args.preset,
        **{k: train_kw[k] for k in ("steps", "image_size", "crop_size", "lr_schedule", "resize")},
        "levels": list(settings[1].levels),
        "afs_keep": list(settings[1].afs_keep),
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "sources_note": "; ".join(notes),
        "sia_model_id": sia_model_id,
        "sia_setting": setting,
    }
    squares: dict[str, bool] = {}
    sia_id = meta["sia_model_id"]
    # The one SIA setting this file's rows may hold: this run's, else the file's own, else
    # that of the first SIA row another file gives (--reuse).
    held = [setting_of_row(r) for r in old.get("runs", [])]
    target = {"setting": setting or next((h for h in held if h is not None), None)}

    def current(row: dict) -> bool:
        """Not an SIA row made from another SDAS model (those are run again) or with
        another SIA setting than the one this file holds."""
        theirs = setting_of_row(row)
        if theirs is None:
            return True
        if target["setting"] is None:
            target["setting"] = theirs
        if theirs != target["setting"]:
            return False
        return "sia" not in srcs or row.get("sia_model_id") == sia_id

    def square(category: str) -> bool:
        root = roots.get(category) or SHARED_CATEGORIES.get(category)
        if category not in squares:
            squares[category] = bool(root) and all_square(Path(root) / category)
        return squares[category]

    # Rows of other training settings are run again (but see reusable_rows).
    rows = reusable_rows(old, meta, square)
    kept_from = [old] if rows else []  # the results files whose rows stay
    done = {(r["category"], r["source"], r["seed"]) for r in rows}
    for tag in args.reuse:  # rows another results file holds that this run would train alike
        other = json.loads((RESULTS / f"{tag}.json").read_text())
        taken = [
            {**r, "from_tag": r.get("from_tag", tag)}
            for r in reusable_rows(other, meta, square)
            if (r["category"], r["source"], r["seed"]) not in done and current(r)
        ]
        for r in taken:
            name = run_name(r["category"], r["source"], r["seed"])
            dst = RESULTS / args.tag / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(RESULTS / tag / name, dst)
            done.add((r["category"], r["source"], r["seed"]))
        rows += taken
        if taken:
            kept_from.append(other)
        for category in {r["category"] for r in taken}:  # PatchCore: whatever RealNet's settings
            fit_json = RESULTS / tag / f"patchcore-{category}.json"
            if fit_json.is_file() and not (RESULTS / args.tag / fit_json.name).is_file():
                shutil.copy(fit_json, RESULTS / args.tag / fit_json.name)
            if category in other.get("patchcore", {}):
                old.setdefault("patchcore", {}).setdefault(category, other["patchcore"][category])
    # SIA rows made from another SDAS model are run again; PatchCore does not depend on them.
    # A bench run without the SIA source (say ``--sources perlin``) keeps the SIA rows it holds.
    rows = with_per_type([r for r in rows if current(r)], args.tag)
    if "sia" not in srcs:
        meta["sia_model_id"] = old.get("meta", {}).get("sia_model_id")
        meta["sia_setting"] = target["setting"] if any(setting_of_row(r) for r in rows) else None
    # The notes of sources this run does not name stay, as their rows stay.
    # A note is "<source> = ...": this run's note for a source replaces the old one.
    old_notes = [
        n for f in kept_from for n in f.get("meta", {}).get("sources_note", "").split("; ")
    ]
    kept_notes = list(dict.fromkeys(n for n in old_notes if n and n.split(" = ")[0] not in srcs))
    meta["sources_note"] = "; ".join(notes + kept_notes)
    patchcore = old.get("patchcore", {})
    done = {(r["category"], r["source"], r["seed"]) for r in rows}
    pc_jsons = {c: RESULTS / args.tag / f"patchcore-{c}.json" for c in categories}
    for category, pc_json in pc_jsons.items():  # earlier fits: in the table from the first save
        if pc_json.is_file():  # one of another coreset ratio is refitted below (under auto)
            patchcore[category] = patchcore_metrics(json.loads(pc_json.read_text()))

    def save() -> None:
        summary = summarise(rows)
        meta["seeds"] = sorted({r["seed"] for r in rows})  # the seeds the table holds
        meta["reused"] = reuse_note(rows, meta)
        out = {"meta": meta, "summary": summary, "patchcore": patchcore, "runs": rows}
        result_json.write_text(json.dumps(out, indent=1))
        (RESULTS / f"{args.tag}.md").write_text(markdown(summary, patchcore, meta))

    # Seed-major, so an interrupted bench already holds every category and source once;
    # PatchCore (the slow coreset fit, independent of RealNet's steps) last.
    for seed in seeds:
        for category in categories:
            for source in sources:
                if (category, source, seed) in done:
                    continue
                row = run_realnet(category, roots[category], source, seed, args, srcs, settings)
                if MIXES[source][1]:
                    row["sia_model_id"] = sia_id
                    row["sia_setting"] = setting
                rows.append(row)
                log.info("%s", json.dumps(rows[-1]))
                save()
    for category in categories:
        pc = patchcore.get(category, {"unavailable": ""})
        ratio = pc.get("coreset_ratio", CORESET_RATIO)
        if "unavailable" in pc or (
            args.patchcore == "auto" and ratio != args.patchcore_coreset_ratio
        ):
            pc_jsons[category].parent.mkdir(parents=True, exist_ok=True)
            earlier = [
                json.loads(f.read_text())
                for f in pc_jsons[category].parent.glob("patchcore-*.json")
            ]
            patchcore[category] = run_patchcore(
                roots[category] / category, pc_jsons[category], args, earlier
            )
            save()
    save()
    print((RESULTS / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()
