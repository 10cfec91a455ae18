"""sb3-contrib RecurrentPPO archives: same actions as SB3 with state, quantized end to end with state."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import pytest

from edgeq.deploy import policy as deploy
from edgeq.deploy.runtime import OrtPolicy
from edgeq.ingest import load_policy
from edgeq.pipeline import quantize

POLICIES = Path(__file__).parent / "fixtures" / "policies"


@pytest.fixture(scope="module")
def rppo_pendulum() -> Path:
    path = POLICIES / "recurrentppo-pendulum.zip"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with scripts/train_fixtures.py recurrentppo-pendulum")
    return path


def test_archive_is_routed_to_the_recurrent_loader(rppo_pendulum: Path) -> None:
    policy = load_policy(rppo_pendulum)
    assert policy.source.algorithm == "RecurrentPPO"
    assert [(s.input_name, s.output_name) for s in policy.state] == [("h_in", "h_out"), ("c_in", "c_out")]
    rec = policy.source.details["recurrent"]
    assert rec["kind"] == "lstm" and rec["hidden_size"] == 32 and len(rec["gate_nodes"]) == 2
    # later stages read the typed field, never source.details
    assert policy.gate_nodes == tuple(rec["gate_nodes"])
    assert {n.name for n in policy.model.graph.node} >= set(policy.gate_nodes)


def test_same_actions_as_sb3_over_full_episodes_with_state(rppo_pendulum: Path) -> None:
    """4 envs, 2 episodes each (400 steps), states reset per env at episode starts: max diff <= 1e-5."""
    from sb3_contrib import RecurrentPPO

    model = RecurrentPPO.load(rppo_pendulum, device="cpu")  # the reference (our own trusted fixture)
    policy = load_policy(rppo_pendulum)
    ours = OrtPolicy(policy.model.SerializeToString(), state=[s.to_json() for s in policy.state])
    envs = [gym.make("Pendulum-v1") for _ in range(4)]
    obs = np.stack([e.reset(seed=100 + i)[0] for i, e in enumerate(envs)])
    state, starts = None, np.ones(4, bool)
    max_diff, steps = 0.0, 0
    for _ in range(400):
        theirs, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        mine = ours.act(obs)
        max_diff = max(max_diff, float(np.abs(mine - theirs).max()))
        starts = np.zeros(4, bool)
        for i, e in enumerate(envs):
            o, _, term, trunc, _ = e.step(mine[i])
            if term or trunc:
                o, _ = e.reset(seed=200 + i)
                starts[i] = True
            obs[i] = o
        if starts.any():
            ours.reset(starts)
        steps += 1
    assert steps == 400 and max_diff <= 1e-5


@pytest.fixture(scope="module")
def bundles(rppo_pendulum: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rppo")
    out = {}
    for cell in ("int8", "fp32"):
        out[cell] = quantize(rppo_pendulum, "Pendulum-v1", root / cell, episodes=6, calib_episodes=8, num_envs=6,
                             cell_precision=cell,
                             # the width rule, not the timed choice: what this test asserts must not depend
                             # on how loaded the machine is (the timed choice is tested in test_cpu_select.py)
                             overrides={"export.cpu_layer_selection": "width"}).bundle
    return out


def test_quantizes_end_to_end_with_state_in_the_manifest(bundles: dict[str, Path]) -> None:
    for cell, bundle in bundles.items():
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["io"]["state"] == [{"input": "h_in", "output": "h_out", "shape": [1, 32]},
                                           {"input": "c_in", "output": "c_out", "shape": [1, 32]}]
        layers = {layer["node"]: layer["precision"] for layer in manifest["quantization"]["layers"]}
        gates = manifest["source"]["details"]["recurrent"]["gate_nodes"]
        assert all(layers[g] == cell.replace("fp32", "float") for g in gates)
        assert sum(p == "int8" for n, p in layers.items() if n not in gates) == 2  # policy_net.0 and action_net
        assert manifest["quantization"]["settings"]["recurrent_cell"]["precision"] == cell
        val = json.loads((bundle / "validation.json").read_text())["targets"]["cpu"]
        assert val["float"]["lengths"] == [200] * 6 and val["int8"]["lengths"] == [200] * 6
        # the recurrent policy is competent and int8 keeps its return (within 10% + 20 of the float mean)
        assert val["float"]["mean"] > -400
        assert abs(val["paired_difference"]["mean"]) <= 0.1 * abs(val["float"]["mean"]) + 20
        # (with an fp32 cell the CPU file may run every layer in float, measured faster: nothing saturates there)
        assert cell == "fp32" or "lstm_actor.l0.h_prev" in val["saturation"]["on_int8_trajectory"]["tensors"]
        # the CPU file runs the tiny action layer (32 → 1) in float but keeps an int8 cell's gates in int8,
        # even the input gate (3 → 128, narrower than cpu_float_below)
        cpu = onnx.load(str(bundle / manifest["models"]["int8-cpu"]))
        integer = {n.name for n in cpu.graph.node if n.op_type == "MatMulIntegerToFloat"}
        assert set(gates) <= integer if cell == "int8" else not set(gates) & integer
        assert not set(gates) & set(manifest["cpu_float_layers"])
        assert any("action_net" in n for n in manifest["cpu_float_layers"])


def test_cell_in_fp32_has_no_more_action_error_than_int8_cell(bundles: dict[str, Path]) -> None:
    err = {cell: json.loads((b / "validation.json").read_text())["targets"]["cpu"]["action_error"]
           ["on_float_trajectory"]["mean_abs"] for cell, b in bundles.items()}
    assert 0 < err["fp32"] <= err["int8"]


def test_deployed_recurrent_policy_carries_and_resets_state(bundles: dict[str, Path]) -> None:
    pol = deploy.load(bundles["int8"], backend="cpu", allow_unsigned=True)
    obs = np.array([1.0, 0.0, 0.5], np.float32)
    first = pol.act(obs)
    later = [pol.act(obs) for _ in range(20)][-1]
    assert not np.allclose(first, later)  # the same observation, a different state
    pol.reset()
    assert np.array_equal(pol.act(obs), first)


def test_fused_recurrent_plan_is_ort_cpu_over_episodes_and_selection_says_why(bundles: dict[str, Path]) -> None:
    """The fused LSTM backend's plan of the bundle's policy.int8.onnx (numpy, no GPU): bit-identical actions
    and state to ONNX Runtime's CPU on the same file over full Pendulum episodes with per-env resets."""
    from edgeq.deploy import cuda
    from edgeq.deploy.fused_rnn import fused_rnn_support
    from edgeq.deploy.onnx_graph import load_graph
    from edgeq.deploy.rnn_plan import recurrent_plan_from_graph, reference_step

    manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
    state = manifest["io"]["state"]
    model = bundles["int8"] / "policy.int8.onnx"
    plan = recurrent_plan_from_graph(load_graph(model), state)
    assert (plan.kind, plan.hidden, [la.n for la in plan.head.layers]) == ("lstm", 32, [64, 1])
    ort = OrtPolicy(model, state=state)
    envs = [gym.make("Pendulum-v1") for _ in range(3)]
    obs = np.stack([e.reset(seed=300 + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    s = plan.zero_state(3)
    worst, ends = 0.0, 0
    for t in range(450):
        want = ort.act(obs)
        got, s = reference_step(plan, obs, s)
        worst = max(worst, float(np.abs(got - want).max()))
        starts = np.zeros(3, bool)
        for i, e in enumerate(envs):
            o, _, term, trunc, _ = e.step(want[i])
            if term or trunc or (t == 120 and i == 1):  # Pendulum ends by time limit; one early reset
                o, _ = e.reset(seed=400 + t + i)
                starts[i] = True
            obs[i] = o
        if starts.any():
            ends += int(starts.sum())
            ort.reset(starts)
            for v in s.values():
                v[starts] = 0.0
    assert ends >= 6 and worst == 0.0
    # the fused kernel takes the int8-cell file; an fp32 cell stays on ONNX Runtime, saying why
    assert fused_rnn_support(model, state) is None
    fp32_cell = fused_rnn_support(bundles["fp32"] / "policy.int8.onnx", state)
    assert fp32_cell is not None and "float" in fp32_cell
    reason = cuda.available()
    if reason is not None:  # no GPU here: auto runs on the CPU and says why the fused kernel did not
        pol = deploy.load(bundles["int8"], backend="auto", allow_unsigned=True)
        assert pol.backend == "cpu"
        assert any(n.startswith("cuda-fused: ") and reason[:40] in n for n in pol.backend_notes), pol.backend_notes
