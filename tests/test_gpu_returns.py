"""The same verdict on every target: CPU and CUDA run the *same* INT8 file (``policy.int8.onnx``) in
paired closed-loop rollouts, judged by the same verdict code, and their returns agree.

On the ``cuda`` target the INT8 policy runs edgeq's fused kernel (what ``edgeq.deploy``'s ``cuda``
backend ships), whose arithmetic is ONNX Runtime's integer CPU path; the float reference runs on
ONNX Runtime's CUDA EP (on the CPU where onnxruntime-gpu is not installed; the result says which).
Needs cuda-python, a GPU and gymnasium (MuJoCo for HalfCheetah, bundle given by
``EDGEQ_GPU_BUNDLE_HC``): skips here, runs on the GPU machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from edgeq.deploy import cuda

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
ORT_CUDA = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
pytestmark = pytest.mark.skipif(cuda.available() is not None,
                                reason="needs cuda-python and a GPU (run on the GPU machine)")


def _both_targets(bundle: Path, env_id: str, seeds: list[int]) -> dict[str, dict]:
    from edgeq.envs import env_factory
    from edgeq.validate.targets import validate_target
    from edgeq.validate.verdict import Tolerance, judge

    manifest = json.loads((bundle / "manifest.json").read_text())
    io = manifest["io"]
    act_dim = int(np.prod(manifest["action_space"]["shape"]))
    out = {}
    for target in ("cpu", "cuda"):
        if target == "cuda" and not ORT_CUDA:
            # no onnxruntime-gpu here: the float reference runs on the CPU, the INT8 policy on the GPU
            from edgeq.deploy.fused_mlp import FusedCudaPolicy
            from edgeq.deploy.runtime import OrtPolicy
            from edgeq.validate.paired import paired_rollouts

            def ref() -> OrtPolicy:
                return OrtPolicy(bundle / "policy.fp32.onnx", input_name=io["input"], output_name=io["output"])

            def q() -> FusedCudaPolicy:
                return FusedCudaPolicy(bundle / "policy.int8.onnx", input_name=io["input"], output_name=io["output"])

            res = paired_rollouts(env_factory(env_id), ref(), q(), ref(), q(), seeds, num_envs=8, act_dim=act_dim)
            res.update(runtime="onnxruntime-cpu (float reference)", int8_runtime="edgeq-fused-cuda",
                       int8_model="policy.int8.onnx")
        else:
            res = validate_target(target, bundle / "policy.fp32.onnx", bundle / "policy.int8.onnx", io,
                                  env_factory(env_id), seeds, act_dim=act_dim, num_envs=8)
        res["verdict"] = judge(res, Tolerance())
        out[target] = res
    return out


def _report(name: str, res: dict[str, dict]) -> None:
    if os.environ.get("EDGEQ_GPU_REPORT"):
        with open(os.environ["EDGEQ_GPU_REPORT"], "a") as fh:
            fh.write(json.dumps({name: {t: {"runtime": r.get("runtime"), "int8_runtime": r.get("int8_runtime", "cpu"),
                                            "float": r["float"]["returns"], "int8": r["int8"]["returns"],
                                            "verdict": r["verdict"]["status"]} for t, r in res.items()}}) + "\n")


def test_pendulum_cpu_and_cuda_int8_returns_agree() -> None:
    res = _both_targets(V1, "Pendulum-v1", list(range(8)))
    _report("pendulum", res)
    assert res["cuda"]["int8_runtime"] == "edgeq-fused-cuda" and res["cuda"]["int8_model"] == "policy.int8.onnx"
    cpu, gpu = np.asarray(res["cpu"]["int8"]["returns"]), np.asarray(res["cuda"]["int8"]["returns"])
    scale = abs(float(np.mean(res["cpu"]["float"]["returns"])))
    # same arithmetic up to tanh's last ulp: each episode's return within 0.1% of the float return scale
    # (measured on an H200: at most 0.04 on returns of -1 to -237, scale 118)
    assert np.abs(gpu - cpu).max() <= 1e-3 * scale, (cpu, gpu)
    assert res["cpu"]["verdict"]["status"] == res["cuda"]["verdict"]["status"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EDGEQ_GPU_BUNDLE_HC"), reason="set EDGEQ_GPU_BUNDLE_HC to a HalfCheetah bundle")
def test_halfcheetah_cpu_and_cuda_int8_returns_agree() -> None:
    res = _both_targets(Path(os.environ["EDGEQ_GPU_BUNDLE_HC"]), "HalfCheetah-v5", list(range(8)))
    _report("halfcheetah", res)
    assert res["cuda"]["int8_runtime"] == "edgeq-fused-cuda"
    f = abs(float(np.mean(res["cpu"]["float"]["returns"])))
    diff = abs(float(np.mean(res["cuda"]["int8"]["returns"])) - float(np.mean(res["cpu"]["int8"]["returns"])))
    assert diff <= 0.01 * f, (diff, f)  # contact dynamics amplify ulp differences; the means stay within 1%
    # the same verdict code on both: with 8 episodes one may stay INCONCLUSIVE where the other PASSes
    # (measured on an H200: CPU PASS, CUDA INCONCLUSIVE), but never PASS on one target and FAIL on the other
    assert {res["cpu"]["verdict"]["status"], res["cuda"]["verdict"]["status"]} != {"PASS", "FAIL"}
