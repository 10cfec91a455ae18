"""``edgeq.quantize``: ingest → calibrate → plan → export → validate, in one call.

Each stage is a plain function of the previous stage's value, so later capabilities (calibrators,
TensorRT engines, reports) plug in as options without changing this call's shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgeq._version import __version__
from edgeq.calibration.collect import CalibrationStats, ExplorationNoise, calibrate_observations, calibrate_rollouts
from edgeq.calibration.dataset import ObservationLog, load_observations, split_holdout
from edgeq.config import ExportConfig, QuantizeConfig, ValidationConfig, keyword_overrides
from edgeq.deploy.bundle_format import (
    FLOAT_MODEL,
    INT8_CPU_MODEL,
    INT8_CUDA_MODEL,
    INT8_MODEL,
    MEASUREMENTS,
    PLAN,
    PRUNED_FLOAT_MODEL,
    VALIDATION,
)
from edgeq.deploy.contracts import ManifestBody, ManifestIO, Space, TargetResult, ValidationResult
from edgeq.describe import build_environment, made_utc
from edgeq.envs import WrapperSpec, check_env_matches, env_factory, parse_wrapper, resolve_env_id
from edgeq.errors import EdgeqError, InputError
from edgeq.export import ort_cpu
from edgeq.export.bundle import BundleWriter
from edgeq.export.cpu_select import replay_record, select_cpu_float_layers
from edgeq.export.file_precision import file_record
from edgeq.export.ort_cpu import specialize_for_ort_cpu
from edgeq.export.ort_cuda import specialize_for_ort_cuda
from edgeq.export.qdq import apply_plan
from edgeq.export.trt_rules import check_qdq_model, format_report
from edgeq.ingest import load_policy
from edgeq.ingest.onnx_policy import bind_env_spaces
from edgeq.ingest.rl_zoo import ZooRun, is_zoo_folder, read_zoo_run
from edgeq.perturb import parse_perturbation, perturbed_factory
from edgeq.policy import FloatPolicy
from edgeq.quantizers.build import build_plan
from edgeq.quantizers.evaluate import action_half_range
from edgeq.quantizers.plan import QuantPlan
from edgeq.spaces import BoxSpec
from edgeq.validate.executor import ExecutorConfig
from edgeq.validate.offline import OPEN_LOOP_REASON, validate_offline
from edgeq.validate.outcomes import parse_failure
from edgeq.validate.robustness import validate_target_robustness
from edgeq.validate.saturation import quantized_ranges, restrict_to_quantized
from edgeq.validate.sequential import episode_design
from edgeq.validate.validator import (
    ValidationOptions,
    decision_record,
    save_validation,
    split_measurements,
    validate_models,
)
from edgeq.validate.verdict import Tolerance

#: ``cell_precision`` values: the recurrent cell's gate MatMuls in int8, or kept in fp32.
CELL_PRECISIONS = ("int8", "fp32")

#: ``progress(stage, total_steps)`` returns a per-step callback ``advance(n)`` for that stage.
ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class QuantizeResult:
    bundle: Path
    manifest: ManifestBody  # without the writer's format_version and files
    validation: ValidationResult
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


def _with_history_reset(fp: FloatPolicy, reset: str) -> FloatPolicy:
    """``fp`` whose observation history starts episodes with ``reset`` (``"zeros"``, ``"first-observation"``)."""
    from edgeq.deploy.history import check_reset

    if fp.history is None:
        raise EdgeqError(f"{fp.source.path}: --history-reset applies to policies that read an observation history; "
                         "this one reads one observation (give --history K for a flat frame stack)")
    try:
        return replace(fp, history=replace(fp.history, reset=check_reset(reset)))
    except InputError as exc:
        raise EdgeqError(f"--history-reset: {exc}") from None


def _torchscript_obs_dim(policy: Any, env: str | None, env_kwargs: dict[str, Any] | None,
                         wrappers: Sequence[WrapperSpec], stack: int) -> int | None:
    """The env's observation size, which a TorchScript module with its own forward() needs to be exported."""
    from edgeq.ingest.torchscript import TORCHSCRIPT_SUFFIXES

    paths = [policy] if isinstance(policy, str | Path) else list(policy) if isinstance(policy, list | tuple) else []
    if env is None or not paths or not all(Path(q).suffix.lower() in TORCHSCRIPT_SUFFIXES for q in paths):
        return None
    probe = env_factory(env, env_kwargs, wrappers, stack)()
    try:
        shape = tuple(getattr(probe.observation_space, "shape", None) or ())
    finally:
        probe.close()
    return int(np.prod(shape)) if len(shape) == 1 else None


def quantize(policy: str | Path | Sequence[str | Path] | FloatPolicy, env: str | None, out: str | Path,
             config: QuantizeConfig | None = None, *, overrides: Mapping[str, Any] | None = None,
             recipe: str | None = None, profile: str | ExportConfig | None = None,
             progress: ProgressFactory = _no_progress,
             overwrite: bool = False, sign_key: str | Path | None = None, executor: ExecutorConfig | None = None,
             **keywords: Any) -> QuantizeResult:
    """Quantize ``policy`` for ``env`` and write a validated bundle to ``out``, as ``config`` says.

    ``config`` (:class:`~edgeq.config.QuantizeConfig`) holds every setting; without it, the defaults with
    ``recipe`` (default: ``calibration/<env>.yaml``, else ``default.yaml``) and ``profile`` (a name, default
    ``cpu-ort``, or an :class:`~edgeq.config.ExportConfig`) applied (:meth:`QuantizeConfig.from_recipe`).
    ``overrides`` (``{"quantization.rounding": "nearest", ...}``) and the flat ``keywords`` of earlier
    versions (``episodes=5``, ``calib_episodes=4``, ``recipe_overrides={...}``, ``tolerance=Tolerance(...)``,
    ...; the table :data:`edgeq.config.KEYWORD_FIELDS`) are applied on top. The manifest stores the config
    used (``manifest["config"]``): ``quantize(policy, env, out2, QuantizeConfig.from_bundle(out))`` makes the
    same files. What each section means: :mod:`edgeq.config`.

    ``policy``: an SB3/sb3-contrib zip, an RL Zoo run folder (its archive, ``vecnormalize.pkl``, env id,
    ``env_kwargs``, wrappers and ``frame_stack`` are used unless the config sets them; an env id
    gymnasium no longer makes maps to the newest version with the policy's observation shape), an ONNX
    file (two: an encoder and a body), a TorchScript file or a loaded :class:`FloatPolicy`. ``env``: a
    gymnasium id or ``module:callable``; ``None`` with ``calibration.data`` (logged observations): the
    last ``calibration.holdout_fraction`` is held out and validation reports the INT8 action error on it
    only (``"closed_loop": false``), as no return can be measured without an environment.

    Calibration uses the recipe's seeds, which are disjoint from the validation seeds, so the INT8
    policy is judged on episodes it was not calibrated on.

    Not part of the config (they do not change the files): ``progress``, ``overwrite``, ``sign_key`` (an
    Ed25519 private key file, ``edgeq keygen``: the manifest is signed, ``manifest.sig``) and ``executor``
    (where validation rollouts run: this process, worker processes or a Ray cluster; same results).
    """
    overrides = {**keyword_overrides(keywords), **dict(overrides or {})}
    if config is not None and (recipe is not None or profile is not None):
        raise EdgeqError("give either a config or a recipe/profile (a config already holds them)")
    # names and types of the overrides are checked before any work
    given = (config or QuantizeConfig()).with_overrides(overrides)
    zoo: ZooRun | None = None
    if isinstance(policy, (str, Path)) and is_zoo_folder(Path(policy)):
        zoo = read_zoo_run(Path(policy))
        policy = zoo.archive
    if zoo is not None and env is None and given.calibration.data is None:
        env = zoo.env_id  # resolved against the policy's observation shape once it is loaded
    if env is None and given.calibration.data is None:
        raise EdgeqError("nothing to calibrate with: give an environment (--env) for rollouts, or logged "
                         "observations (--calib-data)")
    if config is None:
        base = QuantizeConfig.from_recipe(recipe, profile if isinstance(profile, str) else "cpu-ort", env=env)
        config = replace(base, export=profile) if isinstance(profile, ExportConfig) else base
    cfg = config.with_overrides(overrides)
    src, cal, val, prof = cfg.source, cfg.calibration, cfg.validation, cfg.export
    vecnormalize: str | Path | None = src.vecnormalize
    env_kwargs, env_wrappers, frame_stack = src.env_kwargs, src.env_wrappers, src.frame_stack
    if zoo is not None:
        vecnormalize = vecnormalize if vecnormalize is not None else zoo.vecnormalize
        env_kwargs = env_kwargs if env_kwargs else zoo.env_kwargs
        frame_stack = frame_stack if frame_stack is not None else zoo.frame_stack
    wrappers = ([parse_wrapper(w) for w in env_wrappers] if env_wrappers is not None
                else list(zoo.wrappers) if zoo is not None and zoo.wrappers else [])
    stack = int(frame_stack or 0)
    env_note: str | None = None
    timings: dict[str, float] = {}
    out = Path(out)
    writer = BundleWriter(out, overwrite=overwrite, sign_key=sign_key)  # refuses an existing bundle before any work
    design = episode_design(val.episodes, max_episodes=val.max_episodes, time_budget=val.time_budget)
    options = cfg.quant_options()
    rule = parse_failure(val.failure)
    noise = ExplorationNoise(gaussian=cal.exploration.gaussian, epsilon=cal.exploration.epsilon)
    cell_precision = cfg.quantization.cell_precision
    if options.dynamic and prof.runtime == "tensorrt":
        raise EdgeqError(f"profile {prof.name!r} targets TensorRT, which cannot run CrossQuant's dynamic form; "
                         "use the static form (transform: crossquant) or an onnxruntime profile")
    if cell_precision not in CELL_PRECISIONS:
        raise EdgeqError(f"cell precision {cell_precision!r}; expected one of {', '.join(CELL_PRECISIONS)}")
    targets = val.targets
    num_envs = val.num_envs
    calib_data, calib_env, calib_env_kwargs = cal.data, cal.env, cal.env_kwargs
    t0 = time.perf_counter()
    fp = policy if isinstance(policy, FloatPolicy) else load_policy(
        policy, vecnormalize=vecnormalize, input_name=src.onnx_input, output_name=src.onnx_output,
        action_low=_bound(src.action_low), action_high=_bound(src.action_high), history=src.history,
        frame_stack=stack or None, obs_dim=_torchscript_obs_dim(policy, env, env_kwargs, wrappers, stack))
    if src.history_reset is not None:
        fp = _with_history_reset(fp, src.history_reset)
    if zoo is not None:
        fp.source.details["rl_zoo"] = zoo.describe()
    if zoo is not None and env == zoo.env_id:
        env, env_note = resolve_env_id(env, fp.obs_space.shape, env_kwargs, wrappers, stack)
    frame_pad = (list(np.asarray(fp.preprocess["normalize"]["pad"]).tolist())
                 if stack > 1 and "pad" in fp.preprocess.get("normalize", {}) else None)
    timings["ingest_s"] = time.perf_counter() - t0
    gate_nodes: list[str] = list(fp.gate_nodes)
    if gate_nodes and cell_precision == "fp32":
        options = replace(options, keep_float=list(options.keep_float) + gate_nodes)
    calib_specs = [parse_perturbation(p) for p in cal.perturb]
    val_specs = [parse_perturbation(p) for p in val.perturb]
    calib_perturb, perturb = cal.perturb, val.perturb

    make_env: Callable[[], Any] | None = None
    make_calib_env: Callable[[], Any] | None = None
    make_perturbed_env: Callable[[], Any] | None = None
    ep_len: int | None = None
    calib_id, calib_kwargs = calib_env or env, calib_env_kwargs
    if env is not None:
        make_env = env_factory(env, env_kwargs, wrappers, stack, frame_pad)
        if calib_kwargs is None and calib_id == env:
            calib_kwargs = env_kwargs
        calib_name = calib_env or env
        make_calib_env = perturbed_factory(env_factory(calib_name, calib_kwargs, wrappers, stack, frame_pad),
                                           calib_specs)
        make_perturbed_env = perturbed_factory(make_env, val_specs) if val_specs else None
        probe = make_env()
        try:
            fp = _adopt_env_spaces(fp, probe)
            check_env_matches(env, probe.observation_space, probe.action_space, fp.obs_space, fp.action_space)
            fp = bind_env_spaces(fp, probe.observation_space, probe.action_space)
        finally:
            probe.close()
        for name, factory in ((calib_name, make_calib_env), (env, make_perturbed_env)):
            if factory is None or factory is make_env:
                continue
            extra = factory()  # also checks that the disturbances fit the env (e.g. push needs MuJoCo)
            try:
                check_env_matches(name, extra.observation_space, extra.action_space, fp.obs_space, fp.action_space)
            finally:
                extra.close()
        ep_len = _episode_steps(make_env)
    elif calib_env or calib_perturb or perturb:
        raise EdgeqError("--calib-env, --calib-perturb and --perturb need an environment (--env)")

    calib_seeds = list(range(cal.seed, cal.seed + cal.episodes))
    log: ObservationLog | None = None
    holdout_seeds = (list(range(cal.seed + cal.episodes, cal.seed + cal.episodes + max(0, cal.holdout_episodes)))
                     if calib_data is None else [])
    held_out = None
    t0 = time.perf_counter()
    if calib_data is not None:
        log = load_observations(calib_data, cal.data_key)
        if log.observations.shape[1] != fp.obs_space.size:
            raise EdgeqError(f"{log.source}: logged observations have {log.observations.shape[1]} features; the "
                             f"policy expects {fp.obs_space.size}")
        calib_obs = log.observations
        if make_env is None:  # no env: hold out the end of the log for the open-loop validation
            calib_obs, held_out = split_holdout(calib_obs, cal.holdout_fraction)
        stats = _calibrate_logged(fp, calib_obs, progress)
    else:
        assert make_calib_env is not None
        n_episodes = cal.episodes + len(holdout_seeds)

        def rollouts(policy: FloatPolicy, stage: str = "calibrate") -> CalibrationStats:
            assert make_calib_env is not None
            return calibrate_rollouts(
                policy, make_calib_env, calib_seeds, noise=noise, num_envs=min(num_envs, cal.num_envs),
                max_steps_per_episode=cal.max_steps_per_episode, holdout_seeds=holdout_seeds,
                holdout_noise=None if cal.holdout_exploration is None else ExplorationNoise(
                    gaussian=cal.holdout_exploration.gaussian, epsilon=cal.holdout_exploration.epsilon),
                progress=progress(stage, n_episodes * ep_len if ep_len else None))

        stats = rollouts(fp)
    reference = fp  # the float policy every verdict compares against (the unpruned one)
    pruning: dict[str, Any] | None = None
    if cfg.quantization.prune > 0:
        from edgeq.quantizers.prune import prune_hidden_units

        if fp.recurrent or fp.history is not None:
            raise EdgeqError("quantization.prune: structured pruning needs a feed-forward policy of one observation; "
                             "this one is recurrent or reads a history (run without --prune)")
        states = stats.observations if stats.holdout is None or not len(stats.holdout) else np.concatenate(
            [stats.observations, stats.holdout])
        pruned, prune_report = prune_hidden_units(fp.model, states, float(cfg.quantization.prune),
                                                  input_name=fp.input_name)
        fp = replace(fp, model=pruned)
        pruning = {**prune_report.to_json(), "file": PRUNED_FLOAT_MODEL}
        # calibrate again on the pruned policy's own states (its hidden tensors changed width)
        stats = _calibrate_logged(fp, calib_obs, progress) if calib_data is not None else rollouts(
            fp, "calibrate (pruned)")
    timings["calibration_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan: QuantPlan = build_plan(fp.model, stats, options, lower=apply_plan, recurrent=fp.recurrent,
                                 half_range=action_half_range(fp.action_space.low_array, fp.action_space.high_array),
                                 critic=_critic(fp, vecnormalize))
    if gate_nodes:
        plan.settings["recurrent_cell"] = {"precision": cell_precision, "gate_nodes": gate_nodes}
    qmodel = apply_plan(fp.model, plan)
    conformance = check_qdq_model(qmodel)
    trt_errors = [v for v in conformance if v.severity == "error"]
    if trt_errors and not options.dynamic:  # an exporter bug, never the user's input
        raise EdgeqError("the exported INT8 graph breaks TensorRT QDQ rules:\n" + format_report(conformance))
    timings["quantize_s"] = time.perf_counter() - t0

    io: dict[str, Any] = {"input": fp.input_name, "output": fp.output_name, "state": [s.to_json() for s in fp.state]}
    if fp.history is not None:
        io["history"] = fp.history.to_json()
    val_seeds = list(range(val.seed, val.seed + (design.max_episodes if design.sequential else int(val.episodes))))
    with writer as w:
        fpath = w.save_model(reference.model, FLOAT_MODEL)
        # pruned: the pruned float policy too (what the INT8 files quantize; per-layer error is measured on it)
        ppath = w.save_model(fp.model, PRUNED_FLOAT_MODEL) if pruning is not None else None
        qpath = w.save_model(qmodel, INT8_MODEL)
        cmodel, cpu_selection = _cpu_model(qmodel, reference.model, prof, gate_nodes)
        # the timings behind a measured choice go to measurements.json; the manifest keeps the choice
        cpu_timing: dict[str, Any] = {k: cpu_selection.pop(k) for k in ("batch1_median_us", "chosen_us", "fp32_us",
                                                                         "summary") if k in cpu_selection}
        cpath = w.save_model(cmodel, INT8_CPU_MODEL)
        gmodel = specialize_for_ort_cuda(qmodel)
        gpath = w.save_model(gmodel, INT8_CUDA_MODEL)
        # what each shipped file really computes in, read from the file (never from the plan alone)
        file_precision = {INT8_MODEL: file_record(qmodel), INT8_CPU_MODEL: file_record(cmodel),
                          INT8_CUDA_MODEL: file_record(gmodel)}
        w.write_json(PLAN, plan.to_dict())  # the plan as data: QuantPlan.from_bundle reads it back
        int8_for = {"cpu": cpath, "cuda": gpath}
        t0 = time.perf_counter()
        result: ValidationResult
        if make_env is None:
            assert log is not None and held_out is not None
            result = _validate_open_loop(fpath, {t: int8_for.get(t, qpath) for t in targets}, io, log,
                                         held_out, cal.holdout_fraction, targets, fp.action_space.size, progress)
        else:
            assert env is not None  # make_env exists only with an env
            vopts = _validation_options(val, design, rule, executor)
            result = validate_models(
                fpath, qpath, io, make_env, val_seeds, env_id=env, action_low=fp.action_space.low_array,
                action_high=fp.action_space.high_array, options=vopts, plan=plan, episode_steps=ep_len,
                progress=progress, int8_for_target=int8_for, layer_float_model=ppath)
            result["closed_loop"] = True
            # saturation of every INT8 tensor on the validation rollouts (and robustness under disturbances)
            # the tensors the CPU file really quantizes (its tiny layers run in float there)
            ranges = restrict_to_quantized(quantized_ranges(plan.to_json()), cmodel)
            for target in [t for t in targets if t == "cpu" and t in result["targets"]]:
                used = result["targets"][target]["float"]["seeds"][: vopts.detail_episodes]

                def stage(cond: str, target: str = target, n: int = len(used)) -> Callable[[int], None]:
                    return progress(f"saturation {target} {cond}", 2 * n * ep_len if ep_len else None)

                rob = validate_target_robustness(
                    target, fpath, int8_for.get(target, qpath), io, make_env, used,
                    act_dim=fp.action_space.size, ranges=ranges, perturbed_env=make_perturbed_env,
                    perturbation=[p.to_json() for p in val_specs], saturation_warn=val.saturation_warn,
                    num_envs=num_envs, progress=stage)
                if rob.get("saturation") is not None:
                    result["targets"][target]["saturation"] = rob["saturation"]
                if rob.get("perturbed") is not None:
                    result["targets"][target]["perturbed"] = rob["perturbed"]
            if val_specs:
                result["perturbation"] = [p.to_json() for p in val_specs]
            result["warnings"] = _saturation_warnings(result["targets"])
        timings["validation_s"] = time.perf_counter() - t0
        result["timings"] = {k: round(v, 3) for k, v in timings.items()}
        result["made_utc"] = made_utc()
        if cpu_timing:
            result["cpu_layer_timing"] = cpu_timing
        result["sizes"] = {p.name: p.stat().st_size for p in (fpath, qpath, cpath, gpath)}
        manifest: ManifestBody = {
            "edgeq_version": __version__,
            "environment": build_environment(),
            "source": fp.source.to_json(),
            "env": _env_record(env, env_kwargs, wrappers, stack, frame_pad, zoo, env_note),
            "observation_space": cast(Space, fp.obs_space.to_json()),
            "action_space": cast(Space, fp.action_space.to_json()),
            "io": cast(ManifestIO, io),
            "models": {"fp32": FLOAT_MODEL, "int8": INT8_MODEL, "int8-cpu": INT8_CPU_MODEL,
                       "int8-cuda": INT8_CUDA_MODEL},
            "cpu_float_layers": ort_cpu.cpu_float_layers(cmodel),
            "cpu_layer_selection": cpu_selection,
            "file_precision": file_precision,
        }
        if pruning is not None:
            manifest["pruning"] = pruning
        manifest["preprocess"] = fp.preprocess
        manifest["postprocess"] = fp.postprocess
        manifest["profile"] = prof.to_json()
        manifest["calibration"] = ({"recipe": cfg.recipe_record(), "steps": stats.steps, "episodes": len(calib_seeds),
                                    "seeds": [calib_seeds[0], calib_seeds[-1]], "exploration": noise.to_json(),
                                    "holdout_seeds": [holdout_seeds[0], holdout_seeds[-1]] if holdout_seeds else [],
                                    "env": {"id": calib_id, "kwargs": calib_kwargs or {}},
                                    "perturbations": [p.to_json() for p in calib_specs]}
                                   if log is None else
                                   {"recipe": cfg.recipe_record(), "steps": stats.steps, "source": "observations",
                                    "data": log.describe(), "held_out": 0 if held_out is None else len(held_out)})
        manifest["quantization"] = _without_seconds(plan.to_json(), result)
        if make_env is not None:
            manifest["decision"] = decision_record(result)
        manifest["config"] = cfg.to_dict()
        manifest["tensorrt_qdq_check"] = {"errors": len(trt_errors), "tensorrt_compatible": not trt_errors,
                                          "findings": [f"{v.severity} {v.rule}: {v.node}" for v in conformance]}
        w.manifest = dict(manifest)
        if make_env is None:
            deterministic, measured = split_measurements(result)
            w.write_json(VALIDATION, deterministic)
            w.write_json(MEASUREMENTS, measured)
        else:
            save_validation(w.path, result, manifest, report=val.report)
    return QuantizeResult(out, manifest, result, timings)


def _bound(value: float | tuple[float, ...] | None) -> float | list[float] | None:
    return list(value) if isinstance(value, tuple) else value


def _validation_options(val: ValidationConfig, design: Any, rule: Any, executor: ExecutorConfig | None
                        ) -> ValidationOptions:
    """What the validator measures, from the validation section."""
    return ValidationOptions(
        targets=tuple(val.targets), design=design, failure=rule, num_envs=val.num_envs,
        tolerance=Tolerance(relative=val.rel_tol, absolute=val.abs_tol, one_sided=val.one_sided,
                            fail_tol=val.fail_tol),
        detail_episodes=val.detail_episodes, floor_draws=val.floor_draws, sensitivity=val.sensitivity,
        sensitivity_draws=val.sensitivity_draws, per_layer=val.per_layer, per_layer_states=val.per_layer_states,
        latency_calls=val.latency_calls, latency_large_batch=val.latency_large_batch,
        executor=executor or ExecutorConfig())


def _without_seconds(quantization: dict[str, Any], result: ValidationResult) -> dict[str, Any]:
    """The plan for the manifest without its wall-clock time (moved to the measured ``timings``), so that the
    manifest is the same for the same inputs and seeds."""
    seconds = quantization.get("metrics", {}).pop("seconds", None)
    if seconds is not None:
        result.setdefault("timings", {})["quantize_search_s"] = seconds
    return quantization


def _critic(fp: FloatPolicy, vecnormalize: str | Path | None) -> Any:
    """The SB3 archive's Q critic (off-policy algorithms), or None: it weights the plan's errors by value."""
    if fp.source.kind != "sb3" or fp.recurrent or fp.history is not None:
        return None
    from edgeq.ingest.sb3_critic import load_sb3_critic

    try:
        critic = load_sb3_critic(fp.source.path, vecnormalize=vecnormalize)
    except Exception:  # a critic that cannot be read only loses the weighting, never the quantization
        return None
    if critic is None or critic.obs_mean is None and fp.preprocess.get("normalize"):
        return None
    return critic


def _calibrate_logged(fp: FloatPolicy, observations: Any, progress: ProgressFactory) -> CalibrationStats:
    if fp.history is not None:
        raise EdgeqError(f"calibration from logged observations needs a policy of one observation; this one reads the "
                         f"last {fp.history.length} (calibrate with rollouts: --env)")
    if fp.recurrent:
        raise EdgeqError("calibration from logged observations needs a feed-forward policy; this one is recurrent "
                         "(its state depends on whole episodes in order)")
    return calibrate_observations(fp, observations, progress=progress("calibrate", len(observations)))


def _validate_open_loop(fpath: Path, qpaths: dict[str, Path], io: dict[str, Any], log: ObservationLog, held_out: Any,
                        holdout_fraction: float, targets: tuple[str, ...], act_dim: int,
                        progress: ProgressFactory) -> ValidationResult:
    """``validation.json`` without an env: action error on the held-out logged observations."""
    n = len(log.observations)
    validation: ValidationResult = {
        "env_id": None, "closed_loop": False, "reason": OPEN_LOOP_REASON,
        "held_out": {"source": log.source, "rows": [n - len(held_out), n], "samples": len(held_out),
                     "fraction": holdout_fraction},
        "targets": {}}
    for target in targets:
        validation["targets"][target] = cast(TargetResult, validate_offline(
            target, fpath, qpaths[target], io, held_out, act_dim=act_dim,
            progress=progress(f"validate {target}", len(held_out))))
    return validation


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


def _cpu_model(qmodel: Any, fmodel: Any, prof: ExportConfig, gate_nodes: list[str]) -> tuple[Any, dict[str, Any]]:
    """policy.int8.cpu.onnx and how its float layers were chosen (replayed, measured or by width)."""
    if prof.cpu_float_layers is not None:
        record = replay_record(list(prof.cpu_float_layers), qmodel, gate_nodes)
        return specialize_for_ort_cpu(qmodel, keep_int8=gate_nodes, float_layers=record["float_layers"]), record
    # cpu_float_below: 0 asks for every layer INT8 on the CPU too (the arithmetic of policy.int8.onnx)
    if prof.cpu_layer_selection == "measured" and prof.runtime == "onnxruntime" and prof.cpu_float_below > 0:
        chosen, record = select_cpu_float_layers(qmodel, fmodel, width_rule=prof.cpu_float_below,
                                                 keep_int8=gate_nodes)
        return specialize_for_ort_cpu(qmodel, keep_int8=gate_nodes, float_layers=chosen), record
    if prof.cpu_layer_selection not in ("measured", "width"):
        raise EdgeqError(f"profile {prof.name!r}: cpu_layer_selection {prof.cpu_layer_selection!r}; expected "
                         "'measured' or 'width'")
    cmodel = specialize_for_ort_cpu(qmodel, min_int8_width=prof.cpu_float_below, keep_int8=gate_nodes)
    return cmodel, {"method": "width", "cpu_float_below": prof.cpu_float_below,
                    "float_layers": ort_cpu.cpu_float_layers(cmodel)}


def _env_record(env: str | None, kwargs: dict[str, Any] | None, wrappers: list[WrapperSpec], stack: int,
                frame_pad: list[float] | None, zoo: ZooRun | None, note: str | None) -> dict[str, Any] | None:
    """The manifest's ``env``: enough for ``edgeq validate`` to rebuild the env the policy was run in."""
    if env is None:
        return None
    rec: dict[str, Any] = {"id": env, "kwargs": kwargs or {}}
    if wrappers:
        rec["wrappers"] = [w.to_json() for w in wrappers]
    if stack > 1:
        rec["frame_stack"] = stack
        if frame_pad is not None:
            rec["frame_pad"] = frame_pad
    if zoo is not None and zoo.env_id != env:
        rec["trained_on"] = zoo.env_id
    if note:
        rec["note"] = note
    return rec


def _saturation_warnings(targets: dict[str, Any]) -> list[str]:
    out = []
    for target, r in targets.items():
        for cond, res in (("nominal", r), ("perturbed", r.get("perturbed"))):
            for w in ((res or {}).get("saturation") or {}).get("warnings", []):
                out.append(f"{target} {cond}: {w}")
    return out
