"""``edgeq-deploy`` (the containers' entrypoint): verify, selftest, act, bench; errors as one line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import edgeq.deploy
from edgeq.deploy.cli import main

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
REF = FIXTURES / "bundles" / "v1" / "sac-pendulum.reference.json"


def test_verify(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--allow-unsigned", str(V1)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format_version"] == 1 and out["env"] == "Pendulum-v1" and out["decision"] is None  # v1: none
    assert out["files_verified"] == ["policy.fp32.onnx", "policy.int8.onnx", "validation.json"]


def test_selftest_healthy_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selftest", "--allow-unsigned", str(V1), "--json", "--samples", "16", "--latency-calls", "50",
                 "--reference", str(REF)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
    assert [c["name"] for c in report["checks"]] == ["runtime", "bundle", "load", "actions", "input_checks",
                                                      "reference", "latency"]
    assert report["reference"]["max_abs_diff"] <= report["reference"]["atol"] == 0.02  # 1% of Pendulum's 2.0
    assert report["latency_us"]["act"]["calls"] == 50


def test_selftest_fails_on_a_modified_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "b"
    shutil.copytree(V1, bad)
    (bad / "policy.int8.onnx").write_bytes((bad / "policy.int8.onnx").read_bytes()[:-1] + b"\0")
    assert main(["selftest", "--allow-unsigned", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL bundle" in out and "SHA-256" in out and out.strip().endswith("unhealthy")


def test_selftest_reference_mismatch_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = json.loads(REF.read_text())
    ref["actions"] = (np.asarray(ref["actions"]) + 0.5).tolist()
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert main(["selftest", "--allow-unsigned", str(V1), "--reference", str(tmp_path / "ref.json"),
                 "--latency-calls", "0"]) == 1
    assert "FAIL reference" in capsys.readouterr().out


def test_selftest_runtime_only(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["selftest", "--allow-unsigned", "--no-bundle"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("ok   runtime")
    # --optional: with nothing mounted at the default path, only the runtime is checked
    monkeypatch.setenv("EDGEQ_BUNDLE", str(tmp_path / "not-mounted"))
    assert main(["selftest", "--allow-unsigned", "--optional"]) == 0
    # without --optional, a missing bundle is a failure
    assert main(["selftest", "--allow-unsigned"]) == 1


def test_act_single_batch_and_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    policy = edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)
    assert main(["act", "--allow-unsigned", str(V1), "--backend", "cpu", "--obs", "[0.1, 0.2, 0.3]"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(policy.act([0.1, 0.2, 0.3]).tolist())
    monkeypatch.setattr("sys.stdin", io.StringIO("[[1, 0, 0], [0, 1, 0]]\n\n[0, 0, 1]\n"))
    # one JSON observation (or batch) per line, blank lines skipped
    assert main(["act", "--allow-unsigned", str(V1)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    np.testing.assert_allclose(json.loads(lines[0]), policy.act([[1, 0, 0], [0, 1, 0]]), rtol=1e-6)
    np.testing.assert_allclose(json.loads(lines[1]), policy.act([0, 0, 1]), rtol=1e-6)


def test_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["act", "--allow-unsigned", str(V1), "--obs", "[1, 2]"]) == 2
    warning, error = capsys.readouterr().err.splitlines()  # --allow-unsigned is said once, then the error
    assert warning.startswith("warning: ") and "signature not checked" in warning
    assert error.startswith("error: observation shape (2,); expected shape (3,)")
    assert main(["act", "--allow-unsigned", str(V1), "--obs", "[1, 2"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["verify", "--allow-unsigned", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--allow-unsigned", str(V1), "--calls", "300", "--batch", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 4 and out["act_us"]["calls"] == 300 and out["backend_us"]["calls"] == 300
