"""``edgeq.quantize``: ingest → calibrate → plan → export → validate, in one call.

Each stage is a plain function of the previous stage's value, so later capabilities (calibrators,
TensorRT engines, reports) plug in as options without changing this call's shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeq import __version__
from edgeq.calibration.collect import CalibrationStats, ExplorationNoise, calibrate_rollouts
from edgeq.config import CalibrationRecipe, ExportProfile, load_profile, load_recipe
from edgeq.deploy.bundle_format import FLOAT_MODEL, INT8_MODEL, VALIDATION
from edgeq.envs import check_env_matches, env_factory
from edgeq.errors import EdgeqError
from edgeq.export.bundle import BundleWriter
from edgeq.export.qdq import apply_plan
from edgeq.ingest import load_policy
from edgeq.policy import FloatPolicy
from edgeq.quantize.build import build_plan
from edgeq.quantize.evaluate import action_half_range
from edgeq.quantize.plan import QuantPlan
from edgeq.validate.targets import validate_target

#: ``progress(stage, total_steps)`` returns a per-step callback ``advance(n)`` for that stage.
ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class QuantizeResult:
    bundle: Path
    manifest: dict[str, Any]
    validation: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _no_progress(stage: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def _episode_steps(make_env: Callable[[], Any]) -> int | None:
    env = make_env()
    try:
        spec = getattr(env, "spec", None)
        return getattr(spec, "max_episode_steps", None)
    finally:
        env.close()


def quantize(policy: str | Path | FloatPolicy, env: str, out: str | Path, *, episodes: int = 10, seed: int = 0,
             recipe: str | CalibrationRecipe | None = None, profile: str | ExportProfile = "cpu-ort",
             calibrator: str | None = None, calibrator_params: dict[str, Any] | None = None,
             weight_method: str | None = None, calib_episodes: int | None = None,
             exploration: ExplorationNoise | None = None, vecnormalize: str | Path | None = None,
             env_kwargs: dict[str, Any] | None = None, targets: tuple[str, ...] = ("cpu",),
             num_envs: int = 8, overwrite: bool = False,
             recipe_overrides: dict[str, Any] | None = None,
             progress: ProgressFactory = _no_progress) -> QuantizeResult:
    """Quantize ``policy`` for ``env`` and write a validated bundle to ``out``.

    Validation uses seeds ``seed .. seed+episodes-1``; calibration uses the recipe's seeds, which
    are disjoint from them, so the INT8 policy is judged on episodes it was not calibrated on.

    ``recipe_overrides`` sets any :class:`~edgeq.config.CalibrationRecipe` field by name (e.g.
    ``{"transform": "crossquant", "alpha": 0.0, "auto": True, "rounding": "adaround",
    "bias_correction": True, "fp16_fallback": 1, "dynamic": True}``) after the recipe is loaded.
    """
    timings: dict[str, float] = {}
    out = Path(out)
    writer = BundleWriter(out, overwrite=overwrite)  # refuses an existing bundle before any work
    t0 = time.perf_counter()
    fp = policy if isinstance(policy, FloatPolicy) else load_policy(policy, vecnormalize=vecnormalize)
    timings["ingest_s"] = time.perf_counter() - t0
    rec = recipe if isinstance(recipe, CalibrationRecipe) else load_recipe(recipe, env)
    prof = profile if isinstance(profile, ExportProfile) else load_profile(profile)
    if calibrator:
        rec.calibrator = calibrator
        rec.calibrator_params = dict(calibrator_params or {})
    elif calibrator_params:
        rec.calibrator_params = dict(calibrator_params)
    if weight_method:
        rec.weight_method = weight_method
    if calib_episodes:
        rec.episodes = calib_episodes
    for key, value in (recipe_overrides or {}).items():
        if not hasattr(rec, key) or key == "name":
            raise EdgeqError(f"unknown recipe field {key!r} in recipe_overrides; expected some of "
                             f"{sorted(k for k in rec.to_json() if k != 'name')}")
        setattr(rec, key, value)
    options = rec.quant_options()
    noise = exploration or ExplorationNoise(**rec.exploration)
    if options.dynamic and prof.runtime == "tensorrt":
        raise EdgeqError(f"profile {prof.name!r} targets TensorRT, which cannot run CrossQuant's dynamic form; "
                         "use the static form (transform: crossquant) or an onnxruntime profile")

    make_env = env_factory(env, env_kwargs)
    probe = make_env()
    try:
        check_env_matches(env, probe.observation_space, probe.action_space, fp.obs_space, fp.action_space)
    finally:
        probe.close()
    ep_len = _episode_steps(make_env)

    calib_seeds = list(range(rec.seed, rec.seed + rec.episodes))
    holdout_seeds = list(range(rec.seed + rec.episodes, rec.seed + rec.episodes + max(0, rec.holdout_episodes)))
    t0 = time.perf_counter()
    n_episodes = rec.episodes + len(holdout_seeds)
    stats: CalibrationStats = calibrate_rollouts(
        fp, make_env, calib_seeds, noise=noise, num_envs=min(num_envs, rec.num_envs),
        max_steps_per_episode=rec.max_steps_per_episode, holdout_seeds=holdout_seeds,
        holdout_noise=None if rec.holdout_exploration is None else ExplorationNoise(**rec.holdout_exploration),
        progress=progress("calibrate", n_episodes * ep_len if ep_len else None))
    timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan: QuantPlan = build_plan(fp.model, stats, options, recurrent=fp.recurrent,
                                 half_range=action_half_range(fp.action_space.low_array, fp.action_space.high_array))
    qmodel = apply_plan(fp.model, plan)
    timings["quantize_s"] = time.perf_counter() - t0

    io = {"input": fp.input_name, "output": fp.output_name, "state": [s.to_json() for s in fp.state]}
    val_seeds = list(range(seed, seed + episodes))
    with writer as w:
        fpath = w.save_model(fp.model, FLOAT_MODEL)
        qpath = w.save_model(qmodel, INT8_MODEL)
        validation: dict[str, Any] = {"env_id": env, "seeds": val_seeds, "targets": {}}
        t0 = time.perf_counter()
        for target in targets:
            validation["targets"][target] = validate_target(
                target, fpath, qpath, io, make_env, val_seeds, act_dim=fp.action_space.size, num_envs=num_envs,
                progress=progress(f"validate {target}", 2 * episodes * ep_len if ep_len else None))
        timings["validation_s"] = time.perf_counter() - t0
        validation["timings"] = {k: round(v, 3) for k, v in timings.items()}
        validation["sizes"] = {FLOAT_MODEL: fpath.stat().st_size, INT8_MODEL: qpath.stat().st_size}
        w.write_json(VALIDATION, validation)
        w.manifest = {
            "edgeq_version": __version__,
            "source": fp.source.to_json(),
            "env": {"id": env, "kwargs": env_kwargs or {}},
            "observation_space": fp.obs_space.to_json(),
            "action_space": fp.action_space.to_json(),
            "io": io,
            "models": {"fp32": FLOAT_MODEL, "int8": INT8_MODEL},
            "preprocess": fp.preprocess,
            "postprocess": fp.postprocess,
            "profile": prof.to_json(),
            "calibration": {"recipe": rec.to_json(), "steps": stats.steps, "episodes": len(calib_seeds),
                            "seeds": [calib_seeds[0], calib_seeds[-1]], "exploration": noise.to_json(),
                            "holdout_seeds": [holdout_seeds[0], holdout_seeds[-1]] if holdout_seeds else []},
            "quantization": plan.to_json(),
        }
    return QuantizeResult(out, w.manifest, validation, timings)
