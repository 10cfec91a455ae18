"""Synthetic INT8 QDQ policies in edgeq's portable layout, for the fused GPU backend's tests.

``qdq_mlp`` writes ``[Mul(inv factors)] → Q → DQ, DQ(int8 W, per-channel) → MatMul → Add(bias) → act``
per layer and a ``Tanh → Mul → Add`` tail, with random weights and scales: the graph shape
``edgeq quantize`` exports (see the bundles' ``policy.int8.onnx``), at any widths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def qdq_mlp(path: Path, obs_dim: int = 17, hidden: tuple[int, ...] = (512, 256, 128), act_dim: int = 6, *,
            activation: str = "Elu", seed: int = 0, inv_factors: bool = True, rescale: bool = True,
            pre_sub_div: bool = False, window: tuple[int, int] | None = None) -> Path:
    """``window=(L, D)``: a history policy's input (``obs_dim`` = L·D): ``Reshape [-1, L, D] → Mul, Add`` by
    per-feature ``[D]`` constants ``→ Flatten``, as edgeq's frame-stack bundles start."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    cur = "obs"
    if window is not None:
        length, dim = window
        assert length * dim == obs_dim
        nodes.append(helper.make_node("Reshape", [cur, const("win.shape", np.array([-1, length, dim], np.int64))],
                                      ["win"], name="edgeq/history_reshape"))
        nodes.append(helper.make_node("Mul", ["win", const("win.scale", rng.uniform(0.5, 2, dim).astype(np.float32))],
                                      ["win_s"]))
        nodes.append(helper.make_node("Add", ["win_s", const("win.shift", rng.normal(size=dim).astype(np.float32))],
                                      ["win_t"]))
        nodes.append(helper.make_node("Flatten", ["win_t"], ["win_flat"], axis=1))
        cur = "win_flat"
    if pre_sub_div:
        nodes.append(helper.make_node("Sub", [cur, const("obs_mean", rng.normal(size=obs_dim).astype(np.float32))],
                                      ["obs_c"]))
        std = const("obs_std", rng.uniform(0.5, 2, obs_dim).astype(np.float32))
        nodes.append(helper.make_node("Div", ["obs_c", std], ["obs_n"]))
        nodes.append(helper.make_node("Clip", ["obs_n", const("clip_lo", np.array(-5, np.float32)),
                                               const("clip_hi", np.array(5, np.float32))], ["obs_clip"]))
        cur = "obs_clip"
    widths = [obs_dim, *hidden, act_dim]
    for i in range(len(widths) - 1):
        k, n = widths[i], widths[i + 1]
        p = f"l{i}"
        if inv_factors:
            nodes.append(helper.make_node("Mul", [cur, const(f"{p}.inv", rng.uniform(0.5, 2, k).astype(np.float32))],
                                          [f"{p}.scaled"]))
            cur = f"{p}.scaled"
        s = const(f"{p}.s", np.array(rng.uniform(0.01, 0.03), np.float32))
        zp = const(f"{p}.zp", np.array(0, np.int8))
        nodes.append(helper.make_node("QuantizeLinear", [cur, s, zp], [f"{p}.q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.q", s, zp], [f"{p}.dq"]))
        w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
        ws = (rng.uniform(0.5, 1.5, n) / (127 * np.sqrt(k))).astype(np.float32)
        nodes.append(helper.make_node("DequantizeLinear", [const(f"{p}.w", w), const(f"{p}.ws", ws),
                                                          const(f"{p}.wzp", np.zeros(n, np.int8))],
                                      [f"{p}.wdq"], axis=1))
        nodes.append(helper.make_node("MatMul", [f"{p}.dq", f"{p}.wdq"], [f"{p}.mm"], name=f"{p}/MatMul"))
        bias = const(f"{p}.b", (0.1 * rng.normal(size=n)).astype(np.float32))
        nodes.append(helper.make_node("Add", [f"{p}.mm", bias], [f"{p}.y"]))
        cur = f"{p}.y"
        if i < len(widths) - 2:
            kw = {"alpha": 1.0} if activation == "Elu" else {}
            nodes.append(helper.make_node(activation, [cur], [f"{p}.a"], **kw))
            cur = f"{p}.a"
    nodes.append(helper.make_node("Tanh", [cur], ["squash"]))
    cur = "squash"
    if rescale:
        nodes.append(helper.make_node("Mul", [cur, const("half", np.full(act_dim, 2.0, np.float32))], ["scaled"]))
        nodes.append(helper.make_node("Add", ["scaled", const("center", np.full(act_dim, 0.5, np.float32))],
                                      ["shifted"]))
        cur = "shifted"
    nodes.append(helper.make_node("Identity", [cur], ["actions"]))
    graph = helper.make_graph(nodes, "qdq_mlp", [helper.make_tensor_value_info("obs", TensorProto.FLOAT,
                                                                                ["batch", obs_dim])],
                              [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", act_dim])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def ort_cpu(path: Path, obs: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the CPU with edgeq's session options (integer kernels, ``MatMulAddFusion`` off)."""
    import onnxruntime as ort

    from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options("all", 1), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: obs})[0])
