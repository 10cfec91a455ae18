"""Calibration coverage: how exploration noise during calibration rollouts changes the INT8 return.

For each exploration setting (Gaussian action noise as a fraction of the action half-range, and
epsilon-random actions) and each calibration seed set, runs ``edgeq.quantize`` with the given
quantization settings and records the return kept over the paired validation episodes and the
action error on the float and on the int8 trajectories (the latter is where coverage matters:
states near, not on, the float policy's path).

    python benchmarks/coverage.py --fixture sac-halfcheetah:HalfCheetah-v5 --episodes 20 \\
        --noise 0,0 --noise 0.1,0 --noise 0.3,0 --noise 0,0.1 --noise 0.1,0.1 --seeds 1000000,2000000,3000000

Appends a markdown table (with the command) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append_section  # noqa: E402
from defaults import CONFIGS, kept  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", required=True, help="NAME:ENV, NAME a zip in tests/fixtures/policies")
    ap.add_argument("--noise", action="append", required=True, help="GAUSSIAN,EPSILON (repeatable)")
    ap.add_argument("--seeds", default="1000000,2000000,3000000", help="calibration seed bases")
    ap.add_argument("--config", default="baseline", help=f"quantization settings, one of {list(CONFIGS)}")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "coverage.md"))
    args = ap.parse_args()
    from edgeq.pipeline import quantize

    name, env = args.fixture.split(":", 1)
    policy = str(ROOT / "tests" / "fixtures" / "policies" / f"{name}.zip")
    command = "python benchmarks/coverage.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows: list[dict[str, Any]] = []
    for spec in args.noise:
        g, e = (float(v) for v in spec.split(","))
        per_seed = []
        for base in (int(s) for s in args.seeds.split(",")):
            overrides = {**CONFIGS[args.config], "seed": base, "exploration": {"gaussian": g, "epsilon": e}}
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = quantize(policy, env, Path(tmp) / "b", episodes=args.episodes, seed=0,
                                     recipe_overrides=overrides)
                sec = time.perf_counter() - t0
            cpu = res.validation["targets"]["cpu"]
            r = {"gaussian": g, "epsilon": e, "seed": base, "float_mean": cpu["float"]["mean"],
                 "int8_mean": cpu["int8"]["mean"], "kept": kept(cpu["float"]["mean"], cpu["int8"]["mean"]),
                 "err_float_traj": cpu["action_error"]["on_float_trajectory"]["mean_abs"],
                 "err_int8_traj": cpu["action_error"]["on_int8_trajectory"]["mean_abs"],
                 "max_err_int8_traj": cpu["action_error"]["on_int8_trajectory"]["max_abs"],
                 "seconds": sec}
            print(json.dumps(r), flush=True)
            per_seed.append(r)
        k = np.array([r["kept"] for r in per_seed])
        rows.append({"gaussian": g, "epsilon": e, "kept_mean": float(k.mean()), "kept_min": float(k.min()),
                     "kept_all": [float(x) for x in k],
                     "err_float": float(np.mean([r["err_float_traj"] for r in per_seed])),
                     "err_int8": float(np.mean([r["err_int8_traj"] for r in per_seed])),
                     "max_err_int8": float(np.max([r["max_err_int8_traj"] for r in per_seed])),
                     "float_mean": per_seed[0]["float_mean"]})
    lines = [f"### {name} on {env}: exploration noise during calibration (settings: {args.config}; "
             f"{args.episodes} paired episodes, seeds 0..{args.episodes - 1}; calibration seed sets {args.seeds})", "",
             f"Command: `{command}`", "",
             "| gaussian | epsilon | kept, mean over seed sets | kept, worst seed set | kept per seed set | "
             "action err on float traj. | action err on int8 traj. (mean / max) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gaussian']:g} | {r['epsilon']:g} | {100 * r['kept_mean']:.2f}% | "
                     f"{100 * r['kept_min']:.2f}% | {', '.join(f'{100 * x:.2f}%' for x in r['kept_all'])} | "
                     f"{r['err_float']:.4f} | {r['err_int8']:.4f} / {r['max_err_int8']:.3f} |")
    append_section(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
