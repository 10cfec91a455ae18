"""AffineQuant on the observation input (issue 12 part 3): the learned scale + shift is exact in float (Sub/Mul
pre-op, the first layer's weight and bias), lowers the first layer's int8 error on offset observation channels,
and the plan carrying it exports an all-INT8 QDQ file that round-trips."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_helpers import mlp, stats_for

from edgeq.export.qdq import apply_plan
from edgeq.export.trt_rules import check_qdq_model
from edgeq.quantizers.affine import learn_input_affine
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.plan import QuantPlan
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings

OFFSET = np.array([8.0, -5.0, 0.0, 3.0, 0.5])  # observation channels far from 0 (a position, a height)


def _run(model: onnx.ModelProto, obs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["actions"], {"obs": obs})[0], np.float64)


def _obs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 5)) * np.array([0.3, 0.5, 2.0, 0.2, 1.0]) + OFFSET).astype(np.float32)


def _weights(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 0.5, (16, 5)), rng.normal(0, 0.1, 16)), (rng.normal(0, 0.3, (16, 16)),
            rng.normal(0, 0.1, 16)), (rng.normal(0, 0.3, (2, 16)), rng.normal(0, 0.1, 2))]


def _matmul_mlp(weights: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    nodes, inits, x = [], [], "obs"
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w.T.astype(np.float32), f"w{i}"), numpy_helper.from_array(
            b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"L{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"], name=f"L{i}/bias")]
        x = f"z{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["actions"], name="out"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["b", 5])],
                          [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_scale_and_shift_rewrite_is_exact_in_float(kind: str) -> None:
    model = mlp(_weights()) if kind == "gemm" else _matmul_mlp(_weights())
    first = model.graph.node[0].name
    obs = _obs(500, 1)
    d = np.random.default_rng(2).uniform(0.5, 3.0, 5)
    sc = InputScaling(first, d, "affinequant", 0.0, "mul", shift=OFFSET.copy())
    out = apply_input_scalings(model, [sc])
    ops = [n.op_type for n in out.graph.node]
    assert ops[:2] == ["Sub", "Mul"]  # the elementwise pre-op on the observation
    ref = _run(model, obs)
    assert np.abs(_run(out, obs) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    with pytest.raises(ValueError, match="folded"):
        InputScaling(first, d, "affinequant", 0.0, "folded", shift=OFFSET.copy())


def test_learned_shift_lowers_the_first_layer_error_on_offset_channels() -> None:
    obs = _obs(2000, 3).astype(np.float64)
    w = _weights()[0][0]
    amax0 = float(np.abs(obs).max())
    res = learn_input_affine(obs, w, np.ones(5), amax0, seed=0, iters=120)
    plain = learn_input_affine(obs, w, np.ones(5), amax0, seed=0, shift=False, iters=120)
    assert res.loss_end < 0.5 * res.loss_start, res
    assert res.loss_end < plain.loss_end  # the translation is what the offset channels need
    # the learned shift moves the large offsets towards the channels' centres
    assert np.sign(res.shift[0]) == np.sign(OFFSET[0]) and np.sign(res.shift[1]) == np.sign(OFFSET[1])
    again = learn_input_affine(obs, w, np.ones(5), amax0, seed=0, iters=120)
    assert np.array_equal(again.shift, res.shift) and np.array_equal(again.factors, res.factors)


def test_plan_stage_exports_all_int8_and_round_trips() -> None:
    model = mlp(_weights())
    calib, held = _obs(3000, 1), _obs(800, 2)
    stats = stats_for(model, calib, held)
    base = build_plan(model, stats, QuantOptions(), lower=apply_plan)
    plan = build_plan(model, stats, QuantOptions(affine_input=True), lower=apply_plan)
    stage = plan.metrics["stages"]["affine"]
    assert stage["kept"], stage
    assert plan.metrics["heldout_action_error"]["mean"] < base.metrics["heldout_action_error"]["mean"]
    t = plan.transforms[0]
    assert t.method == "affinequant" and t.shift is not None
    q = apply_plan(model, plan)
    assert not [v for v in check_qdq_model(q) if v.severity == "error"]
    assert sum(t.data_type == TensorProto.INT8 and len(t.dims) == 2 for t in q.graph.initializer) == 3
    back = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.transforms[0].shift is not None and np.array_equal(back.transforms[0].shift, t.shift)
    assert apply_plan(model, back).SerializeToString(deterministic=True) == q.SerializeToString(deterministic=True)
