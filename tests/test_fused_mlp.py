"""The fused INT8 GPU backend: the plan read from the ONNX file, its numpy arithmetic against ONNX
Runtime on the CPU, the generated kernels (compiled with NVRTC where it is installed), and, on a
machine with an NVIDIA GPU, the kernels themselves against ONNX Runtime on the CPU at batch 1 to 4096.

The GPU tests skip here (no GPU in CI); they run on the GPU machine (benchmarks/gpu_fused.sh)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from fused_helpers import ort_cpu, qdq_mlp

import edgeq.deploy
from edgeq.deploy import cuda
from edgeq.deploy.fused_mlp import ROWS_MAX_BATCH, FusedCudaPolicy, FusedMlpRunner, FusedProgram, kernel_for_batch
from edgeq.deploy.mlp_plan import UnsupportedGraph, plan_from_graph, reference_forward
from edgeq.deploy.onnx_graph import load_graph
from edgeq.errors import BundleError

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
GPU = cuda.available()
needs_gpu = pytest.mark.skipif(GPU is not None, reason=f"needs an NVIDIA GPU and cuda-python ({GPU})")
BATCHES = (1, 2, 3, ROWS_MAX_BATCH, ROWS_MAX_BATCH + 1, 31, 32, 255, 256, 257, 1000, 1024, 1025, 4096)


def _nvrtc() -> str | None:
    try:
        cuda.compile_cubin('extern "C" __global__ void k() {}', "90")
    except cuda.CudaError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fused")
    return {
        "pendulum": V1 / "policy.int8.onnx",
        "elu512": qdq_mlp(d / "elu.onnx", 17, (512, 256, 128), 6, activation="Elu", seed=1),
        "relu256_norm": qdq_mlp(d / "relu.onnx", 17, (256, 256), 6, activation="Relu", seed=2, pre_sub_div=True,
                                inv_factors=False),
        "wide1024": qdq_mlp(d / "wide.onnx", 40, (1024, 1024), 12, activation="Relu", seed=3, rescale=False),
        # a frame-stack history policy's input: Reshape [-1, 8, 17], per-feature Mul/Add, Flatten
        "window8x17": qdq_mlp(d / "window.onnx", 136, (256, 256), 6, activation="Relu", seed=4, window=(8, 17)),
    }


def _obs(n: int, dim: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 1.5).astype(np.float32)


def _rounding_sensitive(plan: object) -> bool:
    """True if a transcendental activation (computed by the GPU's and the CPU's own exp/tanh, which may
    differ by an ulp) feeds a quantizer: a value within an ulp of a rounding boundary can then land on
    the neighbouring int8 step. ReLU networks have no such step: they must match to float rounding."""
    return any(o.op in ("Elu", "Sigmoid", "Tanh") for la in plan.layers[:-1] for o in la.post)  # type: ignore[attr-defined]


# --- CPU: the plan and its arithmetic ---------------------------------------------------------------


def test_reader_matches_onnx(models: dict[str, Path]) -> None:
    for path in models.values():
        g = load_graph(path)
        m = onnx.load(str(path))
        assert [n.op_type for n in g.nodes] == [n.op_type for n in m.graph.node]
        for t in m.graph.initializer:
            np.testing.assert_array_equal(g.initializers[t.name], onnx.numpy_helper.to_array(t))
        assert g.inputs == [i.name for i in m.graph.input] and g.outputs == [o.name for o in m.graph.output]


def test_plan_of_the_bundle_file() -> None:
    plan = plan_from_graph(load_graph(V1 / "policy.int8.onnx"))
    assert [(la.k, la.n) for la in plan.layers] == [(3, 256), (256, 256), (256, 1)]
    assert [[o.op for o in la.post] for la in plan.layers] == [["Relu"], ["Relu"], ["Tanh", "Mul", "Add"]]
    assert all(la.weight.dtype == np.int8 and la.in_zero_point == 0 for la in plan.layers)


def test_reference_arithmetic_matches_onnx_runtime_cpu(models: dict[str, Path]) -> None:
    """The integer arithmetic the kernel implements is ONNX Runtime's on the CPU (measured: <= 5e-7)."""
    for name, path in models.items():
        plan = plan_from_graph(load_graph(path))
        obs = _obs(2048, plan.obs_dim, 5)
        want = ort_cpu(path, obs)
        err = np.abs(reference_forward(plan, obs) - want).max(axis=1)
        if _rounding_sensitive(plan):  # numpy's and ONNX Runtime's exp may differ by an ulp: rare int8 flips
            assert (err > 1e-6).mean() <= 0.005 and err.max() <= 0.05, name
        else:
            assert err.max() <= 1e-6, name


def test_unsupported_graphs_name_the_node(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedGraph, match="MatMul|Gemm|no INT8"):
        plan_from_graph(load_graph(V1 / "policy.fp32.onnx"))
    m = onnx.load(str(qdq_mlp(tmp_path / "m.onnx", 5, (8,), 2)))
    for node in m.graph.node:
        if node.op_type == "Tanh":
            node.op_type = "Softplus"
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(UnsupportedGraph, match="Softplus"):
        plan_from_graph(load_graph(tmp_path / "bad.onnx"))


def test_history_window_view_runs_as_a_flat_row(models: dict[str, Path], tmp_path: Path) -> None:
    """``Reshape [-1, L, D] → per-feature ops → Flatten`` is elementwise on the flat row with each constant
    repeated L times; any other use of the view is refused, naming the node."""
    plan = plan_from_graph(load_graph(models["window8x17"]))
    assert plan.obs_dim == 136 and [o.op for o in plan.pre[:2]] == ["Mul", "Add"]
    scale = plan.pre[0].const
    assert scale is not None and scale.shape == (136,)
    np.testing.assert_array_equal(scale[:17], scale[17 * 7:])
    m = onnx.load(str(models["window8x17"]))
    flatten = next(n for n in m.graph.node if n.op_type == "Flatten")
    m.graph.node.remove(flatten)
    for n in m.graph.node:  # the view goes straight into the first quantizer
        n.input[:] = ["win_t" if i == "win_flat" else i for i in n.input]
    onnx.save(m, str(tmp_path / "no_flatten.onnx"))
    with pytest.raises(UnsupportedGraph, match=r"\[batch, L, D\] view|does not broadcast per feature \(width 17\)"):
        plan_from_graph(load_graph(tmp_path / "no_flatten.onnx"))


def test_packed_weight_layouts(models: dict[str, Path]) -> None:
    prog = FusedProgram(plan_from_graph(load_graph(models["elu512"])))
    for d, la in zip(prog.layers, prog.plan.layers, strict=True):
        wt = prog.wt[d["wt_off"]: d["wt_off"] + d["n"] * d["kp"]].reshape(d["n"], d["kp"])
        np.testing.assert_array_equal(wt[:, : la.k].T, la.weight)
        assert not wt[:, la.k:].any()
        words = prog.w4[d["w4_off"]: d["w4_off"] + d["kt"] // 4 * d["npad"]].reshape(d["kt"] // 4, d["npad"])
        unpacked = words.copy().view(np.int8).reshape(d["kt"] // 4, d["npad"], 4).transpose(0, 2, 1)
        np.testing.assert_array_equal(unpacked.reshape(d["kt"], d["npad"])[: la.k, : la.n], la.weight)
    assert kernel_for_batch(1) == ("mlp_rows", 1) and kernel_for_batch(4096) == ("mlp_tiles_tm4", 32)


@pytest.mark.skipif(_nvrtc() is not None, reason=f"NVRTC is not installed ({_nvrtc()})")
def test_kernels_compile_for_hopper_and_orin(models: dict[str, Path]) -> None:
    """NVRTC needs no GPU: the generated source compiles for sm_90 (H100/H200) and sm_87 (Jetson Orin)."""
    for path in (models["elu512"], models["wide1024"]):
        prog = FusedProgram(plan_from_graph(load_graph(path)))
        for arch in ("90", "87"):
            cubin, _log = cuda.compile_cubin(prog.source, arch, options=["--fmad=false"])
            assert all(k.encode() in cubin for k in prog.kernels)
    # NVRTC writes its (empty, 1-byte) log into a buffer: never into a bytes object CPython shares
    assert b" " == bytes([32]) and bytes(1) == bytes([0])


@pytest.mark.skipif(GPU is None, reason="a GPU is here: the fallback is not exercised")
def test_without_gpu_auto_says_why_and_falls_back() -> None:
    policy = edgeq.deploy.load(V1, backend="auto", allow_unsigned=True)
    assert policy.backend in ("cpu", "cuda-ort")
    assert any(n.startswith("cuda-fused: ") for n in policy.backend_notes)
    assert any(n.startswith("trt: ") for n in policy.backend_notes)  # no TensorRT or no engine: never picked
    with pytest.raises(BundleError, match="backend 'cuda-fused' cannot"):
        edgeq.deploy.load(V1, backend="cuda-fused", allow_unsigned=True)


# --- GPU: the kernels -----------------------------------------------------------------------------------


@needs_gpu
def test_fused_kernel_matches_onnx_runtime_cpu(models: dict[str, Path]) -> None:
    import json
    import os

    from cuda.bindings import driver

    report = {}
    for name, path in models.items():
        plan = plan_from_graph(load_graph(path))
        runner = FusedMlpRunner(plan)
        rows = rows_off = 0
        worst = 0.0
        for b in BATCHES:
            for seed in (b, b + 1000):  # twice through the same graph, with other inputs
                obs = _obs(b, plan.obs_dim, seed)
                p = runner.path(b)
                cuda.check(driver.cuMemsetD32(p.dev_out.ptr, 0x7FC00000, b * plan.act_dim), "cuMemsetD32")  # NaN
                got = runner.run(obs)
                want = ort_cpu(path, obs)
                assert got.shape == want.shape and np.isfinite(got).all(), (name, b)
                err = np.abs(got - want).max(axis=1)
                rows += b
                rows_off += int((err > 1e-5).sum())
                worst = max(worst, float(err.max()))
        report[name] = {"rows": rows, "rows_over_1e-5": rows_off, "max_abs_err": worst,
                        "rounding_sensitive": _rounding_sensitive(plan)}
        if _rounding_sensitive(plan):
            # a flipped int8 step moves an action by ~ one weight step; allow it in at most 0.5% of the rows
            assert rows_off <= 0.005 * rows and worst <= 0.05, (name, report[name])
        else:
            assert rows_off == 0 and worst <= 1e-5, (name, report[name])
    if os.environ.get("EDGEQ_GPU_REPORT"):
        with open(os.environ["EDGEQ_GPU_REPORT"], "a") as fh:
            fh.write(json.dumps({"test_fused_kernel_matches_onnx_runtime_cpu": report}) + "\n")


@needs_gpu
def test_every_kernel_variant_computes_the_same_bits(models: dict[str, Path]) -> None:
    """Autotuning picks among kernels that must agree bit for bit (same integer sums, same epilogue)."""
    from edgeq.deploy.fused_mlp import kernel_candidates

    for name in ("elu512", "relu256_norm"):
        plan = plan_from_graph(load_graph(models[name]))
        runner = FusedMlpRunner(plan, autotune=False)
        for b in (1, 17, 300, 4096):
            obs = _obs(b, plan.obs_dim, 7 * b)
            p = runner.path(b)
            np.copyto(p.host_in.array, obs)
            p.dev_in.upload(obs)
            outs = {}
            for kernel in kernel_candidates(b):
                out = np.full((b, plan.act_dim), np.nan, np.float32)
                p.dev_out.upload(out)
                runner.launch(b, int(p.dev_in), int(p.dev_out), kernel)
                runner.stream.synchronize()
                outs[kernel] = p.dev_out.download(out)
            first = next(iter(outs.values()))
            assert np.isfinite(first).all()
            for kernel, out in outs.items():
                np.testing.assert_array_equal(out, first, err_msg=f"{name} batch {b} {kernel}")
            assert (np.abs(first - ort_cpu(models[name], obs)).max(axis=1) > 1e-5).mean() <= 0.005


@needs_gpu
def test_one_graph_is_two_copies_and_one_kernel(models: dict[str, Path]) -> None:
    runner = FusedMlpRunner(plan_from_graph(load_graph(models["elu512"])))
    for b in (1, 4096):
        assert runner.graph_nodes(b) == {"KERNEL": 1, "MEMCPY": 2}


@needs_gpu
def test_deploy_load_runs_the_fused_kernel() -> None:
    auto = edgeq.deploy.load(V1, backend="auto", allow_unsigned=True)
    assert auto.backend == "cuda-fused" and "fused" in auto.providers[0]
    assert isinstance(auto.runtime, FusedCudaPolicy)
    assert edgeq.deploy.load(V1, backend="cuda", allow_unsigned=True).backend == "cuda-fused"
    obs = _obs(64, 3, 9)
    want = ort_cpu(V1 / "policy.int8.onnx", obs)
    np.testing.assert_allclose(auto.act(obs), want, atol=1e-5, rtol=0)
    for row, w in zip(obs[:8], want[:8], strict=True):
        np.testing.assert_allclose(auto.act(row), w, atol=1e-5, rtol=0)
