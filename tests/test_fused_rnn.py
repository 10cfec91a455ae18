"""The fused recurrent (LSTM/GRU) GPU backend: its plan read from the INT8 file, its arithmetic, its kernel.

Here (no GPU needed): the plan read from edgeq's own INT8 exports (LSTM and GRU, stacked, with an
encoder layer), its numpy step bit-identical to ONNX Runtime's CPU provider on the same file, the
CPU's Sigmoid/Tanh reproduced bit for bit, and the graphs it refuses. On a machine with an NVIDIA GPU
and cuda-python: the generated kernel against ONNX Runtime's CPU over many steps with resets, at
batch 1, 32 and 4096, and over full episodes of the trained fixtures' bundles
(``EDGEQ_GPU_BUNDLE_RPPO``, ``EDGEQ_GPU_BUNDLE_TSLSTM``: bundles of recurrentppo-pendulum.zip and
torchscript-lstm-invertedpendulum.pt; ``benchmarks/gpu_issue15.sh rnn`` makes that run).
"""

from __future__ import annotations

import os
import platform
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from rnn_helpers import int8_recurrent

from edgeq.deploy import cuda
from edgeq.deploy.mlp_plan import UnsupportedGraph
from edgeq.deploy.onnx_graph import parse_model
from edgeq.deploy.rnn_plan import fma32, mlas_logistic, mlas_tanh, recurrent_plan_from_graph, reference_step
from edgeq.deploy.runtime import OrtPolicy

CASES = {  # name: (kind, layers, encoder width, head activation)
    "lstm1-tanh": ("lstm", 1, 0, "tanh"),
    "lstm2-enc-relu": ("lstm", 2, 8, "relu"),
    "gru1-elu": ("gru", 1, 0, "elu"),
    "gru3-enc-tanh": ("gru", 3, 8, "tanh"),
}
_MODELS: dict[str, tuple[bytes, list]] = {}


def model(name: str) -> tuple[bytes, list]:
    if name not in _MODELS:
        kind, layers, enc, act = CASES[name]
        m, state = int8_recurrent(kind, layers, encoder=enc, activation=act, seed=len(_MODELS))
        _MODELS[name] = (m.SerializeToString(), state)
    return _MODELS[name]


def _steps(obs_dim: int = 5, steps: int = 240, batch: int = 3, seed: int = 5) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(steps, batch, obs_dim)) * 2).astype(np.float32)


def _episode_mask(t: int, batch: int) -> np.ndarray | None:
    """New episodes in some rows at a few steps (as vector envs reset them)."""
    if t in (80, 160):
        return np.arange(batch) % 2 == (t // 80) % 2
    return None


# -- the CPU's activation functions, reproduced ------------------------------------------------------------


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="MLAS's FMA3 Sigmoid/Tanh kernels are ONNX Runtime's x86-64 code; other CPUs use others")
def test_mlas_sigmoid_and_tanh_match_onnxruntime_cpu_bit_for_bit() -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.concatenate([np.linspace(-25, 25, 400_001, dtype=np.float32),
                        np.random.default_rng(0).normal(size=200_000).astype(np.float32) * 3,
                        np.random.default_rng(1).normal(size=100_003).astype(np.float32) * 1e-3])
    for op, ours in (("Sigmoid", mlas_logistic), ("Tanh", mlas_tanh)):
        g = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9  # readable by older ONNX Runtime releases too
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        mine = ours(x)
        assert int((mine != y).sum()) == 0, (op, x[mine != y][:5], y[mine != y][:5], mine[mine != y][:5])
        # and they are not the correctly rounded functions (so a GPU's own expf/tanhf would differ)
        exact = (1 / (1 + np.exp(-x.astype(np.float64))) if op == "Sigmoid" else np.tanh(x.astype(np.float64)))
        assert (mine != exact.astype(np.float32)).mean() > 0.2


def test_fma32_rounds_once() -> None:
    rng = np.random.default_rng(3)
    a = (rng.normal(size=4000) * 2.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    b = (rng.normal(size=4000) * 2.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    c = (rng.normal(size=4000) * 2.0 ** rng.integers(-60, 60, 4000)).astype(np.float32)
    # values whose float64 sum falls exactly halfway between two float32 values (double rounding's trap)
    a[:4] = np.float32(1 + 2.0 ** -23)
    b[:4] = np.float32(2.0 ** -24)
    c[:4] = np.float32([1.0, -1.0, 2.0 ** 30, 3.0])
    got = fma32(a, b, c)

    def exact(x: float, y: float, z: float) -> np.float32:
        v = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo = np.float32(float(v))  # a neighbour; then pick the nearest float32 exactly (ties to even)
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        dist = [abs(Fraction(float(t)) - v) for t in cands]
        best = min(dist)
        winners = [t for t, d in zip(cands, dist, strict=True) if d == best]
        return winners[0] if len(winners) == 1 else next(t for t in winners if int(t.view(np.int32)) % 2 == 0)

    want = np.array([exact(x, y, z) for x, y, z in zip(a, b, c, strict=True)], np.float32)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


# -- the plan and its numpy step against ONNX Runtime's CPU ------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_plan_step_is_bit_identical_to_onnxruntime_cpu(name: str) -> None:
    data, state = model(name)
    plan = recurrent_plan_from_graph(parse_model(data), state)
    kind, layers, enc, _ = CASES[name]
    assert (plan.kind, plan.num_layers, plan.hidden) == (kind, layers, 16)
    assert len(plan.cells[0].into.layers) == (2 if enc else 1) and plan.cells[0].into.pre  # normalization ops
    assert [la.n for la in plan.head.layers] == [32, 2]
    ort = OrtPolicy(data, state=state)
    s = plan.zero_state(3)
    worst = 0.0
    for t, obs in enumerate(_steps()):
        mask = _episode_mask(t, 3)
        if mask is not None:
            ort.reset(mask)
            for v in s.values():
                v[mask] = 0.0
        want = ort.run(obs, ["actions", *(sp["output"] for sp in state)])
        got, s = reference_step(plan, obs, s)
        worst = max(worst, float(np.abs(got - want["actions"]).max()))
        for sp in state:  # the state too, bit for bit
            assert np.array_equal(s[sp["input"]], want[sp["output"]])
    assert worst == 0.0


def test_plan_refuses_graphs_it_cannot_run() -> None:
    data, state = model("lstm1-tanh")
    m = onnx.load_from_string(data)
    # an LSTM whose forget gate is a Tanh is not an LSTM
    node = next(n for n in m.graph.node if n.op_type == "Sigmoid" and ".f" in n.name)
    node.op_type = "Tanh"
    with pytest.raises(UnsupportedGraph, match="not an LSTM's"):
        recurrent_plan_from_graph(parse_model(m.SerializeToString()), state)
    # the manifest's state does not name the graph's inputs
    with pytest.raises(UnsupportedGraph, match="inputs"):
        recurrent_plan_from_graph(parse_model(data), [{**state[0], "input": "hidden"}, state[1]])
    # a GRU's state given for an LSTM graph
    with pytest.raises(UnsupportedGraph):
        recurrent_plan_from_graph(parse_model(data), state[:1])
    # a gate product kept in float (--cell-precision fp32): not INT8, stays on ONNX Runtime
    m = onnx.load_from_string(data)
    for n in m.graph.node:
        if n.name == "rnn.l0.h_prev/QuantizeLinear":
            dq = next(d for d in m.graph.node if d.input and d.input[0] == n.output[0])
            for user in m.graph.node:
                user.input[:] = ["rnn.l0.h_prev" if i == dq.output[0] else i for i in user.input]
            m.graph.node.remove(dq)
            m.graph.node.remove(n)
            break
    with pytest.raises(UnsupportedGraph, match="INT8|float"):
        recurrent_plan_from_graph(parse_model(m.SerializeToString()), state)


def _nvrtc_reason() -> str | None:
    try:
        cuda.compile_cubin('extern "C" __global__ void k() {}', "90")
    except Exception as exc:  # noqa: BLE001 - NVRTC missing here
        return str(exc)[:200]
    return None


_NVRTC = _nvrtc_reason()


@pytest.mark.skipif(_NVRTC is not None, reason=f"NVRTC (cuda-python) does not compile here: {_NVRTC}")
@pytest.mark.parametrize("name", ["lstm2-enc-relu"])  # the GRU kernels are compiled by the GPU tests
def test_generated_kernel_compiles_for_hopper_without_a_gpu(name: str) -> None:
    """The kernel source generated for the plan compiles with NVRTC for sm_90 (no GPU needed), every rows-per-block
    variant, with the shared memory each needs within a Hopper block's."""
    from edgeq.deploy.fused_rnn import ROWS, RecurrentProgram

    data, state = model(name)
    program = RecurrentProgram(recurrent_plan_from_graph(parse_model(data), state))
    assert [f"rnn_step_r{r}" for r in ROWS] == program.kernels
    assert all(f"void __launch_bounds__(256) {k}(" in program.source for k in program.kernels)
    assert "mlas_logistic" in program.source and "expf(" not in program.source.replace("expm1f(", "")
    cubin, _ = cuda.compile_cubin(program.source, "90", options=["--fmad=false"])
    assert len(cubin) > 10_000
    assert program.shared_bytes(max(ROWS)) < 227 * 1024


def test_validation_cuda_target_and_deploy_pick_the_same_fused_recurrent_kernel(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where CUDA is there, ``edgeq validate --targets cuda`` runs a recurrent INT8 file on the fused LSTM/GRU
    kernel, as ``edgeq.deploy.load(b, "cuda")`` does (the wiring, with CUDA and the kernel stubbed)."""
    import edgeq.deploy.fused_rnn as fused_rnn
    from edgeq.validate import targets

    data, state = model("lstm1-tanh")
    path = tmp_path / "policy.int8.onnx"
    path.write_bytes(data)
    io = {"input": "obs", "output": "actions", "state": state}
    monkeypatch.setattr(cuda, "available", lambda device=0: None)
    assert targets.fused_cuda_reason(path, io) is None
    built: dict[str, object] = {}

    class Recorder:
        def __init__(self, model: object, **kw: object) -> None:
            built.update(model=model, **kw)

    monkeypatch.setattr(fused_rnn, "FusedRnnPolicy", Recorder)
    targets.fused_cuda_policy(path, io)
    assert built["model"] == path and built["state"] == state and built["cuda_graph"] is True
    # a graph the kernel does not run stays on ONNX Runtime's CUDA EP, with the reason
    assert "state tensors" in str(targets.fused_cuda_reason(path, {**io, "state": state * 2}))


# -- the kernel on the GPU -----------------------------------------------------------------------------------

_CUDA = cuda.available()
gpu = pytest.mark.skipif(_CUDA is not None, reason=f"needs an NVIDIA GPU and cuda-python: {_CUDA}")


def _fused(data: bytes, state: list, **kw: object):  # noqa: ANN202 - FusedRnnPolicy (imported lazily)
    from edgeq.deploy.fused_rnn import FusedRnnPolicy

    return FusedRnnPolicy(data, state=state, **kw)  # type: ignore[arg-type]


@gpu
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_step_matches_onnxruntime_cpu_with_resets(name: str) -> None:
    data, state = model(name)
    gpu_policy = _fused(data, state)
    ort = OrtPolicy(data, state=state)
    worst, rows_off, steps = 0.0, 0, 0
    for batch in (3, 1, 5):  # a batch size change after reset()
        for t, obs in enumerate(_steps(batch=batch, steps=200, seed=batch)):
            mask = _episode_mask(t, batch)
            if mask is not None:
                ort.reset(mask)
                gpu_policy.reset(mask)
            want = ort.run(obs, ["actions", *(sp["output"] for sp in state)])
            got = gpu_policy.act(obs)
            err = np.abs(got - want["actions"]).max(axis=1)
            worst = max(worst, float(err.max()))
            rows_off += int((err > 1e-5).sum())
            steps += 1
            if t % 50 == 0:  # the state on the GPU is the CPU's
                st = gpu_policy.state()
                for sp in state:
                    np.testing.assert_allclose(st[sp["input"]], want[sp["output"]], atol=1e-5, rtol=0)
        ort.reset()
        gpu_policy.reset()
    print(f"{name}: {steps} steps, max |gpu - ort cpu| {worst:.3g}, rows over 1e-5: {rows_off}")
    if CASES[name][3] == "elu":  # expm1f may differ from the CPU's by an ulp: a rare int8 flip
        assert rows_off <= 0.005 * steps * 3
    else:  # the same bits as the CPU
        assert worst == 0.0
    assert gpu_policy.runner.graph_nodes(3) == {"KERNEL": 1, "MEMCPY": 2}


@gpu
def test_gpu_batches_1_32_4096_match_the_reference_step() -> None:
    data, state = model("lstm2-enc-relu")
    plan = recurrent_plan_from_graph(parse_model(data), state)
    gpu_policy = _fused(data, state)
    for batch in (1, 32, 4096):
        gpu_policy.reset()
        s = plan.zero_state(batch)
        for t, obs in enumerate(_steps(batch=batch, steps=6, seed=batch)):
            if t == 3:
                mask = np.random.default_rng(t).random(batch) < 0.3
                gpu_policy.reset(mask)
                for v in s.values():
                    v[mask] = 0.0
            want, s = reference_step(plan, obs, s)
            got = gpu_policy.act(obs)
            assert np.array_equal(got, want), (batch, t, float(np.abs(got - want).max()))
        assert gpu_policy.runner.choice[batch].startswith("rnn_step_r")
    with pytest.raises(Exception, match="reset"):
        gpu_policy.act(_steps(batch=7, steps=1)[0])  # the state carries 4096 rows


def _bundle(var: str) -> Path:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set (a bundle made on the CPU machine; benchmarks/gpu_issue15.sh rnn)")
    return Path(path)


@gpu
@pytest.mark.parametrize("var,env_id", [("EDGEQ_GPU_BUNDLE_RPPO", "Pendulum-v1"),
                                        ("EDGEQ_GPU_BUNDLE_TSLSTM", "InvertedPendulum-v5")])
def test_gpu_matches_onnxruntime_cpu_over_full_episodes(var: str, env_id: str) -> None:
    """The trained fixtures' bundles, 4 envs in lockstep, full episodes with resets: GPU vs ORT CPU per step."""
    gym = pytest.importorskip("gymnasium")
    import edgeq.deploy as deploy

    bundle = _bundle(var)
    pol = deploy.load(bundle, backend="cuda", allow_unsigned=True)
    assert pol.backend == "cuda-fused" and "LSTM" in pol.providers[0], (pol.backend, pol.backend_notes)
    auto = deploy.load(bundle, backend="auto", allow_unsigned=True)
    assert auto.backend == "cuda-fused", auto.backend_notes
    ref = deploy.load(bundle, backend="cpu", precision="int8", allow_unsigned=True)
    ort = OrtPolicy(bundle / "policy.int8.onnx", state=ref.manifest["io"]["state"])  # the same file as the GPU
    n = 4
    envs = [gym.make(env_id) for _ in range(n)]
    obs = np.stack([e.reset(seed=1000 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    worst, rows_off, episodes = 0.0, 0, 0
    steps = 1200 if env_id == "Pendulum-v1" else 2000
    for t in range(steps):
        a_cpu = ort.act(obs)
        a_gpu = pol.act(obs)
        err = np.abs(a_gpu - a_cpu).max(axis=1)
        worst = max(worst, float(err.max()))
        rows_off += int((err > 1e-5).sum())
        starts = np.zeros(n, bool)
        for i, e in enumerate(envs):
            o, _, term, trunc, _ = e.step(a_cpu[i])
            if term or trunc or (t % 500 == 499 and i == t // 500 % n):
                o, _ = e.reset(seed=2000 + t + i)
                starts[i] = True
                episodes += 1
            obs[i] = o
        if starts.any():
            ort.reset(starts)
            pol.reset(starts)
    print(f"{env_id}: {steps} steps x {n} envs, {episodes} episodes ended, max |gpu - ort cpu| {worst:.3g}, "
          f"rows over 1e-5: {rows_off}")
    assert episodes >= 4
    if "ELU" in str(ref.manifest.get("source", {})) or env_id == "InvertedPendulum-v5":
        assert rows_off <= 0.005 * steps * n  # ELU head: expm1f's rare int8 flip
    else:
        assert worst == 0.0
