"""Every bad input of realnet-train / -eval / -predict: exit 2, one line, nothing created.

Each case names what is wrong and a fragment of the expected message. The out folder must
not exist afterwards (for train and predict) and no traceback may be printed. A crafted
pickle given as a checkpoint must not run: it would create a marker file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from realnet_helpers import small_mvtec, tiny_model_config

from realnet_train.calibration import calibration_record
from realnet_train.checkpoint import checkpoint_dict, save_checkpoint
from realnet_train.cli import eval_main, train_main
from realnet_train.model.realnet import RealNet
from realnet_train.predict import main as predict_main


class Exploit:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def env(shared_data, tiny_sia, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    data = small_mvtec(shared_data, base / "data", n_train=6)
    small_mvtec(shared_data, base / "data", n_train=6, category="cable")  # no SIA shards
    only_good = base / "only_good"
    (only_good / "bottle/train/good").mkdir(parents=True)
    (only_good / "bottle/test/good").mkdir(parents=True)
    for f in sorted((data / "bottle/train/good").glob("*.png"))[:2]:
        (only_good / "bottle/train/good" / f.name).write_bytes(f.read_bytes())
        (only_good / "bottle/test/good" / f.name).write_bytes(f.read_bytes())
    empty = base / "empty"
    empty.mkdir()
    afile = base / "notes.txt"
    afile.write_text("not an image")
    model = RealNet(tiny_model_config())
    fields = {"step": 0, "category": "bottle", "image_size": 32}
    good_ckpt = base / "good.pt"
    cal = calibration_record(np.array([0.1, 0.2, 0.3]), 0.05, ["a", "b", "c"])
    save_checkpoint(good_ckpt, checkpoint_dict(model, **fields, calibration=cal))
    uncalibrated = base / "uncalibrated.pt"
    save_checkpoint(uncalibrated, checkpoint_dict(model, **fields))
    crafted = base / "crafted.pt"
    crafted.write_bytes(pickle.dumps({"model": Exploit(base / "PWNED")}))
    crafted2 = base / "crafted2.pt"  # protocol 2: the loader reaches GLOBAL io.open
    crafted2.write_bytes(pickle.dumps({"model": Exploit(base / "PWNED")}, protocol=2))
    crafted_zip = base / "crafted_zip.pt"  # torch.save's own zip format around the exploit
    torch.save({"model": Exploit(base / "PWNED")}, crafted_zip)
    foreign = base / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = base / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    return {
        "base": base,
        "data": data,
        "sia": tiny_sia,
        "textures": shared_data / "dtd" / "images",
        "only_good": only_good,
        "empty": empty,
        "afile": afile,
        "ckpt": good_ckpt,
        "uncalibrated": uncalibrated,
        "crafted": crafted,
        "crafted2": crafted2,
        "crafted_zip": crafted_zip,
        "foreign": foreign,
        "garbage": garbage,
        "image": sorted((data / "bottle/test/broken_large").glob("*.png"))[0],
    }


TRAIN_OK = {"--category": "bottle", "--data": "{data}", "--sia": "{sia}", "--out": "{out}"}

# (case id, options changed from TRAIN_OK (None removes), expected message fragment)
TRAIN_CASES = [
    ("data-missing", {"--data": "{base}/nope"}, "--data {base}/nope: no such folder"),
    ("data-is-a-file", {"--data": "{afile}"}, "is a file, not a folder"),
    ("data-bad-url", {"--data": "http://example.com/x"}, "unsupported URL scheme"),
    ("data-s3-no-bucket", {"--data": "s3://"}, "S3 URL has no bucket"),
    ("category-unknown", {"--category": "screw"}, "--category screw: no folder {data}/screw"),
    ("category-without-train", {"--data": "{base}", "--category": "data"}, "no training images"),
    ("category-path", {"--category": "../bottle"}, "is not a folder name"),
    ("no-anomaly-source", {"--sia": None}, "give an anomaly source"),
    ("sia-missing", {"--sia": "{base}/nope"}, "--sia {base}/nope: no such folder"),
    ("sia-not-a-dataset", {"--sia": "{data}"}, "no index.json"),
    ("sia-no-category", {"--category": "cable"}, "no shards under"),
    ("strengths-nan", {"--strengths": "nan"}, "must be finite and in [0, 1]"),
    ("strengths-inf", {"--strengths": "0:inf"}, "must be finite and in [0, 1]"),
    ("strengths-reversed", {"--strengths": "0.5:0.1"}, "has LO > HI"),
    ("strengths-words", {"--strengths": "low:high"}, "is not LO:HI"),
    ("strengths-match-no-shard", {"--strengths": "0.6:0.9"}, "no shards under"),
    (
        "strengths-without-sia",
        {"--sia": None, "--textures": "{textures}", "--strengths": "0.1"},
        "give --sia too",
    ),  # fmt: skip
    ("textures-missing", {"--textures": "{base}/nope"}, "--textures {base}/nope: no such folder"),
    ("textures-empty", {"--textures": "{empty}"}, "no texture images"),
    ("mix-unknown-source", {"--mix": "normal=0.5,noise=0.5"}, "unknown source 'noise'"),
    ("mix-not-summing", {"--mix": "normal=0.5,sia=0.2"}, "summing to 1"),
    ("mix-nan", {"--mix": "normal=nan,sia=0.5"}, "summing to 1"),
    ("mix-texture-without-textures", {"--mix": "normal=0.5,texture=0.5"}, "no --textures"),
    ("steps-zero", {"--steps": "0"}, "'0' must be >= 1"),
    ("steps-negative", {"--steps": "-3"}, "must be >= 1"),
    ("steps-words", {"--steps": "ten"}, "'ten' is not an integer"),
    ("batch-size-zero", {"--batch-size": "0"}, "must be >= 1"),
    ("image-size-tiny", {"--image-size": "8"}, "must be >= 32"),
    ("lr-nan", {"--lr": "nan"}, "'nan' must be > 0"),
    ("lr-zero", {"--lr": "0"}, "must be > 0"),
    ("lr-inf", {"--lr": "inf"}, "must be > 0"),
    ("lr-schedule-unknown", {"--lr-schedule": "linear"}, "'linear' is not one of"),
    ("resize-unknown", {"--resize": "stretch"}, "'stretch' is not one of"),
    ("time-budget-negative", {"--time-budget": "-1"}, "must be > 0"),
    ("workers-negative", {"--workers": "-1"}, "must be >= 0"),
    ("threads-zero", {"--threads": "0"}, "must be >= 1"),
    ("checkpoint-every-zero", {"--checkpoint-every": "0"}, "must be >= 1"),
    ("max-bad-negative", {"--max-bad-samples": "-1"}, "must be >= 0"),
    ("holdout-too-big", {"--holdout": "0.9"}, "must be >= 0 and <= 0.5"),
    ("target-fpr-zero", {"--target-fpr": "0"}, "must be > 0 and < 1"),
    ("target-fpr-nan", {"--target-fpr": "nan"}, "must be > 0 and < 1"),
    ("levels-words", {"--levels": "a,b"}, "not a comma-separated list of integers"),
    ("levels-out-of-range", {"--levels": "1,7"}, "backbone levels in 0..4"),
    ("afs-keep-zero", {"--afs-keep": "0,8"}, "must be numbers >= 1"),
    ("afs-keep-nan", {"--afs-keep": "nan"}, "not a comma-separated list of integers"),
    (
        "afs-keep-too-many",
        {"--afs-keep": "25,40,56,40"},
        "AFS keeps 25 channels of level1, which has 24",
    ),
    ("afs-keep-per-level", {"--afs-keep": "8"}, "needs one count per level"),
    ("rrs-counts-one", {"--rrs-counts": "4"}, "must be two numbers >= 1"),
    ("recon-width-odd", {"--recon-width": "48"}, "multiple of 32"),
    ("image-size-indivisible", {"--image-size": "48"}, "must be a multiple of 128"),
    ("crop-size-indivisible", {"--crop-size": "96"}, "--crop-size 96 must be a multiple of 128"),
    ("crop-size-over-image", {"--crop-size": "256"}, "at most --image-size 128"),
    ("preset-unknown", {"--preset": "gpu"}, "'gpu' is not one of"),
    ("paper-without-weights", {"--preset": "paper"}, "needs --backbone-weights FILE"),
    ("backbone-unknown", {"--backbone": "resnet9000"}, "not a timm model name"),
    ("backbone-weights-missing", {"--backbone-weights": "{base}/w.pth"}, "no such file"),
    ("out-is-a-file", {"--out": "{afile}"}, "is a file, not a folder"),
    ("out-remote", {"--out": "s3://bucket/run"}, "must be a local path"),
    ("device-unknown", {"--device": "tpu"}, "'tpu' is not one of"),
    ("foreground-unknown", {"--foreground": "middle"}, "'middle' is not one of"),
    ("unknown-option", {"--colour": "red"}, "No such option '--colour'"),
    ("category-missing", {"--category": None}, "Missing option '--category'"),
]


def expand(value: str, env: dict[str, Path], out: Path) -> str:
    return value.format(out=out, **env)


def invoke(command, args: list[str]):
    return CliRunner().invoke(command, args)


def assert_one_line_error(res, prog: str, fragment: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in res.output and res.stdout == ""


@pytest.mark.parametrize(
    ("case", "changes", "fragment"), TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES]
)
def test_realnet_train_bad_input(env, tmp_path, case, changes, fragment):
    out = tmp_path / "run"
    opts = {**TRAIN_OK, **changes}
    args = [x for k, v in opts.items() if v is not None for x in (k, expand(v, env, out))]
    res = invoke(train_main, args)
    assert_one_line_error(res, "realnet-train", expand(fragment, env, out))
    assert not out.exists()


def test_realnet_train_resume_refuses_a_crafted_checkpoint_without_running_it(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(env["crafted"].read_bytes())
    args = [x for k, v in TRAIN_OK.items() for x in (k, expand(v, env, out))]
    res = invoke(train_main, [*args, "--resume"])
    assert_one_line_error(res, "realnet-train", "is not a RealNet checkpoint")
    assert not (env["base"] / "PWNED").exists()
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_realnet_train_cuda_without_a_gpu(env, tmp_path):
    out = tmp_path / "run"
    args = [x for k, v in TRAIN_OK.items() for x in (k, expand(v, env, out))]
    res = invoke(train_main, [*args, "--device", "cuda"])
    assert_one_line_error(res, "realnet-train", "no CUDA device is visible")
    assert not out.exists()


EVAL_CASES = [
    ("checkpoint-missing", ["--checkpoint", "{base}/nope.pt"], "no such file"),
    ("checkpoint-is-a-folder", ["--checkpoint", "{base}"], "is a folder, not a file"),
    ("checkpoint-crafted-pickle", ["--checkpoint", "{crafted}"], "is not a RealNet checkpoint"),
    (
        "checkpoint-crafted-pickle-2",
        ["--checkpoint", "{crafted2}"],
        "Unsupported global: GLOBAL io.open)",
    ),
    (
        "checkpoint-crafted-torch-zip",
        ["--checkpoint", "{crafted_zip}"],
        "Unsupported global: GLOBAL io.open)",
    ),
    ("checkpoint-foreign-dict", ["--checkpoint", "{foreign}"], "is not a RealNet checkpoint"),
    ("checkpoint-garbage", ["--checkpoint", "{garbage}"], "is not a RealNet checkpoint"),
    ("data-missing", ["--data", "{base}/nope"], "no such folder"),
    ("category-unknown", ["--category", "screw"], "--category screw: no folder {data}/screw"),
    ("test-only-good", ["--data", "{only_good}"], "needs both good and defective images"),
    ("panels-negative", ["--panels", "-1"], "must be >= 0"),
    ("batch-size-zero", ["--batch-size", "0"], "must be >= 1"),
    ("out-is-a-file", ["--out", "{afile}"], "is a file, not a folder"),
]


@pytest.mark.parametrize(("case", "change", "fragment"), EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_realnet_eval_bad_input(env, tmp_path, case, change, fragment):
    out = tmp_path / "eval"
    opts = {"--checkpoint": "{ckpt}", "--data": "{data}", "--out": "{out}"}
    opts[change[0]] = change[1]
    args = [x for k, v in opts.items() for x in (k, expand(v, env, out))]
    res = invoke(eval_main, args)
    assert_one_line_error(res, "realnet-eval", expand(fragment, env, out))
    assert not out.exists()
    assert not (env["base"] / "PWNED").exists()


PREDICT_CASES = [
    ("no-input", [], "give at least one INPUT"),
    ("input-missing", ["{base}/nope.png"], "no such file"),
    ("input-not-an-image", ["{afile}"], "is not an image"),
    ("input-empty-folder", ["{empty}"], "no images"),
    ("input-bad-url", ["http://example.com/a.png"], "unsupported URL"),
    ("checkpoint-crafted-pickle", ["{image}", "--checkpoint", "{crafted}"], "not a RealNet"),
    ("checkpoint-uncalibrated", ["{image}", "--checkpoint", "{uncalibrated}"], "--threshold"),
    ("threshold-nan", ["{image}", "--threshold", "nan"], "'nan' must be finite"),
    ("target-fpr-one", ["{image}", "--target-fpr", "1"], "must be > 0 and < 1"),
    ("target-fpr-nan", ["{image}", "--target-fpr", "nan"], "must be > 0 and < 1"),
    ("threshold-and-fpr", ["{image}", "--threshold", "0.5", "--target-fpr", "0.1"], "not both"),
    ("batch-size-zero", ["{image}", "--batch-size", "0"], "must be >= 1"),
    ("out-is-a-file", ["{image}", "--out", "{afile}"], "is a file, not a folder"),
]


@pytest.mark.parametrize(
    ("case", "extra", "fragment"), PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES]
)
def test_realnet_predict_bad_input(env, tmp_path, case, extra, fragment):
    out = tmp_path / "pred"
    args = ["--checkpoint", str(env["ckpt"]), "--out", str(out)]
    args += [expand(a, env, out) for a in extra]
    res = invoke(predict_main, args)
    assert_one_line_error(res, "realnet-predict", expand(fragment, env, out))
    assert not out.exists()
    assert not (env["base"] / "PWNED").exists()


def test_real_process_prints_one_line_on_stderr(env, tmp_path):
    """Outside CliRunner too: a real process, exit 2, one stderr line, nothing created."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "realnet_train.cli", "--category", "bottle"]
    cmd += ["--data", str(env["data"]), "--sia", str(env["sia"]), "--out", str(out)]
    res = subprocess.run([*cmd, "--strengths", "nan"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "realnet-train: error: --strengths 'nan': strengths must be finite and in [0, 1]"
    ]
    assert not out.exists()


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """Control for the refusals above: plain unpickling of the same bytes does run code."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps({"model": Exploit(marker)}))
    assert marker.exists()


@pytest.mark.parametrize(
    ("entry", "args"),
    [
        ("realnet_train.cli:train_main", ["--category", "bottle", "--data", "NOPE", "--out", "o"]),
        ("realnet_train.cli:train_main", ["--category", "bottle", "--data", "DATA", "--out", "o"]),
        ("realnet_train.cli:eval_main", ["--checkpoint", "NOPE.pt", "--data", "DATA"]),
        ("realnet_train.predict:main", ["--checkpoint", "NOPE.pt", "--out", "o", "DATA"]),
        ("realnet_train.predict:main", ["--checkpoint", "x.pt", "--out", "o", "NOPE"]),
    ],
)
def test_a_refused_path_is_answered_before_torch_is_imported(entry, args, shared_data, tmp_path):
    # torch (and timm) take ~0.9 GB and seconds to import: a mistyped path is answered without.
    data = str(shared_data / "mvtec_ad")
    argv = [data if a == "DATA" else str(tmp_path / a) if a in ("NOPE", "o") else a for a in args]
    argv = [str(tmp_path / a) if a.endswith(".pt") else a for a in argv]
    module, func = entry.split(":")
    code = (
        "import sys, importlib\n"
        f"cmd = getattr(importlib.import_module({module!r}), {func!r})\n"
        f"try:\n    cmd.main({argv!r})\nexcept SystemExit as e:\n    status = e.code\n"
        "print('torch' in sys.modules, 'timm' in sys.modules, status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["False", "False", "2"], proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and not (tmp_path / "o").exists()
