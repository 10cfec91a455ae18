"""Behaviour-cloned history policies (tests/fixtures/policies/): frame-stack MLP, causal Transformer,
Conv1d encoder + MLP body.

Each student reads the last ``K`` observations (oldest first; zeros before the episode start: the
convention of :mod:`edgeq.deploy.history`, which these rollouts use) and is trained by behaviour
cloning from an expert fixture, then DAgger: the student rolls out, the expert labels the states
the student visited, the student is retrained on everything gathered so far. The result is
exported with ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch) and checked:
the ONNX file must match the torch module, and its return is measured through edgeq's own
runtime (ONNX Runtime + :class:`~edgeq.deploy.history.ObservationHistory`) on evaluation seeds
10000.. that neither training nor edgeq's calibration uses. Each fixture gets a JSON record beside
it (command, seed, data sizes, float return mean ± std over the episodes).

Fixtures (expert ``sac-pendulum.zip``, Pendulum-v1, K = 8; ``--task halfcheetah``: expert
``sac-halfcheetah.zip``, HalfCheetah-v5, the same architectures on 17 observations and 6 actions, with
a fixed observation normalization from the expert's states, files ``*-halfcheetah.*``):

* ``framestack-mlp-pendulum.onnx``: input ``obs_history`` [batch, K, 3] flattened inside, MLP 24-64-64-1
  (ELU), tanh action scaled to [-2, 2];
* ``transformer-pendulum.onnx``: per-step embedding + learned positions, 2 pre-LN blocks of 2-head
  causal self-attention (MatMul Q·Kᵀ, additive causal mask, Softmax, MatMul attention·V) and a GELU
  MLP, final LayerNorm, the last step's token → action;
* ``encoder-pendulum.onnx`` (``obs_history`` [batch, K, 3] → two Conv1d over time (kernel 3) with ELU →
  Linear → ``latent`` [batch, 8]) and ``body-pendulum.onnx`` (``obs`` [batch, 3] and ``latent`` → Concat →
  SiLU MLP → action): an RMA-style two-module policy.

Usage (1 torch thread, a few minutes of CPU each)::

    python scripts/make_history_fixtures.py framestack transformer encoder-body

TorchScript twins (``--torchscript``, no training): the same students rebuilt from the committed ONNX
files' weights (``from_onnx``; the module must reproduce the ONNX file to 1e-5), then saved as
TorchScript as legged_gym/Unitree export policies: the frame stack and the encoder + body with
``torch.jit.script``, the Transformer with ``torch.jit.trace``. Files
``torchscript-{framestack-mlp,transformer,encoder,body}-<task>.pt``; the record
``torchscript-<fixture>-<task>.json`` holds the source ONNX hashes, the largest TorchScript-vs-ONNX
difference and the float return of the TorchScript module itself (same evaluation seeds)::

    python scripts/make_history_fixtures.py --torchscript framestack transformer encoder-body
    python scripts/make_history_fixtures.py --torchscript --task halfcheetah framestack transformer encoder-body
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeq.deploy.history import HistoryBuffer, ObservationHistory
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.ingest.sb3 import load_sb3
from edgeq.rollout import run_episodes

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "policies"
ENV_ID = "Pendulum-v1"
EXPERT = OUT / "sac-pendulum.zip"
SUFFIX = "pendulum"
K = 8
OBS_DIM = 3
ACT_DIM = 1
ACT_HIGH = 2.0
OBS_SCALE: tuple[float, ...] = (1.0, 1.0, 1.0 / 8.0)  # Pendulum: cos, sin in [-1, 1], angular velocity in [-8, 8]
OBS_SHIFT: tuple[float, ...] = (0.0, 0.0, 0.0)
EVAL_SEEDS = list(range(10000, 10020))
#: What fills the window at an episode start (edgeq.deploy.history): "zeros", or "first-observation"
#: (--history-reset; those fixtures are named ``*-firstobs-<task>``).
RESET = "zeros"
TRAIN_SEED0 = 20000
#: Episodes: (expert with noise, per DAgger round); HalfCheetah episodes are 1000 steps, Pendulum's 200.
EPISODES = (30, 20)

TASKS: dict[str, dict[str, Any]] = {
    "pendulum": {},
    # obs scale/shift: the expert's own rollouts' mean and std (set in main), fixed in the graph
    "halfcheetah": {"ENV_ID": "HalfCheetah-v5", "EXPERT": OUT / "sac-halfcheetah.zip", "SUFFIX": "halfcheetah",
                    "OBS_DIM": 17, "ACT_DIM": 6, "ACT_HIGH": 1.0, "EVAL_SEEDS": list(range(10000, 10010)),
                    "EPISODES": (10, 5)},
}


# -- students ---------------------------------------------------------------------------------------
class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(OBS_SCALE, dtype=torch.float32))
        self.register_buffer("shift", torch.tensor(OBS_SHIFT, dtype=torch.float32))
        self.shifted = bool(any(OBS_SHIFT))  # Pendulum: a scale only (the graph then has no Add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift if self.shifted else x * self.scale


class FrameStackMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.act_high = float(ACT_HIGH)  # an attribute, not a global: TorchScript can script it
        self.scale = Scale()
        self.net = nn.Sequential(nn.Linear(K * OBS_DIM, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, ACT_DIM))

    def forward(self, obs_history: torch.Tensor) -> torch.Tensor:  # [B, K, obs_dim]
        x = self.scale(obs_history).flatten(1)
        return torch.tanh(self.net(x)) * self.act_high


class CausalSelfAttention(nn.Module):
    """Multi-head attention written with MatMuls (no fused kernel), so the ONNX shows Q·Kᵀ and A·V."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        mask = torch.triu(torch.full((K, K), -1e4), diagonal=1)  # additive: future steps get -1e4
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, self.dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dh)) + self.mask
        att = torch.softmax(scores, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerPolicy(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.act_high = float(ACT_HIGH)  # an attribute, not a global: TorchScript can script it
        self.scale = Scale()
        self.embed = nn.Linear(OBS_DIM, dim)
        self.pos = nn.Parameter(torch.zeros(K, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, ACT_DIM)

    def forward(self, obs_history: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.scale(obs_history)) + self.pos
        x = self.ln(self.blocks(x))
        return torch.tanh(self.head(x[:, -1])) * self.act_high


class ConvEncoder(nn.Module):
    def __init__(self, channels: int = 16, latent: int = 8) -> None:
        super().__init__()
        self.scale = Scale()
        self.conv = nn.Sequential(nn.Conv1d(OBS_DIM, channels, 3), nn.ELU(), nn.Conv1d(channels, channels, 3), nn.ELU())
        self.out = nn.Linear(channels * (K - 4), latent)

    def forward(self, obs_history: torch.Tensor) -> torch.Tensor:
        x = self.scale(obs_history).transpose(1, 2)  # [B, obs_dim, K]: channels = features, length = time
        return self.out(self.conv(x).flatten(1))


class Body(nn.Module):
    def __init__(self, latent: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.act_high = float(ACT_HIGH)  # an attribute, not a global: TorchScript can script it
        self.scale = Scale()
        self.net = nn.Sequential(nn.Linear(OBS_DIM + latent, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, ACT_DIM))

    def forward(self, obs: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([self.scale(obs), latent], dim=1))) * self.act_high


class EncoderBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.body = ConvEncoder(), Body()

    def forward(self, obs_history: torch.Tensor) -> torch.Tensor:
        return self.body(obs_history[:, -1], self.encoder(obs_history))


STUDENTS: dict[str, Callable[[], nn.Module]] = {
    "framestack": FrameStackMLP, "transformer": TransformerPolicy, "encoder-body": EncoderBody}
FILES = {"framestack": "framestack-mlp", "transformer": "transformer", "encoder-body": "encoder-body"}


# -- data -------------------------------------------------------------------------------------------
class TorchHistoryPolicy:
    """A torch student behind act/reset with edgeq's history convention; records windows."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.history = module, HistoryBuffer(K, OBS_DIM, RESET)
        self.last = np.zeros((0, K * OBS_DIM), np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.last = self.history.push(obs)
        with torch.no_grad():
            return self.module(torch.from_numpy(self.last).reshape(-1, K, OBS_DIM)).numpy()

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.history.reset(mask)


class ExpertHistoryPolicy:
    """The expert acts on the current observation; its windows are recorded for the student."""

    def __init__(self, expert: OrtPolicy) -> None:
        self.expert, self.history = expert, HistoryBuffer(K, OBS_DIM, RESET)
        self.last = np.zeros((0, K * OBS_DIM), np.float32)

    def act(self, obs: np.ndarray) -> np.ndarray:
        self.last = self.history.push(obs)
        return self.expert.act(obs)

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.history.reset(mask)


def gather(policy: Any, expert: OrtPolicy, seeds: list[int], noise: float, noise_seed: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roll ``policy`` out; return the windows it fed, the expert's labels there, and the returns."""
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []

    def hook(obs: np.ndarray, actions: np.ndarray, active: np.ndarray) -> None:
        rows = np.asarray(active, bool)
        windows.append(policy.last[rows])
        labels.append(expert.act(obs[rows]))

    def perturb(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(a + rng.normal(0.0, noise * ACT_HIGH, a.shape), -ACT_HIGH, ACT_HIGH).astype(np.float32)

    res = run_episodes(env_factory(ENV_ID), policy, seeds, num_envs=10, on_step=hook,
                       perturb=perturb if noise > 0 else None, noise_seed=noise_seed)
    return np.concatenate(windows), np.concatenate(labels), res.returns


def fit(module: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, seed: int, lr: float = 2e-3) -> float:
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).reshape(-1, K, OBS_DIM)
    yt = torch.from_numpy(y).reshape(-1, ACT_DIM) / ACT_HIGH
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    module.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (256,), generator=gen)
        pred = module(xt[idx]) / ACT_HIGH
        loss = torch.mean((pred - yt[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    module.eval()
    return float(loss.item())


# -- export -----------------------------------------------------------------------------------------
class _Export(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(*args)


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], output: str) -> None:
    torch.onnx.export(_Export(module), args, str(path), input_names=inputs, output_names=[output],
                      dynamic_axes={n: {0: "batch"} for n in [*inputs, output]}, opset_version=17,
                      dynamo=False, do_constant_folding=True)


class _Reshape:
    """The exported file reads [batch, K, obs_dim]; the history buffer gives [batch, K * obs_dim]."""

    def __init__(self, path: Path) -> None:
        self.ort = OrtPolicy(path, input_name="obs_history")

    def act(self, window: np.ndarray) -> np.ndarray:
        return self.ort.act(window.reshape(-1, K, OBS_DIM))

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.ort.reset(mask)


def onnx_runtime(path: Path) -> ObservationHistory:
    return ObservationHistory(_Reshape(path), K, OBS_DIM, reset=RESET)


# -- TorchScript twins of the committed ONNX fixtures (no retraining) -----------------------------
def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The torch parameters of an ONNX fixture exported from ``_Export(student)``.

    Named initializers keep their torch names (``inner.net.0.weight``); weights the exporter folded
    into ``MatMul`` operands (``onnx::MatMul_231``, transposed) get their name from the node's scope
    (``/inner/blocks/blocks.0/attn/q/MatMul`` → ``blocks.0.attn.q.weight``).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sd = {k[len("inner."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("inner.")}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or not node.input[1].startswith("onnx::"):
            continue
        parts = node.name.strip("/").split("/")[1:-1]  # drop "inner" and "MatMul"
        parts = [q for i, q in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(q + "."))]
        sd[".".join(parts) + ".weight"] = torch.from_numpy(inits[node.input[1]].T.copy())
    return sd


def from_onnx(module: nn.Module, path: Path) -> nn.Module:
    """``module`` with the weights of the ONNX file at ``path`` (every parameter must be there)."""
    sd = onnx_state_dict(path)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    # the exporter keeps one copy of the (constant) mask, and drops an unused zero shift
    missing = [m for m in missing
               if not m.endswith("attn.mask") and not (m.endswith("scale.shift") and not any(OBS_SHIFT))]
    if missing or unexpected:
        raise SystemExit(f"{path}: cannot rebuild the torch module: missing {missing}, unexpected {unexpected}")
    return module.eval()


def _set_scale(path: Path) -> None:
    sd = onnx_state_dict(path)
    scale = sd["scale.scale"].numpy()
    shift = sd["scale.shift"].numpy() if "scale.shift" in sd else np.zeros_like(scale)
    globals().update(OBS_SCALE=tuple(scale.tolist()), OBS_SHIFT=tuple(shift.tolist()))


class _TorchScriptRuntime:
    """A TorchScript student (or encoder → body pair) behind act/reset, window kept by HistoryBuffer."""

    def __init__(self, *modules: Any) -> None:
        self.modules, self.history = modules, HistoryBuffer(K, OBS_DIM, RESET)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        enc, body = self.modules
        return body(x[:, -1], enc(x))

    def act(self, obs: np.ndarray) -> np.ndarray:
        w = torch.from_numpy(self.history.push(obs)).reshape(-1, K, OBS_DIM)
        with torch.no_grad():
            return self(w).numpy()

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.history.reset(mask)


def make_torchscript(name: str, task: str) -> None:
    """Save the TorchScript twin of fixture ``name`` and its record (see the module docstring)."""
    import hashlib

    t0 = time.perf_counter()
    base = f"{FILES[name]}-{SUFFIX}"
    x = torch.from_numpy(_probe())
    if name == "encoder-body":
        sources = [OUT / f"encoder-{SUFFIX}.onnx", OUT / f"body-{SUFFIX}.onnx"]
        _set_scale(sources[0])
        enc, body = from_onnx(ConvEncoder(), sources[0]), from_onnx(Body(), sources[1])
        saved = [torch.jit.script(enc), torch.jit.script(body)]
        files = [f"torchscript-encoder-{SUFFIX}.pt", f"torchscript-body-{SUFFIX}.pt"]
        how = "torch.jit.script (encoder: obs_history [B, K, obs_dim] -> latent; body: (obs, latent) -> actions)"
        onnx_ref = _ComposedRuntime(*sources)
        z = onnx_ref.enc.run(["latent"], {"obs_history": x.numpy()})[0]
        ref = onnx_ref.body.run(["actions"], {"obs": x.numpy()[:, -1], "latent": z})[0]
    else:
        sources = [OUT / f"{base}.onnx"]
        _set_scale(sources[0])
        module = from_onnx(STUDENTS[name](), sources[0])
        if name == "transformer":
            saved = [torch.jit.trace(module, (torch.zeros(1, K, OBS_DIM),))]
            how = "torch.jit.trace with a [1, K, obs_dim] example (obs_history -> actions)"
        else:
            saved = [torch.jit.script(module)]
            how = "torch.jit.script (obs_history [B, K, obs_dim] -> actions)"
        files = [f"torchscript-{base}.pt"]
        ref = OrtPolicy(sources[0], input_name="obs_history").act(x.numpy())
    for m, f in zip(saved, files, strict=True):
        m.save(str(OUT / f))
    loaded = [torch.jit.load(str(OUT / f)) for f in files]
    rt = _TorchScriptRuntime(*loaded)
    with torch.no_grad():
        diff = float(np.abs(rt(x).numpy() - ref).max())
    if diff > 1e-5:
        raise SystemExit(f"{files}: the TorchScript module differs from {sources} by {diff:.3g}")
    res = run_episodes(env_factory(ENV_ID), rt, EVAL_SEEDS, num_envs=10)
    record = {
        "fixture": f"torchscript-{base}", "files": files, "format": "TorchScript", "export": how,
        "env_id": ENV_ID, "history": {"length": K, "obs_dim": OBS_DIM, "layout": "oldest first", "reset": RESET},
        "weights_from": [{"path": f"tests/fixtures/policies/{q.name}",
                          "sha256": hashlib.sha256(q.read_bytes()).hexdigest()} for q in sources],
        "training": f"none: the weights of {', '.join(q.name for q in sources)} (see {base}.json)",
        "torchscript_vs_onnx_max_abs_diff": diff,
        "eval": {"runtime": "the TorchScript module(s), torch CPU, edgeq.deploy.history.HistoryBuffer",
                 "episodes": len(EVAL_SEEDS), "seeds": f"{EVAL_SEEDS[0]}..{EVAL_SEEDS[-1]}",
                 "mean_return": round(float(res.returns.mean()), 3),
                 "std_return": round(float(res.returns.std(ddof=1)), 3),
                 "returns": [round(float(r), 3) for r in res.returns]},
        "seconds": round(time.perf_counter() - t0, 1),
        "command": f"python scripts/make_history_fixtures.py --torchscript --task {task} {name}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    (OUT / f"torchscript-{base}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: TorchScript {files}, vs ONNX {diff:.2e}, eval return {res.returns.mean():.1f} ± "
          f"{res.returns.std(ddof=1):.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", nargs="+", choices=sorted(STUDENTS))
    ap.add_argument("--dagger-rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500, help="Adam steps per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", choices=sorted(TASKS), default="pendulum", help="env and expert (default pendulum)")
    ap.add_argument("--history-reset", choices=["zeros", "first-observation"], default="zeros",
                    help="what fills the window at an episode start, in training and evaluation (default zeros)")
    ap.add_argument("--torchscript", action="store_true",
                    help="no training: save TorchScript twins of the committed ONNX fixtures")
    args = ap.parse_args()
    globals().update(TASKS[args.task])
    globals().update(RESET=args.history_reset)
    torch.set_num_threads(1)
    if args.torchscript:
        for name in args.fixtures:
            make_torchscript(name, args.task)
        return
    expert = OrtPolicy(load_sb3(EXPERT).model.SerializeToString())
    n_expert, n_round = EPISODES
    for name in args.fixtures:
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        seed = TRAIN_SEED0
        x, y, expert_returns = gather(ExpertHistoryPolicy(expert), expert, list(range(seed, seed + n_expert)), 0.2, 1)
        seed += n_expert
        if args.task != "pendulum":  # fixed observation normalization from the expert's states
            last = x.reshape(-1, K, OBS_DIM)[:, -1]
            std = last.std(axis=0) + 1e-3
            globals().update(OBS_SCALE=tuple((1.0 / std).tolist()),
                             OBS_SHIFT=tuple((-last.mean(axis=0) / std).tolist()))
        module = STUDENTS[name]()
        history: list[dict[str, Any]] = []
        loss = fit(module, x, y, args.steps * 2, args.seed)
        for r in range(args.dagger_rounds):
            xs, ys, rets = gather(TorchHistoryPolicy(module), expert, list(range(seed, seed + n_round)), 0.0, 0)
            seed += n_round
            history.append({"round": r, "student_mean_return": round(float(rets.mean()), 3),
                            "loss": round(loss, 6), "states": int(len(x))})
            print(f"{name}: round {r} student return {rets.mean():.1f} ± {rets.std():.1f}, loss {loss:.5f}",
                  flush=True)
            x, y = np.concatenate([x, xs]), np.concatenate([y, ys])
            loss = fit(module, x, y, args.steps, args.seed + r + 1)
        base = f"{FILES[name]}{'-firstobs' if RESET != 'zeros' else ''}-{SUFFIX}"
        example = torch.zeros(1, K, OBS_DIM)
        if name == "encoder-body":
            assert isinstance(module, EncoderBody)
            tag = "-firstobs" if RESET != "zeros" else ""
            enc, body = OUT / f"encoder{tag}-{SUFFIX}.onnx", OUT / f"body{tag}-{SUFFIX}.onnx"
            export(module.encoder, (example,), enc, ["obs_history"], "latent")
            export(module.body, (torch.zeros(1, OBS_DIM), torch.zeros(1, 8)), body, ["obs", "latent"], "actions")
            files = [enc.name, body.name]
            check = _compose_check(enc, body, module)
        else:
            path = OUT / f"{base}.onnx"
            export(module, (example,), path, ["obs_history"], "actions")
            files = [path.name]
            check = _onnx_check(path, module)
        res = run_episodes(env_factory(ENV_ID), onnx_runtime(OUT / files[0]) if len(files) == 1 else
                           _ComposedRuntime(OUT / files[0], OUT / files[1]), EVAL_SEEDS, num_envs=10)
        record = {
            "fixture": base, "files": files, "env_id": ENV_ID, "expert": EXPERT.name,
            "method": "behaviour cloning on noisy expert rollouts, then DAgger (expert relabels the student's states)",
            "history": {"length": K, "obs_dim": OBS_DIM, "layout": "oldest first", "reset": RESET},
            "seed": args.seed, "dagger_rounds": args.dagger_rounds, "adam_steps_per_round": args.steps,
            "training_states": int(len(x)), "final_loss": round(loss, 6), "rounds": history,
            "parameters": int(sum(p.numel() for p in module.parameters())),
            "onnx_vs_torch_max_abs_diff": check,
            "expert_noisy_return_mean": round(float(expert_returns.mean()), 3),
            "eval": {"runtime": "onnxruntime CPU, edgeq.deploy.history.ObservationHistory",
                     "episodes": len(EVAL_SEEDS), "seeds": f"{EVAL_SEEDS[0]}..{EVAL_SEEDS[-1]}",
                     "mean_return": round(float(res.returns.mean()), 3),
                     "std_return": round(float(res.returns.std(ddof=1)), 3),
                     "returns": [round(float(r), 3) for r in res.returns]},
            "train_seconds": round(time.perf_counter() - t0, 1),
            "command": (f"python scripts/make_history_fixtures.py {name} --task {args.task} --steps {args.steps} "
                        f"--history-reset {RESET} "
                        f"--dagger-rounds {args.dagger_rounds} --seed {args.seed}"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        (OUT / f"{base}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: eval return {res.returns.mean():.1f} ± {res.returns.std(ddof=1):.1f} "
              f"({len(EVAL_SEEDS)} episodes), onnx vs torch {check:.2e}, {record['train_seconds']} s", flush=True)


def _probe() -> np.ndarray:
    rng = np.random.default_rng(0)
    if OBS_DIM != 3:
        return rng.standard_normal((64, K, OBS_DIM)).astype(np.float32)
    th = rng.uniform(-np.pi, np.pi, (64, K))
    return np.stack([np.cos(th), np.sin(th), rng.uniform(-8, 8, (64, K))], -1).astype(np.float32)


def _onnx_check(path: Path, module: nn.Module) -> float:
    x = _probe()
    ref = module(torch.from_numpy(x)).detach().numpy()
    got = OrtPolicy(path, input_name="obs_history").act(x)
    return float(np.abs(ref - got).max())


class _ComposedRuntime:
    """encoder → body in two ONNX Runtime sessions (the float reference for the pair)."""

    def __init__(self, enc: Path, body: Path) -> None:
        import onnxruntime as ort

        self.enc = ort.InferenceSession(str(enc), providers=["CPUExecutionProvider"])
        self.body = ort.InferenceSession(str(body), providers=["CPUExecutionProvider"])
        self.history = HistoryBuffer(K, OBS_DIM, RESET)

    def act(self, obs: np.ndarray) -> np.ndarray:
        w = self.history.push(obs).reshape(-1, K, OBS_DIM)
        (z,) = self.enc.run(["latent"], {"obs_history": w})
        (a,) = self.body.run(["actions"], {"obs": w[:, -1], "latent": z})
        return np.asarray(a)

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.history.reset(mask)


def _compose_check(enc: Path, body: Path, module: nn.Module) -> float:
    x = _probe()
    ref = module(torch.from_numpy(x)).detach().numpy()
    rt = _ComposedRuntime(enc, body)
    z = rt.enc.run(["latent"], {"obs_history": x})[0]
    got = rt.body.run(["actions"], {"obs": x[:, -1], "latent": z})[0]
    return float(np.abs(ref - got).max())


if __name__ == "__main__":
    sys.exit(main())
