"""TorchScript policies (legged_gym / rsl_rl / Isaac Lab exports) → ONNX with explicit state, step-checked."""

from __future__ import annotations

import copy
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from edgeq.errors import PolicyFormatError
from edgeq.ingest import load_policy
from edgeq.ingest.torchscript import load_torchscript, verify_against_torchscript

# torch >= 2.9 marks torch.jit deprecated; the files robots run are still TorchScript
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")

POLICIES = Path(__file__).parent / "fixtures" / "policies"
TS_FIXTURE = POLICIES / "torchscript-lstm-invertedpendulum.pt"


def _fixture() -> Path:
    if not TS_FIXTURE.exists():
        raise FileNotFoundError(f"{TS_FIXTURE} is missing: make it with scripts/make_torchscript_fixture.py")
    return TS_FIXTURE


# --- modules in the exporters' layouts (weights random; the check is the translation) -------------
class _LSTMExporter(torch.nn.Module):
    """rsl_rl's PolicyExporterLSTM layout, with Isaac Lab's optional normalizer in front."""

    def __init__(self, actor: torch.nn.Module, rnn: torch.nn.LSTM, normalizer: torch.nn.Module | None = None):
        super().__init__()
        self.actor, self.memory = copy.deepcopy(actor), copy.deepcopy(rnn)
        self.normalizer = normalizer if normalizer is not None else torch.nn.Identity()
        self.register_buffer("hidden_state", torch.zeros(rnn.num_layers, 1, rnn.hidden_size))
        self.register_buffer("cell_state", torch.zeros(rnn.num_layers, 1, rnn.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.memory(self.normalizer(x).unsqueeze(0), (self.hidden_state, self.cell_state))
        self.hidden_state[:] = h
        self.cell_state[:] = c
        return self.actor(out.squeeze(0))

    @torch.jit.export
    def reset_memory(self) -> None:
        self.hidden_state[:] = 0.0
        self.cell_state[:] = 0.0


class _GRUExporter(torch.nn.Module):
    """Isaac Lab's GRU export: ``rnn`` with only a ``hidden_state`` buffer and ``reset()``."""

    def __init__(self, actor: torch.nn.Module, rnn: torch.nn.GRU):
        super().__init__()
        self.actor, self.rnn = copy.deepcopy(actor), copy.deepcopy(rnn)
        self.register_buffer("hidden_state", torch.zeros(rnn.num_layers, 1, rnn.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.rnn(x.unsqueeze(0), self.hidden_state)
        self.hidden_state[:] = h
        return self.actor(out.squeeze(0))

    @torch.jit.export
    def reset(self) -> None:
        self.hidden_state[:] = 0.0


class _EmpiricalNormalization(torch.nn.Module):
    """rsl_rl's normalizer in eval mode: ``(x - mean) / (std + eps)``."""

    def __init__(self, n: int):
        super().__init__()
        self.eps = 1e-2
        self.register_buffer("_mean", torch.randn(1, n))
        self.register_buffer("_var", torch.rand(1, n) + 0.5)
        self.register_buffer("_std", torch.sqrt(self._var))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / (self._std + self.eps)


class _Scaled(torch.nn.Module):
    """Does something the layout does not show (scales the input): must fail the step check."""

    def __init__(self, actor: torch.nn.Module, rnn: torch.nn.LSTM):
        super().__init__()
        self.actor, self.memory = copy.deepcopy(actor), copy.deepcopy(rnn)
        self.register_buffer("hidden_state", torch.zeros(rnn.num_layers, 1, rnn.hidden_size))
        self.register_buffer("cell_state", torch.zeros(rnn.num_layers, 1, rnn.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.memory(2.0 * x.unsqueeze(0), (self.hidden_state, self.cell_state))
        self.hidden_state[:] = h
        self.cell_state[:] = c
        return self.actor(out.squeeze(0))


class MLP(torch.nn.Sequential):
    """rsl_rl >= 3 builds actors as an ``nn.Sequential`` subclass named MLP."""


def _actor(n_in: int, n_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, 32), torch.nn.ELU(), torch.nn.Linear(32, 32),
                               torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, n_out))


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


@pytest.mark.parametrize("layout", ["lstm", "lstm2-normalizer", "gru", "feedforward", "gru-mlp-subclass"])
def test_exporter_layouts_translate_within_1e5_over_1000_steps(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    obs, act = 11, 4
    module = {
        "lstm": lambda: _LSTMExporter(_actor(24, act), torch.nn.LSTM(obs, 24)),
        "lstm2-normalizer": lambda: _LSTMExporter(_actor(24, act), torch.nn.LSTM(obs, 24, 2),
                                                  _EmpiricalNormalization(obs)),
        "gru": lambda: _GRUExporter(_actor(24, act), torch.nn.GRU(obs, 24)),
        "feedforward": lambda: _actor(obs, act),
        "gru-mlp-subclass": lambda: _GRUExporter(MLP(*_actor(24, act)), torch.nn.GRU(obs, 24)),
    }[layout]()
    policy = load_policy(_save(module, tmp_path / "policy.pt"))
    report = policy.source.details["verification"]
    assert report["steps"] == 1000 and report["max_abs_action_diff"] <= 1e-5
    assert policy.obs_space.shape == (obs,) and policy.action_space.shape == (act,)
    assert policy.source.kind == "torchscript"
    expected_state = {"lstm": ["h_in", "c_in"], "lstm2-normalizer": ["h_in", "c_in"], "gru": ["h_in"],
                      "feedforward": [], "gru-mlp-subclass": ["h_in"]}[layout]
    assert [s.input_name for s in policy.state] == expected_state
    if layout == "lstm2-normalizer":
        assert policy.state[0].shape == (2, 24) and "normalize" in policy.preprocess


def test_unrecognized_computation_fails_the_step_check(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _save(_Scaled(_actor(16, 2), torch.nn.LSTM(6, 16)), tmp_path / "policy.pt")
    with pytest.raises(PolicyFormatError, match="differs from the TorchScript module"):
        load_policy(path)


def test_torch_save_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # would run if anything unpickled the file
            return (Path(tmp_path / "pwned").touch, ())

    path = tmp_path / "model_1000.pt"
    torch.save({"model_state_dict": {}, "boom": Boom()}, path)
    with pytest.raises(PolicyFormatError, match="torch.save checkpoint"):
        load_policy(path)
    assert not (tmp_path / "pwned").exists()
    not_zip = tmp_path / "policy.jit"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(PolicyFormatError, match="not a TorchScript archive"):
        load_policy(not_zip)


def test_trained_lstm_fixture_matches_torchscript_on_its_own_episodes() -> None:
    """The trained legged_gym-style policy: 1000 random steps at load, then 2 real episodes (2000 steps)."""
    path = _fixture()
    policy = load_torchscript(path)
    assert policy.source.details["verification"]["max_abs_action_diff"] <= 1e-5
    assert policy.source.details["recurrent"]["hidden_size"] == 64
    assert len(policy.gate_nodes) == 2 and policy.gate_nodes == tuple(policy.source.details["recurrent"]["gate_nodes"])
    module = torch.jit.load(str(path))
    env = gym.make("InvertedPendulum-v5")
    observations, starts = [], []
    with torch.no_grad():
        for ep in range(2):
            obs, _ = env.reset(seed=500 + ep)
            module.reset_memory()
            starts.append(len(observations))
            done = False
            while not done:
                observations.append(obs.astype(np.float32))
                action = module(torch.as_tensor(obs, dtype=torch.float32)[None]).numpy()[0]
                obs, _, term, trunc, _ = env.step(action)
                done = term or trunc
    assert len(observations) == 2000  # the policy balances for the full 1000 steps
    report = verify_against_torchscript(module, policy, observations=np.stack(observations),
                                        reset_at=tuple(starts))
    assert report["max_abs_action_diff"] <= 1e-5 and report["max_abs_state_diff"] <= 1e-5
