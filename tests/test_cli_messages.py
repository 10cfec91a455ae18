"""What a newcomer meets: one-line errors with the fix (exit 2), output that survives logs and CI,
``--version`` / ``-h`` / ``--quiet``, ``check`` on a bundle, ``info`` as a summary."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_MEASURE, QUICK_PLAN

from edgeq.commands._progress import PlainProgress
from edgeq.errors import EdgeqError

EDGEQ = [sys.executable, "-m", "edgeq.cli"]
ZOO_RUN = Path(__file__).parent / "fixtures" / "zoo" / "logs" / "sac" / "Pendulum-v1_1"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEQ, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("[edgeq] ")).strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_legacy_mujoco_id_names_the_new_one(sac_halfcheetah: Path, tmp_path: Path) -> None:
    res = run_cli("quantize", str(sac_halfcheetah), "--env", "HalfCheetah-v3", "--out", str(tmp_path / "b"))
    one_line_error(res, "'HalfCheetah-v3' needs mujoco-py", "use --env HalfCheetah-v5")
    assert not (tmp_path / "b").exists()


def _lander_policy(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((8, 2), 0.1, np.float32), "w")
    nodes = [helper.make_node("MatMul", ["obs", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["actions"])]
    g = helper.make_graph(nodes, "lander", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", 2])], [w])
    path = tmp_path / "lander.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_discrete_env_suggests_continuous_kwarg(tmp_path: Path) -> None:
    pytest.importorskip("Box2D")
    res = run_cli("quantize", str(_lander_policy(tmp_path)), "--env", "LunarLander-v3", "--out", str(tmp_path / "b"))
    one_line_error(res, "Discrete action space", "--env-kwargs '{\"continuous\": true}'")


def test_time_feature_policy_points_at_config(tmp_path: Path) -> None:
    # the zoo fixture's archive alone, run in the bare env: one observation short
    res = run_cli("quantize", str(ZOO_RUN / "Pendulum-v1.zip"), "--env", "Pendulum-v1", "--out", str(tmp_path / "b"))
    one_line_error(res, "shape (3,) but the policy expects (4,)", "trained with TimeFeatureWrapper",
                   "config.yml", "--env-wrapper TimeFeatureWrapper")


def test_module_callable_resolves_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from edgeq.envs import env_factory

    (tmp_path / "mysim14.py").write_text("import gymnasium as gym\n\ndef make(**kw):\n"
                                         "    return gym.make('Pendulum-v1', **kw)\n")
    monkeypatch.chdir(tmp_path)
    # the console script's sys.path has neither '' nor the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    env = env_factory("mysim14:make")()
    assert env.observation_space.shape == (3,)
    with pytest.raises(EdgeqError, match="cannot import module 'nosuchmod14'.*run edgeq from the directory"):
        env_factory("nosuchmod14:make")


def test_errors_escape_markup(tmp_path: Path) -> None:
    # rich would eat "[gpu]" out of "edgeq[gpu]" in a message if it were read as markup
    res = run_cli("quantize", str(tmp_path / "edgeq[gpu].zip"), "--env", "Pendulum-v1", "--out", str(tmp_path / "b"))
    one_line_error(res, "edgeq[gpu].zip")


def test_version_help_and_flags() -> None:
    from edgeq import __version__

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"edgeq {__version__}"
    res = run_cli("quantize", "-h")
    assert res.returncode == 0 and "--out" in res.stdout
    assert "<bool>" not in res.stdout  # boolean flags are shown as flags, not as taking a value
    assert "--quiet" in res.stdout and "--json" in res.stdout


def test_plain_progress_lines_every_few_seconds() -> None:
    now = [0.0]
    out = io.StringIO()
    factory = PlainProgress(out, interval=5.0, clock=lambda: now[0])
    advance = factory("calibrate", 1000)
    for _ in range(10):
        now[0] += 2.0
        advance(90)
    advance(100)
    factory("per-layer error", None)
    lines = out.getvalue().splitlines()
    # one line per >= 5 s of work (at 6, 12, 18 s) plus the final one; no line at the very start
    assert lines[0] == "[edgeq] calibrate: 270/1,000 (27%), 6s"
    assert lines[-2] == "[edgeq] calibrate: 1,000/1,000 (100%), 20s" and len(lines) == 5
    assert lines[-1] == "[edgeq] per-layer error..."


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory, sac_pendulum: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("msg") / "bundle"
    res = run_cli("quantize", str(sac_pendulum), "--env", "Pendulum-v1", "--out", str(out), "--episodes", "3",
                  "--calib-episodes", "3", "--set", "export.cpu_layer_selection=width",  # not load-dependent
                  *QUICK_PLAN, *QUICK_MEASURE)
    assert res.returncode == 0, res.stderr
    return out, res


def test_log_output_is_not_truncated(piped_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, res = piped_run
    # stdout is a pipe: every column header and layer name in full, no ellipsis
    assert "…" not in res.stdout
    for text in ("verdict", "int8 - float [interval]", "succ/fail/timeout float | int8", "action err mean / max",
                 "policy.int8.cpu.onnx", "actor.latent_pi.0/Gemm", "input quantizer"):
        assert text in res.stdout
    # progress comes as plain lines on stderr
    assert "[edgeq] calibrate:" in res.stderr and "(100%)" in res.stderr
    # the summary says what each column means and what each layer runs as in each file
    assert "columns:" in res.stdout and "float (int8 weights)" in res.stdout
    assert "search started at" not in res.stdout


@pytest.mark.slow
def test_quiet(piped_run: tuple[Path, subprocess.CompletedProcess], sac_pendulum: Path, tmp_path: Path) -> None:
    res = run_cli("quantize", str(sac_pendulum), "--env", "Pendulum-v1", "--out", str(tmp_path / "q"), "--episodes",
                  "2", "--calib-episodes", "2", "--no-auto", "--quiet", *QUICK_PLAN, *QUICK_MEASURE)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.splitlines()[0].startswith("verdict: ") and len(res.stdout.splitlines()) == 2


def test_check_bundle_per_runtime(piped_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = piped_run
    res = run_cli("check", str(out))
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0].startswith("policy.int8.onnx [tensorrt]: TensorRT QDQ check: OK")
    cpu = next(line for line in lines if line.startswith("policy.int8.cpu.onnx"))
    assert "[onnxruntime-cpu]: OK" in cpu and "session builds" in cpu
    assert "quantize_static" not in res.stdout and "TensorRT will reject" not in res.stdout
    # forcing TensorRT's rules on the ORT file: the fix points at the bundle's TensorRT file
    forced = run_cli("check", str(out / "policy.int8.cpu.onnx"), "--runtime", "tensorrt")
    assert forced.returncode == 1 and "quantize_static" not in forced.stdout
    assert "use the same bundle's policy.int8.onnx" in forced.stdout


def test_check_catches_a_broken_ort_file(piped_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    out, _ = piped_run
    bad = tmp_path / "policy.int8.cpu.onnx"
    bad.write_bytes(b"not onnx")
    res = run_cli("check", str(bad))
    one_line_error(res, "policy.int8.cpu.onnx", "not an ONNX model")
    # inside a bundle each file is checked for its runtime: a damaged ORT file is a violation (exit 1)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("manifest.json", "policy.int8.onnx"):
        (bundle / name).write_bytes((out / name).read_bytes())
    (bundle / "policy.int8.cpu.onnx").write_bytes(b"not onnx")
    res = run_cli("check", str(bundle))
    assert res.returncode == 1 and "policy.int8.cpu.onnx [onnxruntime-cpu]: ERROR [onnx-checker]" in res.stdout


def test_info_is_a_summary(piped_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = piped_run
    res = run_cli("info", str(out))
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert len(lines) < 20 and any(line.startswith("policy: SAC") for line in lines)
    assert any("onnxruntime" in line and "gymnasium" in line and "mujoco" in line for line in lines)
    assert any(line.startswith("verdict:") for line in lines)
    full = run_cli("info", str(out), "--json")
    assert json.loads(full.stdout)["format_version"] >= 1


def test_report_has_versions_legend_and_real_choices(piped_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = piped_run
    md = (out / "report.md").read_text()
    m = json.loads((out / "manifest.json").read_text())
    for name in ("edgeq", "onnxruntime", "torch", "gymnasium", "mujoco"):
        assert f"version: {name}" in md
    made = json.loads((out / "measurements.json").read_text())["made_utc"]
    assert "date_utc" not in m["environment"]  # the manifest stays the same run to run
    assert made in md and m["source"]["sha256"] in md
    assert "Columns:" in md and "Quantized layers" in md
    for la in m["quantization"]["layers"]:
        assert la["choice"]["label"] in md  # the chosen quantizer, not the recipe's starting point
    assert "{'percentile': 99.99}" not in md
