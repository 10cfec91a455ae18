"""All-INT8 action error on the float policy's own noise-free states (issue 12 part 2): a candidate proxy.

The planner scores every choice on held-out *calibration* states (rollouts with exploration noise). This rolls the
float policy out without noise (the states a deployed policy visits), and reports, for each bundle's
``policy.int8.onnx``, the mean |a_int8 - a_float| and the p99 of the per-state max over those states (actions in
the policy's output units; the bundles must share one float policy). Session 7 compares it with the closed-loop
verdicts of ``quantization.input_headroom`` (benchmarks/results/int8_methods.md)::

    python benchmarks/onpolicy_error.py HalfCheetah-v5 B_H1 B_H15 B_H2 --episodes 4 --seed 500000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq.deploy.runtime import OrtPolicy  # noqa: E402


def policy(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The file as edgeq's validation runs it (:class:`edgeq.deploy.runtime.OrtPolicy`, CPU)."""
    return OrtPolicy(path).act


def onpolicy_states(env_id: str, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> np.ndarray:
    """States of ``episodes`` noise-free episodes (seeds ``seed..``), actions clipped to the action space."""
    env = gym.make(env_id)
    low, high = env.action_space.low, env.action_space.high  # type: ignore[attr-defined]
    states = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            states.append(obs)
            obs, _, term, trunc, _ = env.step(np.clip(act(obs[None])[0], low, high))
            done = bool(term or trunc)
    return np.asarray(states)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("env")
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=500000)
    args = ap.parse_args()
    ref_policy = policy(args.bundles[0] / "policy.fp32.onnx")
    states = onpolicy_states(args.env, ref_policy, args.episodes, args.seed)
    ref = ref_policy(states)
    print("| bundle | on-policy states | action error mean | p99 of per-state max |\n|---|---|---|---|")
    for b in args.bundles:
        err = np.abs(policy(b / "policy.int8.onnx")(states) - ref)
        print(f"| {b.name} | {len(states)} | {err.mean():.4f} | {np.percentile(err.max(axis=1), 99):.3f} |")


if __name__ == "__main__":
    main()
