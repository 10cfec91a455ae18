"""The robot side imports only numpy and its backend: checked in a subprocess where the workstation
modules (torch, gymnasium, Stable-Baselines3, onnx, typer, ...) cannot be imported at all."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import FIXTURES

V1 = FIXTURES / "bundles" / "v1"
REPO = Path(__file__).resolve().parent.parent

BLOCKED = ("torch", "gymnasium", "gym", "stable_baselines3", "sb3_contrib", "onnx", "onnxscript", "onnx_ir",
           "typer", "rich", "matplotlib", "yaml", "scipy")

BLOCKER = textwrap.dedent(f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the deploy runtime must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("ORT_DISABLE_TELEMETRY", None)
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_blocker_really_blocks() -> None:
    r = run_blocked("import onnx")
    assert r.returncode != 0 and "onnx is blocked" in r.stderr
    # onnxruntime shares the prefix but is the backend: it must stay importable
    assert run_blocked("import onnxruntime").returncode == 0


def test_import_edgeq_is_light() -> None:
    r = run_blocked("""
        import sys, edgeq
        print(sorted(m for m in ("numpy", "onnxruntime", "edgeq.pipeline", "edgeq.ingest") if m in sys.modules))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_load_and_act_with_workstation_modules_blocked() -> None:
    r = run_blocked(f"""
        import json, sys
        import numpy as np
        import edgeq.deploy
        policy = edgeq.deploy.load({str(V1 / "sac-pendulum")!r}, backend="auto", allow_unsigned=True)
        single = policy.act(np.array([0.5, -0.5, 1.0], np.float32))
        batch = policy.act(np.zeros((4, 3)))
        mods = sorted(m.split(".")[0] for m in sys.modules)
        import os
        import onnxruntime
        print(json.dumps({{"backend": policy.backend, "ort_providers": onnxruntime.get_available_providers(),
                           "single": single.tolist(), "batch": list(batch.shape),
                           "telemetry_off": os.environ.get("ORT_DISABLE_TELEMETRY"),
                           "latency_calls": policy.latency["calls"], "modules": sorted(set(mods))}}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # no GPU here: cpu; on a GPU machine the fused kernel or ONNX Runtime's CUDA EP
    assert out["backend"] in (("cuda-fused", "cuda-ort") if "CUDAExecutionProvider" in out["ort_providers"]
                              else ("cpu", "cuda-fused"))
    assert len(out["single"]) == 1 and -2.0 <= out["single"][0] <= 2.0
    assert out["batch"] == [4, 1]
    assert out["latency_calls"] == 2
    assert out["telemetry_off"] == "1"  # onnxruntime's usage telemetry is off on the robot unless asked for
    assert not set(out["modules"]) & set(BLOCKED)


def test_deploy_command_line_with_workstation_modules_blocked() -> None:
    r = run_blocked(f"""
        import sys
        from edgeq.deploy.cli import main
        rc = main(["selftest", "--allow-unsigned", {str(V1 / "sac-pendulum")!r}, "--samples", "8",
                   "--latency-calls", "20",
                   "--reference", {str(V1 / "sac-pendulum.reference.json")!r}])
        sys.exit(rc)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "healthy" in r.stdout and "FAIL" not in r.stdout


def test_every_deploy_module_imports_with_workstation_modules_blocked() -> None:
    """Each robot-side module (the TensorRT runner included) imports without torch, onnx, gymnasium, ..."""
    r = run_blocked("""
        import importlib, pkgutil, sys, edgeq.deploy
        names = [m.name for m in pkgutil.iter_modules(edgeq.deploy.__path__) if m.name != "__main__"]
        for name in names:
            importlib.import_module("edgeq.deploy." + name)
        print(sorted(names))
        print(sorted(m for m in sys.modules if m.startswith("edgeq.") and not m.startswith("edgeq.deploy")))
    """)
    assert r.returncode == 0, r.stderr
    names, others = r.stdout.strip().splitlines()
    assert "tensorrt_runner" in names and "trt_backend" in names
    # the runtime imports no stage: only the shared leaf modules
    assert set(ast.literal_eval(others)) <= {"edgeq.errors", "edgeq.hashing", "edgeq._version"}
