"""Issue 25's probes as regression tests: every bad input is one line, exit 2, nothing written.

The shared checks (:mod:`sia_pipeline.io.inputs`), the metadata validator
(:mod:`sia_pipeline.format.schema`), and each command's answer to the examples the issue
lists. A few run as real processes, to measure their peak memory (``os.wait4``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import mvtec_subset

from sia_pipeline.format.schema import INDEX, SPEC, load_json, validate
from sia_pipeline.format.v1 import FormatError, list_shards
from sia_pipeline.io.inputs import (
    InputError,
    check_input,
    check_memory,
    check_output,
    parse_strength_range,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MEMORY_CAP = 2 << 30  # bytes of peak RSS a refusal may take (importing torch: about 0.7 GB)


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (to see what a command wrote)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def work(tmp_path, tiny_sia, tiny_model, shared_data) -> Path:
    """A folder with an SIA dataset, a model, MVTec-layout data, a file and a symlink loop."""
    shutil.copytree(tiny_sia, tmp_path / "sia")
    (tmp_path / "model").symlink_to(tiny_model)
    mvtec_subset(shared_data, tmp_path / "mvtec", 2)
    (tmp_path / "afile.txt").write_text("not a folder")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


def invoke(main, args: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)


def refused(result, text: str) -> str:
    """Exit 2, one line ``PROG: error: ...`` holding ``text``, no traceback."""
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert ": error: " in err and text in err, err
    return err


# --- the shared checks -----------------------------------------------------------------


def test_paths_refused_with_the_reason(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    cases = [
        (lambda: check_input(str(tmp_path / "loop"), "ROOT"), "symlink loop"),
        (lambda: check_input(str(tmp_path / "f"), "ROOT"), "is a file, not a folder"),
        (lambda: check_input(str(tmp_path / "d"), "--ckpt", "file"), "is a folder, not a file"),
        (lambda: check_input(str(tmp_path / "none"), "ROOT"), "no such folder"),
        (lambda: check_input("", "ROOT"), "is empty"),
        (lambda: check_input("a\x00b", "ROOT"), "not a valid path"),
        (lambda: check_output(str(tmp_path / "loop" / "x"), "--out"), "symlink loop"),
        (lambda: check_output(str(tmp_path / "f" / "x"), "--out"), "is a file"),
        (lambda: check_output(str(tmp_path / "d"), "--out", {"R": str(tmp_path / "d")}), " is R"),
        (lambda: check_output(str(tmp_path / "d/o"), "--out", {"R": str(tmp_path)}), "inside R"),
        (lambda: check_output(str(tmp_path), "--out", {"R": str(tmp_path / "d")}), "R "),
        (lambda: check_output("s3://b/p/q", "--out", {"R": "s3://b/p/"}), "inside R"),
    ]
    for call, text in cases:
        with pytest.raises(InputError, match=text):
            call()
    check_output(str(tmp_path / "new"), "--out", {"R": str(tmp_path / "d")})  # a sibling: fine
    check_output(str(tmp_path), "--out-dir", {"R": str(tmp_path / "d")}, holds_inputs=True)
    check_output("s3://b/pq", "--out", {"R": "s3://b/p"})  # a prefix of the name, not a folder


def test_strength_ranges_are_finite_and_in_the_papers_range():
    assert parse_strength_range("0.1:0.5") == (0.1, 0.5)
    assert parse_strength_range("0.3") == (0.3, 0.3)
    assert parse_strength_range(None) is None
    for bad in ("-0.5:0.2", "0.2:inf", "nan", "2:3", "0.5:0.1", "a:b", "0:1e308"):
        with pytest.raises(InputError, match="--strengths"):
            parse_strength_range(bad)


def test_memory_estimates_name_the_limit():
    with pytest.raises(InputError, match=r"needs about .* the limit is"):
        check_memory(1e18, "--image-size 1000000")
    check_memory(1 << 20, "a small thing")


# --- the validator ---------------------------------------------------------------------


def test_untrusted_json_refuses_nan_infinity_and_deep_nesting():
    for text in ('{"a": NaN}', '{"a": [Infinity]}', '{"a": -Infinity}', "{x", b"\xff\xfe"):
        with pytest.raises(ValueError, match="is not valid JSON"):
            load_json(text, "f.json")
    with pytest.raises(ValueError, match="nests deeper"):
        load_json("[" * 40 + "]" * 40, "f.json")


def test_index_shard_paths_stay_inside_the_root():
    shard = {"tar": "shards/a/a-000000.tar", "category": "a", "count": 1}
    shard |= {"strength_min": 0.1, "strength_max": 0.2}
    validate({"format_version": 1, "shards": [shard]}, INDEX, "index.json")
    for tar in ("../../../../etc/hostname", "/etc/hostname", "shards/../../x.tar", "s3://b/x"):
        with pytest.raises(ValueError, match=r"index.json: shards\[0\].tar"):
            validate({"format_version": 1, "shards": [shard | {"tar": tar}]}, INDEX, "index.json")
    with pytest.raises(ValueError, match="count must be int"):
        validate({"format_version": 1, "shards": [shard | {"count": "1"}]}, INDEX, "index.json")


SPEC_OK = {
    "model_id": "m",
    "categories": ["bottle"],
    "class_ids": [0],
    "strengths": {"kind": "uniform", "spec": "0.1:0.5", "values": [0.1, 0.5]},
    "per_category": 4,
    "shard_size": 2,
    "seed": 0,
    "sampler": "ddpm",
    "steps": 2,
    "eta": 0.0,
    "image_format": "png",
    "resolution": 32,
}


def test_spec_layout_and_strengths_are_bounded():
    spec = dict(SPEC_OK)
    validate(spec, SPEC, "spec.json")
    bad = {
        "per_category": 10**18,
        "shard_size": 0,
        "steps": 100000,
        "sampler": "euler",
        "categories": ["../x"],
        "strengths": {"kind": "uniform", "spec": "", "values": [-1.0, 0.5]},
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field):
            validate(spec | {field: value}, SPEC, "spec.json")
    with pytest.raises(ValueError, match="shards per category"):
        validate(spec | {"per_category": 10**9, "shard_size": 1}, SPEC, "spec.json")


def test_realnet_reader_refuses_a_shard_outside_the_root(work):
    index = json.loads((work / "sia" / "index.json").read_text())
    index["shards"][0]["tar"] = "../../../../etc/hostname"
    (work / "sia" / "index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="leading out of the root"):
        list_shards(str(work / "sia"))


# --- each command's answer to the examples ---------------------------------------


def test_sia_export_examples(work):
    from sia_pipeline.cli.export import main

    base = ["sia", "--data", "mvtec", "--category", "bottle", "--workers", "0"]
    before = files(work)
    cases = [
        ([*base, "--out", "o", "--image-size", "1000000"], "'--image-size'"),
        ([*base, "--out", "o", "--per-image", "1000000000000"], "'--per-image'"),
        (["afile.txt", *base[1:], "--out", "o"], "SIA_ROOT afile.txt is a file, not a folder"),
        ([*base, "--out", "sia/shards"], "--out sia/shards is inside SIA_ROOT sia"),
        ([*base, "--out", "o", "--strengths", "-0.5:0.2"], "in [0, 1]"),
        ([*base, "--out", "o", "--strengths", "0.2:inf"], "in [0, 1]"),
        (["loop", *base[1:], "--out", "o"], "SIA_ROOT loop: symlink loop"),
        ([*base, "--out", "loop"], "--out loop: symlink loop"),
    ]
    for args, text in cases:
        refused(invoke(main, args, work), text)
    bad = work / "bad" / "bottle" / "train" / "good"
    bad.mkdir(parents=True)
    (bad / "a.png").write_text("not an image")
    (bad / "b.png").write_bytes(b"")
    before = files(work)
    args = ["sia", "--data", "bad", "--category", "bottle", "--workers", "0", "--out", "o"]
    refused(
        invoke(main, args, work), "normal image train/good/a.png is not a decodable PNG/JPEG image"
    )
    assert not (work / "o").exists() and files(work) == before


def test_sia_publish_examples(work):
    from sia_pipeline.cli.publish import main

    refused(invoke(main, ["afile.txt"], work), "ROOT afile.txt is a file, not a folder")
    refused(invoke(main, ["loop"], work), "ROOT loop: symlink loop")
    spec = {"format_version": 1, "spec_hash": "x", "spec": {}}
    for name, text, why in [
        ("huge", None, "per_category must be <= "),
        ("nan", "nan", "is not valid JSON"),
        ("notjson", "{not json", "is not valid JSON"),
    ]:
        root = work / name
        shutil.copytree(work / "sia", root)
        (root / "index.json").unlink()
        doc = json.loads(json.dumps(spec))
        if name == "huge":
            doc["spec"] = SPEC_OK | {"per_category": 10**18, "shard_size": 1}
        body = json.dumps(doc)
        if text == "nan":
            body = body.replace('"spec": {}', '"spec": {"eta": NaN}')
        elif text:
            body = text
        (root / "spec.json").write_text(body)
        before = files(root)
        err = refused(invoke(main, [name], work), why)
        assert "spec.json" in err and "nothing was published" in err
        assert files(root) == before  # no SHA256SUMS, no index, no lease left behind


def test_sia_inspect_and_gen_paths(work):
    from sia_pipeline.cli.gen import main as gen
    from sia_pipeline.cli.inspect import main as inspect

    refused(invoke(inspect, ["loop"], work), "ROOT loop: symlink loop")
    key = "bottle-000000-000000"
    refused(invoke(inspect, ["sia", "--key", key, "--out-dir", "loop"], work), "symlink loop")
    refused(invoke(inspect, ["sia", "--key", key, "--out-dir", "sia/x"], work), "inside ROOT")
    base = ["--model", "model", "--per-category", "2", "--steps", "1", "--dry-run"]
    refused(invoke(gen, [*base, "--out", "loop"], work), "--out loop: symlink loop")
    refused(invoke(gen, [*base, "--out", "model"], work), "--out model is --model model")
    refused(invoke(gen, [*base, "--out", "model/sia"], work), "is inside --model")
    refused(invoke(gen, [*base, "--out", "o", "--strengths", "0.1:1e308"], work), "<= 1")
    assert not (work / "o").exists()


def test_convert_and_preview_examples(work):
    from sia_pipeline.cli.convert_adm import main as convert
    from sia_pipeline.cli.preview import main as preview

    ckpt = "model/unet/diffusion_pytorch_model.safetensors"
    refused(invoke(convert, [ckpt, "--out", "c", "--num-head-channels", "0"], work), ">= 1")
    refused(invoke(convert, [ckpt, "--out", "c", "--image-size", "0"], work), ">= 8")
    refused(invoke(convert, ["mvtec", "--out", "c"], work), "is a folder, not a file")
    base = ["--model", "model", "--out", "p.png"]
    for args, text in [
        (["--per-strength", "0"], "'--per-strength'"),
        (["--steps", "0"], "'--steps'"),
        (["--steps", "100000"], "'--steps'"),
        (["--scale", "0"], "'--scale'"),
        (["--strengths", "2,3"], "in [0, 1]"),
        (["--out", "preview.txt"], ".png, .jpg or .jpeg"),
        (["--out", "loop"], "symlink loop"),
    ]:
        refused(invoke(preview, [*base, *args], work), text)
    assert not (work / "c").exists() and not (work / "p.png").exists()


def test_realnet_predict_never_writes_into_its_input(work):
    from realnet_train.predict import main as predict

    args = ["--checkpoint", "afile.txt", "mvtec/bottle", "--out", "mvtec/bottle/out"]
    refused(invoke(predict, args, work), "--out mvtec/bottle/out is inside INPUT 1 mvtec/bottle")
    assert not (work / "mvtec" / "bottle" / "out").exists()


def test_model_provenance_is_an_absolute_url(tmp_path, tiny_model):
    from sia_pipeline.gen.provenance import model_url

    assert model_url("s3://b/m") == "s3://b/m"
    here = os.getcwd()
    os.chdir(tiny_model.parent)
    try:
        assert model_url(tiny_model.name) == f"file://{tiny_model.resolve()}"
        assert model_url(f"file://{tiny_model}") == f"file://{tiny_model.resolve()}"
    finally:
        os.chdir(here)


# --- real processes: peak memory of the refusals that once ran away ---------------------


def run_capped(args: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS bytes) of one console script, under a 16 GB address
    space cap (a runaway fails instead of taking the machine) and a time cap."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=cap,
        )
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode()
    return p.returncode, text, usage.ru_maxrss * 1024


@pytest.mark.skipif(not (BIN / "sia-export").exists(), reason="console scripts not installed")
def test_runaway_examples_refused_in_little_memory(work):
    root = work / "huge"
    shutil.copytree(work / "sia", root)
    (root / "index.json").unlink()
    spec = SPEC_OK | {"per_category": 10**18, "shard_size": 1}
    doc = {"format_version": 1, "spec_hash": "x", "spec": spec}
    (root / "spec.json").write_text(json.dumps(doc))
    base = ["sia", "--data", "mvtec", "--category", "bottle", "--out", "o", "--workers", "0"]
    before = files(work)
    for args, text in [
        (["sia-export", *base, "--image-size", "1000000"], "--image-size"),
        (["sia-export", *base, "--per-image", "1000000000000"], "--per-image"),
        (["sia-publish", "huge"], "per_category"),
    ]:
        code, err, rss = run_capped(args, work)
        assert code == 2 and text in err and "Traceback" not in err, err
        assert rss < MEMORY_CAP, f"{args}: peak RSS {rss / 2**20:.0f} MB"
    assert files(work) == before
