"""``edgeq.ingest.from_torch_module``: a policy module from Python, exported and normalized."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import QUICK_OVERRIDES

from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import PolicyFormatError
from edgeq.graph.analysis import find_weighted_layers
from edgeq.ingest import from_torch_module
from edgeq.ingest.sb3 import load_sb3
from edgeq.ingest.sb3_archive import read_archive
from edgeq.pipeline import quantize

TOL = 1e-5


class SacActor(torch.nn.Module):
    """SB3 SAC's deterministic action: latent_pi MLP → mu → tanh → rescale to the bounds."""

    def __init__(self, state_dict: dict[str, np.ndarray], low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        w = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state_dict.items()}
        self.latent = torch.nn.Sequential(torch.nn.Linear(3, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                          torch.nn.ReLU())
        self.mu = torch.nn.Linear(256, 1)
        with torch.no_grad():
            for i in (0, 2):
                self.latent[i].weight.copy_(w[f"actor.latent_pi.{i}.weight"])
                self.latent[i].bias.copy_(w[f"actor.latent_pi.{i}.bias"])
            self.mu.weight.copy_(w["actor.mu.weight"])
            self.mu.bias.copy_(w["actor.mu.bias"])
        self.register_buffer("half_range", torch.as_tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("center", torch.as_tensor((high + low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mu(self.latent(obs))) * self.half_range + self.center


@pytest.fixture(scope="module")
def env() -> gym.Env:
    return gym.make("Pendulum-v1")


@pytest.fixture(scope="module")
def actor(sac_pendulum: Path, env: gym.Env) -> SacActor:
    sd = read_archive(sac_pendulum).state_dict
    return SacActor(sd, env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)).eval()


def _obs(env: gym.Env, n: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(env.observation_space.low, env.observation_space.high, size=(n, 3)).astype(np.float32)


def test_module_from_trained_weights_matches_torch(actor: SacActor, env: gym.Env, sac_pendulum: Path) -> None:
    fp = from_torch_module(actor, env.observation_space, env.action_space)
    assert fp.source.kind == "torch-module" and fp.source.details["exporter"] == "torchscript"
    assert fp.obs_space.shape == (3,) and fp.action_space.high == (2.0,)
    assert [(la.in_features, la.out_features) for la in find_weighted_layers(fp.model)] == [(3, 256), (256, 256),
                                                                                           (256, 1)]
    obs = _obs(env)
    ours = OrtPolicy(fp.model.SerializeToString()).act(obs)
    with torch.no_grad():
        theirs = actor(torch.from_numpy(obs)).numpy()
    assert float(np.abs(ours - theirs).max()) <= TOL
    sb3 = OrtPolicy(load_sb3(sac_pendulum).model.SerializeToString()).act(obs)
    assert float(np.abs(ours - sb3).max()) <= TOL  # the rebuilt module is the trained policy
    for n in (1, 5):
        assert OrtPolicy(fp.model.SerializeToString()).act(obs[:n]).shape == (n, 1)


def test_export_is_deterministic_and_keeps_the_mode(actor: SacActor, env: gym.Env) -> None:
    actor.train()
    a = from_torch_module(actor, env.observation_space, env.action_space)
    assert actor.training  # restored after the export
    actor.eval()
    b = from_torch_module(actor, env.observation_space, env.action_space)
    assert a.source.sha256 == b.source.sha256
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)


def test_spaces_from_dimensions_and_errors(actor: SacActor) -> None:
    fp = from_torch_module(actor, 3)
    assert fp.obs_space.shape == (3,) and fp.action_space.shape == (1,)
    assert not fp.action_space.bounded

    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(PolicyFormatError, match="returns tuple; expected one action tensor"):
        from_torch_module(TwoHeads(), 3)
    with pytest.raises(PolicyFormatError, match="obs_space is a str"):
        from_torch_module(actor, "three")
    with pytest.raises(PolicyFormatError, match="action space has 2 values; the graph produces 1"):
        from_torch_module(actor, 3, 2)


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                    reason="the dynamo exporter needs the optional onnxscript package, not installed here")
def test_dynamo_exporter(actor: SacActor, env: gym.Env) -> None:
    a = from_torch_module(actor, env.observation_space, env.action_space, exporter="dynamo")
    b = from_torch_module(actor, env.observation_space, env.action_space, exporter="dynamo")
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
    obs = _obs(env)
    with torch.no_grad():
        theirs = actor(torch.from_numpy(obs)).numpy()
    assert float(np.abs(OrtPolicy(a.model.SerializeToString()).act(obs) - theirs).max()) <= TOL


def test_quantize_accepts_the_module_policy(actor: SacActor, env: gym.Env, tmp_path: Path) -> None:
    fp = from_torch_module(actor, env.observation_space, env.action_space, name="sac-pendulum actor")
    result = quantize(fp, "Pendulum-v1", tmp_path / "b", episodes=4, calib_episodes=4, overrides=QUICK_OVERRIDES)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "torch-module" and manifest["source"]["path"] == "sac-pendulum actor"
    cpu = result.validation["targets"]["cpu"]
    assert result.validation["closed_loop"] is True and len(cpu["int8"]["returns"]) == 4
    assert abs(cpu["int8"]["mean"] - cpu["float"]["mean"]) <= 0.05 * abs(cpu["float"]["mean"])
