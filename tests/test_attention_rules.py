"""TensorRT placement rules for attention and normalization (``edgeq check``), one test per rule."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.export.trt_rules import RULES, check_qdq_model
from edgeq.graph.analysis import find_activation_matmuls
from edgeq.graph.attention import move_attention_scale

D, T = 8, 4


def _qdq(name: str, scale: float, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}.s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}.z")]
    nodes += [helper.make_node("QuantizeLinear", [name, f"{name}.s", f"{name}.z"], [f"{name}.q"], name=f"{name}/Q"),
              helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"], [f"{name}.dq"],
                               name=f"{name}/DQ")]
    return f"{name}.dq"


def attention(*, q_int8: bool = True, k_int8: bool = True, p_int8: bool = True, v_int8: bool = True,
              scores_int8: bool = False, scale_after: bool = False, ln_input_int8: bool = False,
              ln_fp16: bool = False, residual_int8: bool = False) -> onnx.ModelProto:
    """x [1, T, D] → LN → q, k, v (MatMul with int8 weights) → softmax(q·kᵀ + mask)·v → + x → LN → y."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.ones(D, np.float32), "ln.g"),
        numpy_helper.from_array(np.zeros(D, np.float32), "ln.b"),
        numpy_helper.from_array(np.triu(np.full((T, T), -1e4, np.float32), 1), "mask"),
        numpy_helper.from_array(np.array(0.25, np.float32), "scale")]
    ln_in = _qdq("x", 0.05, nodes, inits) if ln_input_int8 else "x"
    if ln_fp16:
        nodes.append(helper.make_node("Cast", [ln_in], ["x16"], name="to_fp16", to=TensorProto.FLOAT16))
        inits += [numpy_helper.from_array(np.ones(D, np.float16), "ln.g16"),
                  numpy_helper.from_array(np.zeros(D, np.float16), "ln.b16")]
        nodes.append(helper.make_node("LayerNormalization", ["x16", "ln.g16", "ln.b16"], ["h16"], name="ln1", axis=-1))
        nodes.append(helper.make_node("Cast", ["h16"], ["h"], name="to_fp32", to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("LayerNormalization", [ln_in, "ln.g", "ln.b"], ["h"], name="ln1", axis=-1))
    h_dq = _qdq("h", 0.03, nodes, inits)
    for p in "qkv":
        w = rng.integers(-127, 128, (D, D)).astype(np.int8)
        inits += [numpy_helper.from_array(w, f"w{p}"), numpy_helper.from_array(np.full(D, 0.01, np.float32), f"w{p}.s"),
                  numpy_helper.from_array(np.zeros(D, np.int8), f"w{p}.z")]
        nodes.append(helper.make_node("DequantizeLinear", [f"w{p}", f"w{p}.s", f"w{p}.z"], [f"w{p}.dq"], axis=1,
                                      name=f"w{p}/DQ"))
        nodes.append(helper.make_node("MatMul", [h_dq, f"w{p}.dq"], [p], name=f"proj_{p}"))
    q_in = p_q = "q"
    if not scale_after:
        nodes.append(helper.make_node("Mul", ["q", "scale"], ["qs"], name="scale_q"))
        q_in = p_q = "qs"
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]))
    a = _qdq(p_q, 0.05, nodes, inits) if q_int8 else q_in
    b = _qdq("kt", 0.05, nodes, inits) if k_int8 else "kt"
    nodes.append(helper.make_node("MatMul", [a, b], ["scores"], name="bmm1"))
    s = "scores"
    if scale_after:
        nodes.append(helper.make_node("Mul", ["scores", "scale"], ["scores_s"], name="scale_scores"))
        s = "scores_s"
    nodes.append(helper.make_node("Add", [s, "mask"], ["masked"], name="mask_add"))
    sm_in = _qdq("masked", 0.1, nodes, inits) if scores_int8 else "masked"
    nodes.append(helper.make_node("Softmax", [sm_in], ["p"], name="softmax", axis=-1))
    pa = _qdq("p", 1 / 127, nodes, inits) if p_int8 else "p"
    vb = _qdq("v", 0.05, nodes, inits) if v_int8 else "v"
    nodes.append(helper.make_node("MatMul", [pa, vb], ["att"], name="bmm2"))
    r_in = _qdq("att", 0.05, nodes, inits) if residual_int8 else "att"
    nodes.append(helper.make_node("Add", ["x", r_in], ["res"], name="residual"))
    nodes.append(helper.make_node("LayerNormalization", ["res", "ln.g", "ln.b"], ["y"], name="ln2", axis=-1))
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _rules(m: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_qdq_model(m)}


ATTENTION_RULES = ("bmm-one-input-quantized", "softmax-quantized-input", "attention-scale-after-bmm1",
                   "layernorm-quantized-input", "layernorm-fp16", "residual-add-quantized")


def test_attention_rules_are_documented() -> None:
    assert all(r in RULES for r in ATTENTION_RULES)


def test_well_placed_int8_attention_passes_and_runs() -> None:
    m = attention()
    assert not (_rules(m) & set(ATTENTION_RULES)), check_qdq_model(m)
    assert not [v for v in check_qdq_model(m) if v.severity == "error"]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)})
    assert np.isfinite(y).all()


@pytest.mark.parametrize("missing", ["q_int8", "k_int8", "p_int8", "v_int8"])
def test_bmm_with_one_quantized_input_warns(missing: str) -> None:
    found = [v for v in check_qdq_model(attention(**{missing: False})) if v.rule == "bmm-one-input-quantized"]
    assert [v.node for v in found] == ["bmm1" if missing in ("q_int8", "k_int8") else "bmm2"]
    assert found[0].severity == "warning"
    assert "one-input-quantized" not in _rules(attention(**{missing: False}))  # not reported twice


def test_float_attention_is_not_a_one_input_violation() -> None:
    m = attention(q_int8=False, k_int8=False, p_int8=False, v_int8=False)
    assert "bmm-one-input-quantized" not in _rules(m)


def test_quantized_softmax_input_warns() -> None:
    assert "softmax-quantized-input" in _rules(attention(scores_int8=True))


def test_scale_after_bmm1_warns_and_moving_it_is_exact() -> None:
    m = attention(scale_after=True, q_int8=False, k_int8=False)
    found = [v for v in check_qdq_model(m) if v.rule == "attention-scale-after-bmm1"]
    assert [v.node for v in found] == ["scale_scores"]
    x = np.random.default_rng(2).standard_normal((1, T, D)).astype(np.float32)
    before = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    moved = move_attention_scale(m)
    assert moved == ["scale_scores"]
    assert "attention-scale-after-bmm1" not in _rules(m)
    after = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)  # scale 0.25 is a power of two: bit for bit


def test_layernorm_int8_input_and_fp16_warn() -> None:
    assert "layernorm-quantized-input" in _rules(attention(ln_input_int8=True))
    assert "layernorm-fp16" in _rules(attention(ln_fp16=True))
    assert not {"layernorm-quantized-input", "layernorm-fp16"} & _rules(attention())


def test_quantized_residual_add_warns() -> None:
    found = [v for v in check_qdq_model(attention(residual_int8=True)) if v.rule == "residual-add-quantized"]
    assert [v.node for v in found] == ["residual"]


def test_attention_matmul_roles() -> None:
    roles = {a.node: a.role for a in find_activation_matmuls(attention(q_int8=False, k_int8=False, p_int8=False,
                                                                       v_int8=False))}
    assert roles == {"bmm1": "attention-scores", "bmm2": "attention-values"}
