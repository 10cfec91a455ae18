"""Tests for the static TensorRT QDQ conformance checker (edgeq.export.trt_rules).

Each test builds a small graph with ``onnx.helper`` that breaks one rule, starting from a clean
2-layer MLP that passes, plus checks on what ONNX Runtime's own quantizer produces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.export.trt_rules import RULES, Violation, check_qdq_model, format_report

OBS, HIDDEN, ACT = 8, 32, 4
RNG = np.random.default_rng(1234)
W1_F = RNG.normal(size=(HIDDEN, OBS)).astype(np.float32)
W2_F = (RNG.normal(size=(ACT, HIDDEN)) * 0.2).astype(np.float32)
B1 = RNG.normal(size=HIDDEN).astype(np.float32)
B2 = RNG.normal(size=ACT).astype(np.float32)


def _quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.abs(w).max(axis=reduce)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0 / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def _errors(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations if v.severity == "error"}


def mlp_qdq(
    *,
    opset: int = 17,
    quantize_obs: bool = True,
    w1_as_constant: bool = False,
    output_qdq: bool = False,
) -> onnx.ModelProto:
    """The clean reference: obs -> Q/DQ -> Gemm(transB=1, int8 W1 -> DQ axis 0) -> Relu -> Q/DQ -> Gemm."""
    w1_q, w1_s = _quantize_per_channel(W1_F, 0)
    w2_q, w2_s = _quantize_per_channel(W2_F, 0)
    inits = [
        numpy_helper.from_array(np.array(4.0 / 127, np.float32), "obs_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "obs_zp"),
        numpy_helper.from_array(w1_s, "w1_scale"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.int8), "w1_zp"),
        numpy_helper.from_array(B1, "b1"),
        numpy_helper.from_array(np.array(6.0 / 127, np.float32), "h_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "h_zp"),
        numpy_helper.from_array(w2_q, "w2_q"),
        numpy_helper.from_array(w2_s, "w2_scale"),
        numpy_helper.from_array(np.zeros(ACT, np.int8), "w2_zp"),
        numpy_helper.from_array(B2, "b2"),
    ]
    nodes = []
    if w1_as_constant:
        nodes.append(helper.make_node("Constant", [], ["w1_q"], name="w1_const", value=numpy_helper.from_array(w1_q)))
    else:
        inits.append(numpy_helper.from_array(w1_q, "w1_q"))
    x = "obs"
    if quantize_obs:
        nodes += [
            helper.make_node("QuantizeLinear", ["obs", "obs_scale", "obs_zp"], ["obs_q"], name="obs_Q"),
            helper.make_node("DequantizeLinear", ["obs_q", "obs_scale", "obs_zp"], ["obs_dq"], name="obs_DQ"),
        ]
        x = "obs_dq"
    nodes += [
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1"], name="w1_DQ", axis=0),
        helper.make_node("Gemm", [x, "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("QuantizeLinear", ["r", "h_scale", "h_zp"], ["r_q"], name="r_Q"),
        helper.make_node("DequantizeLinear", ["r_q", "h_scale", "h_zp"], ["r_dq"], name="r_DQ"),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zp"], ["w2"], name="w2_DQ", axis=0),
        helper.make_node("Gemm", ["r_dq", "w2", "b2"], ["pre" if output_qdq else "actions"], name="fc2", transB=1),
    ]
    if output_qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "a_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["pre", "a_scale", "a_zp"], ["a_q"], name="act_Q"),
            helper.make_node("DequantizeLinear", ["a_q", "a_scale", "a_zp"], ["actions"], name="act_DQ"),
        ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", OBS])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", ACT])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    found: onnx.TensorProto = next(t for t in model.graph.initializer if t.name == name)
    return found


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(value, name))


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    found: onnx.NodeProto = next(n for n in model.graph.node if n.name == name)
    return found


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _only(violations: list[Violation], rule: str) -> list[Violation]:
    return [v for v in violations if v.rule == rule]


# --- the clean graph ---------------------------------------------------------------------------------


def test_clean_mlp_passes_and_runs_in_onnxruntime() -> None:
    model = mlp_qdq()
    onnx.checker.check_model(model, full_check=True)
    assert check_qdq_model(model) == []
    assert format_report([]).endswith("OK (no rule violated)")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    obs = RNG.normal(size=(3, OBS)).astype(np.float32)
    (actions,) = sess.run(None, {"obs": obs})
    ref = np.maximum(obs @ W1_F.T + B1, 0) @ W2_F.T + B2
    np.testing.assert_allclose(actions, ref, atol=0.5)


def test_path_and_str_inputs(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_qdq(), str(path))
    assert check_qdq_model(path) == []
    assert check_qdq_model(str(path)) == []


def test_weights_as_constant_node_are_checked_like_initializers() -> None:
    model = mlp_qdq(w1_as_constant=True)
    onnx.checker.check_model(model, full_check=True)
    assert check_qdq_model(model) == []
    # Same rules apply: a wrong axis on a Constant-node weight is found.
    const = _node(model, "w1_const")
    w1_q, _ = _quantize_per_channel(W1_F, 0)
    w1_q[0, 0] = -128
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(w1_q))
    vs = check_qdq_model(model)
    assert _rules(vs) == {"weight-not-narrow"}
    assert vs[0].node == "w1_q" and vs[0].severity == "warning"


def test_violation_rejects_unknown_severity() -> None:
    with pytest.raises(ValueError, match="severity"):
        Violation("opset", "n", "m", "f", "fatal")


def test_every_reported_rule_is_documented() -> None:
    assert all(rule and summary for rule, summary in RULES.items())


# --- format rules ------------------------------------------------------------------------------------


def test_integer_ops_are_errors() -> None:
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="mmi"),
        helper.make_node("Cast", ["y"], ["out"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.int8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    vs = check_qdq_model(model)
    assert _errors(vs) == {"integer-op"}
    assert vs[0].node == "mmi" and "QDQ" in vs[0].fix


def test_dynamic_quantize_linear_is_error() -> None:
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "zp"], name="dql")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4])],
    )
    vs = check_qdq_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "dynamic-quantization" in _errors(vs)


def test_contrib_domain_qdq_is_error() -> None:
    model = mlp_qdq()
    _node(model, "obs_Q").domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert _errors(check_qdq_model(model)) == {"contrib-qdq"}


def test_opset_below_13_is_error() -> None:
    vs = check_qdq_model(mlp_qdq(opset=12))
    assert _errors(vs) == {"opset"}
    assert "13" in vs[0].message


def test_fp16_scales_need_opset_19() -> None:
    model = mlp_qdq(opset=17)
    _set_init(model, "h_scale", np.array(6.0 / 127, np.float16))
    vs = check_qdq_model(model)
    assert _errors(vs) == {"opset"}
    assert "19" in _only(vs, "opset")[0].message
    model.opset_import[0].version = 19
    assert check_qdq_model(model) == []


def test_float_model_without_qdq_warns() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    vs = check_qdq_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(v.rule, v.severity) for v in vs] == [("no-qdq", "warning")]


# --- zero points and scales ----------------------------------------------------------------------------


def test_nonzero_zero_point_is_error_reported_once_per_tensor() -> None:
    model = mlp_qdq()
    _set_init(model, "obs_zp", np.array(5, np.int8))
    vs = check_qdq_model(model)
    assert [(v.rule, v.node) for v in vs] == [("zero-point-nonzero", "obs_zp")]
    assert "obs_Q" in vs[0].message and "obs_DQ" in vs[0].message and "(5)" in vs[0].message


def test_uint8_zero_point_is_error() -> None:
    model = mlp_qdq()
    _set_init(model, "h_zp", np.array(0, np.uint8))
    vs = check_qdq_model(model)
    assert _rules(vs) == {"zero-point-dtype"}
    assert "uint8" in vs[0].message


def test_missing_zero_point_defaults_to_uint8() -> None:
    model = mlp_qdq()
    for name in ("r_Q", "r_DQ"):
        del _node(model, name).input[2]
    vs = check_qdq_model(model)
    assert _errors(vs) == {"zero-point-dtype"}
    assert {v.node for v in vs} == {"r_Q", "r_DQ"}


def test_runtime_computed_scale_is_error() -> None:
    model = mlp_qdq()
    model.graph.initializer.remove(_init(model, "obs_scale"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(127.0, np.float32), "c127"))
    compute = [
        helper.make_node("Abs", ["obs"], ["obs_abs"], name="abs"),
        helper.make_node("ReduceMax", ["obs_abs"], ["obs_max"], name="absmax", keepdims=0),
        helper.make_node("Div", ["obs_max", "c127"], ["obs_scale"], name="to_scale"),
    ]
    for i, n in enumerate(compute):
        model.graph.node.insert(i, n)
    vs = check_qdq_model(model)
    assert _errors(vs) == {"scale-not-constant"}
    assert vs[0].node == "obs_scale" and "to_scale" in vs[0].message


@pytest.mark.parametrize("bad", [0.0, -0.01, np.nan, np.inf])
def test_invalid_scale_is_error(bad: float) -> None:
    model = mlp_qdq()
    _, w1_s = _quantize_per_channel(W1_F, 0)
    w1_s[3] = bad
    _set_init(model, "w1_scale", w1_s)
    vs = check_qdq_model(model)
    assert _rules(vs) == {"scale-invalid"}
    assert vs[0].node == "w1_scale" and "1 of 32" in vs[0].message


def test_scale_length_must_match_axis() -> None:
    model = mlp_qdq()
    _set_init(model, "w1_scale", np.full(16, 0.01, np.float32))
    _set_init(model, "w1_zp", np.zeros(16, np.int8))
    vs = check_qdq_model(model)
    assert _errors(vs) == {"scale-shape"}
    assert "16 entries" in vs[0].message and "32" in vs[0].message


def test_zero_point_shape_must_match_scale() -> None:
    model = mlp_qdq()
    _set_init(model, "w1_zp", np.array(0, np.int8))
    vs = check_qdq_model(model)
    assert _errors(vs) == {"scale-shape"}
    assert "zero point 'w1_zp'" in vs[0].message


def test_two_dimensional_scale_is_error() -> None:
    model = mlp_qdq()
    _set_init(model, "obs_scale", np.full((1, 1), 0.03, np.float32))
    vs = check_qdq_model(model)
    assert "scale-shape" in _errors(vs)


def test_per_channel_activation_is_error() -> None:
    model = mlp_qdq()
    _set_init(model, "obs_scale", np.full(OBS, 0.03, np.float32))
    _set_init(model, "obs_zp", np.zeros(OBS, np.int8))
    vs = check_qdq_model(model)
    assert [(v.rule, v.node) for v in vs] == [("activation-per-channel", "obs_Q")]


# --- bias and weights ----------------------------------------------------------------------------------


def test_int32_bias_is_error() -> None:
    model = mlp_qdq()
    b1_scale = np.float32(4.0 / 127) * _quantize_per_channel(W1_F, 0)[1]
    model.graph.initializer.remove(_init(model, "b1"))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.rint(B1 / b1_scale).astype(np.int32), "b1_q"),
            numpy_helper.from_array(b1_scale.astype(np.float32), "b1_scale"),
        ]
    )
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["b1_q", "b1_scale"], ["b1"], name="b1_DQ", axis=0))
    onnx.checker.check_model(model, full_check=True)
    vs = check_qdq_model(model)
    assert [(v.rule, v.node) for v in vs] == [("int32-bias", "b1_DQ")]
    assert "QuantizeBias" in vs[0].fix


def _single_op_model(
    op: str, w_shape: tuple[int, ...], axis: int, x_shape: list[int], y_shape: list[int], **attrs: int
) -> onnx.ModelProto:
    w = RNG.normal(size=w_shape).astype(np.float32)
    n_ch = w_shape[axis]
    wq = np.clip(np.rint(w * 50), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, "w_q"),
        numpy_helper.from_array(np.full(n_ch, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(n_ch, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_DQ", axis=axis),
        helper.make_node(op, ["x_dq", "w"], ["y"], name="op"),
    ]
    nodes[-1].attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("op", "w_shape", "x_shape", "y_shape", "attrs", "good_axis", "bad_axis"),
    [
        ("Gemm", (16, 8), [1, 8], [1, 16], {"transB": 1}, 0, 1),
        ("Gemm", (8, 16), [1, 8], [1, 16], {"transB": 0}, 1, 0),
        ("MatMul", (8, 16), [1, 8], [1, 16], {}, 1, 0),
        ("Conv", (6, 3, 3, 3), [1, 3, 8, 8], [1, 6, 6, 6], {}, 0, 1),
        ("ConvTranspose", (3, 6, 3, 3), [1, 3, 8, 8], [1, 6, 10, 10], {}, 1, 0),
    ],
)
def test_per_channel_axis_must_match_consumer(
    op: str,
    w_shape: tuple[int, ...],
    x_shape: list[int],
    y_shape: list[int],
    attrs: dict[str, int],
    good_axis: int,
    bad_axis: int,
) -> None:
    good = _single_op_model(op, w_shape, good_axis, x_shape, y_shape, **attrs)
    onnx.checker.check_model(good, full_check=True)
    assert check_qdq_model(good) == []
    bad = _single_op_model(op, w_shape, bad_axis, x_shape, y_shape, **attrs)
    vs = check_qdq_model(bad)
    assert [(v.rule, v.node, v.severity) for v in vs] == [("per-channel-axis", "w_DQ", "error")]
    assert f"axis {good_axis}" in vs[0].fix


def test_per_channel_axis_checked_on_float_weight_q_dq_pair() -> None:
    model = _single_op_model("Gemm", (16, 8), 0, [1, 8], [1, 16], transB=1)
    # Replace the int8 weight by float weight -> Q(axis 1) -> DQ(axis 1), scales as long as axis 1.
    g = model.graph
    for name in ("w_q", "w_scale", "w_zp"):
        g.initializer.remove(_init(model, name))
    g.initializer.extend(
        [
            numpy_helper.from_array(RNG.normal(size=(16, 8)).astype(np.float32), "w_f"),
            numpy_helper.from_array(np.full(8, 0.02, np.float32), "w_scale"),
            numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        ]
    )
    _set_attr(_node(model, "w_DQ"), "axis", 1)
    g.node.insert(0, helper.make_node("QuantizeLinear", ["w_f", "w_scale", "w_zp"], ["w_q"], name="w_Q", axis=1))
    vs = check_qdq_model(model)
    assert {(v.rule, v.node) for v in vs} == {("per-channel-axis", "w_DQ"), ("per-channel-axis", "w_Q")}


def test_per_tensor_weight_is_warning() -> None:
    model = mlp_qdq()
    _set_init(model, "w1_scale", np.array(0.01, np.float32))
    _set_init(model, "w1_zp", np.array(0, np.int8))
    vs = check_qdq_model(model)
    assert [(v.rule, v.severity) for v in vs] == [("weight-per-tensor", "warning")]


def test_weight_outside_narrow_range_is_warning() -> None:
    model = mlp_qdq()
    w2 = numpy_helper.to_array(_init(model, "w2_q")).copy()
    w2[1, 2] = -128
    _set_init(model, "w2_q", w2)
    vs = check_qdq_model(model)
    assert [(v.rule, v.node, v.severity) for v in vs] == [("weight-not-narrow", "w2_q", "warning")]


# --- placement -----------------------------------------------------------------------------------------


def test_only_weight_quantized_is_warning() -> None:
    vs = check_qdq_model(mlp_qdq(quantize_obs=False))
    assert [(v.rule, v.node, v.severity) for v in vs] == [("one-input-quantized", "fc1", "warning")]


def test_qdq_on_weighted_output_is_warning() -> None:
    model = mlp_qdq()
    relu = _node(model, "relu1")
    relu.input[0] = "h_dq"
    idx = list(model.graph.node).index(relu)
    model.graph.node.insert(
        idx, helper.make_node("DequantizeLinear", ["h_q", "h_scale", "h_zp"], ["h_dq"], name="h_DQ")
    )
    model.graph.node.insert(idx, helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zp"], ["h_q"], name="h_Q"))
    vs = check_qdq_model(model)
    assert [(v.rule, v.node, v.severity) for v in vs] == [("qdq-on-weighted-output", "h_Q", "warning")]
    assert "Relu" in vs[0].message


def test_qdq_producing_graph_output_is_warning() -> None:
    vs = check_qdq_model(mlp_qdq(output_qdq=True))
    assert ("qdq-graph-output", "act_DQ") in {(v.rule, v.node) for v in vs}
    assert all(v.severity == "warning" for v in vs)


def test_qdq_pair_with_different_scales_is_warning() -> None:
    model = mlp_qdq()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "other_scale"))
    _node(model, "r_DQ").input[1] = "other_scale"
    vs = check_qdq_model(model)
    assert _rules(vs) == {"qdq-pair-mismatch"}


def test_concat_inputs_with_different_scales_warn() -> None:
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "sa"),
        numpy_helper.from_array(np.array(0.2, np.float32), "sb"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "sa", "zp"], ["aq"], name="aQ"),
        helper.make_node("DequantizeLinear", ["aq", "sa", "zp"], ["adq"], name="aDQ"),
        helper.make_node("QuantizeLinear", ["b", "sb", "zp"], ["bq"], name="bQ"),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zp"], ["bdq"], name="bDQ"),
        helper.make_node("Concat", ["adq", "bdq"], ["y"], name="cat", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    vs = check_qdq_model(model)
    assert [(v.rule, v.node, v.severity) for v in vs] == [("concat-scale-mismatch", "cat", "warning")]
    _node(model, "bQ").input[1] = "sa"
    _node(model, "bDQ").input[1] = "sa"
    assert check_qdq_model(model) == []


def test_report_lists_errors_first_with_fix_and_summary() -> None:
    model = mlp_qdq(quantize_obs=False)
    _set_init(model, "h_zp", np.array(3, np.int8))
    vs = check_qdq_model(model)
    assert [v.severity for v in vs] == ["error", "warning"]
    text = format_report(vs)
    assert text.splitlines()[0].startswith("ERROR   [zero-point-nonzero] h_zp:")
    assert "fix:" in text
    assert text.splitlines()[-1].startswith("TensorRT QDQ check: 1 error(s), 1 warning(s)")


# --- what ONNX Runtime's quantizer produces ----------------------------------------------------------


def _float_mlp() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["obs", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["pre"], name="fc2", transB=1),
        helper.make_node("Tanh", ["pre"], ["actions"], name="tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", OBS])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", ACT])],
        [numpy_helper.from_array(a, n) for a, n in ((W1_F, "W1"), (B1, "b1"), (W2_F, "W2"), (B2, "b2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort_quantize(tmp_path: Path, name: str, **kwargs: object) -> list[Violation]:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._it = iter([{"obs": rng.normal(size=(16, OBS)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    src = tmp_path / "float.onnx"
    onnx.save(_float_mlp(), str(src))
    dst = tmp_path / f"{name}.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # ORT logs "consider pre-processing" on root
    quantize_static(str(src), str(dst), Reader(), **kwargs)
    return check_qdq_model(dst)


def test_onnxruntime_default_quantize_static_breaks_trt_rules(tmp_path: Path) -> None:
    vs = _ort_quantize(tmp_path, "default")
    # Found by running it (ORT 1.32): asymmetric int8 activations and an int32 bias are errors;
    # per-tensor weights and a quantized Gemm output before Tanh are warnings.
    assert _errors(vs) == {"zero-point-nonzero", "int32-bias"}
    assert {"weight-per-tensor", "qdq-on-weighted-output"} <= _rules(vs) - _errors(vs)
    assert len(_only(vs, "int32-bias")) == 2  # both Gemm biases


def test_onnxruntime_uint8_activations_break_zero_point_dtype(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType

    vs = _ort_quantize(tmp_path, "u8", activation_type=QuantType.QUInt8)
    assert "zero-point-dtype" in _errors(vs)


def test_onnxruntime_tensorrt_settings_break_fewer(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType

    trt_like: dict[str, object] = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QInt8,
        "weight_type": QuantType.QInt8,
    }
    options: dict[str, object] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QDQKeepRemovableActivations": True,  # keep Relu explicit; TensorRT fuses it itself
        "QuantizeBias": False,  # float bias (rule 7)
    }
    default = _ort_quantize(tmp_path, "default")
    trt = _ort_quantize(tmp_path, "trt", extra_options=options, **trt_like)
    assert _errors(trt) == set()
    assert len(trt) < len(default)
    # What is left: ORT still quantizes the Gemm outputs (before Relu and Tanh).
    assert _rules(trt) == {"qdq-on-weighted-output"}
    # Excluding Gemm outputs from quantization makes it fully conformant.
    options["OpTypesToExcludeOutputQuantization"] = ["Gemm", "MatMul"]
    assert _ort_quantize(tmp_path, "trt_clean", extra_options=options, **trt_like) == []
