"""Bad data never kills a run: skipped with a warning naming shard and key, counted, bounded."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from realnet_helpers import damaged_sia, small_mvtec, tiny_model_config

from realnet_train.data.sia_stream import BAD, is_bad, sia_pipeline
from realnet_train.train import TooManyBadSamples, TrainConfig, train
from sia_pipeline.format.v1 import FormatError


@pytest.fixture(scope="module")
def bad_sia(tiny_sia, tmp_path_factory):
    return damaged_sia(tiny_sia, tmp_path_factory.mktemp("bad") / "sia")


@pytest.fixture(scope="module")
def mvtec_with_corrupt_png(shared_data, tmp_path_factory):
    root = small_mvtec(shared_data, tmp_path_factory.mktemp("mvtec"), n_train=10)
    (root / "bottle/train/good/999.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    return root


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_stream_skips_and_names_every_kind_of_bad_sample(bad_sia, caplog):
    root, damage = bad_sia
    with caplog.at_level(logging.WARNING, logger="realnet_train"):
        items = list(sia_pipeline(str(root), ["bottle"], resampled=False, keep_bad=True))
    good = [it["key"] for it in items if not is_bad(it)]
    bad = {it[BAD]["key"]: it[BAD] for it in items if is_bad(it)}
    # shard 0: 6 samples, 3 damaged; shard 1: cut off in the middle of its 4th sample.
    assert good == [f"bottle-000000-00000{i}" for i in (0, 4, 5)] + [
        f"bottle-000001-00000{i}" for i in range(3)
    ]
    assert set(damage) < set(bad)
    assert bad["bottle-000000-000001"]["kind"] == "unreadable"
    assert bad["bottle-000000-000002"]["kind"] == "rejected"
    assert "outside its shard's indexed span [0.1, 0.2]" in bad["bottle-000000-000002"]["reason"]
    assert "'magnetic_tile'" in bad["bottle-000000-000003"]["reason"]
    cut = bad["bottle-000001-000003"]
    assert cut["shard"].endswith("bottle-000001.tar") and "breaks off" in cut["reason"]
    for key, rec in bad.items():  # each warning names the shard and the key
        assert any(rec["shard"] in m and key in m for m in caplog.messages)
    # Without keep_bad the same stream simply leaves them out.
    plain = [it["key"] for it in sia_pipeline(str(root), ["bottle"], resampled=False)]
    assert plain == good


def test_strength_range_with_no_sample_errors_instead_of_hanging(tiny_sia):
    # magnetic_tile's shard spans 0.1-0.5 (samples at 0.1, 0.18, 0.26, ...): 0.19-0.25 has none.
    pipe = sia_pipeline(str(tiny_sia), ["magnetic_tile"], (0.19, 0.25), resampled=True)
    with pytest.raises(FormatError, match="no SIA sample has a strength in"):
        list(itertools.islice(pipe, 1))


def tiny_config(data, sia, out, **kw) -> TrainConfig:
    base = dict(
        category="bottle",
        data=str(data),
        out=str(out),
        sia=str(sia),
        mix="normal=0.0,sia=1.0",
        image_size=32,
        batch_size=4,
        steps=6,
        afs_batches=1,
        checkpoint_every=3,
        num_workers=0,
        model=tiny_model_config(),
    )
    return TrainConfig(**(base | kw))


def test_training_runs_through_bad_data_and_counts_it(
    bad_sia, mvtec_with_corrupt_png, tmp_path, one_thread
):
    root, _ = bad_sia
    out = tmp_path / "run"
    # Each bad sample is reported once, whenever the shuffle buffer lets it out: 12 steps.
    cfg = tiny_config(mvtec_with_corrupt_png, root, out, steps=12, max_bad_samples=1000)
    result = train(cfg)
    assert result["step"] == 12 and result["stopped"] is None
    logged = json.loads((out / "train_log.json").read_text())["bad_samples"]
    assert logged["unreadable"] >= 2  # the corrupt training PNG, then SIA decode/tar failures
    assert logged["rejected"] == 2, logged
    assert logged["count"] == logged["unreadable"] + logged["rejected"]
    keys = {r["key"] for r in logged["examples"]}
    assert "train/good/999.png" in keys
    assert {"bottle-000000-000002", "bottle-000000-000003"} <= keys


def test_too_many_bad_samples_stops_with_a_resumable_checkpoint(
    bad_sia, tiny_sia, mvtec_with_corrupt_png, tmp_path, one_thread
):
    from realnet_train.checkpoint import read_checkpoint

    root, _ = bad_sia
    out = tmp_path / "run"
    with pytest.raises(TooManyBadSamples, match="--max-bad-samples 3"):
        train(tiny_config(mvtec_with_corrupt_png, root, out, max_bad_samples=3, steps=50))
    log = json.loads((out / "train_log.json").read_text())
    assert log["stopped"].startswith(f"{log['bad_samples']['count']} bad samples")
    stopped_at = read_checkpoint(out / "last.pt")["step"]
    assert stopped_at == log["step"] < 50
    # The data fixed (the undamaged dataset), --resume continues from the checkpoint.
    resumed = train(tiny_config(mvtec_with_corrupt_png, tiny_sia, out, steps=8, resume=True))
    assert resumed["step"] == 8 and resumed["steps_this_run"] == 8 - stopped_at
    assert read_checkpoint(out / "last.pt")["calibration"] is not None


def test_cli_stops_with_one_line_and_exit_1(bad_sia, mvtec_with_corrupt_png, tmp_path):
    from click.testing import CliRunner
    from realnet_helpers import TINY_MODEL, TINY_RUN

    from realnet_train.cli import train_main

    root, _ = bad_sia
    out = tmp_path / "cli"
    args = ["--category", "bottle", "--data", str(mvtec_with_corrupt_png), "--sia", str(root)]
    args += ["--mix", "normal=0,sia=1", "--out", str(out), "--steps", "40"]
    args += ["--max-bad-samples", "2", *TINY_RUN, *TINY_MODEL]
    res = CliRunner().invoke(train_main, args)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    err = [ln for ln in lines if ln.startswith("realnet-train: error:")]
    assert len(err) == 1 and "bad samples" in err[0] and "--resume" in err[0]
    assert "Traceback" not in res.output
    assert (out / "last.pt").is_file()


@pytest.fixture(scope="module")
def three_shards_one_cut(shared_data, tmp_path_factory):
    """3 bottle shards of 8; shard 1 cut off half-way. Returns (root, keys it cannot give)."""
    from conftest import write_tiny_sia
    from realnet_helpers import read_shard

    plan = [("bottle", i, (0.1, 0.2)) for i in range(3)]
    root = write_tiny_sia(tmp_path_factory.mktemp("cut") / "sia", shared_data, 8, plan)
    tar = root / "shards/bottle/bottle-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    try:
        readable = len(read_shard(tar))
    except Exception:  # noqa: BLE001 - the cut: count what the tar reader gives before it
        readable = sum(1 for _ in _complete_samples(tar))
    lost = {f"bottle-000001-{j:06d}" for j in range(readable, 8)}
    assert 0 < len(lost) < 8
    return root, lost


def _complete_samples(tar):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with tar.open("rb") as f:
        try:
            yield from group_by_keys(tar_file_expander([{"url": str(tar), "stream": f}]))
        except Exception:  # noqa: BLE001, S110 - stop at the cut
            return


def test_a_cut_shard_is_reported_once_per_lost_sample_over_many_epochs(three_shards_one_cut):
    root, lost = three_shards_one_cut
    items = list(itertools.islice(sia_pipeline(str(root), ["bottle"], keep_bad=True), 200))
    bad = [(it[BAD]["shard"].rsplit("/", 1)[-1], it[BAD]["key"]) for it in items if is_bad(it)]
    good = [it for it in items if not is_bad(it)]
    assert len(good) > 3 * (24 - len(lost))  # several epochs, the cut shard read to its break
    assert sorted(bad) == sorted(("bottle-000001.tar", k) for k in lost)  # each once
    assert {it["key"] for it in good if "-000001-" in it["key"]} == {
        f"bottle-000001-{j:06d}" for j in range(8 - len(lost))
    }
    # With more readers than shards each reader reads every shard; each lost key has one owner.
    from realnet_train.data.sia_stream import expand_shards

    url = str(root / "shards/bottle/bottle-000001.tar")
    owners = []
    for slot in range(3):
        src = [{"url": url, "part": (slot, 3)}] * 4  # four passes over the shard
        owners += [it[BAD]["key"] for it in expand_shards(src, None, {url: 8}) if is_bad(it)]
    assert sorted(owners) == sorted(lost)


def test_training_through_a_cut_shard_counts_its_lost_samples_once(
    three_shards_one_cut, shared_data, tmp_path, one_thread
):
    root, lost = three_shards_one_cut
    data = small_mvtec(shared_data, tmp_path / "mvtec", n_train=6)
    out = tmp_path / "run"
    # The limit is the number of lost samples: counting any of them twice would stop the run.
    cfg = tiny_config(data, root, out, steps=16, afs_batches=2, max_bad_samples=len(lost))
    result = train(cfg)
    assert result["step"] == 16 and result["stopped"] is None
    logged = json.loads((out / "train_log.json").read_text())["bad_samples"]
    assert logged["count"] == logged["unreadable"] == len(lost) and logged["rejected"] == 0
    keys = [r["key"] for r in logged["examples"]]
    assert sorted(keys) == sorted(lost)
    assert all("breaks off" in r["reason"] for r in logged["examples"])
