"""Interchange indexes written beside ``index.json``, from the same shard list.

- ``index.wids.json``: webdataset's ``wids-shard-index-v1`` (shard URL relative to the
  root, ``nsamples``, ``filesize``), so ``wids.ShardListDataset(ROOT/index.wids.json)``
  gives random access to every sample.
- ``croissant.json``: an MLCommons Croissant 1.0 description (JSON-LD): the manifest as a
  record set of per-sample metadata, and the tar shards as archives holding the images.

Both are pure functions of ``index.json`` (no timestamps), so rewriting them for an
unchanged dataset gives equal bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sia_pipeline.format.v1 import MANIFEST_NAME, SAMPLE_SCHEMA
from sia_pipeline.io.storage import Storage, is_s3

WIDS_NAME = "index.wids.json"
CROISSANT_NAME = "croissant.json"
WIDS_KIND = "wids-shard-index-v1"
CROISSANT_CONFORMS_TO = "http://mlcommons.org/croissant/1.0"

# The standard Croissant 1.0 JSON-LD context (from the specification's examples).
CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "equivalentProperty": "cr:equivalentProperty",
    "dct": "http://purl.org/dc/terms/",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
CITATION = (
    "@inproceedings{zhang2024realnet, title={RealNet: A Feature Selection Network with"
    " Realistic Synthetic Anomaly for Anomaly Detection}, author={Zhang, Ximiao and Xu, Min"
    " and Zhou, Xiuzhuang}, booktitle={CVPR}, year={2024}}"
)
_ARROW_TO_SCHEMA = {"string": "sc:Text", "int32": "sc:Integer", "int64": "sc:Integer"}
_ARROW_TO_SCHEMA["double"] = "sc:Float"
_FIELD_DESCRIPTIONS = {
    "key": "WebDataset __key__: CATEGORY-SHARD-INDEX",
    "shard": "shard id CATEGORY-NNNNNN holding the sample",
    "category": "product category the anomaly was synthesised for",
    "class_id": "class id of the category in the diffusion model",
    "strength": "SDAS anomaly strength s (0 = ordinary sampling)",
    "seed": "per-sample seed, a hash of (model, category, index, seed, spec)",
    "sample_index": "index of the sample within its category",
    "model_id": "id of the diffusion model that made the sample",
}


def wids_index(index: dict[str, Any], name: str = "sia") -> dict[str, Any]:
    """The ``wids-shard-index-v1`` document for a dataset's ``index.json``."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": name,
        "shardlist": [
            {"url": s["tar"], "nsamples": int(s["count"]), "filesize": int(s["size"])}
            for s in index["shards"]
        ],
    }


def _image_type(index: dict[str, Any]) -> tuple[str, str]:
    ext = (index.get("spec") or {}).get("image_format") or "png"
    return ext, "image/jpeg" if ext == "jpg" else "image/png"


def croissant(
    index: dict[str, Any], manifest_sha256: str, licence: str = "", url: str | None = None
) -> dict[str, Any]:
    """A Croissant 1.0 description of the dataset whose ``index.json`` is ``index``.

    Args:
        url: the dataset root, recorded as the dataset's ``url`` (object-store roots only:
            a local path would leak a home folder; file URLs are relative to the root).
        manifest_sha256: sha256 of ``manifest.parquet`` (Croissant requires a checksum).
        licence: the licence text (the card's); empty for "see README.md".
    """
    ext, mime = _image_type(index)
    cats = sorted(index.get("categories", {}))
    shards = [
        {
            "@type": "cr:FileObject",
            "@id": s["tar"],
            "name": s["tar"],
            "contentUrl": s["tar"],
            "contentSize": f"{int(s['size'])} B",
            "encodingFormat": "application/x-tar",
            "sha256": s["sha256"],
        }
        for s in index["shards"]
    ]
    manifest = {
        "@type": "cr:FileObject",
        "@id": MANIFEST_NAME,
        "name": MANIFEST_NAME,
        "contentUrl": MANIFEST_NAME,
        "encodingFormat": "application/x-parquet",
        "sha256": manifest_sha256,
    }
    images = {
        "@type": "cr:FileSet",
        "@id": "image-files",
        "name": "image-files",
        "description": f"the {ext.upper()} member of every sample, inside the tar shards",
        "containedIn": [{"@id": s["@id"]} for s in shards],
        "encodingFormat": mime,
        "includes": f"*.{ext}",
    }
    metadata_fields = [
        {
            "@type": "cr:Field",
            "@id": f"samples/{f.name}",
            "name": f.name,
            "description": _FIELD_DESCRIPTIONS.get(f.name, f.name.replace("_", " ")),
            "dataType": _ARROW_TO_SCHEMA.get(str(f.type), "sc:Text"),
            "source": {"fileObject": {"@id": MANIFEST_NAME}, "extract": {"column": f.name}},
        }
        for f in SAMPLE_SCHEMA
    ]
    image_fields = [
        {
            "@type": "cr:Field",
            "@id": "images/key",
            "name": "key",
            "description": "the sample's __key__ (its member name up to the first dot)",
            "dataType": "sc:Text",
            "source": {
                "fileSet": {"@id": "image-files"},
                "extract": {"fileProperty": "filename"},
                "transform": {"regex": r"^([^.]+)"},
            },
            "references": {"field": {"@id": "samples/key"}},
        },
        {
            "@type": "cr:Field",
            "@id": "images/image",
            "name": "image",
            "description": "the synthetic anomaly image (RGB)",
            "dataType": "sc:ImageObject",
            "source": {"fileSet": {"@id": "image-files"}, "extract": {"fileProperty": "content"}},
        },
    ]
    spec = index.get("spec") or {}
    description = (
        f"Synthetic industrial anomalies (SDAS, RealNet CVPR 2024) for {', '.join(cats)}:"
        f" {index.get('num_samples', 0)} images in {index.get('num_shards', 0)} WebDataset"
        f" shards (SIA format v{index.get('format_version')}), strengths"
        f" {index.get('strength_min', 0):.3g} to {index.get('strength_max', 0):.3g},"
        f" sampler {spec.get('sampler', 'unknown')}; spec {index.get('spec_hash', '')}."
    )
    doc = {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_CONFORMS_TO,
        "name": f"sia-{'-'.join(cats)}-{index.get('spec_hash', '')}".strip("-"),
        "description": description,
        "license": licence or "see README.md",
        "version": f"{index.get('format_version', 1)}.0.0",
        "citeAs": CITATION,
        "keywords": ["synthetic", "anomaly detection", "industrial", "SDAS", "RealNet"],
        "isAccessibleForFree": True,
        "distribution": [manifest, *shards, images],
        "recordSet": [
            {
                "@type": "cr:RecordSet",
                "@id": "samples",
                "name": "samples",
                "description": "one record per sample: its metadata (manifest.parquet)",
                "key": {"@id": "samples/key"},
                "field": metadata_fields,
            },
            {
                "@type": "cr:RecordSet",
                "@id": "images",
                "name": "images",
                "description": "one record per sample: its key and image",
                "field": image_fields,
            },
        ],
    }
    if url:
        doc["url"] = url
    return doc


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def write_interchange(
    storage: Storage, index: dict[str, Any], manifest_bytes: bytes, licence: str = ""
) -> list[str]:
    """Write ``index.wids.json`` and ``croissant.json`` for ``index``; returns their names."""
    name = f"sia-{index.get('spec_hash', '')}"
    storage.put_bytes(_json(wids_index(index, name)), WIDS_NAME)
    url = storage.url if is_s3(storage.url) else None
    doc = croissant(index, hashlib.sha256(manifest_bytes).hexdigest(), licence, url)
    storage.put_bytes(_json(doc), CROISSANT_NAME)
    return [WIDS_NAME, CROISSANT_NAME]
