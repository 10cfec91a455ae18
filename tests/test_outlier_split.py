"""Outlier channel splitting (issue 12 part 3): exact in float, lowers the per-channel int8 error of a layer with
an outlier, and the plan carrying the splits exports ordinary wider INT8 layers that ORT and the QDQ checks accept."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from quant_helpers import mlp, stats_for

from edgeq.export.qdq import apply_plan
from edgeq.export.trt_rules import check_qdq_model
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.plan import QuantPlan
from edgeq.quantizers.split import ChannelSplit, apply_splits, choose_splits
from edgeq.quantizers.weights import quantize_weight
from edgeq.validate.layers import per_layer_error


def _run(model: onnx.ModelProto, obs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["actions"], {"obs": obs})[0], np.float64)


def _weights(seed: int = 0, outlier_col: int = 5, outlier_unit: int | None = 9) -> list[tuple[np.ndarray, np.ndarray]]:
    """obs[6] -> 24 -> 24 -> 3; layer 2 has one weight column of magnitude 4 (an outlier column: every row's
    largest weight, the others ~N(0, 0.3)), and hidden unit ``outlier_unit`` of layer 1 fires 10x larger than
    the rest (an activation outlier)."""
    rng = np.random.default_rng(seed)
    w0, b0 = rng.normal(0, 0.5, (24, 6)), rng.normal(0, 0.1, 24)
    if outlier_unit is not None:
        w0[outlier_unit] *= 10.0
    w1, b1 = rng.normal(0, 0.3, (24, 24)), rng.normal(0, 0.1, 24)
    w1[:, outlier_col] = 4.0 * np.sign(rng.normal(size=24))
    w2, b2 = rng.normal(0, 0.3, (3, 24)), rng.normal(0, 0.1, 3)
    return [(w0, b0), (w1, b1), (w2, b2)]


def _obs(n: int = 2048, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def test_splits_are_exact_on_a_matmul_graph() -> None:
    """MatMul + Add layers (ONNX / TorchScript ingest): weights stored [in, out], the bias in the Add."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "obs"
    for i, (w, b) in enumerate(_weights()):
        inits += [numpy_helper.from_array(w.T.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"L{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"], name=f"L{i}/bias")]
        x = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["actions"], name="out"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["b", 6])],
                          [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    obs = _obs()
    split = apply_splits(model, [ChannelSplit("L1", (5, 9), (1.0, 0.5)), ChannelSplit("L2", (3,), (0.5,))])
    ref = _run(model, obs)
    assert np.abs(_run(split, obs) - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    assert _layer_weight(split, "w0").shape == (6, 26) and _layer_weight(split, "b0").shape == (26,)
    assert _layer_weight(split, "w1").shape == (26, 25) and _layer_weight(split, "w2").shape == (25, 3)


def _layer_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_weight_and_activation_splits_are_exact_in_float(activation: str) -> None:
    model = mlp(_weights(), activation)
    obs = _obs()
    scales = (1.0, 0.5, 1.0) if activation == "relu" else (1.0, 1.0, 1.0)
    # unit 24 is the copy the first split appended: splitting it again is allowed
    split = apply_splits(model, [ChannelSplit("fc1/Gemm", (5, 9, 24), scales), ChannelSplit("fc2/Gemm", (0,), (1.0,))])
    ref, got = _run(model, obs), _run(split, obs)
    assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    # 24 + 3 units read by fc1, 24 + 1 read by fc2
    assert [_layer_weight(split, f"fc{i}.weight").shape for i in range(3)] == [(27, 6), (25, 27), (3, 25)]
    assert _layer_weight(split, "fc0.bias").shape == (27,)
    if activation == "tanh":  # tanh(z/2) != tanh(z)/2: an activation split is refused, never silently wrong
        with pytest.raises(ValueError, match="homogeneous"):
            apply_splits(model, [ChannelSplit("fc1/Gemm", (9,), (0.5,))])


def test_weight_split_lowers_the_per_channel_int8_error_of_an_outlier_column() -> None:
    model = mlp(_weights())
    obs = _obs()
    splits, rows = choose_splits(model, obs, 0.1)
    fc1 = next(sp for sp in splits if sp.layer == "fc1/Gemm")
    # the greedy picks the outlier column (weight split) and the outlier unit (activation split) first
    assert (5, 1.0) in list(zip(fc1.units, fc1.scales, strict=True))
    assert (9, 0.5) in list(zip(fc1.units, fc1.scales, strict=True))
    assert rows[0]["modelled_error_ratio"] < 0.6

    def fc1_weight_error(m: onnx.ModelProto) -> float:
        """Output error of fc1 from per-channel int8 weights alone, on the real inputs of fc1."""
        from edgeq.calibration.collect import tensor_values
        from edgeq.graph.analysis import find_weighted_layers

        wl = next(w for w in find_weighted_layers(m) if w.node == "fc1/Gemm")
        xin = tensor_values(m, obs, [wl.input])[wl.input].astype(np.float64)
        w = _layer_weight(m, wl.weight).astype(np.float64)
        wq = quantize_weight(w, axis=0).dequantize().astype(np.float64)
        return float(np.sqrt(np.mean((xin @ (wq - w).T) ** 2)))

    # on a layer whose only outlier is the weight column: one weight split about halves the error
    plain = mlp(_weights(outlier_unit=None))
    before = fc1_weight_error(plain)
    after = fc1_weight_error(apply_splits(plain, [ChannelSplit("fc1/Gemm", (5,), (1.0,))]))
    assert after < 0.6 * before, (before, after)
    # splitting an ordinary column instead does not help
    assert fc1_weight_error(apply_splits(plain, [ChannelSplit("fc1/Gemm", (0,), (1.0,))])) > 0.9 * before


def test_plan_with_splits_exports_wider_int8_layers_that_ort_runs_and_round_trips() -> None:
    model = mlp(_weights())
    calib, held = _obs(3000, 1), _obs(1000, 2)
    stats = stats_for(model, calib, held)
    base = build_plan(model, stats, QuantOptions(calibrator="max", calibrator_params={}), lower=apply_plan)
    plan = build_plan(model, stats, QuantOptions(calibrator="max", calibrator_params={}, split_outliers=0.1),
                      lower=apply_plan)
    rep = plan.metrics["outlier_split"]
    assert rep["kept"] and plan.splits
    assert plan.metrics["heldout_action_error"]["mean"] < 0.8 * base.metrics["heldout_action_error"]["mean"]
    q = apply_plan(model, plan)
    assert not [v for v in check_qdq_model(q) if v.severity == "error"]
    # every layer is one int8 GEMM: int8 weights, wider than the float file's
    int8_w = {t.name: onnx.numpy_helper.to_array(t).shape for t in q.graph.initializer
              if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    assert len(int8_w) == 3 and max(max(s) for s in int8_w.values()) > 24
    ref, got = _run(model, held), _run(q, held)
    assert np.abs(got - ref).mean() < np.abs(_run(apply_plan(model, base), held) - ref).mean()
    # per-layer analysis compares the widened hidden tensors with the float ones (copies merged back)
    per = per_layer_error(model, q, {"input": "obs", "output": "actions", "state": []}, [held[:200]], plan=plan)
    assert all(np.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 10 for r in per["layers"]), per["layers"]
    back = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert [sp.to_json() for sp in back.splits] == [sp.to_json() for sp in plan.splits]
    assert apply_plan(model, back).SerializeToString(deterministic=True) == q.SerializeToString(deterministic=True)
