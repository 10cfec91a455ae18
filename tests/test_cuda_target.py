"""The CUDA target: the CUDA-specialized INT8 graph, kernel placement, provider selection, clear errors.

The first part runs anywhere (ONNX Runtime's CPU build): the graph rewrite is checked against real
ONNX Runtime sessions, placement is read from a real profile, and every GPU entry point must refuse
with one clear line when ``CUDAExecutionProvider`` is absent. The second part runs the policies on a
GPU and skips, with the reason, where ONNX Runtime has no CUDA EP (or, for TensorRT, no TensorRT).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import QUICK_OVERRIDES
from onnx import TensorProto, helper, numpy_helper

from edgeq.deploy.bundle_format import INT8_CUDA_MODEL, model_for, read_manifest
from edgeq.deploy.ort_cuda import (
    CUDA_EP,
    CudaUnavailableError,
    OrtCudaPolicy,
    cuda_ep_available,
    cuda_provider_options,
    node_placement,
    summarize_placement,
)
from edgeq.errors import EdgeqError
from edgeq.export.ort_cuda import dequantize_initializer, kernel_count, specialize_for_ort_cuda
from edgeq.export.trt_rules import check_qdq_model
from edgeq.validate.targets import (
    RUNTIME_ORT_CPU,
    RUNTIME_ORT_CUDA,
    RUNTIME_TENSORRT,
    available_targets,
    target_runtime,
    tensorrt_available,
)

HAS_CUDA_EP = cuda_ep_available()
NO_CUDA_REASON = f"ONNX Runtime {ort.__version__} here has no CUDAExecutionProvider (needs onnxruntime-gpu and a GPU)"
RNG = np.random.default_rng(11)


def _cpu_session(model: onnx.ModelProto, optimization: str = "none") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimization == "none"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pendulum_bundle(sac_pendulum: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeq.pipeline import quantize

    out = tmp_path_factory.mktemp("cuda") / "bundle"
    quantize(sac_pendulum, "Pendulum-v1", out, episodes=2, seed=3, overrides=QUICK_OVERRIDES)
    return out


@pytest.fixture(scope="module")
def qdq_and_cuda(pendulum_bundle: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    return onnx.load(str(pendulum_bundle / "policy.int8.onnx")), onnx.load(str(pendulum_bundle / INT8_CUDA_MODEL))


# --- the CUDA-specialized graph --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,axis,per_axis", [(np.int8, 1, True), (np.int8, 0, True), (np.uint8, 1, False),
                                                 (np.int8, 0, False)])
def test_dequantize_initializer_bit_exact_with_onnxruntime(dtype: type, axis: int, per_axis: bool) -> None:
    info = np.iinfo(dtype)
    q = RNG.integers(info.min, info.max + 1, size=(24, 40)).astype(dtype)
    n = q.shape[axis] if per_axis else 1
    scale = (RNG.uniform(1e-4, 2e-1, size=n) * RNG.choice([1.0, 3.7], size=n)).astype(np.float32)
    zp = RNG.integers(info.min, info.max + 1, size=n).astype(dtype)
    if not per_axis:
        scale, zp = scale.reshape(()), zp.reshape(())
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
                                           numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expected = _cpu_session(model).run(None, {})[0]
    got = dequantize_initializer(q, scale, zp, axis)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_cuda_graph_folds_weight_dq_keeps_activation_qdq(qdq_and_cuda) -> None:
    qdq, cuda = qdq_and_cuda
    before, after = kernel_count(qdq), kernel_count(cuda)
    n_layers = before["MatMul"]
    assert n_layers == 3
    # one DQ per layer (the activation's) instead of two; the Q nodes and the MatMuls stay
    assert before["DequantizeLinear"] == 2 * n_layers and after["DequantizeLinear"] == n_layers
    assert after["QuantizeLinear"] == before["QuantizeLinear"] == n_layers
    assert after["MatMul"] == n_layers and "Identity" not in after and before.get("Identity") == 1
    inits = {t.name: numpy_helper.to_array(t) for t in cuda.graph.initializer}
    producers = {o: n for n in cuda.graph.node for o in n.output}
    for mm in (n for n in cuda.graph.node if n.op_type == "MatMul"):
        act, weight = mm.input
        assert producers[act].op_type == "DequantizeLinear"
        assert producers[producers[act].input[0]].op_type == "QuantizeLinear"
        assert weight in inits and inits[weight].dtype == np.float32 and inits[weight].ndim == 2
    # every activation Q/DQ is still symmetric int8 (the int8 arithmetic of the portable file)
    for node in cuda.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and zp.shape == () and np.all(zp == 0)
    assert [o.name for o in cuda.graph.output] == ["actions"]
    assert cuda.opset_import[0].version == qdq.opset_import[0].version


def test_cuda_graph_weights_equal_the_dequantized_int8_weights(qdq_and_cuda) -> None:
    qdq, cuda = qdq_and_cuda
    q_inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    c_inits = {t.name: numpy_helper.to_array(t) for t in cuda.graph.initializer}
    weight_dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_inits]
    assert len(weight_dq) == 3
    for dq in weight_dq:
        w = c_inits[dq.output[0]]
        q, s = q_inits[dq.input[0]], q_inits[dq.input[1]]
        # int8 values on a per-output-channel grid: the ratio to the scale is an integer in [-127, 127]
        np.testing.assert_array_equal(w, q.astype(np.float32) * s[None, :])
        assert np.all(np.abs(np.round(w / s[None, :])) <= 127)


def test_cuda_graph_computes_the_int8_policy(qdq_and_cuda, pendulum_bundle: Path) -> None:
    qdq, cuda = qdq_and_cuda
    obs = (RNG.standard_normal((256, 3)) * np.array([1.0, 1.0, 4.0])).astype(np.float32)
    a_qdq = _cpu_session(qdq).run(None, {"obs": obs})[0]
    a_cuda = _cpu_session(cuda).run(None, {"obs": obs})[0]
    a_float = _cpu_session(onnx.load(str(pendulum_bundle / "policy.fp32.onnx"))).run(None, {"obs": obs})[0]
    # same arithmetic up to the GEMM's float32 summation order
    np.testing.assert_allclose(a_cuda, a_qdq, rtol=0, atol=2e-5)
    # and it is the int8 policy, not the float one (quantization moves actions by far more than 2e-5)
    assert np.abs(a_cuda - a_float).max() > 1e-3


def test_specialization_leaves_portable_file_unchanged_and_is_deterministic(qdq_and_cuda) -> None:
    qdq, cuda = qdq_and_cuda
    before = qdq.SerializeToString(deterministic=True)
    again = specialize_for_ort_cuda(qdq)
    assert qdq.SerializeToString(deterministic=True) == before
    assert again.SerializeToString(deterministic=True) == cuda.SerializeToString(deterministic=True)
    # the TensorRT file still passes the QDQ rules; a second specialization changes nothing but the name
    assert not [v for v in check_qdq_model(qdq) if v.severity == "error"]
    assert kernel_count(specialize_for_ort_cuda(cuda)) == kernel_count(cuda)


def test_bundle_lists_cuda_file(pendulum_bundle: Path) -> None:
    manifest = read_manifest(pendulum_bundle)  # verifies the SHA-256 of every file, the new one too
    assert manifest["models"]["int8-cuda"] == INT8_CUDA_MODEL
    assert model_for(manifest, "int8", "cuda") == INT8_CUDA_MODEL
    assert model_for(manifest, "int8", "trt") == "policy.int8.onnx"
    validation = json.loads((pendulum_bundle / "validation.json").read_text())
    assert validation["targets"]["cpu"]["runtime"] == RUNTIME_ORT_CPU
    assert validation["sizes"][INT8_CUDA_MODEL] > validation["sizes"]["policy.int8.onnx"]


# --- placement -----------------------------------------------------------------------------------------------


def test_node_placement_names_every_kernel_and_its_provider(qdq_and_cuda) -> None:
    _, cuda = qdq_and_cuda
    placed = node_placement(cuda.SerializeToString(), ["CPUExecutionProvider"], batch=4, optimization="none")
    assert [p.node for p in placed] == [n.name for n in cuda.graph.node]
    assert [p.op_type for p in placed] == [n.op_type for n in cuda.graph.node]
    assert {p.provider for p in placed} == {"CPUExecutionProvider"}
    summary = summarize_placement(placed)
    assert summary["kernels"] == len(cuda.graph.node)
    assert summary["by_provider"] == {"CPUExecutionProvider": len(cuda.graph.node)}
    assert summary["all_on_gpu"] is False and len(summary["not_on_gpu"]) == len(cuda.graph.node)


def _optimized_ops(model: Path, tmp: Path, disabled: list[str]) -> list[tuple[str, int]]:
    """(op type, element type of input 0 when it is an initializer) of ORT's optimized graph."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp / "opt.onnx")
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    opt = onnx.load(str(tmp / "opt.onnx"))
    inits = {t.name: t.data_type for t in opt.graph.initializer}
    return [(n.op_type, inits.get(n.input[0], 0)) for n in opt.graph.node]


def test_runner_keeps_ort_from_adding_int32_bias_dequantize(pendulum_bundle: Path, tmp_path: Path) -> None:
    """ORT's QDQ-aware MatMulAddFusion turns ``DQ → MatMul → Add(bias)`` into a Gemm with an int32 bias
    DequantizeLinear, which the CUDA EP has no kernel for (CPU fallback + copies: no CUDA graph), and on the
    CUDA file it re-quantizes the float weights. The CUDA runner disables that rewrite."""
    from edgeq.deploy.ort_cuda import DISABLED_ORT_OPTIMIZERS

    int32_dq = ("DequantizeLinear", TensorProto.INT32)
    for name in ("policy.int8.onnx", INT8_CUDA_MODEL):
        default = _optimized_ops(pendulum_bundle / name, tmp_path, [])
        assert int32_dq in default and any(op.endswith("Gemm") for op, _ in default)
        ours = _optimized_ops(pendulum_bundle / name, tmp_path, list(DISABLED_ORT_OPTIMIZERS))
        assert int32_dq not in ours and not any(op.endswith("Gemm") for op, _ in ours)


def test_cuda_provider_options() -> None:
    assert cuda_provider_options(1, cuda_graph=True) == {"device_id": "1", "enable_cuda_graph": "1", "use_tf32": "0"}
    assert cuda_provider_options()["enable_cuda_graph"] == "0"


# --- provider selection and errors without a GPU ---------------------------------------------------------


def test_cpu_target_runtime() -> None:
    assert target_runtime("cpu") == RUNTIME_ORT_CPU
    assert available_targets()[0] == "cpu"
    with pytest.raises(EdgeqError, match="unknown target 'tpu'"):
        target_runtime("tpu")


def test_cuda_target_picks_tensorrt_then_onnxruntime() -> None:
    if tensorrt_available():
        assert target_runtime("cuda") == RUNTIME_TENSORRT
    elif HAS_CUDA_EP:
        assert target_runtime("cuda") == RUNTIME_ORT_CUDA
        assert "cuda" in available_targets()
    else:
        with pytest.raises(EdgeqError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
            target_runtime("cuda")
        assert available_targets() == ["cpu"]
    if not tensorrt_available():
        with pytest.raises(EdgeqError, match="target 'trt' needs TensorRT"):
            target_runtime("trt")


@pytest.mark.skipif(HAS_CUDA_EP, reason="CUDAExecutionProvider is available here: the no-GPU errors cannot occur")
def test_gpu_entry_points_refuse_clearly_without_cuda(pendulum_bundle: Path) -> None:
    import edgeq.deploy

    with pytest.raises(CudaUnavailableError, match="no CUDAExecutionProvider"):
        OrtCudaPolicy(pendulum_bundle / INT8_CUDA_MODEL)
    with pytest.raises(EdgeqError, match="no CUDAExecutionProvider"):
        edgeq.deploy.load(pendulum_bundle, backend="cuda", allow_unsigned=True)
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "validate", str(pendulum_bundle), "--targets", "cuda",
                          "--episodes", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "error:" in res.stderr and "CUDAExecutionProvider" in res.stderr and "Traceback" not in res.stderr


def test_validate_json_names_runtime(pendulum_bundle: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "validate", str(pendulum_bundle), "--targets", "cpu",
                          "--episodes", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 1, 3), res.stderr  # 0 PASS / 1 FAIL / 3 INCONCLUSIVE: the verdict, not an error
    out = json.loads(res.stdout)
    assert out["verdict"]["exit_code"] == res.returncode
    cpu = out["targets"]["cpu"]
    assert cpu["runtime"] == RUNTIME_ORT_CPU and cpu["providers"] == ["CPUExecutionProvider"]
    assert len(cpu["float"]["returns"]) == len(cpu["int8"]["returns"]) == 2


# --- on a GPU -----------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA_EP, reason=NO_CUDA_REASON)


@gpu
@pytest.mark.parametrize("io_binding,cuda_graph", [(False, False), (True, False), (True, True)])
def test_ort_cuda_policy_matches_cpu(pendulum_bundle: Path, io_binding: bool, cuda_graph: bool) -> None:
    # reference: ONNX Runtime on the CPU running the graph's operators literally (its CPU-only QDQ rewrites
    # change int8 arithmetic); int8 allows rare one-step activation rounding flips from GEMM summation order
    for name, int8 in (("policy.fp32.onnx", False), (INT8_CUDA_MODEL, True), ("policy.int8.onnx", True)):
        ref = _cpu_session(onnx.load(str(pendulum_bundle / name)), optimization="none")
        pol = OrtCudaPolicy(pendulum_bundle / name, io_binding=io_binding, cuda_graph=cuda_graph)
        assert pol.providers[0] == CUDA_EP
        diffs = []
        for batch in (1, 8, 1, 8, 1, 8, 300):  # repeated: CUDA graph capture, then replays with new inputs
            obs = (RNG.standard_normal((batch, 3)) * 2).astype(np.float32)
            diffs.append(np.abs(pol.act(obs) - ref.run(None, {"obs": obs})[0]).ravel())
        d = np.concatenate(diffs)
        if int8:
            assert np.mean(d <= 1e-4) >= 0.97 and d.max() <= 0.05, (name, d.max(), np.mean(d <= 1e-4))
        else:
            assert d.max() <= 1e-4, (name, d.max())


@gpu
@pytest.mark.parametrize("name", [INT8_CUDA_MODEL, "policy.int8.onnx"])
def test_int8_files_run_entirely_on_the_gpu(pendulum_bundle: Path, name: str) -> None:
    summary = summarize_placement(node_placement(pendulum_bundle / name, batch=8))
    assert summary["all_on_gpu"], summary["not_on_gpu"]


@gpu
def test_validate_cuda_target_keeps_return(pendulum_bundle: Path) -> None:
    from edgeq.envs import env_factory
    from edgeq.validate.targets import validate_target

    if tensorrt_available():
        pytest.skip("TensorRT is installed: the cuda target runs TensorRT, tested in test_tensorrt_engine.py")
    res = validate_target("cuda", pendulum_bundle / "policy.fp32.onnx", pendulum_bundle / "policy.int8.onnx",
                          {"input": "obs", "output": "actions", "state": []}, env_factory("Pendulum-v1"),
                          list(range(4)), act_dim=1, num_envs=4, cuda_int8_model=pendulum_bundle / INT8_CUDA_MODEL)
    assert res["runtime"] == RUNTIME_ORT_CUDA and res["cuda_graph"] is True
    assert res["placement"]["float"]["all_on_gpu"]
    # the INT8 policy runs where edgeq.deploy's cuda backend runs it: the fused kernel, else ORT's CUDA EP
    if res["int8_runtime"] == "onnxruntime-cuda":
        assert res["placement"]["int8"]["all_on_gpu"]
    else:
        assert res["int8_runtime"] == "edgeq-fused-cuda" and res["int8_model"] == "policy.int8.onnx"
    f, q = res["float"]["mean"], res["int8"]["mean"]
    assert abs(q - f) <= 0.05 * abs(f)


def test_validation_uses_the_deploy_providers_tf32_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every validation path on ``cuda`` (closed loop, open loop, robustness) gets the providers
    ``edgeq.deploy`` uses, TF32 off, so it measures the float32 arithmetic that ships."""
    import onnxruntime as ort

    from edgeq.deploy.runtime import ORT_PROVIDERS, provider_names
    from edgeq.validate import targets

    assert targets.target_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(targets, "tensorrt_available", lambda: False)
    got = targets.target_providers("cuda")
    assert got == ORT_PROVIDERS["cuda"] and got[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert provider_names(got) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
