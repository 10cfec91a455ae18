"""Better INT8 for hard layers (issue 12 part 3): GPTQ, stochastic rounding and whole-network reconstruction.

Small synthetic layers and MLPs (seconds): each method must keep every layer W8A8 (same scales,
integers in [-127, 127]) and lower the error it targets; the plan's stage is kept only where the
real ONNX Runtime graph's held-out action error goes down.
"""

from __future__ import annotations

import numpy as np
import pytest
from quant_helpers import mlp, stats_for

from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.quantizers.adaround import output_error
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.plan import make_plan
from edgeq.quantizers.reconstruct import _float_layer, _interpreter, reconstruct
from edgeq.quantizers.rounding import gptq_quantize, gptq_round, stochastic_round
from edgeq.quantizers.weights import quantize_weight


def _layer(seed: int = 0, rows: int = 3000, n_in: int = 48, n_out: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=(rows, n_in)), 0) * rng.uniform(0.1, 3.0, n_in)  # ReLU-like, uneven columns
    return x, rng.normal(size=(n_out, n_in)) * 0.1


def test_gptq_lowers_output_error_with_the_same_scales() -> None:
    x, w = _layer()
    near = quantize_weight(w, 0)
    res = gptq_round(w, near, x, x)
    assert res.used and res.method_error < 0.85 * res.nearest_error, res.to_json()
    assert np.array_equal(res.weight.scale, near.scale) and res.weight.q.dtype == np.int8
    assert np.abs(res.weight.q.astype(int)).max() <= 127
    # with a quantized input the least-squares target also compensates the input's rounding
    s = x.max() / 127
    xq = np.clip(np.rint(x / s), -127, 127) * s
    res_q = gptq_round(w, near, xq, x)
    assert res_q.used and res_q.method_error < res_q.nearest_error
    assert output_error(xq, res_q.weight.dequantize(), x, w) < output_error(xq, near.dequantize(), x, w)


def test_gptq_quantize_on_an_identity_hessian_is_nearest_rounding() -> None:
    _, w = _layer(1)
    near = quantize_weight(w, 0)
    q = gptq_quantize(w, near.scale, np.eye(w.shape[1]), damp=0.0)
    assert np.array_equal(q.astype(np.int8), near.q)  # uncorrelated inputs: nothing to compensate


def test_stochastic_rounding_rounds_to_a_neighbour_unbiased_and_seeded() -> None:
    _, w = _layer(2, n_out=64, n_in=64)
    near = quantize_weight(w, 0)
    a, b = stochastic_round(w, near, seed=3), stochastic_round(w, near, seed=3)
    assert np.array_equal(a.q, b.q) and not np.array_equal(a.q, stochastic_round(w, near, seed=4).q)
    x = w / near.scale[:, None]
    assert np.all((a.q >= np.floor(x) - 1e-9) & (a.q <= np.ceil(x) + 1e-9))
    mean = np.mean([stochastic_round(w, near, seed=s).dequantize() for s in range(40)], axis=0)
    assert abs(float(np.mean(mean - w))) < 0.02 * float(near.scale.mean())  # unbiased on average


@pytest.fixture(scope="module")
def tiny() -> tuple:
    rng = np.random.default_rng(0)
    dims = [6, 32, 32, 3]
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1)
               for i, o in zip(dims, dims[1:], strict=False)]
    model = mlp(weights)
    scale = np.array([0.2, 1.0, 5.0, 20.0, 0.5, 3.0])  # uneven observation channels, like joint angle vs velocity
    calib = (rng.normal(size=(2000, 6)) * scale).astype(np.float32)
    hold = (rng.normal(size=(600, 6)) * scale).astype(np.float32)
    return model, calib, hold


def test_interpreter_matches_onnx_runtime(tiny: tuple) -> None:
    import torch

    model, calib, _ = tiny
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ours = _interpreter(model)(torch.from_numpy(calib), lambda n, x: _float_layer(n, x, inits)).numpy()
    np.testing.assert_allclose(ours, OrtPolicy(model.SerializeToString()).act(calib), atol=1e-5)


def test_reconstruction_lowers_the_action_error_and_keeps_every_layer_int8(tiny: tuple) -> None:
    model, calib, hold = tiny
    stats = stats_for(model, calib, hold)
    plan = make_plan(model, stats.observers, calibrator="max")  # coarse per-tensor ranges: a hard case
    res = reconstruct(model, plan, calib, np.ones(3), iters=150, eval_every=10, seed=0)
    rep = res.report
    assert res.supported and rep["calibration_loss_best"] < 0.9 * rep["calibration_loss_start"], rep
    for old, new in zip(plan.layers, res.plan.layers, strict=False):
        assert new.precision == "int8" and new.weight is not None and old.weight is not None
        assert np.array_equal(new.weight.scale, old.weight.scale)
    ref = OrtPolicy(model.SerializeToString()).act(hold)

    def err(p: object) -> float:
        return float(np.mean(np.abs(OrtPolicy(apply_plan(model, p).SerializeToString()).act(hold) - ref)))

    assert err(res.plan) < err(plan)  # held out: the real ONNX Runtime graph's actions
    again = reconstruct(model, plan, calib, np.ones(3), iters=150, eval_every=10, seed=0)
    assert all(np.array_equal(a.weight.q, b.weight.q) for a, b in zip(res.plan.layers, again.plan.layers, strict=False))


def test_reconstruction_reports_unsupported_graphs_and_changes_nothing(tiny: tuple) -> None:
    model, calib, hold = tiny
    odd = type(model)()
    odd.CopyFrom(model)
    odd.graph.node[1].op_type = "Gelu"  # not in the interpreter
    plan = make_plan(model, stats_for(model, calib, hold).observers)
    res = reconstruct(odd, plan, calib, np.ones(3), iters=5)
    assert not res.supported and "Gelu" in res.report["reason"] and res.plan is plan


@pytest.mark.parametrize("rounding", ["gptq", "brecq", "gptq+brecq", "stochastic", "discquant"])
def test_build_plan_rounding_stage_is_recorded_and_never_worse(tiny: tuple, rounding: str) -> None:
    model, calib, hold = tiny
    stats = stats_for(model, calib, hold)
    base = QuantOptions(calibrator="max", calibrator_params={}, rounding="nearest", reconstruct_iters=60)
    opts = QuantOptions(calibrator="max", calibrator_params={}, rounding=rounding, reconstruct_iters=60)
    p0 = build_plan(model, stats, base, lower=apply_plan)
    p1 = build_plan(model, stats, opts, lower=apply_plan)
    stages = p1.metrics["stages"]
    for part in rounding.split("+"):
        assert part in stages
    assert all(la.precision == "int8" for la in p1.layers)
    assert p1.metrics["heldout_action_error"]["score"] <= p0.metrics["heldout_action_error"]["score"] + 1e-12
    if rounding != "stochastic":  # a deterministic method must win on this coarse plan
        assert any(stages[s]["kept"] for s in rounding.split("+")), stages


def test_unknown_rounding_is_refused() -> None:
    with pytest.raises(ValueError, match="rounding must be one of"):
        QuantOptions(rounding="gptq+magic")


def test_reconstruction_stops_when_it_no_longer_improves(tiny: tuple) -> None:
    model, calib, hold = tiny
    plan = make_plan(model, stats_for(model, calib, hold).observers, calibrator="max")
    res = reconstruct(model, plan, calib, np.ones(3), iters=5000, eval_every=5, patience=2, seed=0)
    rep = res.report
    assert rep["iters"] < 5000 and rep["iters"] - rep["best_iter"] <= 2 * 5
    assert rep["calibration_loss_best"] <= rep["calibration_loss_start"]


def test_discquant_lowers_the_action_error_with_the_plan_scales_and_is_seeded(tiny: tuple) -> None:
    """DiscQuant: relaxed rounding between the two grid points with the linear pull to a vertex; the result is
    W8 with the plan's weight and input scales, lowers the calibration loss and the held-out ORT action error."""
    model, calib, hold = tiny
    stats = stats_for(model, calib, hold)
    plan = make_plan(model, stats.observers, calibrator="max")
    res = reconstruct(model, plan, calib, np.ones(3), iters=150, eval_every=10, seed=0, method="discquant", lr=0.05)
    rep = res.report
    assert res.supported and rep["method"] == "discquant"
    # rounding alone (the scales of this coarse plan stay): a few percent, as BRECQ without its scales (0.94x)
    assert rep["calibration_loss_best"] < 0.96 * rep["calibration_loss_start"], rep
    assert res.plan.activations == plan.activations  # DiscQuant rounds; it does not move the input scales
    for old, new in zip(plan.layers, res.plan.layers, strict=True):
        assert new.rounding == "discquant" and new.weight is not None and old.weight is not None
        assert np.array_equal(new.weight.scale, old.weight.scale)
        w = numpy_weight(model, old.weight_name)
        # every integer is one of the weight's two grid neighbours (a rounding, never a new value)
        x = w / old.weight.scale_broadcast()
        assert np.all((new.weight.q == np.floor(x)) | (new.weight.q == np.ceil(x)) | (np.abs(new.weight.q) == 127))
    ref = OrtPolicy(model.SerializeToString()).act(hold)

    def err(p: object) -> float:
        return float(np.mean(np.abs(OrtPolicy(apply_plan(model, p).SerializeToString()).act(hold) - ref)))

    assert err(res.plan) < err(plan)
    again = reconstruct(model, plan, calib, np.ones(3), iters=150, eval_every=10, seed=0, method="discquant", lr=0.05)
    assert all(np.array_equal(a.weight.q, b.weight.q) for a, b in zip(res.plan.layers, again.plan.layers, strict=True))


def numpy_weight(model: object, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)), np.float64)
