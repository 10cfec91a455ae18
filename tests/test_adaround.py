"""AdaRound and bias correction on the trained Pendulum policy's hidden layer, judged on held-out states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeq.calibration.collect import calibrate_rollouts, tensor_values
from edgeq.envs import env_factory
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.ingest.sb3 import load_sb3
from edgeq.quantizers.adaround import adaround, output_error
from edgeq.quantizers.bias_correction import bias_correction_delta, corrected_bias
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.weights import quantize_weight


def _fake_quant(x: np.ndarray, amax: float) -> np.ndarray:
    s = np.float32(amax / 127)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


@pytest.fixture(scope="module")
def hidden_layer(sac_pendulum: Path):
    """The [256, 256] layer: float weight, bias, and its inputs on calibration and held-out visited states."""
    policy = load_sb3(sac_pendulum)
    make_env = env_factory("Pendulum-v1")
    calib = calibrate_rollouts(policy, make_env, list(range(500, 508)), holdout_seeds=list(range(600, 604)))
    wl = find_weighted_layers(policy.model)[1]
    w = constant_value(policy.model, wl.weight).astype(np.float32)  # Gemm transB=1: [out, in]
    b = constant_value(policy.model, wl.bias).astype(np.float32)
    x_cal = tensor_values(policy.model, calib.observations, [wl.input])[wl.input]
    x_hold = tensor_values(policy.model, calib.holdout, [wl.input])[wl.input]
    amax = float(np.percentile(np.abs(x_cal), 99.99))
    return w, b, x_cal, x_hold, amax


def test_adaround_lowers_output_error_on_heldout_states(hidden_layer) -> None:
    w, _, x_cal, x_hold, amax = hidden_layer
    near = quantize_weight(w, axis=0)
    res = adaround(w, near, _fake_quant(x_cal, amax), x_cal)
    assert res.used
    q = res.weight.q
    assert q.dtype == np.int8 and np.abs(q.astype(np.int16)).max() <= 127
    np.testing.assert_array_equal(res.weight.scale, near.scale)  # only the rounding changes
    ratio = w.astype(np.float64) / near.scale[:, None]
    assert np.all((q >= np.floor(ratio) - 1e-6) & (q <= np.ceil(ratio) + 1e-6))  # up or down, nothing else
    assert 0.0 < res.changed_fraction < 0.5
    xh = _fake_quant(x_hold, amax)
    e_near = output_error(xh, near.dequantize(), x_hold, w)
    e_ada = output_error(xh, res.weight.dequantize(), x_hold, w)
    assert e_ada < 0.8 * e_near  # states from episodes AdaRound never saw


def test_adaround_soft_stage_runs_and_is_never_worse_than_nearest(hidden_layer) -> None:
    w, _, x_cal, _, amax = hidden_layer
    near = quantize_weight(w, axis=0)
    res = adaround(w, near, _fake_quant(x_cal, amax), x_cal, iters=60, polish_sweeps=1)
    assert res.adaround_error <= res.nearest_error or not res.used
    with pytest.raises(ValueError):
        adaround(w, quantize_weight(w, axis=1), x_cal, x_cal)


def test_bias_correction_removes_mean_output_error(hidden_layer) -> None:
    w, b, x_cal, x_hold, amax = hidden_layer
    wq = quantize_weight(w, axis=0).dequantize()
    delta = bias_correction_delta(_fake_quant(x_cal, amax), wq, x_cal, w)
    # by linearity the delta is the mean output error on the calibration rows
    f64 = np.float64
    err_cal = (_fake_quant(x_cal, amax).astype(f64) @ wq.T.astype(f64)) - (x_cal.astype(f64) @ w.T.astype(f64))
    np.testing.assert_allclose(delta, err_cal.mean(axis=0), rtol=1e-6, atol=1e-9)
    b2 = corrected_bias(b, delta)
    xh = _fake_quant(x_hold, amax)
    before = ((xh @ wq.T + b) - (x_hold @ w.T + b)).mean(axis=0)
    after = ((xh @ wq.T + b2) - (x_hold @ w.T + b)).mean(axis=0)
    assert np.abs(after).mean() < 0.5 * np.abs(before).mean()


def test_plan_records_rounding_and_bias_correction(sac_pendulum: Path) -> None:
    policy = load_sb3(sac_pendulum)
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(700, 704)), holdout_seeds=[800])
    plan = build_plan(policy.model, stats, QuantOptions(transform="crossquant", alpha=0.0, rounding="adaround",
                                                       bias_correction=True), lower=apply_plan)
    stages = plan.metrics["stages"]
    assert set(stages) == {"adaround", "bias_correction"}
    for name, rep in stages.items():
        # a stage is kept exactly when it lowered the held-out action error
        before = plan.metrics["heldout_score_by_stage"]["initial"]
        if name == "bias_correction" and stages["adaround"]["kept"]:
            before = stages["adaround"]["heldout_action_error"]
        assert rep["kept"] == (rep["heldout_action_error"] < before)
    for layer in plan.int8_layers():
        assert layer.rounding == ("adaround" if stages["adaround"]["kept"] and
                                  stages["adaround"]["layers"][layer.node]["used"] else "nearest")
        assert (layer.bias is not None) == stages["bias_correction"]["kept"]
