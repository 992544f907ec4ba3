"""sia-export's mvtec and folder layouts read by anomalib's own datamodules (the ``interop``
extra): training normals, held-out normals and anomalies with their masks, counted, and no
"sampling from training set" fallback. Skipped where anomalib is not installed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sia_pipeline.cli.export import main

anomalib = pytest.importorskip("anomalib", reason="anomalib not installed (the interop extra)")

SIZE = 64
N_NORMALS, HOLDOUT, PER_IMAGE = 8, "0.25", 2  # 2 held out, 6 for training, 4 anomalies


@pytest.fixture(scope="module")
def exports(shared_data, tiny_sia, tmp_path_factory) -> dict[str, Path]:
    """The folder and mvtec exports of 8 bottle images: layout -> OUT."""
    root = tmp_path_factory.mktemp("anomalib")
    good = root / "data/bottle/train/good"
    good.mkdir(parents=True)
    for f in sorted((shared_data / "mvtec_ad/bottle/train/good").glob("*.png"))[:N_NORMALS]:
        shutil.copy(f, good / f.name)
    outs = {}
    for layout in ("mvtec", "folder"):
        outs[layout] = root / layout
        args = [str(tiny_sia), "--data", str(root / "data"), "--category", "bottle"]
        args += ["--out", str(outs[layout]), "--layout", layout, "--holdout", HOLDOUT]
        args += ["--per-image", str(PER_IMAGE), "--image-size", str(SIZE), "--workers", "0"]
        result = CliRunner().invoke(main, [*args, "--no-progress"])
        assert result.exit_code == 0, result.output
    return outs


def _check(dm, out: Path, caplog) -> None:
    """Counts, paths and masks anomalib sees, against export.json and metadata.jsonl."""
    with caplog.at_level(logging.INFO, logger="anomalib"):
        dm.setup()
    assert not [r for r in caplog.records if "Sampling from training set" in r.getMessage()]
    split = json.loads((out / "export.json").read_text())["split"]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    train, test = dm.train_data.samples, dm.test_data.samples
    assert sorted(Path(p).relative_to(out).as_posix() for p in train.image_path) == sorted(
        e["image"] for e in split["train"]
    )
    assert (train.label_index == 0).all() and len(train) == 6
    normal = test[test.label_index == 0]
    abnormal = test[test.label_index == 1]
    assert sorted(Path(p).relative_to(out).as_posix() for p in normal.image_path) == sorted(
        e["image"] for e in split["held_out"]
    )
    assert len(normal) == 2 and len(abnormal) == len(rows) == 2 * PER_IMAGE
    by_image = {r["image"]: r for r in rows}
    for i in np.flatnonzero((test.label_index == 1).to_numpy()):
        image_path = Path(test.image_path.iloc[i]).relative_to(out).as_posix()
        assert (
            Path(test.mask_path.iloc[i]).relative_to(out).as_posix() == by_image[image_path]["mask"]
        )
        item = dm.test_data[int(i)]  # the mask as anomalib loads it, against ours
        ours = np.asarray(Image.open(out / by_image[image_path]["mask"])) > 0
        assert np.array_equal(item.gt_mask.numpy().squeeze().astype(bool), ours)
        assert ours.sum() == by_image[image_path]["mask_pixels"] > 0


def test_anomalib_folder_reads_the_folder_export(exports, caplog):
    from anomalib.data import Folder

    out = exports["folder"] / "bottle"
    dm = Folder(
        name="bottle",
        root=out,
        normal_dir="normal",
        abnormal_dir="abnormal",
        mask_dir="mask",
        normal_test_dir="normal_test",
        val_split_mode="same_as_test",
        num_workers=0,
    )
    _check(dm, out, caplog)


def test_anomalib_mvtecad_reads_the_mvtec_export(exports, caplog):
    from anomalib.data import MVTecAD

    dm = MVTecAD(root=exports["mvtec"], category="bottle", num_workers=0)
    _check(dm, exports["mvtec"] / "bottle", caplog)


def test_the_fallback_check_sees_anomalib_sample_from_train(exports, tmp_path, caplog):
    """Control: without test/good (as exports were before --holdout) anomalib logs the
    fallback that the checks above assert away, and moves training normals into test."""
    from anomalib.data import MVTecAD

    shutil.copytree(exports["mvtec"], tmp_path / "old")
    shutil.rmtree(tmp_path / "old/bottle/test/good")
    dm = MVTecAD(root=tmp_path / "old", category="bottle", num_workers=0)
    with caplog.at_level(logging.INFO, logger="anomalib"):
        dm.setup()
    assert any("Sampling from training set" in r.getMessage() for r in caplog.records)
    assert len(dm.train_data) < 6
