"""Which quantization settings keep the return: paired float/int8 episodes per configuration.

For each fixture and each named configuration (recipe overrides), runs ``edgeq.quantize`` and
records float and int8 mean ± std over the paired validation episodes (seeds 0..N-1), the return
kept (``1 + mean(int8 - float) / |mean(float)|``, which reads the same for negative returns), the
action error on the float trajectory, the held-out action error the planner saw, and the time.

    python benchmarks/defaults.py --fixture sac-halfcheetah:HalfCheetah-v5 --episodes 20 \\
        --configs baseline,default --out benchmarks/results/defaults.md

Results are appended as one markdown table per fixture (with the command) to ``--out``.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: name -> recipe overrides. ``baseline`` is the settings edgeq shipped with before this study
#: (percentile 99.99, per-tensor observation input, nearest rounding, nothing else).
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {"transform": "none", "auto": False, "rounding": "nearest", "bias_correction": False,
                 "fp16_fallback": 0, "dynamic": False},
    "keep-first-float": {"transform": "none", "auto": False, "rounding": "nearest", "bias_correction": False,
                         "fp16_fallback": 0, "keep_float": ["actor.latent_pi.0/Gemm"]},
    "crossquant-a0": {"transform": "crossquant", "alpha": 0.0, "auto": False, "rounding": "nearest",
                      "bias_correction": False, "fp16_fallback": 0},
    "crossquant-a0.15": {"transform": "crossquant", "alpha": 0.15, "auto": False, "rounding": "nearest",
                         "bias_correction": False, "fp16_fallback": 0},
    "equalize-a0.5": {"transform": "equalize", "alpha": 0.5, "auto": False, "rounding": "nearest",
                      "bias_correction": False, "fp16_fallback": 0},
    "dynamic-first": {"dynamic": True, "transform": "crossquant", "alpha": 0.15, "auto": False,
                      "rounding": "nearest", "bias_correction": False, "fp16_fallback": 0},
    "dynamic-all": {"dynamic": True, "transform": "crossquant", "transform_layers": "all", "alpha": 0.15,
                    "auto": False, "rounding": "nearest", "bias_correction": False, "fp16_fallback": 0},
    "auto": {"transform": "none", "auto": True, "rounding": "nearest", "bias_correction": False,
             "fp16_fallback": 0},
    "auto+adaround": {"transform": "none", "auto": True, "rounding": "adaround", "bias_correction": False,
                      "fp16_fallback": 0},
    "auto+adaround+bc": {"transform": "none", "auto": True, "rounding": "adaround", "bias_correction": True,
                         "fp16_fallback": 0},
    "cq0+adaround+bc": {"transform": "crossquant", "alpha": 0.0, "auto": False, "rounding": "adaround",
                        "bias_correction": True, "fp16_fallback": 0},
    "auto+adaround+bc+fp16": {"transform": "none", "auto": True, "rounding": "adaround", "bias_correction": True,
                              "fp16_fallback": 1},
    "default": {},  # whatever the recipe for the env says
}


def kept(float_mean: float, int8_mean: float) -> float:
    return 1.0 + (int8_mean - float_mean) / abs(float_mean)


def run_one(policy: str, env: str, name: str, overrides: dict[str, Any], episodes: int,
            noise: tuple[float, float] | None) -> dict[str, Any]:
    import edgeq
    from edgeq.calibration.collect import ExplorationNoise

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = edgeq.quantize(policy, env, Path(tmp) / "b", episodes=episodes, seed=0, recipe_overrides=overrides,
                             exploration=ExplorationNoise(*noise) if noise else None)
        seconds = time.perf_counter() - t0
    cpu = res.validation["targets"]["cpu"]
    q = res.manifest["quantization"]
    layers = q["layers"]
    return {
        "config": name, "float_mean": cpu["float"]["mean"], "float_std": cpu["float"]["std"],
        "int8_mean": cpu["int8"]["mean"], "int8_std": cpu["int8"]["std"],
        "kept": kept(cpu["float"]["mean"], cpu["int8"]["mean"]),
        "ratio_of_means": cpu["paired_difference"]["ratio_of_means"],
        "ci95": cpu["paired_difference"]["ci95"],
        "action_err_mean": cpu["action_error"]["on_float_trajectory"]["mean_abs"],
        "action_err_max": cpu["action_error"]["on_float_trajectory"]["max_abs"],
        "heldout_err": q.get("metrics", {}).get("heldout_action_error", {}).get("mean"),
        "layers": ", ".join(f"{la['precision']}:{(la.get('choice') or {}).get('label', '')}"
                            f"{'/ada' if la.get('rounding') == 'adaround' else ''}"
                            f"{'/bc' if la.get('bias_corrected') else ''}" for la in layers),
        "trt": q.get("tensorrt_compatible", True), "seconds": seconds,
    }


def to_markdown(fixture: str, env: str, rows: list[dict[str, Any]], command: str, episodes: int) -> str:
    out = [f"### {fixture} on {env} ({episodes} paired episodes, seeds 0..{episodes - 1})", "",
           f"Command: `{command}`", "",
           "| config | float mean ± std | int8 mean ± std | kept | paired diff 95% CI | action err mean / max "
           "(float traj.) | held-out err | TRT | layers (precision:input quantizer) | time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['float_mean']:.1f} ± {r['float_std']:.1f} | "
                   f"{r['int8_mean']:.1f} ± {r['int8_std']:.1f} | {100 * r['kept']:.2f}% | "
                   f"[{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] | "
                   f"{r['action_err_mean']:.4f} / {r['action_err_max']:.3f} | "
                   f"{r['heldout_err']:.4f} | {'yes' if r['trt'] else 'no'} | {r['layers']} | "
                   f"{r['seconds']:.0f}s |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", action="append", required=True,
                    help="NAME:ENV, NAME a zip in tests/fixtures/policies (repeatable)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--noise", default=None, help="GAUSSIAN,EPSILON exploration for calibration (default: recipe)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defaults.md"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    noise = tuple(float(v) for v in args.noise.split(",")) if args.noise else None
    command = "python benchmarks/defaults.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    all_rows: dict[str, list[dict[str, Any]]] = {}
    text = []
    for spec in args.fixture:
        name, env = spec.split(":", 1)
        policy = str(ROOT / "tests" / "fixtures" / "policies" / f"{name}.zip")
        rows = []
        for cfg in args.configs.split(","):
            row = run_one(policy, env, cfg, CONFIGS[cfg], args.episodes, noise)  # type: ignore[arg-type]
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            rows.append(row)
        all_rows[name] = rows
        text.append(to_markdown(name, env, rows, command, args.episodes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write("\n".join(text) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
