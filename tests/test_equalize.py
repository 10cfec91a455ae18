"""Equalization (SmoothQuant-style): the factors, the exact rewrite, and what it does to the ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from quant_helpers import mlp

from edgeq.calibration.collect import calibrate_rollouts, tensor_values
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.ingest.sb3 import load_sb3
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.equalize import equalization_factors
from edgeq.quantizers.evaluate import action_half_range
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings, can_fold


def test_factors_formula_and_resulting_ranges() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2000, 5)) * np.array([0.01, 0.5, 3.0, 20.0, 1.0])
    w = rng.normal(0, 1, (4, 5)) * np.array([2.0, 0.1, 1.0, 0.05, 0.7])
    c, wc = np.abs(x).max(0), np.abs(w).max(0)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        d = equalization_factors(c, wc, alpha)
        np.testing.assert_allclose(d, c ** alpha / wc ** (1 - alpha), rtol=1e-12)
        xp, wp = x / d, w * d
        np.testing.assert_allclose(np.abs(xp).max(0), c ** (1 - alpha) * wc ** (1 - alpha), rtol=1e-9)
        np.testing.assert_allclose(np.abs(wp).max(0), c ** alpha * wc ** alpha, rtol=1e-9)
        np.testing.assert_allclose(xp @ wp.T, x @ w.T, rtol=1e-9, atol=1e-9)
    # alpha = 0.5: activation and weight columns get the same range sqrt(c w)
    d = equalization_factors(c, wc, 0.5)
    np.testing.assert_allclose(np.abs(x / d).max(0), np.abs(w * d).max(0), rtol=1e-9)
    # dead channels are left alone
    d0 = equalization_factors(np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.5)
    np.testing.assert_array_equal(d0, [1.0, 1.0])
    with pytest.raises(ValueError):
        equalization_factors(c, wc[:3], 0.5)


@pytest.mark.parametrize("activation,folded", [("relu", True), ("leaky_relu", True), ("tanh", False)])
def test_rewrite_keeps_the_float_model(activation: str, folded: bool) -> None:
    """Every layer equalized: folded through (Leaky)ReLU, an fp32 Mul otherwise; same outputs within 1e-5."""
    rng = np.random.default_rng(1)
    dims = [6, 32, 32, 3]
    weights = [(rng.normal(0, 1, (o, i)) * rng.lognormal(0, 1, (1, i)) / np.sqrt(i), rng.normal(0, 0.1, o))
               for i, o in zip(dims[:-1], dims[1:], strict=True)]
    model = mlp(weights, activation)
    x = (rng.normal(0, 1, (1000, 6)) * np.array([0.01, 0.1, 1, 5, 20, 0.5])).astype(np.float32)
    layers = find_weighted_layers(model)
    vals = tensor_values(model, x, [wl.input for wl in layers])
    scalings = []
    for wl in layers:
        w = constant_value(model, wl.weight)
        scalings.append(InputScaling(wl.node, equalization_factors(np.abs(vals[wl.input]).max(0),
                                                                   np.abs(w).max(0), 0.5), "equalize", 0.5))
    assert (can_fold(model, layers[1].node) is not None) == folded
    out = apply_input_scalings(model, scalings)
    onnx.checker.check_model(out, full_check=True)
    n_mul = sum(n.name.endswith("/input_scale") for n in out.graph.node)
    assert n_mul == (1 if folded else 3)
    a = OrtPolicy(model.SerializeToString()).act(x)
    b = OrtPolicy(out.SerializeToString()).act(x)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))
    with pytest.raises(ValueError, match="cannot take the factors by folding"):
        apply_input_scalings(model, [InputScaling(layers[0].node, np.ones(6), "equalize", 0.5, placement="folded")])


def test_equalization_lowers_the_action_error_on_visited_states(sac_pendulum: Path) -> None:
    policy = load_sb3(sac_pendulum)
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(300, 306)), holdout_seeds=[400, 401])
    hr = action_half_range(policy.action_space.low_array, policy.action_space.high_array)
    base = build_plan(policy.model, stats, QuantOptions(), half_range=hr, lower=apply_plan)
    eq = build_plan(policy.model, stats, QuantOptions(transform="equalize", alpha=0.5), half_range=hr, lower=apply_plan)
    assert [t.method for t in eq.transforms] == ["equalize"]
    assert eq.settings["options"]["transform"] == "equalize"
    assert eq.metrics["heldout_action_error"]["mean"] < 0.6 * base.metrics["heldout_action_error"]["mean"]
