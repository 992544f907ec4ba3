"""bench/realnet_quality.py's bookkeeping: the PatchCore fit estimate, its bound, its table rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from bench_helpers import load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    return load_bench("realnet_quality")


def fit(n_train: int, ratio: float, coreset_s: float) -> dict:
    """The fields of a patchcore_baseline.py JSON that the estimate reads."""
    return {
        "n_train_good": n_train,
        "coreset_s": coreset_s,
        "settings": {"coreset_sampling_ratio": ratio},
    }


def test_estimate_scales_with_square_of_images_and_ratio(quality):
    earlier = [fit(200, 0.01, 400.0), fit(400, 0.001, 80.0), fit(100, 0.01, None)]
    # per n^2 * ratio: 400 / 400 = 1.0 and 80 / 160 = 0.5; the fastest (0.5) is used
    assert quality.coreset_estimate_s(800, 0.01, earlier) == pytest.approx(0.5 * 800**2 * 0.01)
    assert quality.coreset_estimate_s(800, 0.01, [fit(100, 0.01, None)]) is None
    assert quality.coreset_estimate_s(800, 0.01, []) is None


@pytest.fixture
def category(quality, tmp_path, monkeypatch):
    """A 300-image category, a PatchCore tool that must not run, and the bench's arguments."""
    tool = tmp_path / "patchcore_baseline.py"
    tool.write_text("raise SystemExit('must not run')\n")
    monkeypatch.setattr(quality, "PATCHCORE_TOOL", tool)
    good = tmp_path / "cat" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(300):
        (good / f"{i:03d}.png").write_bytes(b"")
    return argparse.Namespace(
        patchcore="auto",
        patchcore_coreset_ratio=0.01,
        patchcore_timeout_s=60.0,
        patchcore_venv=str(tmp_path / "venv"),
        runs=str(tmp_path / "runs"),
    )


def test_memory_of_the_coreset_selection(quality, category, tmp_path, monkeypatch):
    # magnetic_tile's 762 images at 1 %: 780,288 patches x 7,802 selections x 4 bytes
    assert quality.coreset_memory_bytes(762, 0.01) == 4.0 * 780288 * 7802
    assert quality.coreset_memory_bytes(762, 0.001) < quality.coreset_memory_bytes(762, 0.01) / 9
    monkeypatch.setattr(quality, "physical_memory_bytes", lambda: 2**32)
    res = quality.run_patchcore(tmp_path / "cat", tmp_path / "pc.json", category, [])
    # 300 x 1,024 patches x 3,072 selections x 4 bytes = 3.5 GiB > 80 % of 4 GiB
    assert res["unavailable"].startswith("not run: its coreset selection (300 train images")
    assert "would grow to about 3.5 GiB, this machine has 4.0;" in res["unavailable"]
    assert not (tmp_path / "venv").exists() and not (tmp_path / "runs").exists()


def test_fit_over_the_timeout_is_refused_before_it_starts(quality, category, tmp_path):
    args = category
    out = tmp_path / "pc.json"
    res = quality.run_patchcore(tmp_path / "cat", out, args, [fit(100, 0.01, 10.0)])
    # 300 images: 9 x the 10 s of 100 images = 90 s > 60 s
    assert res["unavailable"].startswith("not run: its coreset selection (300 train images")
    assert "--patchcore-timeout-s 60" in res["unavailable"]
    assert not out.exists() and not (tmp_path / "venv").exists()
    args.patchcore = "off"
    assert quality.run_patchcore(tmp_path / "cat", out, args, []) == {
        "unavailable": "not run (--patchcore off)"
    }


def test_table_rows_name_size_and_coreset(quality):
    pc = {
        "bottle": {
            "image_auroc": 1.0,
            "pixel_auroc": 0.987,
            "pro": 0.94,
            "fit_s": 2266.0,
            "model_ms_per_image_batch1": 46.3,
            "image_size": 256,
            "coreset_ratio": 0.001,
        },
        "screw": {"unavailable": "not run (--patchcore off)"},
    }
    meta = {"preset": "cpu", "steps": 1500, "seeds": [0], "threads": 2, "machine": "m"}
    table = quality.markdown([], pc, {**meta, "sources_note": "dtd = x"})
    assert "| bottle | PatchCore (256 px, coreset 0.1%) | 1.000 | 0.987 | 0.940 |" in table
    assert "| screw | PatchCore | not run (--patchcore off) |" in table


def test_a_finished_sia_set_of_more_categories_is_reused(quality, tmp_path, monkeypatch):
    import json

    calls = []
    monkeypatch.setattr(quality.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    spec = {"categories": ["bottle", "magnetic_tile"], "per_category": 192}
    (tmp_path / "index.json").write_text(json.dumps({"spec": spec}))
    assert quality.make_sia(tmp_path, ["magnetic_tile"], 192) == tmp_path
    assert calls == []  # nothing generated
    # Another size, or a category it lacks: sia-gen writes a folder of that spec beside it
    # (at the same folder it would refuse the other spec).
    root = tmp_path / "sia-m"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"spec": spec}))
    assert quality.make_sia(root, ["magnetic_tile"], 64) == tmp_path / "sia-m-magnetic_tile-64"
    assert quality.make_sia(root, ["screw"], 192) == tmp_path / "sia-m-screw-192"
    assert len(calls) == 2 and all("sia_pipeline.cli.gen" in c for c in calls)
    assert [c[c.index("--out") + 1] for c in calls] == [
        str(tmp_path / "sia-m-magnetic_tile-64"),
        str(tmp_path / "sia-m-screw-192"),
    ]
    # One being written for this very spec (spec.json, no index yet) is resumed in place.
    (tmp_path / "sia-m-screw-192").mkdir()
    (tmp_path / "sia-m-screw-192" / "spec.json").write_text(
        json.dumps({"spec": {"categories": ["screw"], "per_category": 192}})
    )
    assert quality.make_sia(tmp_path / "sia-m-screw-192", ["screw"], 192).name == "sia-m-screw-192"


def test_rows_are_reused_only_when_the_run_would_be_the_same(quality, tmp_path):
    from PIL import Image

    for name, size in (("square", (64, 64)), ("wide", (128, 64))):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / name / "train" / "good" / "a.png")
        Image.new("RGB", size).save(tmp_path / name / "train" / "good" / "b.png")
    assert quality.all_square(tmp_path / "square") and not quality.all_square(tmp_path / "wide")

    settings = {"preset": "cpu", "steps": 1500, "image_size": 128, "crop_size": None}
    squash = {**settings, "lr_schedule": "constant", "resize": "squash"}
    runs = [{"category": c, "source": "dtd", "seed": 0} for c in ("square", "wide")]
    before = {"meta": {**settings, "lr_schedule": "constant"}, "runs": runs}  # letterbox then
    is_square = {"square": True, "wide": False}.get
    assert quality.reusable_rows(before, {**squash, "resize": "letterbox"}, is_square) == runs
    kept = quality.reusable_rows(before, squash, is_square)
    assert kept == [{**runs[0], "resize": "letterbox"}]  # the wide category trains again
    assert quality.reusable_rows(before, {**squash, "steps": 10}, is_square) == []
    finer = {**squash, "levels": [0, 1, 2, 3], "afs_keep": [16, 24, 40, 56]}
    assert quality.reusable_rows(before, finer, is_square) == []  # files before --levels: 1-4
    cpu_levels = {"levels": [1, 2, 3, 4], "afs_keep": [24, 40, 56, 40]}
    assert quality.reusable_rows(before, {**squash, **cpu_levels}, is_square) == kept

    note = quality.reuse_note([*kept, {**runs[1], "from_tag": "t"}], squash)
    assert "square (1 runs) run with --resize letterbox" in note
    assert "wide (1 runs) run alike, taken from t.json" in note and "are square" in note
    assert quality.reuse_note(runs, squash) == ""


def test_sia_for_a_category_the_bundled_model_lacks_is_refused_up_front(tmp_path):
    import subprocess

    (tmp_path / "data" / "screw" / "train" / "good").mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "bench" / "realnet_quality.py"), "--data"]
    cmd += [str(tmp_path / "data"), "--categories", "screw", "--sources", "sia,dtd"]
    cmd += ["--runs", str(tmp_path / "runs"), "--tag", "never-written"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    assert "knows bottle, magnetic_tile, not screw: give --sia ROOT" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "runs").exists()
    assert not (ROOT / "bench" / "results" / "never-written.json").exists()
    # --reuse of this run's own tag would copy its panels onto themselves: refused too.
    cmd[cmd.index("--sources") + 1] = "dtd"
    res = subprocess.run(
        [*cmd, "--reuse", "realnet_quality", "--tag", "realnet_quality"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "that is this run's own --tag" in res.stderr


def test_per_type_table_averages_seeds(quality):
    runs = [
        {"category": "tile", "source": "sia", "seed": s, "image_auroc": a, "pixel_auroc": None}
        | {"pro": None, "train_s": 1.0, "steps": 10, "model_ms_per_image_batch1": 1.0}
        | {"image_auroc_per_type": {"crack": a - 0.1, "break": a}}
        for s, a in ((0, 0.8), (1, 0.9))
    ]
    summary = quality.summarise(runs)
    assert summary[0]["image_auroc_per_type"] == pytest.approx({"break": 0.85, "crack": 0.75})
    lines = quality.per_type_table(summary)
    assert "| source | break | crack |" in lines and "| sia | 0.850 | 0.750 |" in lines
    assert (
        quality.per_type_table(quality.summarise([{**runs[0], "image_auroc_per_type": {}}])) == []
    )


def test_sia_settings_name_the_sia_and_old_rows_are_the_legacy_one(quality, tmp_path, monkeypatch):
    import json

    legacy = quality.sia_setting(192)
    assert legacy == quality.LEGACY_SIA and quality.setting_slug(legacy) == ""
    late = quality.sia_setting(1000, "0.10:0.20", "ddim", 20, 500)
    assert late["strengths"] == "0.1:0.2"  # canonical, as sia-gen's spec hash
    assert quality.setting_slug(late) == "-ddim20-s0.1_0.2-n1000-t500"
    assert quality.describe_setting(late) == (
        "--per-category 1000 --strengths 0.1:0.2 --sampler ddim --steps 20 --strength-min-t 500"
    )
    assert quality.describe_setting(legacy) == "--per-category 192 --strengths 0.1:0.5"
    with pytest.raises(quality.PlanError):
        quality.sia_setting(192, "0.5:0.1")
    # A spec as sia-gen writes it (strength_min_t only when not 0).
    spec = {"per_category": 1000, "strengths": {"spec": "0.1:0.2"}, "sampler": "ddim"}
    assert quality.setting_of_spec({**spec, "steps": 20, "strength_min_t": 500}) == late
    assert quality.setting_of_spec({**spec, "per_category": 192, "sampler": "ddpm"}) == {
        **legacy,
        "strengths": "0.1:0.2",
    }
    # Rows from before carry no setting: they are the legacy one; rows without SIA have none.
    rows = [{"source": "sia", "seed": 0}, {"source": "dtd", "seed": 0}]
    assert [quality.setting_of_row(r) for r in rows] == [legacy, None]
    assert quality.setting_clash({"runs": rows}, legacy) is None
    assert quality.setting_clash({"runs": rows}, late) == legacy
    assert quality.setting_clash({"runs": [rows[1]]}, late) is None
    assert quality.setting_clash({"runs": [{**rows[0], "sia_setting": late}]}, late) is None

    # make_sia: sia-gen gets the setting's flags; a dataset of another setting is not reused.
    calls = []
    monkeypatch.setattr(quality.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    root = tmp_path / "sia-m"
    root.mkdir()
    made = {"categories": ["magnetic_tile"], "per_category": 1000, "sampler": "ddim"}
    made |= {"steps": 20, "strengths": {"spec": "0.1:0.2"}}
    (root / "index.json").write_text(json.dumps({"spec": made}))
    assert quality.make_sia(root, ["magnetic_tile"], 1000, late) == tmp_path / (
        "sia-m-magnetic_tile-1000"
    )  # the one there lacks --strength-min-t 500
    cmd = calls[-1]
    assert cmd[cmd.index("--strength-min-t") + 1] == "500"
    assert cmd[cmd.index("--sampler") + 1] == "ddim" and cmd[cmd.index("--steps") + 1] == "20"
    assert cmd[cmd.index("--strengths") + 1] == "0.1:0.2"
    made["strength_min_t"] = 500
    (root / "index.json").write_text(json.dumps({"spec": made}))
    assert quality.make_sia(root, ["magnetic_tile"], 1000, late) == root
    assert len(calls) == 1


def test_another_sia_setting_in_the_same_results_file_is_refused(tmp_path):
    """bench/results/realnet_quality.json holds SIA rows of the legacy setting: a run of
    another is refused up front (nothing made, nothing written) and told to use a --tag."""
    import json
    import subprocess

    results = ROOT / "bench" / "results" / "realnet_quality.json"
    if not results.is_file():
        pytest.skip("bench/results/realnet_quality.json is absent")
    before = results.read_bytes()
    assert any(r["source"] == "sia" for r in json.loads(before)["runs"])
    cmd = [sys.executable, str(ROOT / "bench" / "realnet_quality.py"), "--categories"]
    cmd += ["magnetic_tile", "--sources", "sia", "--runs", str(tmp_path / "runs")]
    cmd += ["--sia-strengths", "0.1:0.2", "--sia-strength-min-t", "500"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    last = res.stderr.splitlines()[-1]
    assert "realnet_quality.json holds SIA rows made with --per-category 192" in last
    assert "--tag realnet_quality-ddpm20-s0.1_0.2-n192-t500" in last
    assert not (tmp_path / "runs").exists() and results.read_bytes() == before
    # The SIA-making flags do not apply to a dataset given with --sia.
    res = subprocess.run(
        [*cmd, "--sia", str(tmp_path), "--tag", "never-written"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "--sia-strengths sets up the SIA made here" in res.stderr
    assert not (ROOT / "bench" / "results" / "never-written.json").exists()
