"""Float ONNX policy files (Isaac Lab style) → edgeq's conventions, then quantized end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch
from conftest import QUICK_PLAN
from typer.testing import CliRunner

from edgeq.cli import app
from edgeq.deploy import load as load_bundle
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.errors import PolicyFormatError
from edgeq.graph.analysis import find_weighted_layers
from edgeq.ingest import load_policy
from edgeq.ingest.sb3 import load_sb3
from edgeq.rollout import run_episodes

ISAAC_FIXTURE = Path(__file__).parent / "fixtures" / "onnx" / "sac-pendulum-isaac.onnx"
CHEETAH_FIXTURE = Path(__file__).parent / "fixtures" / "onnx" / "sac-halfcheetah-isaac.onnx"
TOL = 1e-5


def _export_fixed_batch(module: torch.nn.Module, path: Path, obs_dim: int, input_names: list[str],
                        output_names: list[str], extra_inputs: tuple[torch.Tensor, ...] = ()) -> Path:
    """Export the way Isaac Lab's exporter does: TorchScript, opset 11, fixed batch 1, no dynamic axes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, obs_dim), *extra_inputs), str(path), export_params=True,
                          opset_version=11, input_names=input_names, output_names=output_names, dynamic_axes={},
                          dynamo=False)
    return path


@pytest.fixture(scope="module")
def visited_obs(sac_pendulum: Path) -> np.ndarray:
    """Observations the trained SAC policy visits in Pendulum-v1 (3 episodes, 600 states)."""
    runtime = OrtPolicy(load_sb3(sac_pendulum).model.SerializeToString())
    seen: list[np.ndarray] = []
    run_episodes(env_factory("Pendulum-v1"), runtime, [700, 701, 702], num_envs=3,
                 on_step=lambda obs, act, active: seen.append(obs[active]))
    return np.concatenate(seen)


def test_isaac_file_is_normalized() -> None:
    raw = onnx.load(ISAAC_FIXTURE)
    assert raw.opset_import[0].version == 11
    assert [d.dim_value for d in raw.graph.input[0].type.tensor_type.shape.dim] == [1, 3]

    fp = load_policy(ISAAC_FIXTURE)
    m = fp.model
    onnx.checker.check_model(m, full_check=True)
    assert fp.source.kind == "onnx" and fp.source.details["normalization"]["original_opset"] == 11
    assert {op.version for op in m.opset_import if op.domain in ("", "ai.onnx")} == {17}
    assert [i.name for i in m.graph.input] == ["obs"] and [o.name for o in m.graph.output] == ["actions"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*m.graph.input,
                                                                                        *m.graph.output)]
    assert dims == [["batch", 3], ["batch", 1]]
    layers = find_weighted_layers(m)
    assert [(layer.in_features, layer.out_features) for layer in layers] == [(3, 256), (256, 256), (256, 1)]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert fp.obs_space.shape == (3,) and fp.action_space.shape == (1,)
    assert not fp.action_space.bounded  # an ONNX file carries no bounds


def test_actions_equal_the_trained_source_and_batch_is_dynamic(sac_pendulum: Path, visited_obs: np.ndarray) -> None:
    ours = OrtPolicy(load_policy(ISAAC_FIXTURE).model.SerializeToString())
    sb3 = OrtPolicy(load_sb3(sac_pendulum).model.SerializeToString())
    original = OrtPolicy(ISAAC_FIXTURE)  # fixed batch 1: one row at a time
    batched = ours.act(visited_obs)
    assert batched.shape == (len(visited_obs), 1)
    assert float(np.abs(batched - sb3.act(visited_obs)).max()) <= TOL
    rows = np.concatenate([original.act(o[None]) for o in visited_obs[:64]])
    assert float(np.abs(batched[:64] - rows).max()) <= 1e-6
    for n in (1, 7, 130):
        assert ours.act(visited_obs[:n]).shape == (n, 1)


def test_halfcheetah_file_equals_its_trained_source(sac_halfcheetah: Path) -> None:
    runtime = OrtPolicy(load_sb3(sac_halfcheetah).model.SerializeToString())
    seen: list[np.ndarray] = []
    run_episodes(env_factory("HalfCheetah-v5"), runtime, [710, 711], num_envs=2, max_steps_per_episode=150,
                 on_step=lambda obs, act, active: seen.append(obs[active]))
    obs = np.concatenate(seen)
    fp = load_policy(CHEETAH_FIXTURE)
    assert fp.obs_space.shape == (17,) and fp.action_space.shape == (6,)
    ours = OrtPolicy(fp.model.SerializeToString()).act(obs)
    assert ours.shape == (300, 6)
    assert float(np.abs(ours - runtime.act(obs)).max()) <= TOL


def test_isaac_elu_mlp_with_normalizer_and_hardcoded_reshape(tmp_path: Path) -> None:
    """Isaac Lab's usual actor, ELU [512, 256, 128], with rsl_rl's normalizer and a view(1, -1)."""

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = [48, 512, 256, 128]
            mods: list[torch.nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:], strict=True):
                mods += [torch.nn.Linear(a, b), torch.nn.ELU()]
            self.actor = torch.nn.Sequential(*mods, torch.nn.Linear(128, 12))
            self.register_buffer("mean", torch.linspace(-1, 1, 48)[None])
            self.register_buffer("std", torch.linspace(0.1, 3, 48)[None])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = (x - self.mean) / (self.std + 1e-2)
            return self.actor(x.view(1, -1))

    torch.manual_seed(0)
    module = Exported()
    path = _export_fixed_batch(module, tmp_path / "policy.onnx", 48, ["obs"], ["actions"])
    fp = load_policy(path)
    report = fp.source.details["normalization"]
    assert len(report["reshapes_rewritten"]) == 1 and report["original_batch"] == 1
    assert len(find_weighted_layers(fp.model)) == 4
    obs = np.random.default_rng(1).standard_normal((16, 48)).astype(np.float32) * 2
    with torch.no_grad():
        expected = module.actor((torch.from_numpy(obs) - module.mean) / (module.std + 1e-2)).numpy()
    got = OrtPolicy(fp.model.SerializeToString()).act(obs)
    assert got.shape == (16, 12)
    assert float(np.abs(got - expected).max()) <= TOL


class _ActorCritic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pi = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.vf = torch.nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pi(x), self.vf(x)


def test_other_names_and_a_value_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _ActorCritic()
    path = _export_fixed_batch(module, tmp_path / "ac.onnx", 5, ["policy_obs"], ["mu", "value"])
    with pytest.raises(PolicyFormatError, match=r"2 outputs \['mu', 'value'\].*--onnx-output"):
        load_policy(path)
    fp = load_policy(path, output_name="mu")
    details = fp.source.details["normalization"]
    assert details["original_input"] == "policy_obs" and details["dropped_outputs"] == ["value"]
    assert [o.name for o in fp.model.graph.output] == ["actions"]
    assert len(find_weighted_layers(fp.model)) == 2  # the value head is pruned
    obs = np.random.default_rng(2).standard_normal((9, 5)).astype(np.float32)
    with torch.no_grad():
        expected = module.pi(torch.from_numpy(obs)).numpy()
    assert float(np.abs(OrtPolicy(fp.model.SerializeToString()).act(obs) - expected).max()) <= TOL


def test_a_node_that_drops_the_batch_axis_is_named(tmp_path: Path) -> None:
    class DropsBatch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.reshape(-1)).unsqueeze(0)

    path = _export_fixed_batch(DropsBatch(), tmp_path / "bad.onnx", 3, ["obs"], ["actions"])
    reshape = next(n.name for n in onnx.load(path).graph.node if n.op_type == "Reshape")
    with pytest.raises(PolicyFormatError, match=f"node '{reshape}' reshapes .*dropping the batch axis"):
        load_policy(path)


def test_recurrent_inputs_are_refused(tmp_path: Path) -> None:
    class WithState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + h

    path = _export_fixed_batch(WithState(), tmp_path / "rnn.onnx", 3, ["obs", "h_in"], ["actions"],
                               (torch.zeros(1, 2),))
    with pytest.raises(PolicyFormatError, match=r"2 inputs \['obs', 'h_in'\].*recurrent"):
        load_policy(path)


def test_external_data_is_embedded(tmp_path: Path, visited_obs: np.ndarray) -> None:
    model = onnx.load(ISAAC_FIXTURE)
    target = tmp_path / "ext" / "policy.onnx"
    target.parent.mkdir()
    onnx.save_model(model, target, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="policy.onnx.data", size_threshold=0)
    assert (target.parent / "policy.onnx.data").stat().st_size > 200_000
    fp = load_policy(target)
    assert fp.source.details["external_data"] == ["policy.onnx.data"]
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in fp.model.graph.initializer)
    reference = OrtPolicy(load_policy(ISAAC_FIXTURE).model.SerializeToString()).act(visited_obs)
    assert np.array_equal(OrtPolicy(fp.model.SerializeToString()).act(visited_obs), reference)

    (target.parent / "policy.onnx.data").unlink()
    with pytest.raises(PolicyFormatError, match="external data"):
        load_policy(target)


def test_bad_files_and_bounds(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf at all \xff\xfe")
    with pytest.raises(PolicyFormatError, match="junk.onnx: not a valid ONNX model"):
        load_policy(junk)
    with pytest.raises(PolicyFormatError, match="do not apply to a .onnx policy"):
        load_policy(ISAAC_FIXTURE, vecnormalize="x.pkl")
    fp = load_policy(ISAAC_FIXTURE, action_low=-2.0, action_high=[2.0])
    assert fp.action_space.low == (-2.0,) and fp.action_space.high == (2.0,)
    with pytest.raises(PolicyFormatError, match="action_low has 2 values; the policy has 1"):
        load_policy(ISAAC_FIXTURE, action_low=[-2.0, -2.0])


def test_cli_quantize_onnx_end_to_end(tmp_path: Path, visited_obs: np.ndarray) -> None:
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["quantize", str(ISAAC_FIXTURE), "--env", "Pendulum-v1", "--out", str(out),
                                   "--episodes", "5", "--calib-episodes", "4", "--json", *QUICK_PLAN])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    validation = json.loads((out / "validation.json").read_text())
    assert manifest["source"]["kind"] == "onnx"
    env = gym.make("Pendulum-v1")
    assert manifest["action_space"]["low"] == [float(v) for v in env.action_space.low]  # bounds from the env
    assert validation["closed_loop"] is True
    assert sum(layer["precision"] == "int8" for layer in manifest["quantization"]["layers"]) == 3
    cpu = validation["targets"]["cpu"]
    assert len(cpu["float"]["returns"]) == 5
    # Pendulum returns are negative: int8 within 5% of float, per the paired means
    assert abs(cpu["int8"]["mean"] - cpu["float"]["mean"]) <= 0.05 * abs(cpu["float"]["mean"])
    deployed = load_bundle(out, backend="cpu", allow_unsigned=True)
    actions = deployed.act(visited_obs[:10])
    assert actions.shape == (10, 1) and np.all(np.isfinite(actions))


def test_flatten_over_the_batch_axis_is_named(tmp_path: Path) -> None:
    """A hand-written graph: Flatten(axis=0) on [1, 4] only works while the batch is 1."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], name="flatten_all", axis=0),
         helper.make_node("MatMul", ["flat", "w"], ["y"], name="dense")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[w])
    path = tmp_path / "flatten.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(PolicyFormatError, match="node 'flatten_all' is Flatten\\(axis=0\\)"):
        load_policy(path)
