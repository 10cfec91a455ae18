"""NoisyQuant (issue 12 part 3): the fixed noise leaves the output exactly through the bias, is seeded, lowers a
layer's error where the input's distribution is peaked against the grid, and the file stays all-INT8 QDQ."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
from quant_helpers import mlp, stats_for

from edgeq.export.qdq import apply_plan
from edgeq.export.trt_rules import check_qdq_model
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.noisy import fake_quant_noisy, noisy_bias
from edgeq.quantizers.plan import QuantPlan


def _run(model: onnx.ModelProto, obs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["actions"], {"obs": obs})[0], np.float64)


def _model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return mlp([(rng.normal(0, 0.5, (16, 5)), rng.normal(0, 0.1, 16)), (rng.normal(0, 0.3, (16, 16)),
                rng.normal(0, 0.1, 16)), (rng.normal(0, 0.3, (2, 16)), rng.normal(0, 0.1, 2))])


def _obs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)


def _with_noise(plan: QuantPlan, scale: float, seed: int = 3) -> QuantPlan:
    rng = np.random.default_rng(seed)
    layers = [dataclasses.replace(la, input_noise=(rng.random(16 if i else 5) - 0.5).astype(np.float32) * scale)
              for i, la in enumerate(plan.layers)]
    return dataclasses.replace(plan, layers=layers)


def test_denoising_fold_is_exact_against_the_int8_weights() -> None:
    """``(X + N) W_qᵀ + (b - N W_qᵀ) = X W_qᵀ + b`` to float precision, with the arrays of the exported file."""
    model = _model()
    obs = _obs(300, 2)
    plan = build_plan(model, stats_for(model, obs), QuantOptions(), lower=apply_plan)
    noisy = _with_noise(plan, 0.05)
    q, p = apply_plan(model, noisy), apply_plan(model, plan)
    assert sum(n.op_type == "Add" and n.name.endswith(".noisy/Add") for n in q.graph.node) == 3
    qi = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in q.graph.initializer}
    pi = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in p.graph.initializer}
    x = np.random.default_rng(4).normal(size=(64, 16))
    for i, la in enumerate(noisy.layers):
        w = qi[f"fc{i}.weight.int8"] * qi[f"fc{i}.weight.scale"][None, :]  # [in, out], as the MatMul reads it
        assert np.array_equal(qi[f"fc{i}.weight.int8"], pi[f"fc{i}.weight.int8"])
        n = qi[f"{la.node.replace('/', '_')}.noisy.noise"]
        xi = x[:, :w.shape[0]]
        y_noisy = (xi + n) @ w + qi[f"fc{i}.bias.corrected"]
        y_plain = xi @ w + pi[f"fc{i}.bias"]
        assert np.abs(y_noisy - y_plain).max() <= 1e-6 * max(1.0, np.abs(y_plain).max())
    # run by ONNX Runtime with the input quantizers, the noise only moves each channel's grid: the actions move,
    # by no more than int8 rounding itself moves them from float
    moved = np.abs(_run(q, obs) - _run(p, obs)).max()
    assert 0 < moved < 3 * np.abs(_run(p, obs) - _run(model, obs)).max()
    assert not [v for v in check_qdq_model(q) if v.severity == "error"]


def test_noise_choice_is_seeded_and_lowers_error_on_a_peaked_input() -> None:
    rng = np.random.default_rng(0)
    # a peaked input: every channel sits near the middle of a quantization bin (x = (k + 0.5) step + small)
    amax, step = 1.27, 0.01
    x = ((rng.integers(-50, 50, (4000, 8)) + 0.5) * step + rng.normal(0, 0.0005, (4000, 8))).astype(np.float32)
    w = rng.normal(size=(6, 8))
    r1 = noisy_bias(w, w, x, x, amax, seed=5)
    r2 = noisy_bias(w, w, x, x, amax, seed=5)
    assert r1.noise is not None and r2.noise is not None and np.array_equal(r1.noise, r2.noise)
    assert r1.noisy_error < 0.7 * r1.plain_error
    assert np.abs(r1.noise).max() <= 0.5 * step + 1e-9
    # an input exactly on the grid gains nothing from noise: none is kept
    on_grid = (rng.integers(-50, 50, (4000, 8)) * step).astype(np.float32)
    assert noisy_bias(w, w, on_grid, on_grid, amax, seed=5).noise is None
    np.testing.assert_allclose(fake_quant_noisy(on_grid, amax), on_grid, atol=1e-6)


def test_plan_stage_is_deterministic_and_round_trips() -> None:
    model = _model(1)
    calib, held = _obs(2000, 1), _obs(600, 2)
    stats = stats_for(model, calib, held)
    opts = QuantOptions(noisy_bias=True)
    p1 = build_plan(model, stats, opts, lower=apply_plan)
    p2 = build_plan(model, stats, opts, lower=apply_plan)
    stage = p1.metrics["stages"]["noisy"]
    assert set(stage["layers"]) == {la.node for la in p1.layers}
    b1 = apply_plan(model, p1).SerializeToString(deterministic=True)
    assert b1 == apply_plan(model, p2).SerializeToString(deterministic=True)
    back = QuantPlan.from_dict(json.loads(json.dumps(p1.to_dict())))
    assert apply_plan(model, back).SerializeToString(deterministic=True) == b1
