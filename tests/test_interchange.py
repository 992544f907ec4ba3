"""Interchange indexes beside index.json: ``index.wids.json`` (read back with webdataset's
wids reader) and ``croissant.json`` (checked against the Croissant 1.0 structure)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sia_pipeline.format.interchange import CROISSANT_CONFORMS_TO, CROISSANT_NAME, WIDS_NAME
from sia_pipeline.format.manifest import read_manifest
from sia_pipeline.format.v1 import SAMPLE_SCHEMA, read_index
from sia_pipeline.io.storage import open_storage
from sia_pipeline.publish.publish import publish


def _load(storage, name: str) -> dict:
    return json.loads(storage.get_bytes(name))


def test_wids_index_matches_the_shards(local_root: Path):
    storage = open_storage(local_root)
    index, wids_doc = read_index(storage), _load(storage, WIDS_NAME)
    assert wids_doc["__kind__"] == "wids-shard-index-v1" and wids_doc["wids_version"] == 1
    assert [s["url"] for s in wids_doc["shardlist"]] == [s["tar"] for s in index["shards"]]
    for entry in wids_doc["shardlist"]:
        assert not entry["url"].startswith("/")  # relative: the root can move
        assert entry["filesize"] == (local_root / entry["url"]).stat().st_size
    assert sum(s["nsamples"] for s in wids_doc["shardlist"]) == index["num_samples"]


def test_wids_reader_opens_every_sample(local_root: Path, tmp_path: Path):
    wids = pytest.importorskip("wids", reason="webdataset's wids reader is not installed")
    ds = wids.ShardListDataset(
        str(local_root / WIDS_NAME), cache_dir=str(tmp_path / "cache"), transformations=[]
    )
    keys = read_manifest(open_storage(local_root)).column("key").to_pylist()
    assert len(ds) == len(keys) == 12
    seen = [ds[i]["__key__"] for i in range(len(ds))]
    assert seen == sorted(keys)  # shard order = key order
    last = ds[len(ds) - 1]
    meta = json.loads(last[".json"].read())
    assert meta["category"] == "magnetic_tile" and meta["height"] == 32
    assert last[".png"].read(8) == b"\x89PNG\r\n\x1a\n"


def _ids(items: list[dict]) -> list[str]:
    return [i["@id"] for i in items]


def test_croissant_structure(local_root: Path):
    storage = open_storage(local_root)
    doc, index = _load(storage, CROISSANT_NAME), read_index(storage)
    # Required by Croissant 1.0 for a dataset.
    assert doc["@type"] == "sc:Dataset" and doc["conformsTo"] == CROISSANT_CONFORMS_TO
    ctx = doc["@context"]
    assert ctx["@vocab"] == "https://schema.org/" and ctx["cr"] == "http://mlcommons.org/croissant/"
    assert ctx["dct"] == "http://purl.org/dc/terms/"
    for key in ("name", "description", "license", "distribution", "recordSet"):
        assert doc[key], key
    assert "url" not in doc  # a local root's path is not published
    dist = {d["@id"]: d for d in doc["distribution"]}
    assert len(dist) == len(doc["distribution"])  # unique ids
    files = [d for d in doc["distribution"] if d["@type"] == "cr:FileObject"]
    assert {d["@id"] for d in files} == {"manifest.parquet", *(s["tar"] for s in index["shards"])}
    for d in files:  # every FileObject: contentUrl, encodingFormat and a correct sha256
        data = storage.get_bytes(d["contentUrl"])
        assert d["sha256"] == hashlib.sha256(data).hexdigest(), d["@id"]
        assert d["encodingFormat"] in ("application/x-tar", "application/x-parquet")
    (images,) = [d for d in doc["distribution"] if d["@type"] == "cr:FileSet"]
    assert images["encodingFormat"] == "image/png" and images["includes"] == "*.png"
    assert all(ref["@id"] in dist for ref in images["containedIn"])
    # Record sets: unique field ids, known data types, sources naming a distribution.
    field_ids = [f["@id"] for rs in doc["recordSet"] for f in rs["field"]]
    assert len(set(field_ids)) == len(field_ids)
    samples, imgs = doc["recordSet"]
    assert [f["name"] for f in samples["field"]] == SAMPLE_SCHEMA.names
    assert samples["key"] == {"@id": "samples/key"}
    for rs in doc["recordSet"]:
        assert rs["@type"] == "cr:RecordSet"
        for f in rs["field"]:
            assert f["@type"] == "cr:Field" and f["dataType"].startswith("sc:")
            src = f["source"]
            ref = (src.get("fileObject") or src.get("fileSet"))["@id"]
            assert ref in dist, f["@id"]
    assert {f["name"]: f["dataType"] for f in imgs["field"]}["image"] == "sc:ImageObject"
    assert imgs["field"][0]["references"]["field"]["@id"] in field_ids


def test_interchange_is_deterministic_and_rewritten_by_publish(local_root: Path):
    before = {n: (local_root / n).read_bytes() for n in (WIDS_NAME, CROISSANT_NAME)}
    for name in before:
        (local_root / name).unlink()
    report = publish(str(local_root))
    assert not report.bad and "missing" in report.rebuilt
    assert {n: (local_root / n).read_bytes() for n in before} == before
    sums = (local_root / "SHA256SUMS").read_text()
    assert WIDS_NAME in sums and CROISSANT_NAME in sums and "spec.json" in sums


def test_croissant_on_s3_names_the_root(s3_dataset: str, s3_endpoint: str):
    storage = open_storage(s3_dataset, s3_endpoint)
    storage.delete(CROISSANT_NAME)
    assert not publish(s3_dataset, s3_endpoint).bad
    doc = _load(storage, CROISSANT_NAME)
    assert doc["url"] == s3_dataset
    assert _load(storage, WIDS_NAME)["shardlist"][0]["url"].startswith("shards/")


def test_croissant_loads_with_mlcroissant(local_root: Path):
    mlc = pytest.importorskip("mlcroissant", reason="mlcroissant is not installed")
    ds = mlc.Dataset(jsonld=str(local_root / CROISSANT_NAME))  # validates on load
    manifest = read_manifest(open_storage(local_root)).to_pylist()
    rows = list(ds.records("samples"))
    assert len(rows) == len(manifest) == 12
    first = {k.split("/", 1)[1]: v for k, v in rows[0].items()}
    first = {k: v.decode() if isinstance(v, bytes) else v for k, v in first.items()}
    assert first == manifest[0]
    images = list(ds.records("images"))
    keys = {r["images/key"].decode() for r in images}
    assert keys == {r["key"] for r in manifest}
    assert all(r["images/image"].size == (32, 32) for r in images)
