"""Property test: every command, driven with hostile option values, answers 0, 1 or 2.

For each of the ten console scripts, hypothesis replaces one or two options of a cheap base
command line with values from a hostile pool (negative, zero, huge, NaN, inf, empty, odd
unicode, paths to files, folders, symlink loops, the inputs themselves) or random text, and
checks: exit 0, 1 or 2; no traceback; exit 2 is one line and leaves every file and folder
as it was. The bases are chosen so that a run the values leave valid stays small (sia-gen
--dry-run, 32 px exports of two images, one-step previews) or is refused at its last check
(realnet-train without an anomaly source, checkpoints that are not checkpoints): nothing
here trains. Runs in-process through click's ``CliRunner``; a sampled few run as real
processes under an address-space cap, their peak RSS measured (``os.wait4``).
Examples are derandomized: the same ones every run.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import mvtec_subset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_inputs import BIN, MEMORY_CAP, run_capped

HOSTILE = (
    "-1",
    "0",
    "1",
    " 3 ",
    "0.5",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "-inf",
    "",
    "   ",
    "\uff11",  # a fullwidth 1: int() reads it
    "\u0663",  # an Arabic-Indic 3
    "99999999999999999999",
    "0x10",
    "1:0",
    "0.2:inf",
    "-0.5:0.2",
    "a:b",
    "0,nan",
    "\u202e\u00e9/\u00fc",
    "{file}",
    "{dir}",
    "{loop}",
    "{loop}/x",
    "{missing}",
    "{root}",
    "{root}/shards",
    "{model}",
    "{file}/x",
)
PLACES = {
    "{file}": "afile.txt",
    "{dir}": "emptydir",
    "{loop}": "loop",
    "{missing}": "missing/x",
    "{root}": "sia",
    "{model}": "model",
}
ARG0 = "ARG0"  # the first positional argument

# command -> (module path of its click command, base args, options hypothesis may replace)
COMMANDS = {
    "sia-gen": (
        "sia_pipeline.cli.gen:main",
        ["--model", "model", "--categories", "bottle", "--per-category", "2"]
        + ["--shard-size", "2", "--steps", "1", "--batch-size", "1", "--out", "{new}", "--dry-run"],
        ["--strengths", "--per-category", "--shard-size", "--seed", "--steps", "--eta"]
        + ["--batch-size", "--max-in-flight", "--lease-ttl", "--ray-timeout", "--out"]
        + ["--progress-interval", "--classifier-scale", "--model", "--categories"],
    ),
    "sia-export": (
        "sia_pipeline.cli.export:main",
        ["sia", "--data", "mvtec", "--category", "bottle", "--out", "{new}", "--workers", "0"]
        + ["--image-size", "32", "--no-progress"],
        [ARG0, "--data", "--out", "--per-image", "--image-size", "--strengths", "--seed"]
        + ["--textures", "--category"],
    ),
    "sia-inspect": (
        "sia_pipeline.cli.inspect:main",
        ["sia"],
        [ARG0, "--key", "--out-dir", "--batch-size", "--model"],
    ),
    "sia-publish": (
        "sia_pipeline.cli.publish:main",
        ["sia"],
        [ARG0, "--threads", "--previews-per-bin"],
    ),
    "sia-preview": (
        "sia_pipeline.cli.preview:main",
        ["--model", "model", "--steps", "1", "--per-strength", "1", "--strengths", "0"]
        + ["--out", "{new}.png", "--device", "cpu"],
        ["--strengths", "--per-strength", "--steps", "--seed", "--scale", "--out", "--model"]
        + ["--classifier-scale", "--device"],
    ),
    "sia-convert-adm": (
        "sia_pipeline.cli.convert_adm:main",
        ["afile.txt", "--out", "{new}"],
        [ARG0, "--out", "--image-size", "--model-channels", "--channel-mult"]
        + ["--num-res-blocks", "--attention-resolutions", "--num-head-channels"],
    ),
    "sia-train-diffusion": (
        "sia_pipeline.cli.train_diffusion:main",
        ["--data", "mvtec", "--categories", "nosuch", "--out", "{new}", "--preset", "tiny-cpu"]
        + ["--steps", "1"],
        ["--data", "--out", "--resolution", "--steps", "--batch-size", "--lr", "--ema-decay"]
        + ["--checkpoint-every", "--grad-accumulation", "--grad-clip", "--seed", "--init-from"],
    ),
    "realnet-train": (
        "realnet_train.cli:train_main",
        ["--category", "bottle", "--data", "mvtec", "--out", "{new}"],
        ["--category", "--data", "--out", "--image-size", "--crop-size", "--batch-size"]
        + ["--steps", "--time-budget", "--lr", "--workers", "--seed", "--holdout"]
        + ["--target-fpr", "--strengths", "--mix", "--levels", "--afs-keep", "--rrs-counts"],
    ),
    "realnet-eval": (
        "realnet_train.cli:eval_main",
        ["--checkpoint", "afile.txt", "--data", "mvtec", "--out", "{new}"],
        ["--checkpoint", "--data", "--category", "--out", "--panels", "--batch-size"],
    ),
    "realnet-predict": (
        "realnet_train.predict:main",
        ["--checkpoint", "afile.txt", "mvtec", "--out", "{new}"],
        [ARG0, "--checkpoint", "--out", "--threshold", "--target-fpr", "--batch-size"],
    ),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_sia, tiny_model, shared_data) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(tiny_sia, root / "sia")
    (root / "model").symlink_to(tiny_model)
    mvtec_subset(shared_data, root / "mvtec", 2)
    (root / "afile.txt").write_text("not a folder, not a checkpoint")
    (root / "emptydir").mkdir()
    (root / "loop").symlink_to(root / "loop")
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, mtime) and folder under ``root``, symlinks not followed."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.join(dirpath, d)] = ("dir",)
        for n in names:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


_fresh = itertools.count()


def build_args(base: list[str], changes: list[tuple[str, str]]) -> list[str]:
    args = list(base)
    for option, value in changes:
        if option == ARG0:
            args[0] = value
        elif option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    n = next(_fresh)
    out = []
    for a in args:
        for k, v in PLACES.items():
            a = a.replace(k, v)
        out.append(a.replace("{new}", f"out-{n}"))
    return out


def changes_for(options: list[str]):
    pool = st.sampled_from(HOSTILE)
    value = st.one_of(pool, pool, pool, st.text(max_size=6))  # mostly the pool
    return st.lists(st.tuples(st.sampled_from(options), value), min_size=1, max_size=2)


def load(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hostile_options_answer_0_1_or_2(command, workspace):
    target, base, options = COMMANDS[command]
    main = load(target)

    @settings(
        max_examples=10,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(changes=changes_for(options))
    def check(changes):
        args = build_args(base, changes)
        before = snapshot(workspace)
        here = os.getcwd()
        os.chdir(workspace)
        try:
            result = CliRunner().invoke(main, args)
        finally:
            os.chdir(here)
        why = f"{command} {args}: exit {result.exit_code}\n{result.output}"
        assert result.exit_code in (0, 1, 2), why
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            why,
            result.exception,
        )
        assert "Traceback" not in result.output, why
        if result.exit_code == 2:
            assert len(result.stderr.strip().splitlines()) == 1, why
            assert snapshot(workspace) == before, f"{why}\nexit 2 changed the workspace"

    check()


@pytest.mark.skipif(not (BIN / "sia-export").exists(), reason="console scripts not installed")
@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    command=st.sampled_from(["sia-export", "sia-gen", "sia-publish"]),
    data=st.data(),
)
def test_hostile_options_in_a_real_process_stay_small(command, data, workspace):
    _, base, options = COMMANDS[command]
    changes = data.draw(changes_for(options))
    args = build_args(base, changes)
    before = snapshot(workspace)
    code, err, rss = run_capped([command, *args], workspace, timeout=120)
    assert code in (0, 1, 2) and "Traceback" not in err, (args, code, err)
    assert rss < MEMORY_CAP, f"{args}: peak RSS {rss / 2**20:.0f} MB"
    if code == 2:
        assert snapshot(workspace) == before, (args, err)
