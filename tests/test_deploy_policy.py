"""``edgeq.deploy.load(...).act``: single and batch, input checks, NaN policies, backends, state, latency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper

import edgeq.deploy
from edgeq.deploy.bundle_format import INT8_MODEL
from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import BundleError, InputError
from edgeq.export.bundle import BundleWriter

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
REFERENCE = json.loads((FIXTURES / "bundles" / "v1" / "sac-pendulum.reference.json").read_text())


@pytest.fixture(scope="module")
def policy() -> edgeq.deploy.DeployedPolicy:
    return edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)


def test_single_and_batch_match_the_onnx_model(policy: edgeq.deploy.DeployedPolicy) -> None:
    obs = np.asarray(REFERENCE["observations"], np.float32)
    direct = OrtPolicy(V1 / INT8_MODEL).act(obs)  # the bare ONNX Runtime session on the same file
    batch = policy.act(obs)
    assert batch.shape == (len(obs), 1) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, direct)
    for row, want in zip(obs, direct, strict=True):
        got = policy.act(row)
        assert got.shape == (1,)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_real_dtypes_are_converted_and_lists_accepted(policy: edgeq.deploy.DeployedPolicy) -> None:
    obs = np.asarray(REFERENCE["observations"][:3], np.float64)  # MuJoCo envs return float64
    want = policy.act(obs.astype(np.float32))
    np.testing.assert_array_equal(policy.act(obs), want)
    np.testing.assert_array_equal(policy.act(obs.tolist()), want)
    ints = np.array([[1, 0, -3]], np.int64)
    np.testing.assert_array_equal(policy.act(ints), policy.act(ints.astype(np.float32)))


@pytest.mark.parametrize("bad, match", [
    (np.zeros(4, np.float32), r"observation shape \(4,\); expected shape \(3,\)"),
    (np.zeros((2, 4), np.float32), r"shape \(2, 4\)"),
    (np.zeros((2, 1, 3), np.float32), r"shape \(2, 1, 3\)"),
    (np.zeros(()), r"shape \(\)"),
    (np.zeros((0, 3), np.float32), "batch is empty"),
    (np.zeros(3, bool), "dtype bool is not a real number type"),
    (np.zeros(3, np.complex64), "dtype complex64"),
    (np.array(["a", "b", "c"]), "dtype <U1"),
    ([[1.0, 2.0, 3.0], [1.0]], "not an array"),
])
def test_bad_observations_are_refused_clearly(policy: edgeq.deploy.DeployedPolicy, bad: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        policy.act(bad)


def test_batch_larger_than_the_bundle_max_batch_is_refused(policy: edgeq.deploy.DeployedPolicy) -> None:
    assert policy.max_batch is not None and policy.max_batch == policy.manifest["profile"]["max_batch"]
    with pytest.raises(InputError, match=f"larger than the bundle's max_batch {policy.max_batch}"):
        policy.act(np.zeros((policy.max_batch + 1, 3), np.float32))


def test_nan_policies() -> None:
    obs = np.array([[0.5, np.nan, 1.0], [0.1, 0.2, np.inf]], np.float32)
    strict = edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)
    with pytest.raises(InputError, match=r"non-finite value \(nan\) at index \(0, 1\)"):
        strict.act(obs)
    with pytest.raises(InputError, match=r"non-finite value \(inf\) at index \(2,\)"):
        strict.act(obs[1])
    assert strict.latency["calls"] == 0  # refused calls never reach the backend
    zero = edgeq.deploy.load(V1, backend="cpu", nan_policy="zero", allow_unsigned=True)
    np.testing.assert_array_equal(zero.act(obs), strict.act(np.nan_to_num(obs, nan=0.0, posinf=0.0)))
    passed = edgeq.deploy.load(V1, backend="cpu", nan_policy="pass", allow_unsigned=True).act(obs)
    assert passed.shape == (2, 1)  # handed to the model unchanged; what it makes of NaN is its business
    with pytest.raises(ValueError, match="nan_policy 'ignore'"):
        edgeq.deploy.load(V1, backend="cpu", nan_policy="ignore", allow_unsigned=True)


def test_fp32_precision_and_reference_actions() -> None:
    obs = np.asarray(REFERENCE["observations"], np.float32)
    fp32 = edgeq.deploy.load(V1, backend="cpu", precision="fp32", allow_unsigned=True)
    assert fp32.precision == "fp32"
    np.testing.assert_allclose(fp32.act(obs), np.asarray(REFERENCE["actions_fp32"]), atol=1e-5)
    with pytest.raises(BundleError, match="precision 'fp16'"):
        edgeq.deploy.load(V1, precision="fp16", allow_unsigned=True)


def test_backends() -> None:
    import onnxruntime as ort

    with pytest.raises(BundleError, match="unknown backend 'gpu'"):
        edgeq.deploy.load(V1, backend="gpu", allow_unsigned=True)
    with pytest.raises(BundleError, match="needs a TensorRT engine of precision 'int8'"):
        edgeq.deploy.load(V1, backend="trt", allow_unsigned=True)
    auto = edgeq.deploy.load(V1, backend="auto", allow_unsigned=True)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # the fused INT8 kernel first (where cuda-python reaches the GPU), else ONNX Runtime's CUDA EP
        assert auto.backend in ("cuda-fused", "cuda-ort"), auto.backend_notes
        assert edgeq.deploy.load(V1, backend="cuda-ort", allow_unsigned=True).providers[0] == "CUDAExecutionProvider"
        assert edgeq.deploy.load(V1, backend="cuda", allow_unsigned=True).backend == auto.backend
    else:
        assert auto.backend == "cpu" and auto.providers == ["CPUExecutionProvider"]
        with pytest.raises(BundleError, match="backend 'cuda' cannot start: .*no CUDAExecutionProvider"):
            edgeq.deploy.load(V1, backend="cuda", allow_unsigned=True)


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU (run on the GPU machine)")
def test_cuda_matches_cpu() -> None:
    obs = np.asarray(REFERENCE["observations"], np.float32)
    # measured on an H100 with TF32 off: 1e-5 (fp32), 2e-6 (int8); int8 leaves room for one activation
    # that lands on the other side of a rounding boundary
    for precision, atol in (("fp32", 1e-4), ("int8", 0.05)):
        cpu = edgeq.deploy.load(V1, backend="cpu", precision=precision, allow_unsigned=True).act(obs)
        cuda = edgeq.deploy.load(V1, backend="cuda-ort", precision=precision, allow_unsigned=True)
        assert cuda.providers[0] == "CUDAExecutionProvider"
        np.testing.assert_allclose(cuda.act(obs), cpu, atol=atol)
        for row, want in zip(obs, cpu, strict=True):
            np.testing.assert_allclose(cuda.act(row), want, atol=atol)


def test_latency_statistics(policy: edgeq.deploy.DeployedPolicy) -> None:
    policy.reset_latency()
    assert policy.latency == {"calls": 0}
    for row in np.asarray(REFERENCE["observations"], np.float32):
        policy.act(row)
    policy.act(np.zeros((5, 3), np.float32))
    act, backend = policy.latency, policy.backend_latency
    assert act["calls"] == backend["calls"] == len(REFERENCE["observations"]) + 1
    for s in (act, backend):
        assert 0 < s["median_us"] <= s["p90_us"] <= s["p99_us"] <= s["p999_us"] <= s["max_us"]
    assert act["median_us"] > backend["median_us"]  # act = checks + backend call


def _recurrent_bundle(out: Path) -> Path:
    """A tiny recurrent policy: h' = h + obs, actions = 2 h' (state in/out like an LSTM's)."""
    obs = helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["N", 2])
    h_in = helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", 2])
    acts = helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["N", 2])
    h_out = helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", 2])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Add", ["h_in", "obs"], ["h_out"]),
                               helper.make_node("Mul", ["h_out", "two"], ["actions"])],
                              "recurrent", [obs, h_in], [acts, h_out], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    box = {"type": "Box", "shape": [2], "dtype": "float32", "low": ["-inf", "-inf"], "high": ["inf", "inf"]}
    with BundleWriter(out) as w:
        w.save_model(model, INT8_MODEL)
        w.manifest = {"env": {"id": "none"}, "observation_space": box, "action_space": box,
                      "io": {"input": "obs", "output": "actions",
                             "state": [{"input": "h_in", "output": "h_out", "shape": [2]}]},
                      "models": {"int8": INT8_MODEL}}
    return out


def test_recurrent_state_is_carried_and_reset(tmp_path: Path) -> None:
    p = edgeq.deploy.load(_recurrent_bundle(tmp_path / "rnn"), backend="cpu", allow_unsigned=True)
    assert p.recurrent
    one = np.array([1.0, -1.0], np.float32)
    np.testing.assert_array_equal(p.act(one), [2.0, -2.0])  # warm-up calls did not leave state behind
    np.testing.assert_array_equal(p.act(one), [4.0, -4.0])
    p.reset()
    np.testing.assert_array_equal(p.act(one), [2.0, -2.0])
    batch = np.ones((3, 2), np.float32)
    with pytest.raises(InputError, match="call reset\\(\\) before changing the batch size"):
        p.act(batch)  # the state of 1 row is never silently dropped for a batch of 3
    np.testing.assert_array_equal(p.act(one), [4.0, -4.0])  # ... and the refused call changed nothing
    p.reset()
    np.testing.assert_array_equal(p.act(batch)[:, 0], [2.0, 2.0, 2.0])
    p.reset(np.array([False, True, False]))
    np.testing.assert_array_equal(p.act(batch)[:, 0], [4.0, 2.0, 4.0])
