"""Export a trained RecurrentPPO actor as a legged_gym / rsl_rl style TorchScript ``policy.pt``.

Real legged-robot policies (Unitree's G1/H1 releases, legged_gym, rsl_rl) ship as TorchScript files
written by rsl_rl's ``PolicyExporterLSTM``: a module with the actor's ``nn.LSTM`` as ``memory``,
its MLP as ``actor``, and the LSTM state in ``hidden_state``/``cell_state`` buffers
``[num_layers, 1, hidden]`` that ``forward`` updates in place; ``reset_memory()`` zeroes them.
This script builds that same module around the weights of an sb3-contrib RecurrentPPO actor
(``lstm_actor`` → ``mlp_extractor.policy_net`` → ``action_net``, the same computation as rsl_rl's
``memory_a`` → ``actor``), scripts it with ``torch.jit.script`` and saves it, so edgeq's TorchScript
ingest is tested on a trained policy in exactly the exported form.

The archive is read with edgeq's non-unpickling reader. Beside ``NAME.pt`` a ``NAME.json`` records
the source archive's SHA-256, the command, and the deterministic return of the TorchScript module
itself over 10 episodes (seeds 10000..10009), stepping it one observation at a time with
``reset_memory()`` at each episode start, as a robot's control loop does.

Usage::

    python scripts/make_torchscript_fixture.py tests/fixtures/policies/recurrentppo-invertedpendulum.zip \\
        --env InvertedPendulum-v5 --out tests/fixtures/policies/torchscript-lstm-invertedpendulum.pt
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeq.ingest.sb3 import policy_activation
from edgeq.ingest.sb3_archive import read_archive


class PolicyExporterLSTM(nn.Module):
    """The module rsl_rl / legged_gym write with ``export_policy_as_jit`` for recurrent actors."""

    def __init__(self, actor_critic: Any) -> None:
        super().__init__()
        self.actor = actor_critic.actor
        self.is_recurrent = actor_critic.is_recurrent
        self.memory = actor_critic.memory_a.rnn
        self.memory.cpu()
        self.register_buffer("hidden_state", torch.zeros(self.memory.num_layers, 1, self.memory.hidden_size))
        self.register_buffer("cell_state", torch.zeros(self.memory.num_layers, 1, self.memory.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.memory(x.unsqueeze(0), (self.hidden_state, self.cell_state))
        self.hidden_state[:] = h
        self.cell_state[:] = c
        return self.actor(out.squeeze(0))

    @torch.jit.export
    def reset_memory(self) -> None:
        self.hidden_state[:] = 0.0
        self.cell_state[:] = 0.0


_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


def actor_critic_from_archive(path: Path) -> SimpleNamespace:
    """An rsl_rl-like ``actor_critic`` (``actor``, ``memory_a.rnn``) holding the archive's actor weights."""
    archive = read_archive(path)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in archive.state_dict.items()}
    kw = archive.policy_kwargs()
    act = _ACT[policy_activation(kw, "PPO", archive.path)]
    n_layers = int(kw.get("n_lstm_layers", 1))
    hidden = int(sd["lstm_actor.weight_hh_l0"].shape[1])
    rnn = nn.LSTM(int(sd["lstm_actor.weight_ih_l0"].shape[1]), hidden, n_layers)
    rnn.load_state_dict({k.removeprefix("lstm_actor."): v for k, v in sd.items() if k.startswith("lstm_actor.")})
    layers: list[nn.Module] = []
    i = 0
    while f"mlp_extractor.policy_net.{i}.weight" in sd or f"mlp_extractor.policy_net.{i + 1}.weight" in sd:
        if f"mlp_extractor.policy_net.{i}.weight" in sd:
            w, b = sd[f"mlp_extractor.policy_net.{i}.weight"], sd[f"mlp_extractor.policy_net.{i}.bias"]
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": b})
            layers += [lin, act()]
        i += 1
    head = nn.Linear(sd["action_net.weight"].shape[1], sd["action_net.weight"].shape[0])
    head.load_state_dict({"weight": sd["action_net.weight"], "bias": sd["action_net.bias"]})
    actor = nn.Sequential(*layers, head)
    return SimpleNamespace(actor=actor, memory_a=SimpleNamespace(rnn=rnn), is_recurrent=True,
                           sha256=archive.sha256, source=str(path))


def evaluate_module(module: Any, env_id: str, episodes: int = 10, seed: int = 10_000) -> list[float]:
    """Deterministic returns of the TorchScript module, one observation per call."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    with torch.no_grad():
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            module.reset_memory()
            total, done = 0.0, False
            while not done:
                action = module(torch.as_tensor(obs, dtype=torch.float32)[None]).numpy()[0]
                obs, r, term, trunc, _ = env.step(action)
                total += float(r)
                done = term or trunc
            returns.append(total)
    env.close()
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="RecurrentPPO .zip (MlpLstmPolicy)")
    parser.add_argument("--env", required=True, help="gymnasium id to evaluate the exported module in")
    parser.add_argument("--out", type=Path, required=True, help="TorchScript file to write (policy.pt)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ac = actor_critic_from_archive(args.archive)
    exporter = PolicyExporterLSTM(ac)
    exporter.to("cpu")
    scripted = torch.jit.script(exporter)
    tmp = args.out.with_suffix(".tmp")
    scripted.save(str(tmp))
    tmp.replace(args.out)
    loaded = torch.jit.load(str(args.out))
    returns = evaluate_module(loaded, args.env)
    record = {"fixture": args.out.name, "format": "TorchScript, rsl_rl/legged_gym PolicyExporterLSTM layout",
              "source_archive": {"path": ac.source, "sha256": ac.sha256}, "env_id": args.env,
              "lstm": {"hidden_size": ac.memory_a.rnn.hidden_size, "num_layers": ac.memory_a.rnn.num_layers},
              "actor": str(ac.actor),
              "eval": {"episodes": len(returns), "seeds": "10000..10009", "deterministic": True,
                       "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
                       "returns": [round(r, 3) for r in returns]},
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "torch": torch.__version__}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["eval"]))


if __name__ == "__main__":
    main()
