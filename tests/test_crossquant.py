"""CrossQuant: the static form's exact algebra, the dynamic form against numpy, quantization kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from quant_helpers import mlp, stats_for

from edgeq.calibration.collect import calibrate_observations, tensor_values
from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.ingest.sb3 import load_sb3
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.crossquant import (
    crossquant_static_factors,
    dynamic_quantize_reference,
    dynamic_reference,
)
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings, can_fold
from edgeq.quantizers.weights import quantize_weight

PENDULUM_LOW, PENDULUM_HIGH = np.array([-1, -1, -8.0]), np.array([1, 1, 8.0])


def _states(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(PENDULUM_LOW, PENDULUM_HIGH, (n, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def pendulum(sac_pendulum: Path):
    return load_sb3(sac_pendulum)


def test_static_factors_formula() -> None:
    c = np.array([0.5, 2.0, 8.0, 0.0])
    d = crossquant_static_factors(c, 0.15)
    expected = np.power(np.maximum(c, 8.0 * 1e-6), 0.85)
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    np.testing.assert_allclose(crossquant_static_factors(c[:3], 0.0), c[:3])
    np.testing.assert_allclose(crossquant_static_factors(c[:3], 1.0), 1.0)
    with pytest.raises(ValueError):
        crossquant_static_factors(c, 1.5)


def test_static_quantizer_is_per_tensor_on_rescaled_input() -> None:
    """Q with scale_ij = T^a c_j^(1-a)/127, then X W^T, equals Q_s(X/d) (W diag d)^T (the folded form)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (500, 6)) * np.array([0.05, 0.3, 1.0, 4.0, 10.0, 0.01])
    w = rng.normal(0, 0.5, (7, 6))
    alpha = 0.15
    c = np.abs(x).max(axis=0)
    t_big = float(np.abs(x).max())
    d = crossquant_static_factors(c, alpha)
    scale = (t_big ** alpha) * np.power(c, 1 - alpha)[None, :] / 127.0  # scale_ij with t_i -> T
    q_direct = np.clip(np.rint(x / scale), -127, 127) * scale
    s = t_big ** alpha / 127.0
    x_prime = x / d
    q_folded = np.clip(np.rint(x_prime / s), -127, 127) * s
    np.testing.assert_allclose(q_direct @ w.T, q_folded @ (w * d[None, :]).T, rtol=1e-9, atol=1e-12)
    assert np.abs(x).max() <= t_big  # nothing clipped: |x_ij| <= T^a c_j^(1-a)
    assert np.all(np.abs(x_prime) <= (t_big ** alpha) * (1 + 1e-12))


def test_static_rewrite_keeps_the_float_policy(pendulum) -> None:
    layers = find_weighted_layers(pendulum.model)
    obs = _states(2048, 1)
    inputs = tensor_values(pendulum.model, obs, [wl.input for wl in layers])
    scalings = [InputScaling(wl.node, crossquant_static_factors(np.abs(inputs[wl.input]).max(0), 0.15),
                             "crossquant", 0.15) for wl in layers]
    assert can_fold(pendulum.model, layers[0].node) is None  # the observation: an fp32 Mul pre-op
    assert can_fold(pendulum.model, layers[1].node) == layers[0].node  # after a ReLU: folded into rows
    rewritten = apply_input_scalings(pendulum.model, scalings)
    onnx.checker.check_model(rewritten, full_check=True)
    muls = [n for n in rewritten.graph.node if n.name.endswith("/input_scale")]
    assert len(muls) == 1 and muls[0].name == f"{layers[0].node}/input_scale"
    a = OrtPolicy(pendulum.model.SerializeToString()).act(obs)
    b = OrtPolicy(rewritten.SerializeToString()).act(obs)
    assert np.abs(a - b).max() <= 1e-5
    # the hidden layer's input is now exactly X / d
    new_in = tensor_values(rewritten, obs, [layers[1].input])[layers[1].input]
    np.testing.assert_allclose(new_in, inputs[layers[1].input] / scalings[1].factors[None, :], rtol=1e-5,
                               atol=1e-6)
    # the weight's input columns were multiplied by d
    w0 = constant_value(pendulum.model, layers[2].weight)
    w1 = constant_value(rewritten, layers[2].weight)
    np.testing.assert_allclose(w1, w0 * scalings[2].factors[None, :], rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.15])
def test_dynamic_form_matches_numpy_reference(alpha: float) -> None:
    rng = np.random.default_rng(3)
    cols = np.array([0.02, 0.1, 1.0, 5.0, 30.0, 0.5, 2.0, 8.0])
    w = rng.normal(0, 0.4, (5, 8)).astype(np.float32)
    b = rng.normal(0, 0.1, 5).astype(np.float32)
    model = mlp([(w, b)])
    calib = (rng.normal(0, 1, (3000, 8)) * cols).astype(np.float32)
    stats = stats_for(model, calib)
    plan = build_plan(model, stats, QuantOptions(dynamic=True, alpha=alpha), lower=apply_plan)
    layer = plan.layers[0]
    assert layer.scheme == "crossquant-dynamic" and not plan.tensorrt_compatible
    assert plan.to_json()["tensorrt_compatible"] is False
    q = apply_plan(model, plan)
    ops = {n.op_type for n in q.graph.node}
    assert {"MatMulInteger", "ReduceMax", "Abs", "Round", "Clip", "Cast"} <= ops
    assert "QuantizeLinear" not in ops
    x = (rng.normal(0, 1, (400, 8)) * cols).astype(np.float32)
    got = OrtPolicy(q.SerializeToString()).act(x)
    d = crossquant_static_factors(np.abs(calib).max(0), alpha)
    wq = quantize_weight((w.astype(np.float64) * d[None, :]).astype(np.float32), axis=0)
    ref = dynamic_reference(x, wq.q, wq.scale, b, d, alpha)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the int8 activations follow the paper's definition scale_ij = t_i^a c_j^(1-a) / 127
    qa, _ = dynamic_quantize_reference(x, d, alpha)
    t = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
    paper = np.clip(np.rint(x / (t ** alpha * d[None, :] / 127.0)), -127, 127)
    assert np.mean(qa == paper) > 0.999 and np.abs(qa - paper).max() <= 1
    # and the dynamic layer is close to the float layer
    assert np.abs(got - (x @ w.T + b)).mean() < 0.02 * np.abs(x @ w.T).mean()


def test_quantization_kernel_reported_and_smaller_with_crossquant(pendulum) -> None:
    """Observation channels of very different ranges: per-tensor int8 zeroes the small ones; CrossQuant keeps them."""
    stats = calibrate_observations(pendulum, _states(4000, 2))
    base = build_plan(pendulum.model, stats, QuantOptions(), lower=apply_plan)
    cq = build_plan(pendulum.model, stats, QuantOptions(transform="crossquant", alpha=0.15), lower=apply_plan)
    first = find_weighted_layers(pendulum.model)[0].node
    kb, kc = base.layer(first), cq.layer(first)
    assert kb.kernel is not None and kc.kernel is not None
    assert kb.kernel == pytest.approx(kb.kernel_per_tensor)
    assert kc.kernel < 0.5 * kb.kernel
    for layer in cq.int8_layers():
        assert 0.0 <= layer.kernel <= 1.0 and 0.0 <= layer.kernel_per_tensor <= 1.0
    j = json.loads(json.dumps(cq.to_json()))
    assert j["transforms"][0]["layer"] == first and j["transforms"][0]["method"] == "crossquant"
    assert j["layers"][0]["kernel"] == pytest.approx(kc.kernel, abs=1e-6)
    # and the held-out action error drops
    assert cq.metrics["heldout_action_error"]["mean"] < 0.75 * base.metrics["heldout_action_error"]["mean"]
