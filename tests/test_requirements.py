"""The package's requirements are ranges that admit a CUDA build of torch, the exact tested
versions live in constraints.txt (which `make` applies), and the lowest declared versions
have the APIs the code uses.

The lowest versions are not installed here (torch wheels are GBs); :data:`API_SINCE` records
when each API the code relies on appeared, checked by hand against those releases (the
webdataset 0.2.100 and diffusers 0.35.0 wheels were read; torch from its release docs:
``torch.serialization`` of 2.4 lacks ``safe_globals``). The test fails when the code uses one of
them and the declared lower bound is older, or when a recorded API is no longer used.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sia_pipeline", "realnet_train")

# (distribution, first version with the API, regex over the package sources, the API)
API_SINCE = [
    ("torch", "2.5", r"serialization\.safe_globals\(", "torch.serialization.safe_globals"),
    ("torch", "2.1", r"mmap=True", "torch.load(..., mmap=True)"),
    ("torch", "1.13", r"weights_only=True", "torch.load(..., weights_only=True)"),
    ("torch", "2.0", r"torch\.compile\(", "torch.compile"),
    ("webdataset", "0.2.100", r"wds\.shuffle\([^)]*seed=", "shuffle(..., seed=)"),
    ("webdataset", "0.2.100", r"TarWriter\([^)]*mtime=", "TarWriter(..., mtime=)"),
    ("webdataset", "0.2.100", r"wds\.pipelinefilter\(", "pipelinefilter"),
    ("webdataset", "0.2.100", r"import group_by_keys, tar_file_expander", "tariterators"),
    ("diffusers", "0.35", r"import randn_tensor", "diffusers.utils.torch_utils.randn_tensor"),
    ("diffusers", "0.35", r"import EMAModel", "diffusers.training_utils.EMAModel"),
    ("diffusers", "0.35", r"low_cpu_mem_usage=False", "from_pretrained(low_cpu_mem_usage=)"),
    ("pillow", "9.1", r"Image\.Resampling\.", "PIL.Image.Resampling"),
    ("numpy", "1.17", r"np\.random\.default_rng\(", "numpy.random.default_rng"),
]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def _lower_bound(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_torch_and_torchvision_are_ranges_that_admit_cuda_builds():
    reqs = _requirements()
    torch, vision = reqs["torch"].specifier, reqs["torchvision"].specifier
    for build in ("2.5.1+cu124", "2.6.0+cu126", "2.14.1", "2.14.1+cu130"):
        assert torch.contains(build), build
    assert not torch.contains("2.4.1+cu121")  # lacks torch.serialization.safe_globals
    for build in ("0.20.1+cu124", "0.21.0+cu126", "0.29.1"):
        assert vision.contains(build), build
    # The lower bounds are a released pair: torchvision 0.(N + 15) goes with torch 2.N.
    low_t, low_v = _lower_bound(reqs["torch"]), _lower_bound(reqs["torchvision"])
    assert (low_t.major, low_v.minor) == (2, low_t.minor + 15)
    exact = [r for r in _project()["dependencies"] if "==" in r]
    assert not [r for r in exact if Requirement(r).name in ("torch", "torchvision")]


def test_constraints_pin_a_tested_pair_within_the_ranges_and_make_applies_them():
    reqs, pins = _requirements(), _pins()
    assert {"torch", "torchvision"} <= set(pins)
    for name, version in pins.items():
        assert name in reqs, f"constraints.txt pins {name}, which nothing requires"
        assert reqs[name].specifier.contains(version), (name, version, str(reqs[name]))
    t, v = Version(pins["torch"]), Version(pins["torchvision"])
    assert v.minor == t.minor + 15, (t, v)  # a released pair
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e '\.\[test,interop\]'", make)


@pytest.mark.parametrize(("dist", "since", "pattern", "api"), API_SINCE, ids=lambda x: str(x))
def test_lowest_declared_versions_have_the_apis_the_code_uses(dist, since, pattern, api):
    sources = "\n".join(
        p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
    )
    assert re.search(pattern, sources), f"{api} is no longer used: drop it from API_SINCE"
    low = _lower_bound(_requirements()[canonicalize_name(dist)])
    assert low >= Version(since), f"the code uses {api} ({dist} {since}) but declares {dist}>={low}"
