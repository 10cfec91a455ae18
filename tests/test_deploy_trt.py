"""The TensorRT backend's engine choice: an engine built for another GPU or TensorRT version is refused.

TensorRT cannot run on these machines; what is tested is edgeq's own logic around the engine records
(selection among several engines, the messages, the manifest checks, the load() errors). The
compatibility rule itself is :func:`edgeq.deploy.tensorrt_runner.check_engine_compat`; where that
module is not present yet, a stand-in with the same contract (raise BundleError on a TensorRT version
or compute capability mismatch) is used.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES

import edgeq.deploy
from edgeq.deploy.bundle_format import MANIFEST, sha256_of
from edgeq.deploy.trt_backend import engines_for, select_engine, tensorrt_available
from edgeq.errors import BundleError

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"


def _stand_in_compat(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> None:
    problems = []
    for key in ("tensorrt_version", "compute_capability"):
        if expected.get(key) and actual.get(key) and str(expected[key]) != str(actual[key]):
            problems.append(f"{key} mismatch: built for {expected[key]}, this machine has {actual[key]}")
    if problems:
        raise BundleError("; ".join(problems))


try:
    from edgeq.deploy.tensorrt_runner import check_engine_compat as compat
except ImportError:
    compat = _stand_in_compat

ORIN = {"file": "policy.int8.sm87.engine", "precision": "int8", "tensorrt_version": "10.3.0",
        "gpu_name": "Orin", "compute_capability": "8.7"}
H100 = {"file": "policy.int8.sm90.engine", "precision": "int8", "tensorrt_version": "10.3.0",
        "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
H100_FP16 = {**H100, "file": "policy.fp16.sm90.engine", "precision": "fp16"}
RECORDS = [ORIN, H100, H100_FP16]


def test_the_engine_for_this_gpu_is_chosen() -> None:
    here = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    assert select_engine(RECORDS, here, precision="int8", check=compat)["file"] == H100["file"]
    assert select_engine(RECORDS, here, precision="fp16", check=compat)["file"] == H100_FP16["file"]
    orin = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
    assert select_engine(RECORDS, orin, precision="int8", check=compat)["file"] == ORIN["file"]


def test_another_gpu_is_refused_naming_every_engine() -> None:
    ada = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    with pytest.raises(BundleError) as err:
        select_engine(RECORDS, ada, precision="int8", check=compat)
    msg = str(err.value)
    assert "no engine in the bundle fits this machine (TensorRT 10.3.0, NVIDIA L4 (compute capability 8.9))" in msg
    assert ORIN["file"] in msg and H100["file"] in msg and H100_FP16["file"] not in msg
    assert "8.7" in msg and "9.0" in msg


def test_another_tensorrt_version_is_refused() -> None:
    newer = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}
    with pytest.raises(BundleError, match=r"10\.3\.0.*10\.13\.0|10\.13\.0.*10\.3\.0"):
        select_engine([H100], newer, precision="int8", check=compat)


def test_no_engine_of_that_precision() -> None:
    with pytest.raises(BundleError, match="no TensorRT engine of precision 'fp32' .*engines: fp16, int8.*backend "
                                          "'cuda' or 'cpu'"):
        select_engine(RECORDS, {"tensorrt_version": "10.3.0", "compute_capability": "9.0"}, precision="fp32",
                      check=compat)


def _bundle_with_engine(tmp_path: Path, record: dict[str, Any]) -> Path:
    """The v1 bundle plus an engine file and its record, hashed like any other file."""
    root = tmp_path / "b"
    shutil.copytree(V1, root)
    (root / record["file"]).write_bytes(b"not a real engine: TensorRT cannot run on this machine")
    m = json.loads((root / MANIFEST).read_text())
    m["engines"] = [record]
    m["files"][record["file"]] = sha256_of(root / record["file"])
    (root / MANIFEST).write_text(json.dumps(m))
    return root


def test_engine_records_in_the_manifest(tmp_path: Path) -> None:
    root = _bundle_with_engine(tmp_path, dict(ORIN))
    m = edgeq.deploy.read_manifest(root)  # the engine's hash is verified with the other files
    assert [r["file"] for r in engines_for(m, "int8")] == [ORIN["file"]] and engines_for(m, "fp16") == []
    (root / ORIN["file"]).write_bytes(b"changed")
    with pytest.raises(BundleError, match=f"{ORIN['file']}: SHA-256"):
        edgeq.deploy.read_manifest(root)


def test_trt_backend_without_tensorrt_or_engine(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="backend 'trt' needs a TensorRT engine of precision 'int8'"):
        edgeq.deploy.load(V1, backend="trt", allow_unsigned=True)
    root = _bundle_with_engine(tmp_path, dict(ORIN))
    with pytest.raises(BundleError, match="needs a TensorRT engine of precision 'fp32'"):
        edgeq.deploy.load(root, backend="trt", precision="fp32", allow_unsigned=True)
    if not tensorrt_available():
        with pytest.raises(BundleError, match="backend 'trt' needs TensorRT's Python package"):
            edgeq.deploy.load(root, backend="trt", allow_unsigned=True)
        # auto skips TensorRT when it cannot run, even with an engine in the bundle
        assert edgeq.deploy.load(root, backend="auto", allow_unsigned=True).backend in ("cpu", "cuda-fused",
                                                                                        "cuda-ort")
