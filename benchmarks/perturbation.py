"""How often does a tiny action perturbation alone make the float policy fail? (the floor for any INT8 policy)

Rolls the float policy out on seeds 0..N-1 with and without Gaussian noise on its actions, of a
size comparable to an INT8 policy's action error, and counts the episodes that lose more than 10%
of the unperturbed return of the same seed ("failures": a HalfCheetah that flips onto its back).

    python benchmarks/perturbation.py --fixture sac-halfcheetah:HalfCheetah-v5 --episodes 40 --sigma 0.005,0.01,0.02
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append_section  # noqa: E402


def main() -> None:
    from edgeq.deploy.runtime import OrtPolicy
    from edgeq.envs import env_factory
    from edgeq.ingest.sb3 import load_sb3
    from edgeq.rollout import run_episodes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", required=True, help="NAME:ENV")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--sigma", default="0.005,0.01,0.02", help="noise std, fraction of the action half-range")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perturbation.md"))
    args = ap.parse_args()
    name, env = args.fixture.split(":", 1)
    policy = load_sb3(ROOT / "tests" / "fixtures" / "policies" / f"{name}.zip")
    make_env = env_factory(env)
    low, high = policy.action_space.low_array.ravel(), policy.action_space.high_array.ravel()
    half = ((high - low) / 2).astype(np.float32)
    seeds = list(range(args.episodes))
    actor = OrtPolicy(policy.model.SerializeToString())
    clean = run_episodes(make_env, actor, seeds).returns
    command = "python benchmarks/perturbation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"### {name} on {env}: float policy with Gaussian action noise ({args.episodes} episodes, seeds 0.."
             f"{args.episodes - 1})", "", f"Command: `{command}`", "",
             f"Unperturbed float return: {clean.mean():.1f} ± {clean.std(ddof=1):.1f}.", "",
             "| noise std (fraction of half-range) | mean return | kept | failures (lost > 10% of the seed's return) |",
             "|---|---|---|---|"]
    for sigma in (float(s) for s in args.sigma.split(",")):
        def perturb(a: np.ndarray, rng: np.random.Generator, s: float = sigma) -> np.ndarray:
            return np.clip(a + rng.normal(0, s, a.shape).astype(np.float32) * half, low, high).astype(np.float32)

        noisy = run_episodes(make_env, actor, seeds, perturb=perturb, noise_seed=123).returns
        fails = int(np.sum(noisy - clean < -0.1 * np.abs(clean)))
        kept = 1 + (noisy.mean() - clean.mean()) / abs(clean.mean())
        lines.append(f"| {sigma:g} | {noisy.mean():.1f} ± {noisy.std(ddof=1):.1f} | {100 * kept:.2f}% | "
                     f"{fails} / {args.episodes} |")
        print(lines[-1], flush=True)
    append_section(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
