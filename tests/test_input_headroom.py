"""``quantization.input_headroom`` (issue 12): the observation input's int8 range widened by a factor after every
other stage, so that an observation beyond the calibrated range (a falling robot) is not clipped. Only that one
range changes; the all-INT8 file stays all-INT8; a state beyond calibration is acted on as float does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from quant_helpers import mlp, stats_for

from edgeq.config import ConfigError, QuantizeConfig
from edgeq.export.qdq import apply_plan
from edgeq.quantizers.build import QuantOptions, build_plan


def _weights() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [(rng.normal(0, 0.5, (32, 6)), rng.normal(0, 0.1, 32)), (rng.normal(0, 0.3, (32, 32)),
            rng.normal(0, 0.1, 32)), (rng.normal(0, 0.3, (2, 32)), rng.normal(0, 0.1, 2))]


def _obs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)


def _act(model: onnx.ModelProto, obs: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: obs})[0], np.float64)


@pytest.fixture(scope="module")
def plans() -> tuple[onnx.ModelProto, dict[float, object]]:
    model = mlp(_weights())
    stats = stats_for(model, _obs(3000, 1), _obs(600, 2))
    return model, {h: build_plan(model, stats, QuantOptions(affine_input=True, input_headroom=h), lower=apply_plan)
                   for h in (1.0, 2.0)}


def test_only_the_observation_range_widens(plans) -> None:  # type: ignore[no-untyped-def]
    model, by_h = plans
    base, wide = by_h[1.0], by_h[2.0]
    first = base.layers[0].input
    assert wide.layers[0].input == first
    assert wide.activations[first].amax == pytest.approx(2.0 * base.activations[first].amax, rel=1e-12)
    assert {k: v.amax for k, v in wide.activations.items() if k != first} == \
        {k: v.amax for k, v in base.activations.items() if k != first}
    for a, b in zip(base.layers, wide.layers, strict=True):
        assert np.array_equal(a.weight.q, b.weight.q) and a.precision == b.precision == "int8"
    rep = wide.metrics["stages"]["input_headroom"]
    assert rep["factor"] == 2.0 and rep["tensor"] == first and rep["amax"] == pytest.approx(2 * rep["amax_calibrated"])
    assert "input_headroom" not in base.metrics["stages"]
    assert np.isfinite(rep["heldout_score"]) and wide.metrics["heldout_score_by_stage"]["input_headroom"] == \
        pytest.approx(rep["heldout_score"], abs=1e-6)
    q = apply_plan(model, wide)
    scales = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if i.data_type == TensorProto.FLOAT}
    ql = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == first]
    assert len(ql) == 1 and float(scales[ql[0].input[1]]) == pytest.approx(wide.activations[first].amax / 127, rel=1e-6)
    assert sum(t.data_type == TensorProto.INT8 and len(t.dims) == 2 for t in q.graph.initializer) == 3


def test_a_state_beyond_calibration_is_not_clipped(plans) -> None:  # type: ignore[no-untyped-def]
    """One observation channel at 5.0, ~1.3x the calibrated input range (the rest as in calibration): the
    all-INT8 file with headroom 2 acts much closer to float than the one that clips that channel."""
    model, by_h = plans
    assert by_h[1.0].activations[by_h[1.0].layers[0].input].amax < 5.0 < by_h[2.0].activations[
        by_h[2.0].layers[0].input].amax
    err = {1.0: 0.0, 2.0: 0.0}
    for ch in range(6):
        far = _obs(400, 9)
        far[:, ch] = 5.0
        ref = _act(model, far)
        for h, p in by_h.items():
            err[h] += float(np.abs(_act(apply_plan(model, p), far) - ref).mean())
    assert err[2.0] < 0.6 * err[1.0], err


@pytest.mark.parametrize("bad", [0.5, 0.0, float("nan"), 100.0])
def test_a_factor_outside_1_to_16_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="input_headroom"):
        QuantOptions(input_headroom=bad)
    with pytest.raises(ConfigError, match="input_headroom"):
        QuantizeConfig.from_dict({"quantization": {"input_headroom": bad}}).quant_options()
