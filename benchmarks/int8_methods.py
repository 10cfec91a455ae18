"""INT8 methods on the all-INT8 file: every layer W8A8 (``policy.int8.onnx``, what TensorRT runs), validated on CPU.

For each fixture, calibrates once with the env's recipe (the seeds ``edgeq quantize`` uses), then for
each named method (recipe overrides on top of the env's recipe, fp16 fallback always 0, no float
layers) builds the plan, writes it into the float graph exactly as ``edgeq quantize`` writes
``policy.int8.onnx`` (:func:`edgeq.export.qdq.apply_plan`) and validates **that file** against the
float file on ONNX Runtime CPU with paired episodes (seeds 0..N-1, or ``--episodes auto``: the
sequential verdict). Records the return kept with its 95% CI, the verdict, the failures of each side,
the held-out action error the planner saw (plain, and weighted by the critic's value sensitivity where the
zip has a Q critic: :mod:`edgeq.quantizers.sensitivity`) and the planning time.

    python benchmarks/int8_methods.py --fixture sac-halfcheetah:HalfCheetah-v5 --episodes 20 \\
        --methods default,gptq,brecq --out benchmarks/results/int8_methods.md

Rows are appended to ``--out`` (markdown) and, one JSON object per row, to ``--jsonl``
(benchmarks/objective.py reads those for the rank correlations).
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

ALL_INT8: dict[str, Any] = {"fp16_fallback": 0, "keep_float": (), "dynamic": False}

#: name -> recipe overrides on top of the env's recipe (every one all-INT8, TensorRT-compatible).
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "single-start": {"auto_starts": "recipe"},  # the per-layer search from the recipe's start only (before)
    "plain": {"transform": "none", "alpha": None, "auto": False, "rounding": "nearest", "bias_correction": False,
              "tail_weight": 0.0, "tail_on_calibration_states": False},
    "nearest": {"rounding": "nearest"},
    "stochastic": {"rounding": "stochastic"},
    "gptq": {"rounding": "gptq"},
    "brecq": {"rounding": "brecq"},
    "gptq+brecq": {"rounding": "gptq+brecq"},
    "adaround+brecq": {"rounding": "adaround+brecq"},
    "brecq-200": {"rounding": "brecq", "reconstruct_iters": 200},
    "adaround+brecq-200": {"rounding": "adaround+brecq", "reconstruct_iters": 200},
    "brecq-long": {"rounding": "brecq", "reconstruct_iters": 2000, "reconstruct_seconds": 240.0},
    "equalize-all": {"transform": "equalize", "transform_layers": "all", "alpha": 0.5, "auto": False},
    "crossquant-all": {"transform": "crossquant", "transform_layers": "all", "alpha": 0.0, "auto": False},
    "brecq+critic": {"rounding": "brecq", "objective": "critic"},
    # outlier channel splitting (edgeq.quantizers.split): up to 5% / 10% of each hidden width added
    "split": {"split_outliers": 0.05},
    "split-10": {"split_outliers": 0.1},
    "split+brecq": {"split_outliers": 0.05, "rounding": "adaround+brecq"},
    # NoisyQuant (edgeq.quantizers.noisy): fixed noise before each input quantizer, removed through the bias
    "noisy": {"noisy_bias": True},
    "noisy+split": {"noisy_bias": True, "split_outliers": 0.05},
    # DiscQuant (edgeq.quantizers.reconstruct METHODS): relaxed rounding of every layer against the float actions
    "discquant": {"rounding": "discquant"},
    "adaround+discquant": {"rounding": "adaround+discquant"},
    "split+discquant": {"rounding": "adaround+discquant", "split_outliers": 0.05},
    # AffineQuant on the observation input (edgeq.quantizers.affine): learned scale + shift, folded exactly
    "affine": {"affine_input": True},
    "affine+split": {"affine_input": True, "split_outliers": 0.05},
    "default+critic": {"objective": "critic"},
    # deliberately coarse: development stand-ins for a hard layer (max calibrator, no first-layer fix)
    "coarse": {"transform": "none", "alpha": None, "auto": False, "rounding": "nearest", "bias_correction": False,
               "calibrator": "max", "calibrator_params": {}},
    "coarse+gptq": {"transform": "none", "alpha": None, "auto": False, "rounding": "gptq", "bias_correction": False,
                    "calibrator": "max", "calibrator_params": {}},
    "coarse+brecq": {"transform": "none", "alpha": None, "auto": False, "rounding": "brecq",
                     "bias_correction": False, "calibrator": "max", "calibrator_params": {}},
    "coarse+gptq+brecq": {"transform": "none", "alpha": None, "auto": False, "rounding": "gptq+brecq",
                          "bias_correction": False, "calibrator": "max", "calibrator_params": {}},
}


def method_config(config: Any, method: str) -> Any:
    """``config`` (a :class:`edgeq.config.QuantizeConfig`) with the method's overrides, all-INT8."""
    section = {"calibrator": "calibration", "calibrator_params": "calibration"}
    over = {f"{section.get(k, 'quantization')}.{k}": v for k, v in {**METHODS[method], **ALL_INT8}.items()}
    return config.with_overrides(over)


def _fixture_path(name: str) -> Path:
    for cand in (ROOT / "tests" / "fixtures" / "policies" / f"{name}.zip",
                 Path("/work/main/tests/fixtures/policies") / f"{name}.zip",
                 Path("/work/wt-me/tests/fixtures/policies") / f"{name}.zip"):  # fixtures still being committed
        if cand.exists():
            return cand
    raise SystemExit(f"fixture {name!r}: no tests/fixtures/policies/{name}.zip")


class Fixture:
    """A fixture loaded and calibrated once (the recipe's seeds, as ``edgeq quantize``)."""

    def __init__(self, name: str, env: str) -> None:
        from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
        from edgeq.config import QuantizeConfig
        from edgeq.envs import env_factory
        from edgeq.ingest import load_policy
        from edgeq.ingest.onnx_policy import bind_env_spaces

        self.name, self.env = name, env
        self.path = _fixture_path(name)
        vecnorm = self.path.with_suffix("") / "vecnormalize.pkl"
        self.config = QuantizeConfig.from_recipe(None, "cpu-ort", env=env)
        fp = load_policy(self.path, vecnormalize=vecnorm if vecnorm.exists() else None)
        self.make_env = env_factory(env)
        probe = self.make_env()
        try:
            fp = bind_env_spaces(fp, probe.observation_space, probe.action_space)
            self.ep_len = probe.spec.max_episode_steps if probe.spec else None
        finally:
            probe.close()
        self.fp = fp
        from edgeq.ingest.sb3_critic import load_sb3_critic

        self.critic = load_sb3_critic(self.path, vecnormalize=vecnorm if vecnorm.exists() else None)
        c = self.config.calibration
        hold = list(range(c.seed + c.episodes, c.seed + c.episodes + c.holdout_episodes))
        t0 = time.perf_counter()
        self.stats = calibrate_rollouts(fp, self.make_env, list(range(c.seed, c.seed + c.episodes)),
                                        noise=ExplorationNoise(c.exploration.gaussian, c.exploration.epsilon),
                                        num_envs=c.num_envs, holdout_seeds=hold)
        self.calib_s = time.perf_counter() - t0


def run_method(fx: Fixture, method: str, episodes: str, tmp: Path, first_seed: int = 0,
               max_episodes: int = 200) -> dict[str, Any]:
    import onnx

    from edgeq.export.qdq import apply_plan
    from edgeq.quantizers.build import build_plan
    from edgeq.quantizers.evaluate import action_half_range
    from edgeq.validate.outcomes import parse_failure
    from edgeq.validate.sequential import episode_design
    from edgeq.validate.validator import ValidationOptions, validate_models

    opts = method_config(fx.config, method).quant_options()
    t0 = time.perf_counter()
    hr = action_half_range(fx.fp.action_space.low_array, fx.fp.action_space.high_array)
    plan = build_plan(fx.fp.model, fx.stats, opts, lower=apply_plan, half_range=hr, critic=fx.critic)
    plan_s = time.perf_counter() - t0
    assert all(la.precision == "int8" for la in plan.layers), "every layer must be INT8"
    qmodel = apply_plan(fx.fp.model, plan)
    fpath, qpath = tmp / f"{fx.name}.fp32.onnx", tmp / f"{fx.name}.{method}.int8.onnx"
    onnx.save(fx.fp.model, str(fpath))
    onnx.save(qmodel, str(qpath))
    design = episode_design(episodes, max_episodes=max_episodes)
    n_seeds = design.max_episodes if design.sequential else int(episodes)
    vopts = ValidationOptions(targets=("cpu",), floor_draws=0, sensitivity=False, per_layer=False, latency_calls=0,
                              design=design, failure=parse_failure(fx.config.validation.failure))
    io = {"input": fx.fp.input_name, "output": fx.fp.output_name, "state": []}
    t0 = time.perf_counter()
    val = validate_models(fpath, qpath, io, fx.make_env, list(range(first_seed, first_seed + n_seeds)), env_id=fx.env,
                          action_low=fx.fp.action_space.low_array, action_high=fx.fp.action_space.high_array,
                          options=vopts, episode_steps=fx.ep_len)
    cpu = val["targets"]["cpu"]
    f = np.asarray(cpu["float"]["returns"], np.float64)
    q = np.asarray(cpu["int8"]["returns"], np.float64)
    vd = cpu["verdict"]
    ha = plan.metrics["heldout_action_error"]
    row = {"fixture": fx.name, "env": fx.env, "method": method, "file": "policy.int8.onnx (every layer W8A8)",
           "target": "cpu (onnxruntime)", "episodes": int(len(f)), "first_seed": first_seed,
           "float_mean": float(f.mean()), "int8_mean": float(q.mean()),
           "kept": 1.0 + float((q - f).mean()) / abs(float(f.mean())),
           "ci": vd["returns"].get("interval"), "verdict": vd.get("status"),
           "failures": {"float": vd["failures"].get("float_failures"), "int8": vd["failures"].get("int8_failures")},
           "heldout_mean": ha["mean"], "heldout_score": ha["score"], "heldout_weighted": ha.get("weighted_mean"),
           "critic_value_loss": plan.metrics.get("critic_value_loss", {}).get("relative"),
           "plan_s": round(plan_s, 1), "validate_s": round(time.perf_counter() - t0, 1),
           "stages": {k: v.get("kept") for k, v in plan.metrics.get("stages", {}).items()},
           "outlier_split_kept": plan.metrics.get("outlier_split", {}).get("kept"),
           "added_units": sum(len(sp.units) for sp in plan.splits),
           "verdict_raw": vd}
    return row


def _fmt_ci(row: dict[str, Any]) -> str:
    ci = row["ci"]
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        fm = abs(row["float_mean"])
        return f"[{100 * (1 + ci[0] / fm):.2f}%, {100 * (1 + ci[1] / fm):.2f}%]"
    return str(ci)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", action="append", required=True, help="NAME:ENV (repeatable)")
    ap.add_argument("--methods", default="default,gptq,brecq")
    ap.add_argument("--episodes", default="20")
    ap.add_argument("--max-episodes", type=int, default=200, help="cap of --episodes auto (edgeq's default: 200)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="validation seeds start here (e.g. 1000: a confirmation on seeds no earlier run used)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_methods.md"))
    ap.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "int8_methods.jsonl"))
    args = ap.parse_args()
    command = "python benchmarks/int8_methods.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; expected some of {sorted(METHODS)}")
    for spec in args.fixture:
        name, env = spec.split(":", 1)
        fx = Fixture(name, env)
        seeds = f", validation seeds from {args.first_seed}" if args.first_seed else ""
        lines = [f"### {name} on {env}: `policy.int8.onnx` (every layer W8A8) on ONNX Runtime CPU, "
                 f"episodes {args.episodes}{seeds}", "", f"Command: `{command}`", "",
                 "| method | float mean | int8 mean | kept | 95% CI of kept | verdict | failures float/int8 | "
                 "held-out action error (mean / score / critic-weighted) | plan s |",
                 "|---|---|---|---|---|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as td:
            for m in methods:
                row = run_method(fx, m, args.episodes, Path(td), args.first_seed, args.max_episodes)
                row["command"] = command
                Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(row, default=float) + "\n")
                w = row["heldout_weighted"]
                ep = f" ({row['episodes']} ep)" if args.episodes == "auto" else ""
                lines.append(f"| {m} | {row['float_mean']:.1f} | {row['int8_mean']:.1f} | {100 * row['kept']:.2f}% | "
                             f"{_fmt_ci(row)} | {row['verdict']}{ep} | "
                             f"{row['failures']['float']}/{row['failures']['int8']}"
                             f" | {row['heldout_mean']:.4f} / {row['heldout_score']:.4f} / "
                             f"{'-' if w is None else f'{w:.4g}'} | {row['plan_s']} |")
                print(lines[-1], flush=True)
        append_section(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
