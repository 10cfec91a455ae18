"""Validation rollouts per second with 1, 2, ... worker processes (and a local Ray instance).

Runs the paired float/INT8 rollouts of a bundle (:func:`edgeq.validate.spread.run_paired_spread`)
on the same seeds with each executor, checks that every executor gives the serial returns bit for
bit, and appends a table to ``benchmarks/results/rollouts.md``: paired episodes per second (each
paired episode = one float + one INT8 episode), the median of ``--rounds`` runs, start-up included
(the pool is made fresh for each round).

    PYTHONPATH=. python benchmarks/rollout_workers.py --bundle tests/fixtures/bundles/v1/sac-pendulum \
        --env Pendulum-v1 --episodes 64 --workers 1,2 --ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_section  # noqa: E402

from edgeq.envs import env_factory  # noqa: E402
from edgeq.validate.executor import ExecutorConfig  # noqa: E402
from edgeq.validate.spread import run_paired_spread  # noqa: E402
from edgeq.validate.targets import RuntimeSpec  # noqa: E402


def one_run(bundle: Path, env: str, seeds: list[int], config: ExecutorConfig) -> tuple[float, list[float]]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    io, models = manifest.get("io", {}), manifest["models"]
    f = RuntimeSpec.of("cpu", bundle / models["fp32"], io, "fp32")
    q = RuntimeSpec.of("cpu", bundle / models.get("int8-cpu", models["int8"]), io, "int8")
    act_dim = len(manifest["action_space"]["low"])
    t0 = time.perf_counter()
    with config.make() as ex:
        run = run_paired_spread(env_factory(env), f, q, seeds, act_dim=act_dim, executor=ex, record=False)
    return time.perf_counter() - t0, [float(x) for x in run.candidate.returns] + [float(x) for x in
                                                                               run.reference.returns]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--ray", action="store_true", help="also a local Ray instance with the largest --workers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "rollouts.md")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    seeds = list(range(args.episodes))
    configs = [(f"{w} worker process{'es' if w > 1 else ''}" if w > 1 else "serial (this process)",
                ExecutorConfig(workers=w)) for w in (int(x) for x in args.workers.split(","))]
    if args.ray:
        w = max(int(x) for x in args.workers.split(","))
        configs.append((f"Ray, local instance, {w} CPUs", ExecutorConfig(kind="ray", workers=w)))
    rows: list[dict[str, Any]] = []
    reference: list[float] | None = None
    for name, cfg in configs:
        times = []
        for _ in range(args.rounds):
            seconds, returns = one_run(args.bundle, args.env, seeds, cfg)
            times.append(seconds)
            reference = returns if reference is None else reference
            if returns != reference:
                raise SystemExit(f"{name}: returns differ from the serial run")
        med = statistics.median(times)
        rows.append({"name": name, "median_s": med, "min_s": min(times), "max_s": max(times),
                     "eps": args.episodes / med})
    base = rows[0]["eps"]
    cmd = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"## Paired validation episodes per second: {args.bundle.name}, {args.env}, {args.episodes} episodes",
             "", "```", cmd, "```", "",
             f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; median of "
             f"{args.rounds} rounds (min-max), pool start-up included; returns identical to serial in every round; "
             f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs "
             "on the machine).",
             "", "| executor | paired episodes/s | seconds (median, min-max) | vs serial |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['eps']:.2f} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
                     f"| {r['eps'] / base:.2f}x |")
    append_section(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
