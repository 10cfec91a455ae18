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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append_section  # noqa: E402

#: Every stage off: the settings edgeq shipped with before this study (percentile 99.99 per-tensor
#: activations, per-tensor observation input, per-channel absmax weights, nearest rounding).
PLAIN: dict[str, Any] = {"transform": "none", "alpha": None, "dynamic": False, "auto": False, "rounding": "nearest",
                         "bias_correction": False, "fp16_fallback": 0, "tail_weight": 0.0,
                         "tail_on_calibration_states": False}
TAIL = {"tail_weight": 0.1, "tail_fraction": 0.01, "tail_on_calibration_states": True}
CQ0 = {"transform": "crossquant", "alpha": 0.0}

#: name -> recipe overrides (on top of the env's recipe).
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": dict(PLAIN),
    "keep-first-float": {**PLAIN, "keep_float": ["actor.latent_pi.0/Gemm"]},
    "crossquant-a0": {**PLAIN, **CQ0},
    "crossquant-a0.15": {**PLAIN, "transform": "crossquant", "alpha": 0.15},
    "equalize-a0.5": {**PLAIN, "transform": "equalize", "alpha": 0.5},
    "dynamic-first": {**PLAIN, "dynamic": True, "transform": "crossquant", "alpha": 0.15},
    "dynamic-all": {**PLAIN, "dynamic": True, "transform": "crossquant", "alpha": 0.15, "transform_layers": "all"},
    "cq0+adaround": {**PLAIN, **CQ0, "rounding": "adaround"},
    "cq0+adaround+bc": {**PLAIN, **CQ0, "rounding": "adaround", "bias_correction": True},
    "auto(mean)": {**PLAIN, **CQ0, "auto": True},
    "auto(mean)+adaround+bc": {**PLAIN, **CQ0, "auto": True, "rounding": "adaround", "bias_correction": True},
    "auto(mean+tail)": {**PLAIN, **CQ0, **TAIL, "auto": True},
    "auto(mean+tail)+adaround+bc": {**PLAIN, **CQ0, **TAIL, "auto": True, "rounding": "adaround",
                                    "bias_correction": True},
    "default": {},  # whatever the env's recipe says (calibration/<env>.yaml, else default.yaml)
}


def kept(float_mean: float, int8_mean: float) -> float:
    return 1.0 + (int8_mean - float_mean) / abs(float_mean)


def run_one(policy: str, env: str, name: str, overrides: dict[str, Any], episodes: int,
            noise: tuple[float, float] | None, calib_seed: int | None = None) -> dict[str, Any]:
    import numpy as np

    from edgeq.calibration.collect import ExplorationNoise
    from edgeq.pipeline import quantize

    if calib_seed is not None:
        overrides = {**overrides, "seed": calib_seed}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = quantize(policy, env, Path(tmp) / "b", episodes=episodes, seed=0, recipe_overrides=overrides,
                             exploration=ExplorationNoise(*noise) if noise else None)
        seconds = time.perf_counter() - t0
    cpu = res.validation["targets"]["cpu"]
    q = res.manifest["quantization"]
    layers = q["layers"]
    f, i8 = np.array(cpu["float"]["returns"]), np.array(cpu["int8"]["returns"])
    return {
        "config": name, "calib_seed": res.manifest["calibration"]["seeds"][0],
        "failures": int(np.sum(i8 - f < -0.1 * abs(float(f.mean())))),
        "float_returns": f.tolist(), "int8_returns": i8.tolist(),
        "float_mean": cpu["float"]["mean"], "float_std": cpu["float"]["std"],
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
           "kept = 1 + mean(int8 - float) / |mean(float)|; failures = episodes where int8 lost more than 10% "
           "of the mean float return against the same seed's float episode; action error in action units on the "
           "float trajectory; held-out err = mean |a_int8 - a_float| / half-range on held-out calibration states "
           "(what the planner saw).", "",
           "| config | calib. seeds | float mean ± std | int8 mean ± std | kept | failures | paired diff 95% CI | "
           "action err mean / max | held-out err | TRT | layers (precision:input quantizer) | time |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['calib_seed']} | {r['float_mean']:.1f} ± {r['float_std']:.1f} | "
                   f"{r['int8_mean']:.1f} ± {r['int8_std']:.1f} | {100 * r['kept']:.2f}% | {r['failures']} | "
                   f"[{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] | "
                   f"{r['action_err_mean']:.4f} / {r['action_err_max']:.3f} | "
                   f"{r['heldout_err']:.4f} | {'yes' if r['trt'] else 'no'} | {r['layers']} | "
                   f"{r['seconds']:.0f}s |")
    by_cfg: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cfg.setdefault(r["config"], []).append(r)
    if any(len(v) > 1 for v in by_cfg.values()):
        out += ["", "Over calibration seed sets:", "",
                "| config | seed sets | kept, mean | kept, worst | failures / episodes | action err mean |",
                "|---|---|---|---|---|---|"]
        for cfg, rs in by_cfg.items():
            ks = [r["kept"] for r in rs]
            out.append(f"| {cfg} | {len(rs)} | {100 * sum(ks) / len(ks):.2f}% | {100 * min(ks):.2f}% | "
                       f"{sum(r['failures'] for r in rs)} / {episodes * len(rs)} | "
                       f"{sum(r['action_err_mean'] for r in rs) / len(rs):.4f} |")
    return "\n".join(out) + "\n"


def render_json(path: str, command: str, episodes: int) -> str:
    """Markdown of a ``--json`` file written by an earlier run (failures recounted from the returns)."""
    import numpy as np

    data = json.loads(Path(path).read_text())
    text = []
    for name, rows in data.items():
        for r in rows:
            f, i8 = np.array(r["float_returns"]), np.array(r["int8_returns"])
            r["failures"] = int(np.sum(i8 - f < -0.1 * abs(float(f.mean()))))
        env = rows[0].get("env", "")
        text.append(to_markdown(name, env, rows, command, episodes))
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", action="append", required=True,
                    help="NAME:ENV, NAME a zip in tests/fixtures/policies (repeatable)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--noise", default=None, help="GAUSSIAN,EPSILON exploration for calibration (default: recipe)")
    ap.add_argument("--calib-seeds", default=None,
                    help="comma list of calibration seed bases; each config runs once per base (default: recipe)")
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
        rows: list[dict[str, Any]] = []
        bases = [int(b) for b in args.calib_seeds.split(",")] if args.calib_seeds else [None]
        for cfg in args.configs.split(","):
            for base in bases:
                row = run_one(policy, env, cfg, CONFIGS[cfg], args.episodes, noise, base)  # type: ignore[arg-type]
                row["env"] = env
                print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "float_returns",
                                                                            "int8_returns")}), flush=True)
                rows.append(row)
        all_rows[name] = rows
        text.append(to_markdown(name, env, rows, command, args.episodes))
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))
    append_section(args.out, "\n".join(text))


if __name__ == "__main__":
    main()
