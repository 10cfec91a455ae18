"""fp16 fallback: reported (never silent), the int8 layers still follow the QDQ rules, ORT CPU runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.calibration.collect import calibrate_rollouts
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.export.qdq import apply_plan
from edgeq.ingest.sb3 import load_sb3
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.evaluate import action_half_range
from edgeq.quantizers.precision import with_precision


@pytest.fixture(scope="module")
def pendulum_stats(sac_pendulum: Path):
    policy = load_sb3(sac_pendulum)
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(900, 906)), holdout_seeds=[950, 951])
    return policy, stats, action_half_range(policy.action_space.low_array, policy.action_space.high_array)


def _check_int8_rules(q: onnx.ModelProto, n_int8: int) -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    for node in q.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.dtype == np.int8 and np.all(zp == 0)
            assert np.all(inits[node.input[1]] > 0)
    int8_mm = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in producers
               and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert len(int8_mm) == n_int8
    for mm in int8_mm:
        a, w = producers[mm.input[0]], producers[mm.input[1]]
        assert a.op_type == "DequantizeLinear" and producers[a.input[0]].op_type == "QuantizeLinear"
        wq = inits[w.input[0]]
        assert wq.dtype == np.int8 and np.abs(wq.astype(np.int16)).max() <= 127
        assert next(att.i for att in w.attribute if att.name == "axis") == 1
    assert producers["actions"].op_type not in ("QuantizeLinear", "DequantizeLinear")


def test_fp16_fallback_is_reported_and_exported(pendulum_stats, tmp_path: Path) -> None:
    policy, stats, hr = pendulum_stats
    plan = build_plan(policy.model, stats, QuantOptions(transform="crossquant", alpha=0.0, fp16_fallback=1,
                                                        max_action_error=1e-4), half_range=hr, lower=apply_plan)
    fp16 = [la for la in plan.layers if la.precision == "fp16"]
    assert len(fp16) == 1
    rep = plan.metrics["stages"]["fp16_fallback"]
    assert rep["moved"][0]["layer"] == fp16[0].node
    assert rep["error_after"] < rep["error_before"]
    # the most sensitive layer: the one whose fp16 move gives the lowest error
    assert fp16[0].node == min(rep["sensitivity"], key=rep["sensitivity"].get)
    j = plan.to_json()
    row = next(la for la in j["layers"] if la["node"] == fp16[0].node)
    assert row["precision"] == "fp16" and "fp16 fallback" in row["reason"] and "weight_axis" not in row

    q = apply_plan(policy.model, plan)
    onnx.checker.check_model(q, full_check=True)
    _check_int8_rules(q, n_int8=2)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    mm16 = next(n for n in q.graph.node if n.name == fp16[0].node)
    assert mm16.op_type == "MatMul" and inits[mm16.input[1]].dtype == np.float16
    cast_in = producers[mm16.input[0]]
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT16
    # no float32 weight matrix is left for any layer
    assert not any(v.dtype == np.float32 and v.ndim == 2 for v in inits.values())

    # ORT CPU runs the mixed graph; the fp16 layer lowers the action error on held-out states
    path = tmp_path / "q.onnx"
    path.write_bytes(q.SerializeToString())
    obs = stats.holdout
    ref = OrtPolicy(policy.model.SerializeToString()).act(obs)
    got = OrtPolicy(path).act(obs)
    all_int8 = apply_plan(policy.model, with_precision(plan, fp16[0].node, "int8"))
    got8 = OrtPolicy(all_int8.SerializeToString()).act(obs)
    assert np.abs(got - ref).mean() < np.abs(got8 - ref).mean()
    err = np.abs(got - ref).mean() / hr.mean()
    assert err == pytest.approx(plan.metrics["heldout_action_error"]["mean"], rel=1e-3)


def test_no_fallback_when_target_is_met_or_turned_off(pendulum_stats) -> None:
    policy, stats, hr = pendulum_stats
    met = build_plan(policy.model, stats, QuantOptions(fp16_fallback=2, max_action_error=10.0), half_range=hr,
                     lower=apply_plan)
    assert all(la.precision == "int8" for la in met.layers)
    assert met.metrics["stages"]["fp16_fallback"]["moved"] == []
    off = build_plan(policy.model, stats, QuantOptions(fp16_fallback=0, max_action_error=0.0), half_range=hr,
                     lower=apply_plan)
    assert all(la.precision == "int8" for la in off.layers) and "fp16_fallback" not in off.metrics["stages"]
    # at most max_layers layers move
    two = build_plan(policy.model, stats, QuantOptions(fp16_fallback=2, max_action_error=0.0), half_range=hr,
                     lower=apply_plan)
    assert 1 <= sum(la.precision == "fp16" for la in two.layers) <= 2
