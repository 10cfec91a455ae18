"""Make an Isaac-Lab-style ``policy.onnx`` from a trained SB3 fixture (tests/fixtures/onnx/).

Isaac Lab's rsl_rl exporter (``export_policy_as_onnx`` → ``_OnnxPolicyExporter``) wraps the actor
``nn.Sequential`` and the empirical observation normalizer in one module whose forward is
``actor(normalizer(obs))``, and exports it with the TorchScript exporter at ``opset_version=11``,
a fixed batch of 1 (``torch.zeros(1, actor[0].in_features)``, ``dynamic_axes={}``), input name
``obs`` and output name ``actions``. This script does the same with a real trained policy:

* the actor is the SB3 SAC actor's deterministic path, rebuilt from the archive's weights
  (Linear/activation layers, ``mu``, tanh, and the rescale to the action bounds, so that the file
  acts in the env's own units);
* the normalizer is an rsl_rl-style ``(x - mean) / (std + eps)`` with ``eps = 1e-2`` and mean/std
  measured on the policy's own rollouts; to keep the policy's function unchanged, the first Linear
  is compensated (``W' = W * (std + eps)``, ``b' = b + W @ mean``) in float64.

The script checks the exported file against edgeq's SB3 ingest of the same archive (which
the SB3 ingest tests check against SB3's own ``predict``) and prints the largest difference.

Usage::

    python scripts/make_onnx_fixture.py sac-pendulum --env Pendulum-v1
    python scripts/make_onnx_fixture.py sac-halfcheetah --env HalfCheetah-v5
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.graph.layers import Activation, Linear, RescaleFromUnit, Tanh
from edgeq.ingest.sb3 import actor_layers, detect_algorithm, load_sb3
from edgeq.ingest.sb3_archive import read_archive
from edgeq.rollout import run_episodes

ROOT = Path(__file__).resolve().parent.parent
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}


class EmpiricalNormalizer(torch.nn.Module):
    """rsl_rl's eval-mode observation normalizer: ``(x - mean) / (std + eps)``."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("_mean", torch.as_tensor(mean, dtype=torch.float32)[None])
        self.register_buffer("_std", torch.as_tensor(std, dtype=torch.float32)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / (self._std + self.eps)


class ActionRescale(torch.nn.Module):
    """[-1, 1] → [low, high], as SB3's ``unscale_action``."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        low64, high64 = np.asarray(low, np.float64), np.asarray(high, np.float64)
        self.register_buffer("half_range", torch.as_tensor(0.5 * (high64 - low64), dtype=torch.float32))
        self.register_buffer("center", torch.as_tensor(low64 + 0.5 * (high64 - low64), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.half_range + self.center


class OnnxPolicyExporter(torch.nn.Module):
    """The shape of Isaac Lab's ``_OnnxPolicyExporter`` for a feed-forward policy."""

    def __init__(self, actor: torch.nn.Sequential, normalizer: torch.nn.Module) -> None:
        super().__init__()
        self.actor = actor
        self.normalizer = normalizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actor(self.normalizer(x))

    def export(self, path: Path) -> None:
        obs = torch.zeros(1, self.actor[0].in_features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(self, obs, str(path), export_params=True, opset_version=11, verbose=False,
                              input_names=["obs"], output_names=["actions"], dynamic_axes={}, dynamo=False)


def actor_from_archive(path: Path, mean: np.ndarray, std: np.ndarray, eps: float) -> torch.nn.Sequential:
    """The SB3 actor's deterministic path as ``nn.Sequential``, its first layer compensating the normalizer."""
    archive = read_archive(path)
    layers, _ = actor_layers(archive, detect_algorithm(archive))
    modules: list[torch.nn.Module] = []
    first = True
    for layer in layers:
        if isinstance(layer, Linear):
            w = layer.weight.astype(np.float64)
            b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.astype(np.float64)
            if first:
                b = b + w @ mean.astype(np.float64)
                w = w * (std.astype(np.float64) + eps)[None, :]
                first = False
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
                lin.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
            modules.append(lin)
        elif isinstance(layer, Activation):
            modules.append(ACTIVATIONS[layer.kind]())
        elif isinstance(layer, Tanh):
            modules.append(torch.nn.Tanh())
        elif isinstance(layer, RescaleFromUnit):
            modules.append(ActionRescale(layer.low, layer.high))
        else:
            raise SystemExit(f"layer {layer!r} is not handled by this script")
    return torch.nn.Sequential(*modules).eval()


def rollout_observations(policy_path: Path, env_id: str, episodes: int, seed: int) -> np.ndarray:
    fp = load_sb3(policy_path)
    runtime = OrtPolicy(fp.model.SerializeToString())
    seen: list[np.ndarray] = []
    run_episodes(env_factory(env_id), runtime, list(range(seed, seed + episodes)), num_envs=4,
                 on_step=lambda obs, act, active: seen.append(obs[active]))
    return np.concatenate(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", help="name of tests/fixtures/policies/NAME.zip")
    parser.add_argument("--env", required=True, help="gymnasium id the policy was trained on")
    parser.add_argument("--out", type=Path, default=None, help="default: tests/fixtures/onnx/NAME-isaac.onnx")
    parser.add_argument("--episodes", type=int, default=5, help="rollouts for the normalizer statistics")
    parser.add_argument("--seed", type=int, default=500)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    src = ROOT / "tests" / "fixtures" / "policies" / f"{args.fixture}.zip"
    out = args.out or ROOT / "tests" / "fixtures" / "onnx" / f"{args.fixture}-isaac.onnx"
    obs = rollout_observations(src, args.env, args.episodes, args.seed)
    mean, std, eps = obs.mean(axis=0), obs.std(axis=0), 1e-2
    exporter = OnnxPolicyExporter(actor_from_archive(src, mean, std, eps), EmpiricalNormalizer(mean, std, eps)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    exporter.export(tmp)
    tmp.replace(out)

    reference = OrtPolicy(load_sb3(src).model.SerializeToString())
    exported = OrtPolicy(out)
    diff = max(float(np.abs(exported.act(o[None]) - reference.act(o[None])).max()) for o in obs[::7])
    print(f"wrote {out} ({out.stat().st_size} bytes) from {src.name}; normalizer stats from {len(obs)} "
          f"observations; max |a_onnx - a_sb3| over {len(obs[::7])} visited states: {diff:.2e}")


if __name__ == "__main__":
    main()
