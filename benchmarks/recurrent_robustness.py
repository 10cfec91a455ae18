"""Recurrent policies under INT8: returns and fall rates nominally and under pushes, saturation, drift.

For one recurrent policy (a TorchScript ``policy.pt`` or a RecurrentPPO ``.zip``) and its env this
runs :func:`edgeq.quantize` in four configurations:

=================  ==========================================================================
cell int8 / fp32   the LSTM gate MatMuls in int8, or kept float (the MLP head int8 in both)
calib nominal      calibration rollouts in the plain env (the recipe's seeds, exploration noise)
calib perturbed    calibration rollouts under the same disturbance as validation (other seeds)
=================  ==========================================================================

and validates each bundle on the same seeds nominally and under ``--perturb`` (float and int8 meet
the same push schedule per seed). Reported per configuration and condition: float and int8 return
(mean ± std), paired int8 - float difference with its 95% bootstrap CI, termination (fall) rates
with Wilson 95% intervals, the largest INT8 tensor saturation on the int8 trajectory, and the mean
action error on the float trajectory.

Then, for drift through the state: the float policy runs ``--long-episodes`` episodes of up to
``--long-steps`` steps (the env's time limit raised), an int8 shadow of each cell precision reads
the same observations with its own state, and the mean |action error| and |h_int8 - h_float| are
reported per window of time steps.

Usage::

    python benchmarks/recurrent_robustness.py tests/fixtures/policies/torchscript-lstm-invertedpendulum.pt \\
        --env InvertedPendulum-v5 --perturb push:speed=1.0,interval=40-120 --episodes 100 \\
        --md benchmarks/results/recurrent.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.pipeline import quantize

WINDOWS = ((0, 10), (10, 100), (100, 500), (500, 1000), (1000, 2000), (2000, 5000))


def _fmt_rate(r: dict[str, Any]) -> str:
    lo, hi = r["termination_ci95"]
    return f"{100 * r['termination_rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def condition_row(config: str, cond: str, r: dict[str, Any]) -> str:
    d = r["paired_difference"]
    t = r["termination_difference"]
    sat = r.get("saturation", {})
    return (f"| {config} | {cond} | {r['float']['mean']:.1f} ± {r['float']['std']:.1f} | "
            f"{r['int8']['mean']:.1f} ± {r['int8']['std']:.1f} | {d['mean']:+.1f} [{d['ci95'][0]:+.1f}, "
            f"{d['ci95'][1]:+.1f}] | {_fmt_rate(r['float'])} | {_fmt_rate(r['int8'])} | "
            f"{100 * t['mean']:+.0f} [{100 * t['ci95'][0]:+.0f}, {100 * t['ci95'][1]:+.0f}] "
            f"({t['only_int8']}/{t['only_float']}) | "
            f"{100 * sat.get('max_rate', 0):.3f}% ({sat.get('max_tensor')}) | "
            f"{r['action_error']['on_float_trajectory']['mean_abs']:.4f} |")


def long_sequence_drift(bundle: Path, env: str, env_kwargs: dict[str, Any], episodes: int, seed: int
                        ) -> dict[str, Any]:
    """Mean |a_int8 - a_float| and |h_int8 - h_float| per time window, int8 shadowing the float trajectory."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    io = manifest["io"]

    def rt(name: str) -> OrtPolicy:
        return OrtPolicy(bundle / name, state=io["state"])

    make = env_factory(env, env_kwargs)
    sums: dict[tuple[int, int], list[float]] = {w: [0.0, 0.0, 0] for w in WINDOWS}  # type: ignore[misc]
    lengths = []
    for ep in range(episodes):
        f, q = rt("policy.fp32.onnx"), rt("policy.int8.onnx")
        e = make()
        obs, _ = e.reset(seed=seed + ep)
        t, done = 0, False
        while not done:
            o = np.asarray(obs, np.float32)[None]
            a_f = f.run(o, ["actions", "h_out"])
            a_q = q.run(o, ["actions", "h_out"])
            err = float(np.abs(a_f["actions"] - a_q["actions"]).mean())
            herr = float(np.abs(a_f["h_out"] - a_q["h_out"]).mean())
            for w in WINDOWS:
                if w[0] <= t < w[1]:
                    sums[w][0] += err
                    sums[w][1] += herr
                    sums[w][2] += 1
            obs, _, term, trunc, _ = e.step(a_f["actions"][0])
            t += 1
            done = term or trunc
        lengths.append(t)
        e.close()
    return {"lengths": lengths,
            "windows": {f"{a}-{b}": {"action_err": s[0] / s[2], "hidden_err": s[1] / s[2], "steps": int(s[2])}
                        for (a, b), s in sums.items() if s[2]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", type=Path)
    parser.add_argument("--env", required=True)
    parser.add_argument("--perturb", required=True, help="validation (and push-calibration) disturbance")
    parser.add_argument("--calib-perturb", default=None, help="calibration disturbance (default: --perturb)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--calib-episodes", type=int, default=None)
    parser.add_argument("--long-episodes", type=int, default=3)
    parser.add_argument("--long-steps", type=int, default=5000)
    parser.add_argument("--md", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args()

    t_start = time.time()
    rows, configs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for cell in ("int8", "fp32"):
            for calib in ("nominal", "perturbed"):
                name = f"cell {cell}, calib {calib}"
                res = quantize(args.policy, args.env, Path(tmp) / f"{cell}-{calib}", episodes=args.episodes,
                               calib_episodes=args.calib_episodes, cell_precision=cell,
                               calib_perturb=[args.calib_perturb or args.perturb] if calib == "perturbed" else [],
                               perturb=[args.perturb])
                r = res.validation["targets"]["cpu"]
                configs[name] = {"bundle": res.bundle, "validation": r}
                rows.append(condition_row(name, "nominal", r))
                rows.append(condition_row(name, "perturbed", r["perturbed"]))
                print(rows[-2], rows[-1], sep="\n", flush=True)
        drift = {cell: long_sequence_drift(configs[f"cell {cell}, calib nominal"]["bundle"], args.env,
                                           {"max_episode_steps": args.long_steps}, args.long_episodes, 90_000)
                 for cell in ("int8", "fp32")}
        sat_tables = {name: c["validation"] for name, c in configs.items()}
        lines = [
            f"## Recurrent policy under INT8: {args.policy.name} on {args.env}",
            "",
            "Command:",
            "",
            "```",
            "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "```",
            "",
            f"{args.episodes} paired validation episodes per condition (seeds 0..{args.episodes - 1}); perturbed: "
            f"`{args.perturb}` (float and int8 meet the same disturbances on each seed). Calibration: the recipe's "
            f"seeds (disjoint), nominal or under `{args.calib_perturb or args.perturb}`. Terminated = the env "
            "ended the episode before its time limit (a fall). Intervals: 95% (paired bootstrap for the "
            "differences, Wilson for rates). Saturation: largest fraction of a quantized tensor's values "
            "outside its calibrated range, on the int8 policy's own trajectory.",
            "",
            "| configuration | condition | float return | int8 return | int8 - float [95% CI] | "
            "terminated float | terminated int8 | int8 - float terminated, pts [95% CI] (only int8 / only float) | "
            "int8 saturation max (tensor) | action err (mean abs) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Saturation per tensor (int8 trajectory), nominal / perturbed:",
            "",
            "| configuration | tensor | amax | nominal | perturbed | largest abs value perturbed |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in sat_tables.items():
            nom = r["saturation"]["on_int8_trajectory"]["tensors"]
            pus = r["perturbed"]["saturation"]["on_int8_trajectory"]["tensors"]
            for t, s in nom.items():
                lines.append(f"| {name} | `{t}` | {s['amax']:.3g} | {100 * s['rate']:.3f}% | "
                             f"{100 * pus[t]['rate']:.3f}% | {pus[t]['absmax_seen']:.3g} |")
        lines += ["", f"Drift through the recurrent state: the float policy runs {args.long_episodes} episodes of up "
                  f"to {args.long_steps} steps; an int8 shadow (calibrated nominally) reads the same observations with "
                  "its own state. Mean |a_int8 - a_float| and mean |h_int8 - h_float| per window of steps:", "",
                  "| cell | " + " | ".join(f"steps {w}" for w in drift["int8"]["windows"]) + " |",
                  "|---|" + "---|" * len(drift["int8"]["windows"])]
        for cell, d in drift.items():
            lines.append(f"| {cell} action | " + " | ".join(f"{v['action_err']:.4f}" for v in d["windows"].values())
                         + " |")
            lines.append(f"| {cell} hidden | " + " | ".join(f"{v['hidden_err']:.4f}" for v in d["windows"].values())
                         + " |")
        lines += ["", f"Episode lengths in the drift run: {drift['int8']['lengths']}.", "",
                  f"Machine: {platform.machine()}, {platform.python_version()}, one ORT thread; wall time "
                  f"{time.time() - t_start:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        with open(args.md, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
