"""``edgeq.quantize``: ingest → calibrate → plan → export → validate, in one call.

Each stage is a plain function of the previous stage's value, so later capabilities (calibrators,
TensorRT engines, reports) plug in as options without changing this call's shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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
from edgeq.perturb import PerturbationSpec, parse_perturbation, perturbed_factory
from edgeq.policy import FloatPolicy
from edgeq.quantize.plan import QuantPlan, make_plan
from edgeq.spaces import BoxSpec
from edgeq.validate.robustness import validate_target_robustness
from edgeq.validate.saturation import DEFAULT_SATURATION_WARN, quantized_ranges

#: ``cell_precision`` values: the recurrent cell's gate MatMuls in int8, or kept in fp32.
CELL_PRECISIONS = ("int8", "fp32")

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
             calib_env: str | None = None, calib_env_kwargs: dict[str, Any] | None = None,
             calib_perturb: Sequence[str | PerturbationSpec] = (), perturb: Sequence[str | PerturbationSpec] = (),
             cell_precision: str = "int8", saturation_warn: float = DEFAULT_SATURATION_WARN,
             progress: ProgressFactory = _no_progress) -> QuantizeResult:
    """Quantize ``policy`` for ``env`` and write a validated bundle to ``out``.

    Validation uses seeds ``seed .. seed+episodes-1``; calibration uses the recipe's seeds, which
    are disjoint from them, so the INT8 policy is judged on episodes it was not calibrated on.

    ``env`` / ``calib_env`` are gymnasium ids or ``module:callable`` entry points. Calibration runs
    in ``calib_env`` (default: ``env``; its kwargs default to ``env_kwargs`` when it is the same
    env) with the disturbances ``calib_perturb`` (e.g. ``"push:speed=1"``). Validation runs in
    ``env`` nominally and, with ``perturb``, also under those disturbances; it reports each INT8
    tensor's saturation rate and warns above ``saturation_warn``. ``cell_precision="fp32"`` keeps a
    recurrent policy's LSTM/GRU gate MatMuls in float (the MLP stays int8).
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
    noise = exploration or ExplorationNoise(**rec.exploration)
    if cell_precision not in CELL_PRECISIONS:
        raise EdgeqError(f"cell precision {cell_precision!r}; expected one of {', '.join(CELL_PRECISIONS)}")
    gate_nodes: list[str] = list(fp.source.details.get("recurrent", {}).get("gate_nodes", []))
    calib_specs = [parse_perturbation(p) for p in calib_perturb]
    val_specs = [parse_perturbation(p) for p in perturb]

    make_env = env_factory(env, env_kwargs)
    calib_id = calib_env or env
    calib_kwargs = calib_env_kwargs if calib_env_kwargs is not None else (
        env_kwargs if calib_id == env else None)
    make_calib_env = perturbed_factory(env_factory(calib_id, calib_kwargs), calib_specs)
    make_perturbed_env = perturbed_factory(make_env, val_specs) if val_specs else None
    probe = make_env()
    try:
        fp = _adopt_env_spaces(fp, probe)
        check_env_matches(env, probe.observation_space, probe.action_space, fp.obs_space, fp.action_space)
    finally:
        probe.close()
    for name, factory in ((calib_id, make_calib_env), (env, make_perturbed_env)):
        if factory is None or factory is make_env:
            continue
        extra = factory()  # also checks that the disturbances fit the env (e.g. push needs MuJoCo)
        try:
            check_env_matches(name, extra.observation_space, extra.action_space, fp.obs_space, fp.action_space)
        finally:
            extra.close()
    ep_len = _episode_steps(make_env)

    calib_seeds = list(range(rec.seed, rec.seed + rec.episodes))
    t0 = time.perf_counter()
    stats: CalibrationStats = calibrate_rollouts(
        fp, make_calib_env, calib_seeds, noise=noise, num_envs=min(num_envs, rec.num_envs),
        max_steps_per_episode=rec.max_steps_per_episode,
        progress=progress("calibrate", rec.episodes * ep_len if ep_len else None))
    timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    keep_float = list(rec.keep_float) + (gate_nodes if cell_precision == "fp32" else [])
    plan: QuantPlan = make_plan(fp.model, stats.observers, calibrator=rec.calibrator,
                                calibrator_params=rec.calibrator_params, weight_method=rec.weight_method,
                                keep_float=keep_float)
    if gate_nodes:
        plan.settings["recurrent_cell"] = {"precision": cell_precision, "gate_nodes": gate_nodes}
    qmodel = apply_plan(fp.model, plan)
    timings["quantize_s"] = time.perf_counter() - t0

    io = {"input": fp.input_name, "output": fp.output_name, "state": [s.to_json() for s in fp.state]}
    val_seeds = list(range(seed, seed + episodes))
    with writer as w:
        fpath = w.save_model(fp.model, FLOAT_MODEL)
        qpath = w.save_model(qmodel, INT8_MODEL)
        validation: dict[str, Any] = {"env_id": env, "seeds": val_seeds, "targets": {}}
        if val_specs:
            validation["perturbation"] = [p.to_json() for p in val_specs]
        ranges = quantized_ranges(plan.to_json())
        t0 = time.perf_counter()
        for target in targets:
            def stage(cond: str, target: str = target) -> Callable[[int], None]:
                return progress(f"validate {target} {cond}", 2 * episodes * ep_len if ep_len else None)

            validation["targets"][target] = validate_target_robustness(
                target, fpath, qpath, io, make_env, val_seeds, act_dim=fp.action_space.size, ranges=ranges,
                perturbed_env=make_perturbed_env, perturbation=[p.to_json() for p in val_specs],
                saturation_warn=saturation_warn, num_envs=num_envs, progress=stage)
        timings["validation_s"] = time.perf_counter() - t0
        validation["warnings"] = _saturation_warnings(validation["targets"])
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
                            "env": {"id": calib_id, "kwargs": calib_kwargs or {}},
                            "perturbations": [p.to_json() for p in calib_specs]},
            "quantization": plan.to_json(),
        }
    return QuantizeResult(out, w.manifest, validation, timings)


def _adopt_env_spaces(fp: FloatPolicy, env: Any) -> FloatPolicy:
    """TorchScript files store no spaces: give the policy the env's boxes when their shapes agree."""
    if fp.source.kind != "torchscript":
        return fp
    try:
        env_obs, env_act = BoxSpec.from_gym(env.observation_space), BoxSpec.from_gym(env.action_space)
    except EdgeqError:
        return fp  # check_env_matches names the problem
    if env_obs.shape != fp.obs_space.shape or env_act.shape != fp.action_space.shape:
        return fp
    return replace(fp, obs_space=env_obs, action_space=env_act)


def _saturation_warnings(targets: dict[str, Any]) -> list[str]:
    out = []
    for target, r in targets.items():
        for cond, res in (("nominal", r), ("perturbed", r.get("perturbed"))):
            for w in ((res or {}).get("saturation") or {}).get("warnings", []):
                out.append(f"{target} {cond}: {w}")
    return out
