"""Calibration benchmark: edgeq's calibrators and quantizers next to ONNX Runtime's ``quantize_static``.

For every fixture (trained policy + its gymnasium env) and every configuration, one row:

* **edgeq rows** run ``edgeq.pipeline.quantize`` (what ``edgeq quantize`` does) with the fixture's
  calibration recipe and the row's overrides (activation calibrator, weight quantizer and, when
  this checkout has them, the later quantization stages), validated on ``--episodes`` paired
  episodes (seeds 0..N-1) with the validation extras off (no noise floor, per-layer or latency);
* **ONNX Runtime rows** quantize the same float graph (the bundle's ``policy.fp32.onnx``) with
  ``onnxruntime.quantization.quantize_static``, calibrated on exactly the states edgeq's default
  calibration visits (same seeds, same exploration noise, every step), then are validated on the
  same paired episodes by the same validator.

Reported per row: float and int8 mean return, the fraction of the return kept
(``1 + mean(int8 - float) / |mean(float)|``: int8/float for positive returns, and still "higher is
better" for negative ones such as Pendulum's), the paired difference with its bootstrap 95% CI, the
action error on the float policy's trajectory (mean and max |Δa|), calibration time (rollouts) and
quantization time, the peak resident memory of calibration + quantization, and the number of
TensorRT QDQ rule errors/warnings of the INT8 graph (``edgeq check``).

Every row runs in its own Python process so its peak memory is its own: the child resets the
kernel's RSS high-water mark (``/proc/self/clear_refs``) just before calibration starts and reads
``VmHWM`` when validation starts.

    PYTHONPATH=. python benchmarks/calibration_table.py --episodes 20 \\
        --memory-json /tmp/calib-bench/memory.json --out benchmarks/results/calibration.md

``--fixtures``/``--configs`` pick subsets (comma lists of the names below); ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fixture:
    """A trained policy file and the env it acts in."""

    name: str
    policy: str  # relative to the repository root
    env: str
    note: str = ""

    @property
    def path(self) -> Path:
        return ROOT / self.policy


FIXTURES: dict[str, Fixture] = {f.name: f for f in (
    Fixture("sac-pendulum", "tests/fixtures/policies/sac-pendulum.zip", "Pendulum-v1", "SAC [256, 256]"),
    Fixture("sac-halfcheetah", "tests/fixtures/policies/sac-halfcheetah.zip", "HalfCheetah-v5", "SAC [256, 256]"),
    Fixture("crossq-pendulum", "tests/fixtures/policies/crossq-pendulum.zip", "Pendulum-v1",
            "sb3-contrib CrossQ, BatchRenorm folded"),
    Fixture("ppo-halfcheetah-vecnorm", "tests/fixtures/policies/ppo-halfcheetah-vecnorm.zip", "HalfCheetah-v5",
            "PPO [256, 256] ReLU + VecNormalize (ppo-halfcheetah-vecnorm/vecnormalize.pkl)"),
    Fixture("ppo-pendulum-sb3-1x", "tests/fixtures/sb3-1x/sb3-1x-ppo-Pendulum-v1.zip", "Pendulum-v1",
            "legacy SB3 1.x PPO (RL Zoo)"),
    Fixture("sac-pendulum-isaac", "tests/fixtures/onnx/sac-pendulum-isaac.onnx", "Pendulum-v1",
            "Isaac-Lab-style policy.onnx (opset 11, batch 1, normalizer)"),
    Fixture("sac-halfcheetah-isaac", "tests/fixtures/onnx/sac-halfcheetah-isaac.onnx", "HalfCheetah-v5",
            "Isaac-Lab-style policy.onnx (opset 11, batch 1, normalizer)"),
)}


@dataclass(frozen=True)
class Config:
    """One quantization setting: edgeq recipe overrides, or ONNX Runtime ``quantize_static`` arguments."""

    name: str
    kind: str  # "edgeq" | "ort"
    settings: dict[str, Any] = field(default_factory=dict)
    describe: str = ""
    headline: bool = False
    plain: bool = True  # edgeq rows: start from PLAIN_STAGES (False: from the shipped recipe)
    shipped_cpu_file: bool = False  # edgeq rows: the shipped cpu-ort profile (else every layer int8 on the CPU)


def _edgeq(name: str, describe: str, headline: bool = False, plain: bool = True, **overrides: Any) -> Config:
    return Config(name, "edgeq", overrides, describe, headline, plain)


#: Recipe fields that turn the later quantization stages off. Every edgeq row but "edgeq default"
#: starts from these (where this checkout's recipe has the field), so a row measures its own
#: setting, not whatever else the shipped recipe turns on.
PLAIN_STAGES: dict[str, Any] = {"transform": "none", "dynamic": False, "auto": False, "rounding": "nearest",
                                "bias_correction": False, "fp16_fallback": 0}


#: edgeq rows: overrides of the fixture's calibration recipe (recipe fields,
#: ``edgeq.config.RECIPE_FIELDS``). A row whose fields this checkout's recipe does not have is skipped and listed.
EDGEQ_CONFIGS: list[Config] = [
    _edgeq("edgeq default", "the recipe as shipped (calibration/<env>.yaml, else default.yaml, over the "
           "QuantizeConfig defaults)", headline=True, plain=False),
    Config("edgeq default (shipped CPU file)", "edgeq", {},
           "the shipped recipe and the shipped cpu-ort profile: policy.int8.cpu.onnx as edgeq.deploy runs it on a "
           "CPU (layers narrower than cpu_float_below = 32, i.e. the observation and action layers, in float on "
           "their int8 weights)", headline=True, plain=False, shipped_cpu_file=True),
    _edgeq("edgeq default without fp16", "the shipped recipe with fp16_fallback 0 (all layers int8)", plain=False,
           fp16_fallback=0),
    *[_edgeq(f"{cal} / w-{wm}", f"activations {cal} (per tensor), weights per-channel {wm}, later stages off",
             calibrator=c, calibrator_params=p, weight_method=wm)
      for c, p, cal in (("max", {}, "max"),
                        ("percentile", {"percentile": 99.9}, "p99.9"),
                        ("percentile", {"percentile": 99.99}, "p99.99"),
                        ("percentile", {"percentile": 99.999}, "p99.999"),
                        ("mse", {}, "mse"),
                        ("entropy", {}, "entropy"))
      for wm in ("absmax", "mse")],
]

#: One quantization stage at a time (CrossQuant, equalization, per-layer automatic choice, AdaRound,
#: bias correction, fp16 fallback) on top of PLAIN_STAGES and the recipe's calibrator; skipped where
#: this checkout's recipe lacks the fields.
EDGEQ_STAGE_CONFIGS: list[Config] = [
    _edgeq("CrossQuant static a=0.15 (first layer)", "static CrossQuant, alpha 0.15 (the paper's), on the layer "
           "reading the observation", transform="crossquant", transform_layers="first", alpha=0.15),
    _edgeq("CrossQuant static a=0 (first layer)", "static CrossQuant, alpha 0 (per-column scales folded into the "
           "weights), first layer", transform="crossquant", transform_layers="first", alpha=0.0),
    _edgeq("CrossQuant static a=0.15 (all layers)", "static CrossQuant, alpha 0.15, every layer",
           transform="crossquant", transform_layers="all", alpha=0.15),
    _edgeq("CrossQuant dynamic a=0.15 (first layer)", "CrossQuant's dynamic form (run-time row scales; ORT CPU "
           "only, not TensorRT), first layer", dynamic=True, transform_layers="first", alpha=0.15),
    _edgeq("equalization a=0.5 (first layer)", "SmoothQuant-style equalization, alpha 0.5, first layer",
           transform="equalize", transform_layers="first", alpha=0.5),
    _edgeq("equalization a=0.5 (all layers)", "SmoothQuant-style equalization, alpha 0.5, every layer",
           transform="equalize", transform_layers="all", alpha=0.5),
    _edgeq("per-layer auto", "each layer's calibrator and rewrite chosen by the held-out action error", auto=True),
    _edgeq("AdaRound", "AdaRound-style weight rounding (kept where it lowers the held-out error)",
           rounding="adaround"),
    _edgeq("bias correction", "empirical bias correction (kept where it lowers the held-out error)",
           bias_correction=True),
    _edgeq("fp16 fallback (<= 1 layer)", "at most one layer in fp16 while the held-out error stays above "
           "max_action_error", fp16_fallback=1),
    _edgeq("auto + AdaRound + bias corr.", "per-layer auto choice, AdaRound and bias correction, no fp16",
           auto=True, rounding="adaround", bias_correction=True),
]

_TRT_STYLE = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QInt8", "weight_type": "QInt8",
              "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}}

#: ONNX Runtime rows: keyword arguments of ``quantize_static`` (enum members by name).
ORT_CONFIGS: list[Config] = [
    Config("ORT default", "ort", {}, "quantize_static defaults: QDQ, per-tensor, QInt8/QInt8, MinMax, int32 bias, "
           "all supported op types", headline=True),
    Config("ORT TensorRT-style", "ort", dict(_TRT_STYLE),
           "QDQ, per_channel, QInt8/QInt8, ActivationSymmetric, WeightSymmetric, QuantizeBias=False, MinMax",
           headline=True),
    Config("ORT TRT-style MatMul/Gemm only", "ort", {**_TRT_STYLE, "op_types_to_quantize": ["MatMul", "Gemm"]},
           "as TensorRT-style, quantizing only the weighted layers (as edgeq does)"),
    Config("ORT TRT-style Percentile", "ort", {**_TRT_STYLE, "calibrate_method": "Percentile"},
           "as TensorRT-style, calibrate_method=Percentile (99.999)"),
    Config("ORT TRT-style Entropy", "ort", {**_TRT_STYLE, "calibrate_method": "Entropy"},
           "as TensorRT-style, calibrate_method=Entropy"),
]


#: Reference rows, no quantization: the float policy itself with i.i.d. Gaussian action noise
#: (``sigma`` × the action half-range, ``draws`` draws averaged per seed). On chaotic tasks a
#: return moves under any perturbation; these rows show how much for errors of the size int8 makes.
NOISE_CONFIGS: list[Config] = [
    Config(f"float + noise {sigma:g}", "noise", {"sigma": sigma, "draws": 3},
           f"reference, no quantization: the float policy with Gaussian action noise of std {sigma:g} × the action "
           "half-range (3 draws, returns averaged per seed)", headline=sigma == 0.01)
    for sigma in (0.003, 0.01)
]


def all_configs() -> list[Config]:
    configs = [*EDGEQ_CONFIGS, *EDGEQ_STAGE_CONFIGS, *ORT_CONFIGS, *NOISE_CONFIGS]
    assert not any("," in c.name for c in configs), "configuration names are picked by comma lists"
    return configs


def recipe_fields() -> set[str]:
    from edgeq.config import RECIPE_FIELDS

    return set(RECIPE_FIELDS)


def unsupported_fields(config: Config) -> list[str]:
    """Recipe fields ``config`` sets that this checkout's recipes lack."""
    if config.kind != "edgeq":
        return []
    return sorted(set(config.settings) - recipe_fields())


# ---------------------------------------------------------------------------------------------
# Memory: the kernel's RSS high-water mark of this process
# ---------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class PeakRss:
    """Peak RSS between :meth:`start` (resets the high-water mark) and :meth:`stop` (Linux only)."""

    def __init__(self) -> None:
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.reset = False

    def start(self) -> None:
        """Reset the high-water mark to the current RSS (``/proc/self/clear_refs``) and note that RSS.

        Where the reset is not allowed the peak is the process's since it started (``reset`` False).
        """
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
        self.start_bytes = _status_kib("VmRSS") * 1024
        self.peak_bytes = None

    def stop(self) -> None:
        if self.start_bytes is not None and self.peak_bytes is None:
            # the kernel updates VmHWM lazily: just after the reset it can read below the RSS measured then
            self.peak_bytes = max(_status_kib("VmHWM"), _status_kib("VmRSS")) * 1024
            self.peak_bytes = max(self.peak_bytes, self.start_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"rss_at_start_mib": None if self.start_bytes is None else self.start_bytes / MiB,
                "peak_rss_mib": None if self.peak_bytes is None else self.peak_bytes / MiB,
                "peak_increase_mib": (None if self.peak_bytes is None or self.start_bytes is None
                                      else (self.peak_bytes - self.start_bytes) / MiB),
                "high_water_mark_reset": self.reset}


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------
def light_validation(num_envs: int = 8) -> Any:
    """The validator with its extras off: paired rollouts and action error only."""
    from edgeq.validate.validator import ValidationOptions

    return ValidationOptions.light(targets=("cpu",), floor_draws=0, per_layer=False, latency_calls=0,
                                   num_envs=num_envs)


def trt_check(path: Path) -> dict[str, Any]:
    """``edgeq check``: TensorRT QDQ rule errors and warnings of an ONNX file."""
    from edgeq.export.trt_rules import check_qdq_model

    violations = check_qdq_model(path)
    errors = [v for v in violations if v.severity == "error"]
    warnings = [v for v in violations if v.severity != "error"]
    return {"errors": len(errors), "warnings": len(warnings),
            "rules": sorted({f"{v.severity}:{v.rule}" for v in violations})}


def summarize_validation(val: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers from a ``validation.json`` (cpu target)."""
    c = val["targets"]["cpu"]
    d = c["paired_difference"]
    ae = c["action_error"]["on_float_trajectory"]
    return {"episodes": len(val["seeds"]), "float_mean": c["float"]["mean"], "float_std": c["float"]["std"],
            "int8_mean": c["int8"]["mean"], "int8_std": c["int8"]["std"], "diff_mean": d["mean"],
            "diff_ci95": d["ci95"], "kept": 1.0 + d["relative_mean"], "ratio_of_means": d["ratio_of_means"],
            "action_err_mean": ae["mean_abs"], "action_err_max": ae["max_abs"],
            "action_err_p99": ae["p99_step_max_abs"], "float_returns": c["float"]["returns"],
            "int8_returns": c["int8"]["returns"]}


def _profile_for(config: Config) -> Any:
    """The export profile of an edgeq row: ``cpu-ort`` with every layer INT8 on the CPU too (the arithmetic of
    ``policy.int8.onnx`` / TensorRT, so rows compare quantizers), or as shipped for ``shipped_cpu_file`` rows."""
    from dataclasses import replace

    from edgeq.config import load_profile

    shipped = load_profile("cpu-ort")
    return shipped if config.shipped_cpu_file else replace(shipped, cpu_float_below=0)


def _recipe_for(fixture: Fixture, config: Config | None) -> Any:
    """The fixture's shipped recipe (a :class:`~edgeq.config.QuantizeConfig`); for ``plain`` rows with the later
    stages off; then the row's settings."""
    from edgeq.config import RECIPE_FIELDS, QuantizeConfig

    recipe = QuantizeConfig.from_recipe(None, env=fixture.env)
    if config is None:
        return recipe
    known = recipe_fields()
    plain = {k: v for k, v in PLAIN_STAGES.items() if k in known} if config.plain else {}
    return recipe.with_overrides({RECIPE_FIELDS[k]: v for k, v in {**plain, **config.settings}.items()})


def run_edgeq_row(fixture: Fixture, config: Config, episodes: int, work: Path, num_envs: int = 8) -> dict[str, Any]:
    """``edgeq.pipeline.quantize`` with ``config``'s recipe; times and memory of calibration + quantization."""
    from edgeq.pipeline import quantize

    recipe = _recipe_for(fixture, config)
    mem = PeakRss()

    def progress(stage: str, total: int | None) -> Callable[[int], None]:
        if stage == "calibrate":
            mem.start()
        elif stage.startswith("cpu:"):  # the validator's first stage: calibration and export are done
            mem.stop()
        return lambda n: None

    bundle = work / "bundle"
    t0 = time.perf_counter()
    result = quantize(fixture.path, fixture.env, bundle, dataclasses.replace(recipe, export=_profile_for(config)),
                      episodes=episodes, seed=0, num_envs=num_envs, validation=light_validation(num_envs), report=False,
                      overwrite=True, progress=progress)
    wall = time.perf_counter() - t0
    mem.stop()
    q = result.manifest.get("quantization", {})
    row = {"timings": result.timings, "wall_s": wall, "memory": mem.to_json(),
           "calibration_steps": result.manifest["calibration"]["steps"],
           "recipe": result.manifest["calibration"]["recipe"], "plan_settings": q.get("settings", {}),
           "precisions": [layer.get("precision") for layer in q.get("layers", [])],
           "check": trt_check(bundle / "policy.int8.onnx"),
           "int8_size": (bundle / "policy.int8.onnx").stat().st_size,
           **summarize_validation(result.validation)}
    return row


def bound_policy(fixture: Fixture) -> tuple[Any, Callable[[], Any], int | None]:
    """The float policy as ``edgeq quantize`` sees it (ingested, bound to the env's spaces)."""
    from edgeq.envs import env_factory
    from edgeq.ingest import load_policy
    from edgeq.ingest.onnx_policy import bind_env_spaces

    fp = load_policy(fixture.path)
    make_env = env_factory(fixture.env)
    probe = make_env()
    try:
        fp = bind_env_spaces(fp, probe.observation_space, probe.action_space)
        steps = getattr(getattr(probe, "spec", None), "max_episode_steps", None)
    finally:
        probe.close()
    return fp, make_env, steps


def calibration_states(fp: Any, make_env: Callable[[], Any], config: Any, num_envs: int = 8,
                       holdout: bool = True) -> Any:
    """Every state edgeq's calibration rollouts visit: the calibration episodes, then (``holdout``) the
    held-out episodes, with the same seeds, exploration noise and noise streams as
    :func:`edgeq.calibration.collect.calibrate_rollouts` called by the pipeline.

    edgeq's observers see the first part; its per-layer decisions are scored on the second. ONNX
    Runtime's calibrator gets both: every state edgeq's calibration looked at.
    """
    import numpy as np

    from edgeq.calibration.collect import ExplorationNoise
    from edgeq.deploy.runtime import OrtPolicy
    from edgeq.rollout import run_episodes

    recipe = config.calibration  # the calibration section of an edgeq.config.QuantizeConfig
    seeds = list(range(recipe.seed, recipe.seed + recipe.episodes))
    n_hold = max(0, int(recipe.holdout_episodes)) if holdout else 0
    held = list(range(recipe.seed + recipe.episodes, recipe.seed + recipe.episodes + n_hold))
    noise = ExplorationNoise(**recipe.exploration.to_dict())
    hold_cfg = recipe.holdout_exploration
    hold_noise = noise if hold_cfg is None else ExplorationNoise(**hold_cfg.to_dict())
    low, high = fp.action_space.low_array.ravel(), fp.action_space.high_array.ravel()
    rows: list[np.ndarray] = []

    def record(obs: np.ndarray, actions: np.ndarray, active: np.ndarray) -> None:
        rows.append(obs[np.asarray(active, bool)].copy())

    for ep_seeds, ep_noise, noise_seed in ((seeds, noise, seeds[0]), (held, hold_noise, held[0] + 1 if held else 0)):
        if not ep_seeds:
            continue
        actor = OrtPolicy(fp.model.SerializeToString(), input_name=fp.input_name, output_name=fp.output_name,
                          state=[s.to_json() for s in fp.state])
        run_episodes(make_env, actor, ep_seeds, num_envs=min(num_envs, recipe.num_envs), on_step=record,
                     perturb=ep_noise.make(low, high), noise_seed=int(noise_seed),
                     max_steps_per_episode=recipe.max_steps_per_episode)
    return np.concatenate(rows).astype(np.float32)


def equal_batch(n: int, largest: int = 256) -> int:
    """The largest batch size <= ``largest`` that splits ``n`` rows into equal batches.

    ONNX Runtime's histogram calibrators (Percentile, Entropy) stack the batches' outputs and fail on
    a shorter last batch, so every batch has the same size (no row dropped or repeated).
    """
    return next(b for b in range(min(largest, n), 0, -1) if n % b == 0)


def ort_quantize(fp32: Path, out: Path, observations: Any, input_name: str, settings: dict[str, Any],
                 batch: int = 256) -> None:
    """``onnxruntime.quantization.quantize_static`` of ``fp32`` calibrated on ``observations``."""
    batch = equal_batch(len(observations), batch)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[Any] = (observations[i:i + batch] for i in range(0, len(observations), batch))

        def get_next(self) -> dict[str, Any] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {input_name: chunk}

    kwargs = dict(settings)
    enums = {"quant_format": QuantFormat, "activation_type": QuantType, "weight_type": QuantType,
             "calibrate_method": CalibrationMethod}
    for key, enum in enums.items():
        if key in kwargs:
            kwargs[key] = enum[kwargs[key]]
    quantize_static(str(fp32), str(out), Reader(), **kwargs)


def run_ort_row(fixture: Fixture, config: Config, episodes: int, work: Path, num_envs: int = 8) -> dict[str, Any]:
    """ONNX Runtime's static quantizer on the bundle's float graph and edgeq's calibration states."""
    import numpy as np

    from edgeq.validate.validator import validate_models

    fp, make_env, ep_len = bound_policy(fixture)
    recipe = _recipe_for(fixture, None)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "policy.fp32.onnx"
    fp32.write_bytes(fp.model.SerializeToString(deterministic=True))  # what the bundle stores
    out = work / "policy.ort-int8.onnx"
    mem = PeakRss()
    mem.start()
    t0 = time.perf_counter()
    states = calibration_states(fp, make_env, recipe, num_envs)
    rollouts_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ort_quantize(fp32, out, states, fp.input_name, config.settings)
    quantize_s = time.perf_counter() - t0
    mem.stop()
    io = {"input": fp.input_name, "output": fp.output_name, "state": [s.to_json() for s in fp.state]}
    val = validate_models(fp32, out, io, make_env, list(range(episodes)), env_id=fixture.env,
                          action_low=np.asarray(fp.action_space.low_array, np.float64),
                          action_high=np.asarray(fp.action_space.high_array, np.float64),
                          options=light_validation(num_envs), episode_steps=ep_len)
    return {"timings": {"calibration_s": rollouts_s, "quantize_s": quantize_s}, "memory": mem.to_json(),
            "calibration_steps": int(len(states)), "check": trt_check(out), "int8_size": out.stat().st_size,
            **summarize_validation(val)}


def run_noise_row(fixture: Fixture, config: Config, episodes: int, work: Path, num_envs: int = 8) -> dict[str, Any]:
    """The float policy with Gaussian action noise vs itself without, paired on the same seeds."""
    import numpy as np

    from edgeq.rollout import run_episodes
    from edgeq.validate.noise import perturbed_returns
    from edgeq.validate.stats import describe, paired_difference
    from edgeq.validate.targets import make_runtime

    fp, make_env, _ = bound_policy(fixture)
    io = {"input": fp.input_name, "output": fp.output_name, "state": [s.to_json() for s in fp.state]}
    rt = make_runtime("cpu", fp.model.SerializeToString(), io, precision="fp32")
    seeds = list(range(episodes))
    low, high = fp.action_space.low_array.ravel(), fp.action_space.high_array.ravel()
    sigma, draws = float(config.settings["sigma"]), int(config.settings["draws"])
    ref = run_episodes(make_env, rt, seeds, num_envs=num_envs).returns
    noisy = perturbed_returns(make_env, rt, seeds, sigma=sigma, draws=draws, low=low, high=high, num_envs=num_envs,
                              draw_seed=30_000)
    cand = noisy.mean(axis=0)
    d = paired_difference(ref, cand)
    f, q = describe(ref), describe(cand)
    half = np.where(np.isfinite(high - low), (high - low) / 2, 1.0)
    per_draw_kept = [1.0 + float((row - ref).mean()) / (abs(float(ref.mean())) or 1.0) for row in noisy]
    return {"episodes": len(seeds), "float_mean": f["mean"], "float_std": f["std"], "int8_mean": q["mean"],
            "int8_std": q["std"], "diff_mean": d["mean"], "diff_ci95": d["ci95"], "kept": 1.0 + d["relative_mean"],
            "ratio_of_means": d["ratio_of_means"], "kept_per_draw": per_draw_kept,
            # E|N(0, s)| = s * sqrt(2 / pi), before clipping to the bounds
            "action_err_mean": float(sigma * half.mean() * np.sqrt(2 / np.pi)), "action_err_max": None,
            "float_returns": [float(x) for x in ref], "int8_returns": [float(x) for x in cand],
            "draw_returns": [[float(x) for x in row] for row in noisy]}


def run_row(fixture: Fixture, config: Config, episodes: int, work: Path, num_envs: int = 8) -> dict[str, Any]:
    """One row, in this process. Failures become a row with ``error`` (the table shows them)."""
    base = {"fixture": fixture.name, "env": fixture.env, "config": config.name, "kind": config.kind,
            "settings": config.settings, "describe": config.describe, "headline": config.headline}
    missing = unsupported_fields(config)
    if missing:
        return {**base, "skipped": f"this checkout's recipes have no field(s) {missing}"}
    try:
        fn = {"edgeq": run_edgeq_row, "ort": run_ort_row, "noise": run_noise_row}[config.kind]
        return {**base, **fn(fixture, config, episodes, work, num_envs)}
    except Exception as exc:  # noqa: BLE001 - a failing configuration is a result, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {**base, "error": f"{type(exc).__name__}: {first}"}


def run_row_subprocess(fixture: str, config: str, episodes: int, work: Path, num_envs: int = 8,
                       timeout: float | None = None) -> dict[str, Any]:
    """:func:`run_row` in a fresh Python process (its own peak memory); adds the child's max RSS."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "row.json"
    log = work / "row.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "row", "--fixture", fixture, "--config", config,
           "--episodes", str(episodes), "--num-envs", str(num_envs), "--work", str(work), "--row-json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    if out.is_file():
        row: dict[str, Any] = json.loads(out.read_text())
    else:
        tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
        row = {"fixture": fixture, "config": config, "error": f"process exited {proc.returncode}: " + " | ".join(tail)}
    row["process_wall_s"] = wall
    return row


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _return(mean: float | None, std: float | None) -> str:
    return "—" if mean is None else f"{mean:.1f} ± {std:.1f}"


def worst_episode(r: dict[str, Any]) -> float | None:
    """The worst paired episode: min over seeds of (int8 − float), as a fraction of |mean float return|."""
    f, q = r.get("float_returns"), r.get("int8_returns")
    if not f or not q:
        return None
    denom = abs(sum(f) / len(f)) or 1.0
    return min(b - a for a, b in zip(f, q, strict=True)) / denom


#: An episode counts as "lost" when its return falls below the float one on the same seed by more
#: than this fraction of |mean float return| (HalfCheetah flipping over, Pendulum failing to swing up).
LOST = 0.10


def lost_episodes(r: dict[str, Any]) -> str:
    """``k/n`` episodes lost (see :data:`LOST`); noise rows count over all their draws."""
    f = r.get("float_returns")
    if not f:
        return "—"
    denom = abs(sum(f) / len(f)) or 1.0
    runs = r.get("draw_returns") or [r["int8_returns"]]
    lost = sum(1 for q in runs for a, b in zip(f, q, strict=True) if b - a < -LOST * denom)
    return f"{lost}/{len(f) * len(runs)}"


def row_cells(r: dict[str, Any], full: bool) -> list[str]:
    n = len(HEAD_FULL if full else HEAD_SHORT)
    if "skipped" in r or "error" in r:
        msg = r.get("skipped") or r.get("error", "")
        return [r["config"], f"**{'skipped' if 'skipped' in r else 'failed'}**: {msg}"] + [""] * (n - 2)
    lo, hi = r["diff_ci95"]
    noise = r.get("kind") == "noise"
    kept = f"{r['kept']:.2%}"
    if noise:
        kept += " (draws " + ", ".join(f"{k:.1%}" for k in r.get("kept_per_draw", [])) + ")"
    c = r.get("check", {})
    cells = [r["config"], _return(r["float_mean"], r["float_std"]), _return(r["int8_mean"], r["int8_std"]), kept,
             f"{r['diff_mean']:+.3g} [{lo:+.3g}, {hi:+.3g}]", f"{_f(worst_episode(r), '+.1%')}", lost_episodes(r),
             ("≈" if noise else "") + f"{r['action_err_mean']:.4f}", _f(r.get("action_err_max"), ".3f"),
             "n/a" if noise else f"{c['errors']}" + (f" ({c['warnings']} warn)" if c["warnings"] else "")]
    if full:
        if noise:
            return cells + [""] * (n - len(cells))
        t, m = r["timings"], r["memory"]
        cells += [f"{t.get('calibration_s', 0):.1f}", f"{t.get('quantize_s', 0):.2f}",
                  f"{_f(m.get('peak_rss_mib'), '.0f')} (+{_f(m.get('peak_increase_mib'), '.0f')})",
                  f"{r.get('int8_size', 0) / 1024:.0f}"]
    return cells


HEAD_FULL = ["config", "float return", "int8 return", "kept", "int8 − float [95% CI]", "worst episode",
             "episodes lost", "act err mean", "act err max", "TRT errors", "calib rollouts (s)", "quantize (s)",
             "peak RSS MiB (+ over start)", "int8 KiB"]
HEAD_SHORT = HEAD_FULL[:10]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]


def memory_section(memory: dict[str, Any]) -> list[str]:
    lines = ["## Calibration peak memory vs calibration steps", "",
             f"Command: `{memory.get('command', '')}`", "", memory.get("description", ""), "",
             "| calibration steps | episodes (+ held out) | envs | calibration (s) | steps/s | RSS before MiB | "
             "calibration peak RSS MiB | peak − before MiB | plan (s) | plan peak RSS MiB | child max RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in memory["runs"]:
        plan_peak = r.get("plan_peak_rss_mib")
        lines.append(f"| {r['steps']:,} | {r['episodes']} (+{r.get('holdout_episodes', 0)}) | {r['num_envs']} | "
                     f"{r['seconds']:.1f} | {r['steps'] / r['seconds']:,.0f} | {r['rss_before_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.1f} | {r['peak_rss_mib'] - r['rss_before_mib']:.1f} | "
                     f"{r.get('plan_s', 0):.1f} | {_f(plan_peak, '.1f')} | {r['child_maxrss_mib']:.1f} |")
    if memory.get("finding"):
        lines += ["", memory["finding"]]
    return lines + [""]


NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the file is regenerated -->", "<!-- /notes -->"


def existing_notes(path: Path) -> str | None:
    """The hand-written notes section of a previous results file, if any."""
    if not path.is_file():
        return None
    text = path.read_text()
    if NOTES_BEGIN not in text or NOTES_END not in text:
        return None
    return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0].strip() or None


def markdown(rows: list[dict[str, Any]], command: str, episodes: int, memory: dict[str, Any] | None = None,
             started: float | None = None, notes: str | None = None) -> str:
    import onnxruntime as ort

    import edgeq

    f_order = {name: i for i, name in enumerate(FIXTURES)}
    c_order = {c.name: i for i, c in enumerate(all_configs())}
    rows = sorted(rows, key=lambda r: (f_order.get(r["fixture"], len(f_order)), c_order.get(r["config"], len(c_order))))
    fixtures = list(dict.fromkeys(r["fixture"] for r in rows))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# Calibration benchmark: edgeq vs ONNX Runtime's quantize_static", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared with other jobs (load average "
             f"{load} at the end), Python {platform.python_version()}, onnxruntime {ort.__version__}, edgeq "
             f"{edgeq.__version__} (git {_git_head()}). One process at a time, one ORT thread."
             + (f" Wall time of this invocation {(time.time() - started) / 60:.0f} min." if started else ""), "",
             f"Every row: {episodes} paired episodes on seeds 0..{episodes - 1} (float and int8 from the same "
             "initial states), the INT8 model run by ONNX Runtime's CPU provider; edgeq rows run every layer in "
             "INT8 there too (export profile `cpu_float_below: 0`: the arithmetic of `policy.int8.onnx`, i.e. of a "
             "TensorRT engine), except **edgeq default (shipped CPU file)**: `policy.int8.cpu.onnx` as edgeq ships "
             "it, with the observation and action layers in float on their int8 weights. **kept** = "
             "1 + mean(int8 − float) / |mean(float)| (= int8/float for positive returns; for Pendulum's negative "
             "returns it is still \"higher is better\", 100% = no loss). Action error = |a_int8 − a_float| on the "
             "states the float policy visits (env action units). **TRT errors** = error-severity violations of "
             "`edgeq check` (TensorRT explicit-quantization rules) on the INT8 graph (edgeq: `policy.int8.onnx`). "
             "**worst episode** = the most negative per-seed int8 − float, over |mean float return| (HalfCheetah "
             "can flip over: one such episode costs ~5% of a 20-episode mean); **episodes lost** = how many "
             "seeds' int8 return is below float's by more than 10% of |mean float return| (noise rows: over all "
             "draws). ONNX Runtime rows quantize the "
             "bundle's `policy.fp32.onnx` and calibrate on every state of edgeq's calibration rollouts (the same "
             "calibration and held-out episodes, seeds and exploration noise). **float + noise σ** rows are a "
             "reference, no quantization: the float policy with i.i.d. Gaussian action noise of std σ × the action "
             "half-range (3 draws averaged per seed; their act err column is E|noise|), i.e. what an action error "
             "of that size does to the return on its own. Times and memory (full tables): calibration rollouts "
             "(calibration + held-out episodes; ORT rows: recording the same states), quantize = the plan's "
             "stages + export + check (ORT: `quantize_static`), peak RSS of the row's process from the start of "
             "calibration to the start of validation (kernel high-water mark, reset at calibration start).", ""]
    lines += ["## Headline: edgeq default vs ONNX Runtime (defaults, TensorRT-style)", "",
              "Per fixture: edgeq's default, ONNX Runtime's `quantize_static` with its defaults and with "
              "TensorRT-style settings, and the reference float + noise 0.01 row.", ""]
    head_rows = [[r["fixture"], *row_cells(r, full=False)] for f in fixtures for r in rows
                 if r["fixture"] == f and r.get("headline")]
    lines += _table(["fixture", *HEAD_SHORT], head_rows) + [""]
    if notes:
        lines += [NOTES_BEGIN, notes.strip(), NOTES_END, ""]
    lines += ["## Overview: return kept (int8 vs float, paired), every configuration × fixture", "",
              "† = the INT8 graph breaks TensorRT rules (`edgeq check` errors); — = failed or not available.", ""]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["fixture"], r["config"]): r for r in rows}
    matrix = []
    for c in configs:
        cells = [c]
        for f in fixtures:
            r = by.get((f, c))
            ok = r is not None and "kept" in r
            broken = r is not None and r.get("check", {}).get("errors")
            cells.append(f"{r['kept']:.1%}{' †' if broken else ''}" if ok else "—")
        matrix.append(cells)
    lines += _table(["config", *fixtures], matrix) + [""]
    lines += ["## Configurations", ""]
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["config"], r.get("describe", ""))
    lines += [f"- **{k}**: {v}" for k, v in seen.items()] + [""]
    for f in fixtures:
        fr = [r for r in rows if r["fixture"] == f]
        fx = FIXTURES.get(f)
        steps = next((r.get("calibration_steps") for r in fr if r.get("calibration_steps")), None)
        lines += [f"## {f} ({fx.env if fx else ''}{', ' + fx.note if fx and fx.note else ''})", "",
                  f"Calibration: {steps if steps is not None else '?'} steps of rollouts.", ""]
        lines += _table(HEAD_FULL, [row_cells(r, full=True) for r in fr]) + [""]
        rules = sorted({rule for r in fr for rule in r.get("check", {}).get("rules", [])})
        if rules:
            lines += ["TensorRT rules broken in this fixture's rows: " + ", ".join(f"`{x}`" for x in rules) + ".", ""]
    if memory:
        lines += memory_section(memory)
    return "\n".join(lines)


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _pick(names: str | None, known: Sequence[str], what: str) -> list[str]:
    if not names:
        return list(known)
    picked = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in picked if n not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; expected some of {list(known)}")
    return picked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    one = sub.add_parser("row", help="run one row in this process (used by the table runner)")
    one.add_argument("--fixture", required=True)
    one.add_argument("--config", required=True)
    one.add_argument("--episodes", type=int, default=20)
    one.add_argument("--num-envs", type=int, default=8)
    one.add_argument("--work", type=Path, required=True)
    one.add_argument("--row-json", type=Path, required=True)
    ap.add_argument("--fixtures", help=f"comma list (default: all present) of {list(FIXTURES)}")
    ap.add_argument("--configs", help="comma list of configuration names (default: all; --list shows them)")
    ap.add_argument("--episodes", type=int, default=20, help="paired validation episodes per row (seeds 0..N-1)")
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--work", type=Path, help="where bundles and per-row JSON go (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration.md")
    ap.add_argument("--json", type=Path, help="also write all rows as JSON here")
    ap.add_argument("--memory-json", type=Path, help="calibration_memory.py's JSON, shown as a section")
    ap.add_argument("--row-timeout", type=float, default=1800.0)
    ap.add_argument("--reuse", type=Path, action="append",
                    help="rows JSON of an earlier run (--json): its successful rows with the same --episodes are "
                         "taken as they are instead of being run again")
    ap.add_argument("--list", action="store_true", help="print fixture and configuration names and exit")
    args = ap.parse_args(argv)

    if args.cmd == "row":
        import resource

        row = run_row(FIXTURES[args.fixture], {c.name: c for c in all_configs()}[args.config], args.episodes,
                      args.work, args.num_envs)
        row["process_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB
        args.row_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.row_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        tmp.replace(args.row_json)
        return 0

    if args.list:
        print("fixtures:", ", ".join(FIXTURES))
        print("configs:", "; ".join(c.name for c in all_configs()))
        return 0
    fixtures = _pick(args.fixtures, list(FIXTURES), "fixture")
    missing = [f for f in fixtures if not FIXTURES[f].path.is_file()]
    if missing and not args.fixtures:
        print(f"skipping fixtures without a file here: {missing}", file=sys.stderr)
        fixtures = [f for f in fixtures if f not in missing]
    elif missing:
        raise SystemExit(f"fixture files missing: {[str(FIXTURES[f].path) for f in missing]}")
    configs = _pick(args.configs, [c.name for c in all_configs()], "configuration")
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeq-calib-bench-"))
    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in
                                               ["benchmarks/calibration_table.py", *(argv or sys.argv[1:])])
    started = time.time()
    rows: list[dict[str, Any]] = []
    reuse: dict[tuple[str, str], dict[str, Any]] = {}
    for path in args.reuse or []:
        for r in json.loads(path.read_text()):
            if "error" not in r and "skipped" not in r and r.get("episodes") == args.episodes:
                reuse[(r["fixture"], r["config"])] = r
    for f in fixtures:
        for c in configs:
            slug = "".join(ch if ch.isalnum() else "-" for ch in c).strip("-")
            if (f, c) in reuse:
                rows.append(reuse[(f, c)])
                continue
            row = run_row_subprocess(f, c, args.episodes, work / f / slug, args.num_envs, args.row_timeout)
            rows.append(row)
            status = row.get("error") or row.get("skipped") or (
                f"kept {row['kept']:.2%}, act err {row['action_err_mean']:.4f}, "
                f"TRT errors {row.get('check', {}).get('errors', 'n/a')}")
            print(f"[{time.time() - started:7.0f}s] {f} / {c}: {status}", file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    memory = json.loads(args.memory_json.read_text()) if args.memory_json and args.memory_json.is_file() else None
    text = markdown(rows, command, args.episodes, memory, started, existing_notes(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(rows)} rows; work files in {work})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
