"""int4 weights (W4A8): exact packing, the quantizer, the QDQ opset-21 export ORT runs, MatMulNBits, plan round-trip."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.int4 import (
    int4_layer_names,
    int4_tensor,
    specialize_int4_for_ort_cpu,
    tensor_int4_values,
    weight_only,
)
from edgeq.export.ort_cpu import int8_layer_names, specialize_for_ort_cpu
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.quantizers.int4 import Int4Weight, pack_int4, quantize_weight_int4, unpack_int4
from edgeq.quantizers.mixed import with_int4
from edgeq.quantizers.plan import QuantPlan, make_plan
from tests.quant_helpers import mlp, stats_for


def test_pack_unpack_exact_and_onnx_agrees() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 257):
        v = rng.integers(-8, 8, size=n).astype(np.int8)
        raw = pack_int4(v)
        assert len(raw) == (n + 1) // 2
        assert np.array_equal(unpack_int4(raw, n), v)
        t = int4_tensor(v.reshape(1, n), "t")
        assert np.array_equal(np.asarray(numpy_helper.to_array(t), np.int8).reshape(-1), v)  # onnx's own reader
        assert np.array_equal(tensor_int4_values(t).reshape(-1), v)
    assert pack_int4(np.array([1, -1], np.int8)) == bytes([0xF1])  # element 0 in the low nibble
    with pytest.raises(ValueError):
        pack_int4(np.array([8]))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("block", [0, 16])
def test_int4_quantizer_range_error_and_layout(axis: int, block: int) -> None:
    rng = np.random.default_rng(1)
    w_oi = rng.standard_normal((6, 40)).astype(np.float32)
    w_oi[2] = 0.0  # a dead channel dequantizes to exact zeros
    w = w_oi if axis == 0 else w_oi.T
    for method in ("absmax", "mse"):
        q = quantize_weight_int4(w, axis, block_size=block, method=method)
        assert q.q.shape == w.shape and np.abs(q.q).max() <= 7
        assert q.scale.shape == ((6,) if block == 0 else ((6, 3) if axis == 0 else (3, 6)))
        deq = q.dequantize()
        assert np.all(deq[(2, slice(None)) if axis == 0 else (slice(None), 2)] == 0)
        if method == "absmax":  # nothing clipped: every error within half a step
            assert np.all(np.abs(deq - w) <= q.scale_full() / 2 + 1e-6)
    a = quantize_weight_int4(w, axis, block_size=block, method="absmax")
    m = quantize_weight_int4(w, axis, block_size=block, method="mse")
    assert np.square(m.dequantize() - w).sum() <= np.square(a.dequantize() - w).sum()
    # blocks of 16 fit the weight better than one scale per channel
    if block:
        pc = quantize_weight_int4(w, axis, method="mse")
        assert np.square(m.dequantize() - w).sum() < np.square(pc.dequantize() - w).sum()
    with pytest.raises(ValueError):
        Int4Weight(np.full((2, 2), 8, np.int8), np.ones(2, np.float32), 0)


def _mlp_plan(block: int = 0) -> tuple[onnx.ModelProto, QuantPlan, QuantPlan, np.ndarray]:
    rng = np.random.default_rng(2)
    sizes = [(8, 64), (64, 64), (64, 3)]
    model = mlp([(rng.standard_normal((o, i)).astype(np.float32) / np.sqrt(i), rng.standard_normal(o) * 0.1)
                 for i, o in sizes])
    states = rng.standard_normal((512, 8)).astype(np.float32)
    base = make_plan(model, stats_for(model, states).observers, calibrator="max")
    plan = base
    for wl in find_weighted_layers(model)[:2]:
        plan = with_int4(plan, wl.node, np.asarray(constant_value(model, wl.weight)), block_size=block)
    return model, base, plan, states


def _reference(model: onnx.ModelProto, plan: QuantPlan, x: np.ndarray) -> np.ndarray:
    """numpy W4A8: int8 fake-quant of each quantized layer's input, int4/int8 dequantized weights, tanh-free MLP."""
    h = x.astype(np.float32)
    layers = find_weighted_layers(model)
    for i, wl in enumerate(layers):
        la = plan.layer(wl.node)
        s = np.float32(plan.activations[la.input].scale)
        hq = (np.clip(np.rint(h / s), -127, 127) * s).astype(np.float32)
        w = la.weight4.dequantize() if la.precision == "int4" else la.weight.dequantize()
        b = np.asarray(constant_value(model, wl.bias), np.float32)
        h = hq @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("block", [0, 32])
def test_w4a8_qdq_file_runs_in_ort_and_matches_numpy(block: int, tmp_path) -> None:
    model, base, plan, states = _mlp_plan(block)
    q = apply_plan(model, plan)  # full ONNX check inside
    assert max(op.version for op in q.opset_import if op.domain in ("", "ai.onnx")) >= 21 and q.ir_version >= 10
    inits = {t.name: t for t in q.graph.initializer}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].data_type == TensorProto.INT4]
    assert len(dqs) == 2
    for n in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == ({"axis": 1} if block == 0 else {"axis": 0, "block_size": 32})
        assert np.all(tensor_int4_values(inits[n.input[2]]) == 0)
    assert len(int4_layer_names(q)) == 2 and len(int8_layer_names(q)) == 1
    got = OrtPolicy(q.SerializeToString()).act(states[:64])
    np.testing.assert_allclose(got, _reference(model, plan, states[:64]), atol=2e-5, rtol=1e-5)
    # smaller than the all-int8 file: the two hidden layers' weights take half the bytes
    assert len(q.SerializeToString()) < len(apply_plan(model, base).SerializeToString()) - 64 * 64 // 2 + 200
    # the CPU file: int8 layer → MatMulIntegerToFloat, int4 layers → MatMulNBits after their activation Q/DQ
    cpu = specialize_int4_for_ort_cpu(specialize_for_ort_cpu(q))
    ops = [n.op_type for n in cpu.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMulIntegerToFloat") == 1
    assert all(n.op_type != "DequantizeLinear" or inits.get(n.input[0]) is None
               or inits[n.input[0]].data_type != TensorProto.INT4 for n in cpu.graph.node)
    np.testing.assert_allclose(OrtPolicy(cpu.SerializeToString()).act(states[:64]), got, atol=2e-4, rtol=1e-4)
    # TensorRT's weight-only form: no Q/DQ before the int4 MatMuls
    wo = weight_only(q)
    producer = {o: n for n in wo.graph.node for o in n.output}
    for mm in [n for n in wo.graph.node if n.name in int4_layer_names(wo)]:
        assert producer.get(mm.input[0]) is None or producer[mm.input[0]].op_type != "DequantizeLinear"
    onnx.checker.check_model(wo, full_check=True)
    ort.InferenceSession(wo.SerializeToString(), providers=["CPUExecutionProvider"])


def test_plan_with_int4_round_trips(tmp_path) -> None:
    model, _, plan, states = _mlp_plan(32)
    back = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert [la.precision for la in back.layers] == ["int4", "int4", "int8"]
    for a, b in zip(plan.int4_layers(), back.int4_layers(), strict=True):
        assert b.weight4 is not None and a.weight4 is not None
        assert np.array_equal(a.weight4.q, b.weight4.q) and np.array_equal(a.weight4.scale, b.weight4.scale)
        assert b.weight4.block_size == 32
    assert apply_plan(model, back).SerializeToString() == apply_plan(model, plan).SerializeToString()
    assert not plan.tensorrt_compatible
    row = plan.to_json()["layers"][0]
    assert row["precision"] == "int4" and row["weight_bits"] == 4 and row["activation"] == "int8"


# ---------------------------------------------------------------------------------------------------
# TensorRT's INT4 rules (docs/tensorrt-int4-rules.md): weight-only INT4, blocks INT4-only, 2-D, along K


def _rules(model: onnx.ModelProto) -> dict[str, str]:
    from edgeq.export.trt_rules import check_qdq_model

    return {v.rule: v.severity for v in check_qdq_model(model)}


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], k: int = 64, n: int = 8) -> onnx.ModelProto:
    g = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                               [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _w4(k: int = 64, n: int = 8, block: int = 32, axis: int = 0, name: str = "w") -> list[onnx.TensorProto]:
    q = np.random.default_rng(3).integers(-7, 8, size=(k, n)).astype(np.int8)
    shape = [k // block, n] if axis == 0 else [k, n // block]
    return [int4_tensor(q, name), numpy_helper.from_array(np.full(shape, 0.01, np.float32), f"{name}_s"),
            int4_tensor(np.zeros(shape, np.int8), f"{name}_z")]


def test_trt_int4_rules_accept_the_weight_only_files_and_flag_w4a8() -> None:
    for block in (0, 32):
        model, _, plan, _ = _mlp_plan(block)
        w4a8 = apply_plan(model, plan)
        found = _rules(w4a8)
        assert found.get("int4-weight-only") == "error"
        wo = _rules(weight_only(w4a8))
        assert not [r for r, s in wo.items() if s == "error"], wo
        assert "one-input-quantized" not in wo  # INT4 weight-only is TensorRT's INT4 mode, not a half-quantized GEMM
        assert "per-channel-axis" not in found  # blocked along K (axis 0 of [K, N]) is right for a MatMul


def test_trt_int4_rules_flag_bad_files() -> None:
    dq = onnx.helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wd"], axis=0, block_size=32)
    good = _graph([dq, onnx.helper.make_node("MatMul", ["x", "wd"], ["y"])], _w4())
    assert not [r for r, s in _rules(good).items() if s == "error"]
    # blocks along N (the output channels) instead of K
    dq_n = onnx.helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wd"], axis=1, block_size=4)
    assert _rules(_graph([dq_n, onnx.helper.make_node("MatMul", ["x", "wd"], ["y"])], _w4(block=4, axis=1))
                  ).get("block-axis") == "warning"
    # block quantization of an INT8 weight: TensorRT blocks INT4 only
    q8 = numpy_helper.from_array(np.ones((64, 8), np.int8), "w")
    inits8 = [q8, numpy_helper.from_array(np.full((2, 8), 0.01, np.float32), "w_s"),
              numpy_helper.from_array(np.zeros((2, 8), np.int8), "w_z")]
    assert _rules(_graph([dq, onnx.helper.make_node("MatMul", ["x", "wd"], ["y"])], inits8)).get("block-not-int4") \
        == "error"
    # an activation quantized to INT4
    acts = [numpy_helper.from_array(np.array(0.1, np.float32), "a_s"), int4_tensor(np.zeros((), np.int8), "a_z")]
    qa = [onnx.helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]),
          onnx.helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"])]
    w = numpy_helper.from_array(np.ones((64, 8), np.float32), "wf")
    bad_act = _graph([*qa, onnx.helper.make_node("MatMul", ["xd", "wf"], ["y"])], [*acts, w])
    assert _rules(bad_act).get("int4-activation") == "error"
    # an INT4 weight feeding something other than a GEMM's weight input
    add = _graph([dq, onnx.helper.make_node("MatMul", ["x", "wf"], ["m"]),
                  onnx.helper.make_node("ReduceSum", ["wd"], ["r"], keepdims=0),
                  onnx.helper.make_node("Add", ["m", "r"], ["y"])], [*_w4(), w])
    assert _rules(add).get("int4-consumer") == "error"
    # a 3-D blocked weight
    q3 = np.zeros((2, 64, 8), np.int8)
    i3 = [int4_tensor(q3, "w"), numpy_helper.from_array(np.full((2, 2, 8), 0.01, np.float32), "w_s"),
          int4_tensor(np.zeros((2, 2, 8), np.int8), "w_z")]
    dq3 = onnx.helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wd"], axis=1, block_size=32)
    bad3 = _graph([dq3, onnx.helper.make_node("MatMul", ["x", "wd"], ["m"]),
                   onnx.helper.make_node("ReduceSum", ["m", "axes"], ["y"], keepdims=0)],
                  [*i3, numpy_helper.from_array(np.array([0], np.int64), "axes")])
    assert _rules(bad3).get("block-rank") == "error"


def test_candidates_rank_int4_moves_by_error_per_byte_and_start_from_the_smallest() -> None:
    from edgeq.quantizers.mixed import candidate_plans, layer_sizes, plan_weight_bytes, rank_layers

    model, base, _, _ = _mlp_plan(0)
    wls = find_weighted_layers(model)
    one = {wl.node: with_int4(base, wl.node, np.asarray(constant_value(model, wl.weight))) for wl in wls}
    sizes = layer_sizes(base, {wl.node: np.asarray(constant_value(model, wl.weight)).shape for wl in wls})
    saved = {n: plan_weight_bytes(base, sizes) - plan_weight_bytes(p, sizes) for n, p in one.items()}
    assert saved[wls[1].node] > saved[wls[0].node] > saved[wls[2].node] > 0  # 64x64 > 8x64 > 64x3
    fake = {wls[0].node: 2.0, wls[1].node: 3.0, wls[2].node: 1.5}  # the big layer hurts most, but per byte least

    def score(p: QuantPlan) -> float:
        moved = [la.node for la in p.int4_layers()]
        return 1.0 + sum(fake[n] - 1.0 for n in moved)

    ranking = rank_layers(base, one, score, saved)
    assert [n for n, _ in ranking][0] == wls[1].node
    assert [n for n, _ in rank_layers(base, one, score)][0] == wls[2].node  # by sensitivity alone: the tiny layer
    cands = candidate_plans(base, one, ranking, sizes, fp16_layers=[wls[0].node], score=score)
    names = [c.name for c in cands]
    assert names[0] == "W4A8" and names.index("W8A8") < names.index("int8+fp16x1")
    assert [c.weight_bytes for c in cands] == sorted(c.weight_bytes for c in cands)
    assert all(c.proxy is not None for c in cands)


def test_gptq_int4_lowers_the_heldout_output_error_or_keeps_nearest() -> None:
    from edgeq.quantizers.mixed import gptq_int4

    rng = np.random.default_rng(5)
    k, n = 48, 16
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (rng.standard_normal((2000, k)) @ mix + 0.3).astype(np.float32)  # correlated inputs
    s = np.abs(x).max() / 127
    x_hat = (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    for block in (0, 16):
        near = quantize_weight_int4(w, 0, block_size=block)
        got, rep = gptq_int4(w, near, x_hat, x)
        assert rep["used"] and rep["heldout_output_mse_gptq"] < 0.9 * rep["heldout_output_mse_nearest"]
        assert np.abs(got.q).max() <= 7 and np.array_equal(got.scale, near.scale) and got.block_size == block
        # [in, out] storage (MatMul weights) gives the same integers, transposed
        got_t, _ = gptq_int4(w, quantize_weight_int4(w.T, 1, block_size=block), x_hat, x)
        assert np.array_equal(got_t.q.T, got.q)
