"""Joint (BRECQ-style) reconstruction on int4 grids (W4A8) and on mixed int8 + int4 plans, on the SAC Pendulum fixture.

The reconstruction must keep every layer on its own grid (int4 in [-7, 7] with the plan's per-channel or
per-block scales, int8 in [-127, 127]), lower the real ONNX Runtime graph's action error on held-out states
below nearest and GPTQ int4 rounding, be deterministic for a seed, and optimize what the exported files
compute (portable QDQ with INT4 initializers, and the CPU file with MatMulNBits).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeq.calibration.collect import calibrate_rollouts, layer_rows, tensor_values
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.errors import EdgeqError
from edgeq.export.int4 import int4_layer_names, specialize_int4_for_ort_cpu
from edgeq.export.ort_cpu import specialize_for_ort_cpu
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.ingest.sb3 import load_sb3
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.int4 import INT4_QMAX
from edgeq.quantizers.mixed import with_int4
from edgeq.quantizers.plan import QuantPlan
from edgeq.quantizers.reconstruct import fake_quant_actions, layer_grid, reconstruct
from edgeq.search import int4_roundings

HALF_RANGE = np.array([2.0])  # Pendulum's torque in [-2, 2]


@pytest.fixture(scope="module")
def pendulum(sac_pendulum: Path) -> tuple:
    """The trained SAC Pendulum actor, its all-INT8 plan (the observation's columns scaled as edgeq does, so
    the velocity's range does not crush the angle's), the graph its weights belong to, calibration and
    held-out visited states."""
    policy = load_sb3(sac_pendulum)
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(900, 912)),
                               holdout_seeds=list(range(950, 956)))
    model = policy.model
    base = build_plan(model, stats, QuantOptions(transform="crossquant", alpha=0.0), lower=apply_plan)
    work = base.rewritten(model)
    calib = np.asarray(stats.observations, np.float32)
    hold = np.asarray(stats.holdout, np.float32)
    return model, work, base, calib, hold


def _w4a8(model, work, base: QuantPlan, calib: np.ndarray, rounding: str, block: int, nodes=None) -> QuantPlan:
    """``base`` with the given layers (default all) in int4, ``rounding`` per layer, bias-corrected on the
    inputs the quantized graph feeds each layer."""
    plan = base
    wls = [wl for wl in find_weighted_layers(work) if nodes is None or wl.node in nodes]

    def inputs(p: QuantPlan, node: str) -> tuple[np.ndarray, np.ndarray]:
        la = p.layer(node)
        idx = [x.node for x in p.layers].index(node)
        prefix = replace(p, layers=[x if i < idx else replace(x, precision="float") for i, x in enumerate(p.layers)])
        x_q = layer_rows(tensor_values(apply_plan(model, prefix, check=False), calib, [la.input])[la.input])
        x_f = layer_rows(tensor_values(work, calib, [la.input])[la.input])
        s = np.float32(p.activations[la.input].scale)
        return (np.clip(np.rint(x_q / s), -127, 127) * s).astype(np.float32), x_f

    for wl in wls:
        w = np.asarray(constant_value(work, wl.weight), np.float32)
        b = np.asarray(constant_value(work, wl.bias), np.float32) if wl.bias else None
        plan = with_int4(plan, wl.node, w, block_size=block, inputs=inputs, original_bias=b, rounding=rounding)
    return plan


def _err(model, plan: QuantPlan, x: np.ndarray) -> tuple[float, float]:
    """Mean and RMS of |a_q - a_float| / half-range, both from the real ONNX Runtime graphs."""
    ref = OrtPolicy(model.SerializeToString()).act(x)
    got = OrtPolicy(apply_plan(model, plan).SerializeToString()).act(x)
    d = np.abs(got - ref) / HALF_RANGE[0]
    return float(np.mean(d)), float(np.sqrt(np.mean(d**2)))


def test_w4a8_reconstruction_stays_on_the_int4_grid_and_beats_nearest_and_gptq(pendulum: tuple) -> None:
    model, work, base, calib, hold = pendulum
    near = _w4a8(model, work, base, calib, "nearest", 0)
    gptq = _w4a8(model, work, base, calib, "gptq", 0)
    res = reconstruct(work, gptq, calib, HALF_RANGE, iters=150, eval_every=10, seed=0)
    assert res.supported and res.report["calibration_loss_best"] < 0.8 * res.report["calibration_loss_start"]
    assert set(res.report["grids"].values()) == {"int4 [-7, 7]"}
    for old, new in zip(gptq.layers, res.plan.layers, strict=True):
        assert new.precision == "int4" and new.weight4 is not None and old.weight4 is not None
        assert new.weight4.q.dtype == np.int8 and int(np.abs(new.weight4.q).max()) <= INT4_QMAX
        assert np.array_equal(new.weight4.scale, old.weight4.scale) and new.weight4.block_size == 0
        assert new.rounding == "brecq" and new.notes["brecq_start_rounding"] in ("gptq", "nearest")
    assert any(not np.array_equal(a.weight4.q, b.weight4.q) for a, b in zip(gptq.layers, res.plan.layers, strict=True))
    # held-out states of episodes the reconstruction never saw, on the ONNX Runtime graph
    (m_near, r_near), (m_gptq, r_gptq), (m_rec, r_rec) = (_err(model, p, hold) for p in (near, gptq, res.plan))
    assert m_rec < 0.95 * m_gptq and r_rec < r_gptq, (m_gptq, m_rec, r_gptq, r_rec)
    assert m_rec < 0.5 * m_near and r_rec < 0.6 * r_near, (m_near, m_rec, r_near, r_rec)
    # from nearest integers too: the joint rounding alone halves nearest int4's error
    from_near = reconstruct(work, near, calib, HALF_RANGE, iters=150, eval_every=10, seed=0)
    m_rn, r_rn = _err(model, from_near.plan, hold)
    assert m_rn < 0.6 * m_near and r_rn < 0.6 * r_near and r_rn < r_gptq, (m_near, m_rn, r_near, r_rn)


def test_reconstruction_starts_exactly_at_the_plan_and_is_deterministic(pendulum: tuple) -> None:
    model, work, base, calib, _ = pendulum
    gptq = _w4a8(model, work, base, calib, "gptq", 0)
    # GPTQ moves integers more than one step from floor(w / s): the start must still be the plan itself
    for margin in (0.0, 0.25):  # off-nearest integers start inside their side of 1/2: still the plan
        still = reconstruct(work, gptq, calib, HALF_RANGE, iters=0, seed=0, learn_scales=False, start_margin=margin)
        for a, b in zip(gptq.layers, still.plan.layers, strict=True):
            assert a.weight4 is not None and b.weight4 is not None and np.array_equal(a.weight4.q, b.weight4.q)
        assert still.report["changed_weight_fraction"] == 0.0
        assert still.plan.activations == gptq.activations
    one = reconstruct(work, gptq, calib, HALF_RANGE, iters=40, eval_every=10, seed=3)
    two = reconstruct(work, gptq, calib, HALF_RANGE, iters=40, eval_every=10, seed=3)
    assert one.report["calibration_loss_best"] == two.report["calibration_loss_best"]
    for a, b in zip(one.plan.layers, two.plan.layers, strict=True):
        assert a.weight4 is not None and b.weight4 is not None and np.array_equal(a.weight4.q, b.weight4.q)
    assert one.plan.activations == two.plan.activations
    # the tail-aware (CVaR) loss is another objective: its start loss is larger than the plain mean's
    tail = reconstruct(work, gptq, calib, HALF_RANGE, iters=0, seed=3, tail_weight=3.0, tail_fraction=0.02)
    assert tail.report["calibration_loss_start"] > 1.5 * one.report["calibration_loss_start"]


def test_mixed_int8_int4_blocked_reconstruction_matches_the_exported_files_on_ort(pendulum: tuple) -> None:
    model, work, base, calib, hold = pendulum
    wls = find_weighted_layers(work)
    mixed = _w4a8(model, work, base, calib, "nearest", 32, nodes={wls[1].node, wls[2].node})  # first layer stays int8
    res = reconstruct(work, mixed, calib, HALF_RANGE, iters=150, eval_every=10, seed=0, learn_bias=True,
                      learn_weight_scales=True)
    plan = res.plan
    assert [la.precision for la in plan.layers] == ["int8", "int4", "int4"]
    assert res.report["grids"][wls[0].node] == "int8 [-127, 127]"
    l8 = plan.layer(wls[0].node)
    assert l8.weight is not None and int(np.abs(l8.weight.q.astype(np.int16)).max()) <= 127
    for la in plan.int4_layers():
        assert la.weight4 is not None and la.weight4.block_size == 32 and int(np.abs(la.weight4.q).max()) <= 7
        grid = layer_grid(la)
        assert grid is not None and grid.scale.shape == la.weight4.q.shape
        assert np.all(grid.scale == la.weight4.scale_full())
    assert _err(model, plan, hold)[1] < _err(model, mixed, hold)[1]
    # what was optimized is what ONNX Runtime runs: the portable QDQ file (INT4 initializers, opset 21) ...
    sim = fake_quant_actions(work, plan, hold)
    q = apply_plan(model, plan)
    assert len(int4_layer_names(q)) == 2
    got = OrtPolicy(q.SerializeToString()).act(hold)
    assert float(np.median(np.abs(got - sim))) < 1e-5 and float(np.max(np.abs(got - sim))) < 2e-3
    # ... and the CPU file (int4 layers as MatMulNBits, the int8 one as MatMulIntegerToFloat)
    cpu = specialize_int4_for_ort_cpu(specialize_for_ort_cpu(q, float_layers=[]))
    ops = [n.op_type for n in cpu.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMulIntegerToFloat") == 1
    np.testing.assert_allclose(OrtPolicy(cpu.SerializeToString()).act(hold), got, atol=2e-4, rtol=1e-4)


def test_int4_rounding_names() -> None:
    assert int4_roundings("both") == ("nearest", "gptq")
    assert int4_roundings("all") == ("nearest", "gptq", "gptq+brecq")
    assert int4_roundings("nearest, gptq+brecq,nearest") == ("nearest", "gptq+brecq")
    for bad in ("adaround", "", "gptq,magic"):
        with pytest.raises(EdgeqError, match="--int4-rounding"):
            int4_roundings(bad)


def _layer_inputs(model: Any, work: Any, calib: np.ndarray) -> Any:
    """The search's ``inputs(plan, node, graph=None)``: a layer's int8 input (the graph quantized up to it) and
    its float input (of ``graph``, default ``work``) on the calibration states."""

    def inputs(p: QuantPlan, node: str, graph: Any = None) -> tuple[np.ndarray, np.ndarray]:
        g = work if graph is None else graph
        la = p.layer(node)
        idx = [x.node for x in p.layers].index(node)
        prefix = replace(p, layers=[x if i < idx else replace(x, precision="float") for i, x in enumerate(p.layers)])
        x_q = layer_rows(tensor_values(apply_plan(model, prefix, check=False), calib, [la.input])[la.input])
        s = np.float32(p.activations[la.input].scale)
        return (np.clip(np.rint(x_q / s), -127, 127) * s).astype(np.float32), layer_rows(
            tensor_values(g, calib, [la.input])[la.input])

    return inputs


def test_int4_input_scaling_of_the_first_layer_is_carried_by_every_candidate(pendulum: tuple) -> None:
    """``edgeq search --int4-input-scaling``: the first layer's int4 weight under its own observation scaling;
    a candidate with it in int4 takes that scaling and input range, whatever other layers are int4 too."""
    from edgeq.quantizers.evaluate import ActionErrorScorer
    from edgeq.quantizers.mixed import with_precisions
    from edgeq.search import _int4_input_rescaled

    model, work, base, calib, hold = pendulum
    wls = find_weighted_layers(work)
    scorer = ActionErrorScorer(model, hold, HALF_RANGE, lower=apply_plan)

    inputs = _layer_inputs(model, work, calib)

    first = wls[0].node
    alt = _int4_input_rescaled(base, first, model, calib, scorer, "nearest", 0, inputs)
    assert alt is not None
    tr = next(t for t in alt.transforms if t.layer == first)
    assert tr.method == "equalize-int4" and 0.25 <= tr.alpha <= 1.0
    others = [t for t in alt.transforms if t.layer != first]
    assert [t.layer for t in others] == [t.layer for t in base.transforms if t.layer != first]
    la = alt.layer(first)
    assert la.precision == "int4" and la.weight4 is not None and int(np.abs(la.weight4.q).max()) <= 7
    assert alt.activations[la.input].params["int4_input_scaling_alpha"] == tr.alpha
    # a W4A8 candidate (first layer from `alt`, the others plain int4) carries alt's scaling, not the base's
    one4 = {wl.node: _w4a8(model, work, base, calib, "nearest", 0, nodes={wl.node}) for wl in wls[1:]}
    one4[first] = alt
    plan = with_precisions(base, one4, {n: "int4" for n in one4})
    assert plan.transforms == alt.transforms
    assert plan.activations[la.input] == alt.activations[la.input]
    # and is the plan it claims: the exported file computes the plan's arithmetic on its rewritten graph
    got = OrtPolicy(apply_plan(model, plan).SerializeToString()).act(hold)
    sim = fake_quant_actions(plan.rewritten(model), plan, hold)
    assert float(np.median(np.abs(got - sim))) < 1e-5


def test_input_split_is_exact_in_float_and_is_the_plan_the_files_compute(pendulum: tuple) -> None:
    """Outlier channel splitting of the first layer's input (``edgeq search --int4-input-split``): duplicated
    observation columns (a Gather before the input's int8 quantizer, the weight column halved and copied) leave
    the float policy unchanged, survive plan.json, and the exported W4A8 file computes the plan's arithmetic."""
    from edgeq.quantizers.input_split import InputSplit, apply_input_splits, choose_input_split
    from edgeq.quantizers.int4 import quantize_weight_int4

    model, work, base, calib, hold = pendulum
    first = find_weighted_layers(work)[0]
    split = apply_input_splits(work, [InputSplit(first.node, (1, 0, 3))])
    ref = OrtPolicy(work.SerializeToString()).act(hold)
    np.testing.assert_allclose(OrtPolicy(split.SerializeToString()).act(hold), ref, atol=2e-5)
    w = np.asarray(constant_value(split, find_weighted_layers(split)[0].weight))
    assert w.shape[1 - base.layer(first.node).weight_axis] == 3 + 3
    with pytest.raises(ValueError, match="out of range"):
        apply_input_splits(work, [InputSplit(first.node, (7,))])
    # the greedy choice lowers the int4 layer's modelled output error on its own grid
    x = layer_rows(tensor_values(work, calib, [first.input])[first.input])
    w0 = np.asarray(constant_value(work, first.weight), np.float64)
    w_oi = w0 if base.layer(first.node).weight_axis == 0 else w0.T
    cols, e0, e1 = choose_input_split(w_oi, x, 3, lambda v: quantize_weight_int4(v, 0).dequantize())
    assert cols and e1 < 0.8 * e0


def test_int4_input_split_lowers_the_first_layers_int4_error_and_is_carried(pendulum: tuple) -> None:
    from edgeq.quantizers.evaluate import ActionErrorScorer
    from edgeq.quantizers.mixed import with_precisions
    from edgeq.search import _int4_input_rescaled

    model, work, base, calib, hold = pendulum
    wls = find_weighted_layers(work)
    scorer = ActionErrorScorer(model, hold, HALF_RANGE, lower=apply_plan)

    inputs = _layer_inputs(model, work, calib)

    first = wls[0].node
    plain = _w4a8(model, work, base, calib, "gptq", 0, nodes={first})
    alt = _int4_input_rescaled(base, first, model, calib, scorer, "gptq", 0, inputs, transforms=(), split_columns=3)
    assert alt is not None and alt.input_splits and alt.input_splits[0].layer == first
    la = alt.layer(first)
    assert la.precision == "int4" and la.input.endswith(f".split_for.{first}")
    e_plain, e_split = float(scorer(plain)), float(scorer(alt))
    print(f"first layer alone in int4 (gptq): held-out action error {e_plain:.4f} -> {e_split:.4f}, input split")
    assert e_split < 0.9 * e_plain
    assert QuantPlan.from_dict(alt.to_dict()).input_splits == alt.input_splits
    # a W4A8 candidate taking that layer carries the split and the split input's range; the file is the plan
    one4 = {wl.node: _w4a8(model, work, base, calib, "nearest", 0, nodes={wl.node}) for wl in wls[1:]}
    one4[first] = alt
    cand = with_precisions(base, one4, {n: "int4" for n in one4})
    assert cand.input_splits == alt.input_splits and cand.activations[la.input] == alt.activations[la.input]
    q = apply_plan(model, cand)
    ops = [n.op_type for n in q.graph.node]
    assert ops.index("Gather") < ops.index("QuantizeLinear")
    got = OrtPolicy(q.SerializeToString()).act(hold)
    sim = fake_quant_actions(cand.rewritten(model), cand, hold)
    assert float(np.median(np.abs(got - sim))) < 1e-5
    cpu = specialize_int4_for_ort_cpu(specialize_for_ort_cpu(q, float_layers=[]))
    np.testing.assert_allclose(OrtPolicy(cpu.SerializeToString()).act(hold), got, atol=2e-4, rtol=1e-4)


def test_w4a8_with_int4_grid_hidden_splits_is_exact_in_float_and_every_layer_int4(pendulum: tuple) -> None:
    """``edgeq search --int4-hidden-split``: weight splits chosen for the int4 grid on top of the plan's own; the
    widened float graph is the same policy (each hidden input scaling extended by the copied units' factors), every
    layer is int4 on it, and the exported file computes that plan."""
    from edgeq.quantizers.evaluate import ActionErrorScorer
    from edgeq.search import _w4a8_hidden_split

    model, work, base, calib, hold = pendulum

    inputs = _layer_inputs(model, work, calib)

    ocs = _w4a8_hidden_split(base, base, model, calib, 0.1, "nearest", 0, inputs)
    assert ocs is not None and len(ocs.splits) > len(base.splits)
    added = ocs.splits[len(base.splits):]
    assert all(s == 1.0 for sp in added for s in sp.scales)  # weight splits only: the int8 input ranges hold
    assert all(la.precision == "int4" and la.weight4 is not None for la in ocs.layers)
    ref = OrtPolicy(model.SerializeToString()).act(hold)
    np.testing.assert_allclose(OrtPolicy(ocs.rewritten(model).SerializeToString()).act(hold), ref, atol=2e-5)
    got = OrtPolicy(apply_plan(model, ocs).SerializeToString()).act(hold)
    sim = fake_quant_actions(ocs.rewritten(model), ocs, hold)
    assert float(np.median(np.abs(got - sim))) < 1e-5
    scorer = ActionErrorScorer(model, hold, HALF_RANGE, lower=apply_plan)
    plain = _w4a8(model, work, base, calib, "nearest", 0)
    print(f"W4A8 nearest held-out action error {float(scorer(plain)):.4f}, with int4-grid hidden splits "
          f"{float(scorer(ocs)):.4f}")


def test_int4_input_affine_is_fitted_for_the_int4_grid_and_lowers_the_first_layers_error(pendulum: tuple) -> None:
    """``--int4-input-affine``: AffineQuant's scale and shift learned against the int4 layer's error (weight grid
    [-7, 7]) replace the int8 plan's transform where that lowers the held-out action error; bad option values are
    one line before any work."""
    from edgeq.quantizers.affine import learn_input_affine
    from edgeq.quantizers.evaluate import ActionErrorScorer
    from edgeq.search import _int4_input_rescaled, search

    model, work, base, calib, hold = pendulum
    first = find_weighted_layers(model)[0]
    x = layer_rows(tensor_values(model, calib, [first.input])[first.input])
    w = np.asarray(constant_value(model, first.weight), np.float64)
    w = w if base.layer(first.node).weight_axis == 0 else w.T
    r4 = learn_input_affine(x, w, np.ones(w.shape[1]), float(np.abs(x).max()), weight_qmax=7, iters=100)
    r8 = learn_input_affine(x, w, np.ones(w.shape[1]), float(np.abs(x).max()), iters=0)
    assert r4.loss_end < r4.loss_start and r4.loss_start > 10 * r8.loss_start  # the int4 grid's error, not int8's
    with pytest.raises(ValueError, match="weight_qmax"):
        learn_input_affine(x, w, np.ones(w.shape[1]), 1.0, weight_qmax=0)
    scorer = ActionErrorScorer(model, hold, HALF_RANGE, lower=apply_plan)

    inputs = _layer_inputs(model, work, calib)

    plain = _w4a8(model, work, base, calib, "gptq", 0, nodes={first.node})
    alt = _int4_input_rescaled(base, first.node, model, calib, scorer, "gptq", 0, inputs, transforms=("affine",))
    assert alt is not None
    e_plain, e_alt = float(scorer(plain)), float(scorer(alt))
    print(f"first layer alone in int4 (gptq): held-out action error {e_plain:.4f} -> {e_alt:.4f}, affine for int4")
    assert e_alt < 0.5 * e_plain  # measured 0.0959 -> 0.0276
    for bad in ({"int4_input_split": 5.0}, {"int4_hidden_split": 2.0}):
        with pytest.raises(EdgeqError, match="--int4-"):
            search("no-such-bundle", "out", **bad)
