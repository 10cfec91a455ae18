"""A plan is data that round-trips: to_dict -> JSON -> from_dict, and a bundle's plan.json -> QuantPlan.

The test of exactness is the graph: ``apply_plan`` of the read-back plan writes the same bytes as
``apply_plan`` of the original (and, for a bundle, the same bytes as its ``policy.int8.onnx``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.calibration.collect import calibrate_rollouts
from edgeq.deploy.bundle_format import FLOAT_MODEL, INT8_MODEL, MANIFEST, PLAN
from edgeq.envs import env_factory
from edgeq.errors import BundleError
from edgeq.export.qdq import apply_plan
from edgeq.ingest.sb3 import load_sb3
from edgeq.pipeline import quantize
from edgeq.quantizers.build import QuantOptions, build_plan
from edgeq.quantizers.plan import QuantPlan
from edgeq.quantizers.precision import with_precision


def _graph_bytes(model: onnx.ModelProto, plan: QuantPlan) -> bytes:
    return apply_plan(model, plan).SerializeToString(deterministic=True)


def _round_trip(plan: QuantPlan) -> tuple[dict, QuantPlan]:
    d = json.loads(json.dumps(plan.to_dict()))  # through real JSON text
    return d, QuantPlan.from_dict(d)


@pytest.fixture(scope="module")
def pendulum(sac_pendulum: Path):
    policy = load_sb3(sac_pendulum)
    stats = calibrate_rollouts(policy, env_factory("Pendulum-v1"), list(range(700, 703)), holdout_seeds=[800])
    return policy, stats


def test_every_artifact_round_trips_exactly(pendulum) -> None:
    policy, stats = pendulum
    plan = build_plan(policy.model, stats, QuantOptions(transform="crossquant", alpha=0.3, rounding="adaround",
                                                       adaround_iters=20), lower=apply_plan)
    first, last = plan.int8_layers()[0], plan.int8_layers()[-1]
    # make sure every kind of artifact is present: a corrected bias, an fp16 layer, an input scaling
    rng = np.random.default_rng(0)
    assert first.weight is not None
    bias = rng.normal(0, 0.1, first.weight.q.shape[first.weight_axis]).astype(np.float32)
    plan = dataclasses.replace(plan, layers=[dataclasses.replace(la, bias=bias) if la.node == first.node else la
                                             for la in plan.layers])
    plan = with_precision(plan, last.node, "fp16", "test")
    assert plan.transforms and any(la.precision == "fp16" for la in plan.layers)

    d, back = _round_trip(plan)
    assert "metrics" not in d and d["format"] == 1
    assert back.to_dict() == d
    assert _graph_bytes(policy.model, back) == _graph_bytes(policy.model, plan)
    assert [la.precision for la in back.layers] == [la.precision for la in plan.layers]
    b0 = back.layer(first.node)
    assert b0.bias is not None and b0.bias.dtype == np.float32 and np.array_equal(b0.bias, bias)
    assert b0.weight is not None and np.array_equal(b0.weight.q, first.weight.q)
    assert b0.weight.scale.dtype == first.weight.scale.dtype
    assert np.array_equal(b0.weight.scale, plan.layer(first.node).weight.scale)  # type: ignore[union-attr]
    np.testing.assert_array_equal(back.transforms[0].factors, plan.transforms[0].factors)
    assert {k: a.amax for k, a in back.activations.items()} == {k: a.amax for k, a in plan.activations.items()}


def test_dynamic_crossquant_round_trips(pendulum) -> None:
    policy, stats = pendulum
    plan = build_plan(policy.model, stats, QuantOptions(dynamic=True, alpha=0.5), lower=apply_plan)
    assert any(la.scheme == "crossquant-dynamic" for la in plan.layers)
    d, back = _round_trip(plan)
    assert _graph_bytes(policy.model, back) == _graph_bytes(policy.model, plan)
    assert not back.tensorrt_compatible


def test_plan_is_frozen_and_bad_input_is_refused(pendulum) -> None:
    policy, stats = pendulum
    plan = build_plan(policy.model, stats, QuantOptions(auto=False), lower=apply_plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers = []  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers[0].precision = "fp16"  # type: ignore[misc]
    d = plan.to_dict()
    with pytest.raises(ValueError, match="format"):
        QuantPlan.from_dict({**d, "format": 99})
    with pytest.raises(ValueError, match="malformed"):
        QuantPlan.from_dict({**d, "layers": [{"node": "x"}]})


def test_bundle_plan_rebuilds_the_int8_model_byte_for_byte(sac_pendulum: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    quantize(sac_pendulum, "Pendulum-v1", out, episodes=2, seed=5, report=False,
             recipe_overrides={"rounding": "adaround", "bias_correction": True})
    manifest = json.loads((out / MANIFEST).read_text())
    assert PLAN in manifest["files"]
    plan = QuantPlan.from_bundle(out)
    assert plan.metrics == manifest["quantization"]["metrics"]  # the report stays in the manifest
    assert "metrics" not in json.loads((out / PLAN).read_text())
    rebuilt = _graph_bytes(onnx.load(str(out / FLOAT_MODEL)), plan)
    assert rebuilt == (out / INT8_MODEL).read_bytes()

    # a plan.json that does not match its hash is refused
    text = (out / PLAN).read_text()
    (out / PLAN).write_text(text.replace('"precision": "int8"', '"precision": "fp16"', 1))
    with pytest.raises(BundleError, match="SHA-256"):
        QuantPlan.from_bundle(out)
    # a bundle made before plan.json existed says so (callers fall back to the manifest)
    (out / PLAN).write_text(text)
    del manifest["files"][PLAN]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="edgeq < 0.2.0"):
        QuantPlan.from_bundle(out)
