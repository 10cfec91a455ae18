"""``DeployedPolicy.act``'s hot path for the fused GPU backend, on the CPU: a stand-in runner computes the
plan's numpy reference arithmetic, so the path's decisions (which inputs take it, the finite check run
while the GPU would compute, the fall-back for everything else, the latency records) are tested here;
the GPU itself runs it in tests/test_fused_mlp.py on the GPU machine."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES

from edgeq.deploy.fused_mlp import FusedCudaPolicy
from edgeq.deploy.mlp_plan import plan_from_graph, reference_forward
from edgeq.deploy.onnx_graph import load_graph
from edgeq.deploy.policy import DeployedPolicy
from edgeq.deploy.runtime import LatencyStats
from edgeq.errors import InputError

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"


class _Runner:
    """The runner's interface, in numpy: ``run`` and ``run_overlapped`` as the GPU runner has them."""

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.latency = LatencyStats()
        self.overlapped: list[int] = []  # the batch of each hot-path call
        self.plain: list[int] = []

    def run(self, obs: np.ndarray) -> np.ndarray:
        self.plain.append(len(obs))
        return reference_forward(self.plan, obs)

    def run_overlapped(self, obs: np.ndarray, batch: int, work: Any) -> tuple[np.ndarray, bool]:
        self.overlapped.append(batch)
        buf = np.empty((batch, self.plan.obs_dim), np.float32)
        np.copyto(buf, obs, casting="same_kind")  # what the pinned copy does (one observation broadcasts)
        return reference_forward(self.plan, buf), work(obs)


def _policy(nan_policy: str = "error") -> tuple[DeployedPolicy, _Runner]:
    plan = plan_from_graph(load_graph(V1 / "policy.int8.onnx"))
    fused = FusedCudaPolicy.__new__(FusedCudaPolicy)  # no GPU here: everything but the runner
    runner = _Runner(plan)
    fused.runner, fused.plan, fused.obs_dim = runner, plan, plan.obs_dim  # type: ignore[assignment]
    fused.input_name, fused.output_name, fused.output_names = "obs", "actions", ["actions"]
    fused._latency = runner.latency
    manifest = json.loads((V1 / "manifest.json").read_text())
    return DeployedPolicy(fused, manifest, precision="int8", backend="cuda-fused", nan_policy=nan_policy), runner


def test_float32_arrays_take_the_hot_path_with_the_same_actions() -> None:
    pol, runner = _policy()
    obs = (np.random.default_rng(0).standard_normal((5, 3)) * 2).astype(np.float32)
    want = reference_forward(runner.plan, obs)
    np.testing.assert_array_equal(pol.act(obs), want)
    one = pol.act(obs[2])
    assert one.shape == (1,)
    np.testing.assert_array_equal(one, want[2])
    assert runner.overlapped == [5, 1] and runner.plain == []
    assert pol.latency["calls"] == 2


def test_other_inputs_take_the_checked_path() -> None:
    pol, runner = _policy()
    obs = np.random.default_rng(1).standard_normal((4, 3))
    want = reference_forward(runner.plan, obs.astype(np.float32))
    np.testing.assert_array_equal(pol.act(obs), want)  # float64: converted on the general path
    np.testing.assert_array_equal(pol.act(np.asfortranarray(obs.astype(np.float32))), want)
    np.testing.assert_array_equal(pol.act(obs[0].tolist()), want[0])
    assert runner.overlapped == [] and runner.plain == [4, 4, 1]
    with pytest.raises(InputError, match="shape"):
        pol.act(np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="max_batch"):
        pol.act(np.zeros((4097, 3), np.float32))
    assert runner.overlapped == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_found_while_the_gpu_computes_is_refused(bad: float) -> None:
    pol, runner = _policy()
    obs = np.ones((3, 3), np.float32)
    obs[1, 2] = bad
    with pytest.raises(InputError, match=r"non-finite value .* at index \(1, 2\)"):
        pol.act(obs)
    assert runner.overlapped == [3]  # computed, then discarded
    single = np.ones(3, np.float32)
    single[0] = bad
    with pytest.raises(InputError, match=r"at index \(0,\)"):
        pol.act(single)
    assert pol.latency["calls"] == 0


def test_nan_policies_on_the_hot_path() -> None:
    obs = np.array([[0.5, np.nan, 1.0], [1e20, 0.0, 0.0]], np.float32)  # 1e20² overflows: finite all the same
    pol, runner = _policy("zero")
    np.testing.assert_array_equal(pol.act(obs), reference_forward(runner.plan, np.nan_to_num(obs, nan=0.0)))
    assert runner.overlapped == [2] and runner.plain == [2]  # recomputed with the zeroed input
    pol, runner = _policy("pass")
    pol.act(obs)
    assert runner.overlapped == [2] and runner.plain == []
    pol, runner = _policy("error")
    np.testing.assert_array_equal(pol.act(obs[1:]), reference_forward(runner.plan, obs[1:]))
    assert runner.overlapped == [1] and runner.plain == [1]  # the overflow is re-checked element-wise


def test_recurrent_bundles_without_a_gpu_go_to_onnx_runtime_with_the_reason() -> None:
    """A recurrent policy is no longer refused for being recurrent (the fused LSTM/GRU kernel runs it);
    without a GPU ``cuda`` falls back to ONNX Runtime's CUDA EP and the reason names the missing driver."""
    from edgeq.deploy import cuda
    from edgeq.deploy.policy import resolve_backend, unavailable_backend_reason

    manifest = {"io": {"input": "obs", "output": "actions",
                       "state": [{"input": "h_in", "output": "h_out", "shape": [1, 64]}]}}
    reason = unavailable_backend_reason("cuda-fused", manifest, "int8")
    if cuda.available() is None:
        pytest.skip("a GPU is here: the fused recurrent kernel's own tests (tests/test_fused_rnn.py) cover it")
    assert reason is not None and not reason.startswith("recurrent policy")
    assert reason == cuda.available()
    assert resolve_backend("cuda", manifest, "int8") == "cuda-ort"
