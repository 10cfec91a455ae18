"""The bundle format: the frozen v1 bundle keeps loading, newer versions and modified files are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES

import edgeq.deploy
from edgeq.deploy.bundle_format import FORMAT_VERSION, MANIFEST, check_manifest, read_manifest, sha256_of
from edgeq.errors import BundleError

V1_DIR = FIXTURES / "bundles" / "v1"
V1 = V1_DIR / "sac-pendulum"
REFERENCE = json.loads((V1_DIR / "sac-pendulum.reference.json").read_text())


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(V1, out)
    return out


def _edit_manifest(root: Path, fn: Any) -> None:
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m))


def test_v1_bundle_still_loads_and_acts_as_when_it_was_made() -> None:
    """A bundle written by edgeq 0.1.0 (format 1), committed as is: later versions must load it."""
    m = read_manifest(V1)
    assert m["format_version"] == 1 <= FORMAT_VERSION
    assert m["edgeq_version"] == "0.1.0"
    obs = np.asarray(REFERENCE["observations"], np.float32)
    for precision, atol in (("int8", 1e-2), ("fp32", 1e-5)):
        p = edgeq.deploy.load(V1, backend="cpu", precision=precision, allow_unsigned=True)
        got = p.act(obs)
        np.testing.assert_allclose(got, np.asarray(REFERENCE[f"actions_{precision}"]), atol=atol)


def test_v2_bundle_loads_acts_and_carries_its_decision() -> None:
    """A bundle written with format 2 (the three-way verdict), committed as is: later versions must load it."""
    v2_dir = FIXTURES / "bundles" / "v2"
    root, ref = v2_dir / "sac-pendulum", json.loads((v2_dir / "sac-pendulum.reference.json").read_text())
    m = read_manifest(root)
    assert m["format_version"] == 2 <= FORMAT_VERSION
    d = m["decision"]
    assert d["status"] == "PASS" and d["exit_code"] == 0 and d["procedure"]["mode"] == "fixed"
    cpu = d["targets"]["cpu"]
    assert (cpu["float_model"], cpu["int8_model"], cpu["runtime"], cpu["episodes"]) == (
        "policy.fp32.onnx", "policy.int8.cpu.onnx", "onnxruntime-cpu", 4)
    assert cpu["outcomes"]["int8"] == {"success": 0, "failure": 0, "timeout": 4}
    obs = np.asarray(ref["observations"], np.float32)
    for precision, atol in (("int8", 1e-5), ("fp32", 1e-5)):
        got = edgeq.deploy.load(root, backend="cpu", precision=precision, allow_unsigned=True).act(obs)
        np.testing.assert_allclose(got, np.asarray(ref[f"actions_{precision}"]), atol=atol)
    # a decision that is not one of the three states is refused
    bad = dict(m, decision={"status": "MAYBE"})
    with pytest.raises(BundleError, match="decision.status is 'MAYBE'"):
        check_manifest(bad)


def test_fixture_files_are_the_committed_ones() -> None:
    files = read_manifest(V1)["files"]
    assert sorted(files) == ["policy.fp32.onnx", "policy.int8.onnx", "validation.json"]
    assert all(sha256_of(V1 / name) == digest for name, digest in files.items())


def test_newer_format_version_is_refused_clearly(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match=f"format_version {FORMAT_VERSION + 1} is newer than this edgeq reads "
                                          f"\\({FORMAT_VERSION}\\); upgrade edgeq"):
        edgeq.deploy.load(bundle, allow_unsigned=True)


@pytest.mark.parametrize("value", [None, "1", 0, 1.0, True])
def test_bad_format_version_is_refused(bundle: Path, value: object) -> None:
    _edit_manifest(bundle, lambda m: m.update(format_version=value) if value is not None else m.pop("format_version"))
    with pytest.raises(BundleError, match="format_version is .*expected an integer >= 1"):
        edgeq.deploy.load(bundle, allow_unsigned=True)


@pytest.mark.parametrize("name", ["policy.int8.onnx", "policy.fp32.onnx", "validation.json"])
def test_a_modified_file_is_refused(bundle: Path, name: str) -> None:
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: SHA-256 .* does not match the manifest .*modified after export"):
        edgeq.deploy.load(bundle, allow_unsigned=True)  # every listed file is checked, not only the model that runs


def test_a_missing_file_is_refused(bundle: Path) -> None:
    (bundle / "validation.json").unlink()
    with pytest.raises(BundleError, match="validation.json is listed in manifest.json but missing"):
        edgeq.deploy.load(bundle, allow_unsigned=True)


def test_a_model_not_covered_by_the_hashes_is_refused(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].pop("policy.int8.onnx"))
    with pytest.raises(BundleError, match="policy.int8.onnx.*not listed in (the manifest's )?files"):
        edgeq.deploy.load(bundle, allow_unsigned=True)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["io"].pop("input"), "missing field 'io.input'"),
    (lambda m: m.pop("observation_space"), "missing field 'observation_space.shape'"),
    (lambda m: m["action_space"].update(shape=[0]), r"action_space.shape is \[0\]"),
    (lambda m: m["models"].update(int8="../policy.int8.onnx"), "models.int8 is '../policy.int8.onnx', expected"),
    (lambda m: m["files"].update({"x.onnx": "abc"}), "files\\['x.onnx'\\] is 'abc'"),
    (lambda m: m.update(engines=[{"file": "a.engine", "precision": "int8"}]),
     "engines\\[0\\] has no 'tensorrt_version'"),
])
def test_malformed_manifest_fields_are_named(bundle: Path, edit: Any, match: str) -> None:
    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=match):
        edgeq.deploy.load(bundle, allow_unsigned=True)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        edgeq.deploy.load(tmp_path / "nothing", allow_unsigned=True)
    with pytest.raises(BundleError, match="no manifest.json"):
        edgeq.deploy.load(tmp_path, allow_unsigned=True)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        edgeq.deploy.load(tmp_path, allow_unsigned=True)


def test_verify_false_skips_the_hashes_but_not_the_version(bundle: Path) -> None:
    (bundle / "validation.json").write_text("{}")
    assert edgeq.deploy.load(bundle, backend="cpu", verify=False, allow_unsigned=True).act(np.zeros(3)).shape == (1,)
    _edit_manifest(bundle, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer"):
        edgeq.deploy.load(bundle, verify=False, allow_unsigned=True)
