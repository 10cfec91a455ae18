"""The lowering on onnx_ir writes what the protobuf lowering wrote: same bytes, same actions.

Stored outputs of the old code (before the IR, git fc4f45a): the frozen v2 bundle (made by edgeq 0.2.0)
and tests/fixtures/lowering/*.json (a plan frozen exactly, with the sha256 and the ONNX Runtime actions
of the files the old lowering wrote from it; ``scripts/make_lowering_fixtures.py``). The whole set of
fixtures and plans is compared by ``scripts/compare_lowering.py`` (benchmarks/results/lowering.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.deploy.runtime import session_options
from edgeq.export.ort_cpu import cpu_float_layers, specialize_for_ort_cpu
from edgeq.export.ort_cuda import DEQUANTIZED_DOC, specialize_for_ort_cuda
from edgeq.export.qdq import apply_plan
from edgeq.export.tensorrt_engine import fp16_onnx_with_casts
from edgeq.ingest import load_policy
from edgeq.quantizers.plan import QuantPlan

FIXTURES = Path(__file__).parent / "fixtures"
V2 = FIXTURES / "bundles" / "v2" / "sac-pendulum"
# what fc4f45a's specialize_for_ort_cpu (its float layers) and fp16_onnx_with_casts wrote for the v2 bundle
V2_OLD_SHA256 = {
    "cpu": "c70f1ebf8f8201f90e74a2ee8a303ddf321a8bc5c027c21e8f21fbedc7a9e63e",
    "fp16": "7db9205018729c0339551cf95d8ec4a58a0f9a9652ea3e6bdea3f684adac9be9",
}
# the frozen plans: which policy file (and ingest options) each was made on
FROZEN = {
    "transformer-pendulum__fp16-layer": (["transformer-pendulum.onnx"], {"history": 8}),
    "sac-pendulum__crossquant-dynamic": (["sac-pendulum.zip"], {}),
}


def _sha(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _unmarked(model: onnx.ModelProto) -> onnx.ModelProto:
    """The CUDA file without the marks 0c7ed69 put on its dequantized weights (the only change since fc4f45a)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.doc_string == DEQUANTIZED_DOC:
            t.ClearField("doc_string")
    return out


def _actions(model: onnx.ModelProto, states: np.ndarray) -> np.ndarray:
    # edgeq's session options: exact int8 products also on CPUs without VNNI (docs/ort-int8-x86.md), so the
    # frozen actions are the same on every x86-64 CPU
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    feeds = {i.name: (states if k == 0 else np.zeros([len(states), *i.shape[1:]], np.float32))
             for k, i in enumerate(sess.get_inputs())}
    return np.asarray(sess.run(None, feeds)[0])


def test_v2_bundle_rebuilt_byte_for_byte() -> None:
    fp32 = onnx.load(str(V2 / "policy.fp32.onnx"))
    stored = (V2 / "policy.int8.onnx").read_bytes()
    q = apply_plan(fp32, QuantPlan.from_bundle(V2))
    assert q.SerializeToString(deterministic=True) == stored
    cuda = _unmarked(specialize_for_ort_cuda(q)).SerializeToString(deterministic=True)
    assert cuda == (V2 / "policy.int8.cuda.onnx").read_bytes()
    # the stored CPU file predates the zero-offset Add drop (f380c6b): compare with fc4f45a's output
    cpu = specialize_for_ort_cpu(q, float_layers=cpu_float_layers(onnx.load(str(V2 / "policy.int8.cpu.onnx"))))
    assert _sha(cpu) == V2_OLD_SHA256["cpu"]
    assert _sha(fp16_onnx_with_casts(fp32)) == V2_OLD_SHA256["fp16"]
    # the actions the bundle's reference records for the CPU backend, from the rebuilt CPU file
    ref = json.loads((V2.parent / "sac-pendulum.reference.json").read_text())
    obs = np.asarray(ref["observations"], np.float32)
    np.testing.assert_array_equal(_actions(cpu, obs), np.asarray(ref["actions_int8"], np.float32))


@pytest.mark.parametrize("job", sorted(FROZEN))
def test_frozen_plan_lowers_to_the_old_bytes_and_actions(job: str) -> None:
    record = json.loads((FIXTURES / "lowering" / f"{job}.json").read_text())
    files, options = FROZEN[job]
    paths = [FIXTURES / "policies" / f for f in files]
    fp32 = load_policy(paths[0] if len(paths) == 1 else paths, **options).model
    assert _sha(fp32) == record["float_sha256"], "the ingested float graph changed; refreeze the fixture"
    plan = QuantPlan.from_dict(record["plan"])
    q = apply_plan(fp32, plan)
    assert apply_plan(fp32, plan).SerializeToString(deterministic=True) == q.SerializeToString(deterministic=True)
    lower = {"policy.int8.onnx": lambda: q,
             "policy.int8.cpu.onnx": lambda: specialize_for_ort_cpu(q, min_int8_width=record["cpu_float_below"],
                                                                    keep_int8=record["keep_int8"]),
             "policy.int8.cuda.onnx": lambda: _unmarked(specialize_for_ort_cuda(q)),
             "policy.fp16.onnx": lambda: fp16_onnx_with_casts(fp32)}
    states = np.asarray(record["states"], np.float32)
    assert set(record["sha256"]) >= {"policy.int8.onnx", "policy.int8.cpu.onnx", "policy.int8.cuda.onnx"}
    for name, digest in record["sha256"].items():
        made = lower[name]()
        onnx.checker.check_model(made, full_check=True)
        assert _sha(made) == digest, name
        np.testing.assert_array_equal(_actions(made, states), np.asarray(record["actions"][name], np.float32))
