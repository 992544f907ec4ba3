"""``sia-gen --extend``: grow --per-category in place; earlier shards untouched, new shards
equal to a fresh run's, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sia_pipeline.format.spec import shard_ranges
from sia_pipeline.format.v1 import ShardStats
from sia_pipeline.gen.generate import GenError, generate
from sia_pipeline.publish.publish import publish

ARGS = dict(categories="bottle", shard_size=3, steps=2, batch_size=2, workers=1, progress=False)


def _gen(model: Path, out: Path, per_category: int, **kw):
    return generate(model=str(model), out=str(out), per_category=per_category, **ARGS | kw)


def _files(root: Path, suffix: str) -> dict[str, tuple[int, bytes]]:
    return {
        p.name: (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted((root / "shards" / "bottle").glob(f"*{suffix}"))
    }


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model, ray_local):
    """(6-image root before, the same root extended to 12, a fresh 12-image root)."""
    base = tmp_path_factory.mktemp("extend")
    root = base / "grown"
    _gen(tiny_model, root, 6)
    before = _files(root, ".tar"), _files(root, ".json")
    report = _gen(tiny_model, root, 12, extend=True)
    fresh = base / "fresh"
    _gen(tiny_model, fresh, 12)
    return before, report, root, fresh


def test_shard_ranges_keep_earlier_layers():
    assert shard_ranges(12, 3) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert shard_ranges(12, 4, (6,)) == [(0, 4), (4, 6), (6, 10), (10, 12)]
    assert shard_ranges(12, 4) == [(0, 4), (4, 8), (8, 12)]


def test_extend_appends_and_leaves_old_shards(grown):
    (tars, stats), report, root, _ = grown
    assert report.shards_skipped == 2 and report.shards_written == 2
    after = _files(root, ".tar")
    assert sorted(after) == [f"bottle-{i:06d}.tar" for i in range(4)]
    for name, (mtime, data) in tars.items():  # untouched: same bytes, never rewritten
        assert after[name] == (mtime, data), name
    index = json.loads((root / "index.json").read_text())
    assert index["num_samples"] == 12 and index["spec"]["extends"] == [6]
    assert index["spec"]["per_category"] == 12 and "--extend" in index["command"]
    new_stats = {n: ShardStats.from_json(d) for n, (_, d) in _files(root, ".json").items()}
    for name, (_, data) in stats.items():  # only the spec hash moved
        old = ShardStats.from_json(data)
        assert old.spec_hash != index["spec_hash"] == new_stats[name].spec_hash
        assert old.samples == new_stats[name].samples and old.sha256 == new_stats[name].sha256
    assert not publish(str(root)).bad


def test_extended_equals_fresh_run_bit_for_bit(grown):
    _, _, root, fresh = grown
    ext, new = _files(root, ".tar"), _files(fresh, ".tar")
    assert sorted(ext) == sorted(new)
    assert all(ext[n][1] == new[n][1] for n in ext)  # old and new shards alike
    rows = [json.loads(p.read_text())["samples"] for p in sorted(fresh.glob("shards/*/*.json"))]
    rows_ext = [json.loads(p.read_text())["samples"] for p in sorted(root.glob("shards/*/*.json"))]
    assert rows == rows_ext


def test_rerun_of_an_extended_dataset_writes_nothing(grown, tiny_model):
    _, _, root, _ = grown
    for extend in (True, False):
        report = _gen(tiny_model, root, 12, extend=extend)
        assert report.shards_written == 0 and not report.indexed


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"per_category": 3}, "has 12 images per category; --per-category 3 would shrink it"),
        ({"per_category": 15, "seed": 1}, r"was made with seed=0 \(this run: 1\)"),
        ({"per_category": 15, "shard_size": 5}, "shard_size=3 .*only --per-category may change"),
    ],
)
def test_extend_refuses_other_changes(grown, tiny_model, kw, match):
    _, _, root, _ = grown
    per = kw.pop("per_category")
    with pytest.raises(GenError, match=match):
        _gen(tiny_model, root, per, extend=True, **kw)


def test_extend_needs_a_dataset(tiny_model, tmp_path):
    with pytest.raises(GenError, match="--extend: .* holds no dataset to extend"):
        _gen(tiny_model, tmp_path / "empty", 6, extend=True)
    assert not (tmp_path / "empty").exists()
