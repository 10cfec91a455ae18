"""Calibration peak memory vs calibration length: it must stay flat from 10k to 1M steps.

Each size runs in a fresh Python process: real rollouts of a trained policy (default: the SAC
Pendulum fixture, 200-step episodes) through ``edgeq.calibration.collect.calibrate_rollouts``, with
the recipe's exploration noise and held-out episodes, on ``--num-envs`` environments stepped
together. The child resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) right before
calibration and reads ``VmHWM`` after it; then it builds the quantization plan the recipe asks for
(``build_plan``: per-layer auto choice, AdaRound, ... on the bounded reservoir of stored states) and
measures its peak the same way. The plan's activation thresholds are reported too (more steps change
the statistics, not the memory).

    PYTHONPATH=. python benchmarks/calibration_memory.py --steps 10000,100000,1000000 \\
        --json /tmp/calib-bench/memory.json

``benchmarks/calibration_table.py --memory-json`` puts the result into ``results/calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
sys.path.insert(0, str(ROOT / "benchmarks"))

from calibration_table import PeakRss  # noqa: E402  (benchmarks/ is not a package)


def measure(policy: Path, env: str, steps: int, num_envs: int) -> dict[str, Any]:
    """Calibrate ``policy`` for about ``steps`` env steps (whole episodes) in this process, as ``edgeq quantize``
    does (the recipe's exploration noise and held-out episodes), then build the recipe's quantization plan;
    peak RSS of each part and timings."""
    from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
    from edgeq.config import QuantizeConfig
    from edgeq.envs import env_factory
    from edgeq.export.qdq import apply_plan
    from edgeq.ingest import load_policy
    from edgeq.ingest.onnx_policy import bind_env_spaces
    from edgeq.quantizers.build import build_plan
    from edgeq.quantizers.evaluate import action_half_range

    fp = load_policy(policy)
    make_env = env_factory(env)
    probe = make_env()
    try:
        fp = bind_env_spaces(fp, probe.observation_space, probe.action_space)
        ep_len = int(probe.spec.max_episode_steps)
    finally:
        probe.close()
    config = QuantizeConfig.from_recipe(None, env=env)
    recipe = config.calibration
    episodes = max(1, round(steps / ep_len))
    seeds = list(range(recipe.seed, recipe.seed + episodes))
    held = list(range(recipe.seed + episodes, recipe.seed + episodes + recipe.holdout_episodes))
    hold = recipe.holdout_exploration
    hold_noise = None if hold is None else ExplorationNoise(**hold.to_dict())
    mem = PeakRss()
    mem.start()
    t0 = time.perf_counter()
    stats = calibrate_rollouts(fp, make_env, seeds, noise=ExplorationNoise(**recipe.exploration.to_dict()),
                               num_envs=num_envs, holdout_seeds=held, holdout_noise=hold_noise)
    seconds = time.perf_counter() - t0
    mem.stop()
    calib_mem = mem.to_json()
    mem.start()
    t0 = time.perf_counter()
    plan = build_plan(fp.model, stats, config.quant_options(), recurrent=fp.recurrent,
                      half_range=action_half_range(fp.action_space.low_array, fp.action_space.high_array),
                      lower=apply_plan)
    plan_s = time.perf_counter() - t0
    mem.stop()
    plan_mem = mem.to_json()
    return {"policy": str(policy), "env": env, "steps": int(stats.steps), "episodes": episodes,
            "holdout_episodes": len(held), "num_envs": num_envs, "seconds": seconds, "plan_s": plan_s,
            "rss_before_mib": calib_mem["rss_at_start_mib"], "peak_rss_mib": calib_mem["peak_rss_mib"],
            "plan_rss_before_mib": plan_mem["rss_at_start_mib"], "plan_peak_rss_mib": plan_mem["peak_rss_mib"],
            "reservoir_rows": int(len(stats.observations)),
            "observer_bytes": int(sum(o.nbytes for o in stats.observers.values())),
            "activation_floats_per_step": int(sum(o.channels or 0 for o in stats.observers.values())),
            "amax": {a.tensor: a.amax for a in plan.activations.values()},
            "child_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB}


def run_child(policy: Path, env: str, steps: int, num_envs: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "one", "--policy", str(policy), "--env", env,
           "--steps", str(steps), "--num-envs", str(num_envs)]
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"calibration of {steps} steps failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    one = sub.add_parser("one", help="one size, in this process; prints one JSON line")
    for p in (ap, one):
        p.add_argument("--policy", type=Path, default=ROOT / "tests/fixtures/policies/sac-pendulum.zip")
        p.add_argument("--env", default="Pendulum-v1")
        p.add_argument("--num-envs", type=int, default=50)
    one.add_argument("--steps", type=int, required=True)
    ap.add_argument("--steps", default="10000,100000,1000000", help="comma list of calibration lengths")
    ap.add_argument("--json", type=Path, help="write the results here (for calibration_table.py --memory-json)")
    args = ap.parse_args(argv)
    if args.cmd == "one":
        print(json.dumps(measure(args.policy, args.env, args.steps, args.num_envs)))
        return 0
    runs = []
    for n in (int(s) for s in args.steps.split(",")):
        r = run_child(args.policy, args.env, n, args.num_envs)
        runs.append(r)
        print(f"{r['steps']:>9,} steps: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mib']:.1f} MiB "
              f"(before {r['rss_before_mib']:.1f} MiB)", file=sys.stderr, flush=True)
    peaks = [r["peak_rss_mib"] - r["rss_before_mib"] for r in runs]
    first, last = runs[0], runs[-1]
    width = last["activation_floats_per_step"]
    keep_mib = last["steps"] * width * 4 / MiB
    finding = (f"From {first['steps']:,} to {last['steps']:,} steps ({last['steps'] / first['steps']:.0f}x), the "
               f"calibration's peak RSS goes from {first['peak_rss_mib']:.1f} to {last['peak_rss_mib']:.1f} MiB "
               f"(growth over the RSS before calibration: {peaks[0]:.1f} → {peaks[-1]:.1f} MiB); the observers "
               f"hold {last['observer_bytes'] / 1024:.0f} KiB of statistics. Keeping the activations instead would "
               f"need {last['steps']:,} steps × {width} floats × 4 B = {keep_mib:,.0f} MiB.")
    policy = Path(args.policy).resolve()
    shown = policy.relative_to(ROOT) if policy.is_relative_to(ROOT) else policy
    out = {"command": "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in
                                                        ["benchmarks/calibration_memory.py", *(argv or sys.argv[1:])]),
           "description": (f"`calibrate_rollouts` of `{shown}` in `{args.env}` (real rollouts with the recipe's "
                           f"exploration noise and held-out episodes), {args.num_envs} envs stepped together, one "
                           "fresh process per length; peak RSS = the kernel's high-water mark during calibration "
                           "(reset just before it); plan = `build_plan` with the recipe's stages (default: per-layer "
                           "auto choice, AdaRound, bias correction, ...) on the stored states, its peak measured the "
                           "same way right after; child max RSS = the whole process's."),
           "runs": runs, "finding": finding}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
