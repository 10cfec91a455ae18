"""The whole validation of a float/INT8 model pair: closed-loop statistics on every available target,
noise floor, sensitivity, per-layer error and latency, as one JSON-able dict (``validation.json``).

``edgeq validate`` (all parts on) and ``edgeq quantize`` (:meth:`ValidationOptions.light`) both run
:func:`validate_models`; :func:`validate_bundle` does it for an existing bundle.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from edgeq.deploy.contracts import (
    Decision,
    DecisionFailures,
    DecisionReturns,
    DecisionTarget,
    Manifest,
    ValidationResult,
)
from edgeq.errors import EdgeqError
from edgeq.quantizers.plan import QuantPlan
from edgeq.validate.executor import Executor, ExecutorConfig
from edgeq.validate.latency import measure_latency, strip_samples
from edgeq.validate.layers import per_layer_error, plan_from_manifest
from edgeq.validate.noise import (
    DEFAULT_SENSITIVITY_LEVELS,
    FLOOR_NOISE,
    noise_floor,
    sensitivity_curve,
)
from edgeq.validate.outcomes import FailureRule, parse_failure
from edgeq.validate.paired import PairedRun, action_error_series, merge_paired
from edgeq.validate.sequential import SequentialDesign, run_until_decided
from edgeq.validate.spread import perturbed_returns_spread, run_paired_spread
from edgeq.validate.stats import json_safe
from edgeq.validate.targets import (
    RUNTIME_ORT_CUDA,
    RUNTIME_TENSORRT,
    RuntimeSpec,
    fused_cuda_reason,
    make_runtime,
    runtime_for,
    target_runtime,
    unavailable_reason,
)
from edgeq.validate.verdict import Tolerance, add_floor_text, decide, overall

#: ``progress(stage, total)`` returns a per-step ``advance(n)`` callback (see edgeq.pipeline).
ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(stage: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


@dataclass(frozen=True)
class ValidationOptions:
    """What to measure. The defaults are those of ``edgeq validate``; :meth:`light` is ``edgeq quantize``'s.

    * ``floor_draws``: float re-rolls under ``floor_sigma`` action noise (0 turns the floor off);
    * ``sensitivity``: float return under action noise ``sensitivity_levels`` × ``sensitivity_draws``;
    * ``per_layer``: SQNR per fused layer and the one-layer-at-a-time ranking on ``per_layer_states``;
    * ``latency_calls``: batch-1 calls per model and target (0 turns latency off), plus
      ``latency_large_batch`` rows per call for throughput;
    * ``design``: how many paired episodes (``auto``: batches until the verdict is decided, see
      :mod:`edgeq.validate.sequential`; ``fixed``: every seed given);
    * ``failure``: which episode ends are failures (:mod:`edgeq.validate.outcomes`);
    * ``detail_episodes``: the noise floor runs on the first this-many validation seeds only.
    * ``all_int8_on_cpu``: where the ``cpu`` target runs a specialized file (``policy.int8.cpu.onnx``) that
      differs from the all-INT8 ``int8_model``, also run ``int8_model`` on the CPU (same seeds, the same
      sequential procedure, no noise floor or latency) as its own row with its own verdict
      (``validation["all_int8_cpu"]``): it is what TensorRT and CUDA run. The overall verdict stays the
      targets' (the files they run).
    * ``executor``: where the rollouts run (this process, worker processes, a Ray cluster); the
      results are the same for every executor (:mod:`edgeq.validate.spread`).
    """

    targets: tuple[str, ...] = ("cpu", "cuda", "trt")
    tolerance: Tolerance = field(default_factory=Tolerance)
    design: SequentialDesign = field(default_factory=SequentialDesign)
    failure: FailureRule = field(default_factory=FailureRule)
    detail_episodes: int = 30
    num_envs: int = 8
    floor_draws: int = 5
    floor_sigma: float = FLOOR_NOISE
    sensitivity: bool = True
    sensitivity_levels: tuple[float, ...] = DEFAULT_SENSITIVITY_LEVELS
    sensitivity_draws: int = 3
    per_layer: bool = True
    per_layer_states: int = 4096
    latency_calls: int = 10_000
    latency_large_batch: int = 4096
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    all_int8_on_cpu: bool = True

    @classmethod
    def light(cls, **overrides: Any) -> ValidationOptions:
        """Inside ``edgeq quantize``: 3 floor draws, no sensitivity, 2,000 latency calls, per-layer on."""
        base = cls(targets=("cpu",), floor_draws=3, sensitivity=False, latency_calls=2000, latency_large_batch=1024)
        return replace(base, **overrides)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = self.tolerance.to_json()
        d["design"] = self.design.to_json()
        d["failure"] = self.failure.to_json()
        d["executor"] = self.executor.to_json()
        return d


def slower_int8_note(target: str, result: dict[str, Any]) -> str | None:
    """A sentence when the target's int8 file is slower than its float file at batch 1 (median), else None."""
    models = (result.get("latency") or {}).get("models", {})
    f, q = models.get("float", {}).get("batch1"), models.get("int8", {}).get("batch1")
    if not f or not q or not q["median_us"] > f["median_us"]:
        return None
    int8_name, float_name = result.get("int8_model", "the int8 file"), result.get("float_model", "the float file")
    return (f"{target}: {int8_name} is slower than {float_name} at batch 1 (median {q['median_us']:.1f} us vs "
            f"{f['median_us']:.1f} us, {q['median_us'] / f['median_us']:.2f}x)")


def _series_json(seed: int, err: np.ndarray) -> dict[str, Any]:
    return {"seed": int(seed), "abs_error": [[float(f"{v:.6g}") for v in row] for row in err],
            "trajectory": "float"}


def _per_layer_episodes(traj: Any, seeds: Sequence[int], stateless: bool, max_states: int) -> list[np.ndarray]:
    if stateless:
        return [traj.sample_observations(max_states)]
    out, total = [], 0
    for s in seeds:
        obs = traj.observations(s)[:-1]
        take = obs[: max(0, max_states - total)]
        if len(take):
            out.append(take)
            total += len(take)
        if total >= max_states:
            break
    return out


def validate_models(float_model: Path, int8_model: Path, io: Mapping[str, Any], make_env: Callable[[], Any],
                    seeds: Sequence[int], *, env_id: str, action_low: np.ndarray, action_high: np.ndarray,
                    options: ValidationOptions = ValidationOptions(), plan: QuantPlan | None = None,
                    episode_steps: int | None = None,
                    progress: ProgressFactory = _no_progress,
                    int8_for_target: dict[str, Path] | None = None,
                    layer_float_model: Path | None = None) -> ValidationResult:
    """Validate ``int8_model`` against ``float_model`` in closed loop; returns ``validation.json``'s content
    (with the measured values :func:`split_measurements` moves to ``measurements.json``).

    ``int8_for_target`` names a target-specialized INT8 file (e.g. ``policy.int8.cpu.onnx`` for
    ``cpu``): that target validates the file that actually runs there. Each target's result names
    the files (``float_model``, ``int8_model``) and the runtime that produced its numbers.

    ``seeds`` are the seeds available, in order: with ``options.design`` ``auto`` each target takes
    them batch by batch until its verdict is decided (or the cap / time budget is reached); with
    ``fixed`` it runs them all.

    ``layer_float_model``: the float graph the INT8 files were made from when it is not ``float_model``
    (a pruned policy: ``float_model`` is the unpruned reference of the closed-loop verdict); the per-layer
    error is measured against it.

    Targets that cannot run here are listed under ``unavailable_targets`` with the reason. Raises
    :class:`EdgeqError` only when no requested target can run.
    """
    with options.executor.make() as executor:
        return _validate_models(float_model, int8_model, dict(io), make_env, seeds, env_id=env_id,
                                action_low=action_low, action_high=action_high, options=options, plan=plan,
                                episode_steps=episode_steps, progress=progress, int8_for_target=int8_for_target,
                                executor=executor, layer_float_model=layer_float_model)


def _validate_models(float_model: Path, int8_model: Path, io: dict[str, Any], make_env: Callable[[], Any],
                     seeds: Sequence[int], *, env_id: str, action_low: np.ndarray, action_high: np.ndarray,
                     options: ValidationOptions, plan: QuantPlan | None, episode_steps: int | None,
                     progress: ProgressFactory, int8_for_target: dict[str, Path] | None,
                     executor: Executor, layer_float_model: Path | None = None) -> ValidationResult:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EdgeqError("validation needs at least one episode (--episodes >= 1)")
    low = np.asarray(action_low, np.float64).ravel()
    high = np.asarray(action_high, np.float64).ravel()
    half = np.where(np.isfinite(high - low), (high - low) / 2, 1.0)
    act_dim = int(low.size)
    opts = options
    steps_per_rollout = len(seeds) * episode_steps if episode_steps else None
    if opts.design.sequential:
        steps_per_rollout = None  # unknown in advance
    val: dict[str, Any] = {"env_id": env_id, "seeds": seeds, "targets": {}, "unavailable_targets": {},
                           "tolerance": opts.tolerance.to_json(), "options": opts.to_json()}
    timings: dict[str, float] = {}
    float_traj_for_layers = None
    stateless = not io.get("state")
    traj_box: dict[str, Any] = {}

    def one_target(target: str, forced_int8: Path | None = None) -> dict[str, Any] | str:
        """Paired validation on ``target``; ``forced_int8``: this INT8 file instead of the target's own, light
        (no noise floor, no latency: the all-INT8 file's extra row). Returns the result or why it cannot run."""
        reason = unavailable_reason(target)
        runtimes = None
        if reason is None:
            try:
                # TensorRT builds from the portable QDQ file; ONNX Runtime targets run their specialized copy
                int8_here = (int8_model if target_runtime(target) == RUNTIME_TENSORRT
                             else (int8_for_target or {}).get(target, int8_model))
                if forced_int8 is not None:
                    int8_here = forced_int8
                if (forced_int8 is None and target_runtime(target) == RUNTIME_ORT_CUDA
                        and fused_cuda_reason(int8_model, io) is None):
                    # what edgeq.deploy's cuda backend runs: the fused INT8 kernel on the all-INT8 file
                    int8_here = int8_model
                f_spec = RuntimeSpec.of(target, float_model, io, "fp32")
                q_spec = RuntimeSpec.of(target, int8_here, io, "int8")
                # built here (and cached for the serial executor) so a target that cannot start is reported
                runtimes = [runtime_for(f_spec, 0), runtime_for(q_spec, 0), runtime_for(f_spec, 1),
                            runtime_for(q_spec, 1)]
            except Exception as exc:  # a provider that is listed but cannot start (missing libraries)
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if runtimes is None:
            return str(reason)
        f_rt, q_rt, f_shadow, q_shadow = runtimes
        t0 = time.perf_counter()
        stage = progress(f"{target}: float + int8 rollouts" + ("" if forced_int8 is None else
                                                               f" ({Path(forced_int8).name})"),
                         2 * steps_per_rollout if steps_per_rollout and not opts.design.sequential else None)
        box: dict[str, PairedRun] = {}

        def run_batch(batch: list[int]) -> None:
            more = run_paired_spread(make_env, f_spec, q_spec, batch, num_envs=opts.num_envs,  # noqa: B023
                                     act_dim=act_dim, action_scale=half, record=True, executor=executor,
                                     shard_size=opts.executor.shard_size, progress=stage,  # noqa: B023
                                     outcome=opts.failure)
            prev = box.get("run")  # noqa: B023
            box["run"] = more if prev is None else merge_paired([prev, more])  # noqa: B023

        def look(n: int, failure_alpha: float, final: bool) -> dict[str, Any]:
            r = box["run"]  # noqa: B023
            return decide(r.reference.returns, r.candidate.returns, r.reference.failed, r.candidate.failed,
                          opts.tolerance, opts.design, opts.failure, failure_alpha=failure_alpha, final=final)

        verdict, record = run_until_decided(seeds, opts.design, run_batch, look)
        run = box["run"]
        used = [int(s) for s in run.reference.seeds]
        res = run.to_json()
        res["runtime"] = target_runtime(target)
        res["providers"] = list(getattr(f_rt, "providers", []))[:1]
        res["float_model"] = Path(float_model).name
        res["int8_model"] = Path(int8_here).name if isinstance(int8_here, (str, Path)) else "(in memory)"
        describe = getattr(q_rt, "describe", None)
        res["int8_runtime"] = describe()["runtime"] if callable(describe) else res["runtime"]
        res["episodes"] = {**record.to_json(), "design": opts.design.to_json()}
        assert run.reference_traj is not None
        first = used[0]
        res["action_error_series"] = _series_json(
            first, action_error_series(f_shadow, q_shadow, run.reference_traj.observations(first)[:-1]))
        timings[f"{target}_rollouts_s" if forced_int8 is None else f"{target}_all_int8_rollouts_s"] = \
            time.perf_counter() - t0
        if opts.floor_draws > 0 and forced_int8 is None:
            t0 = time.perf_counter()
            k = max(1, min(len(used), opts.detail_episodes))
            fl = perturbed_returns_spread(make_env, f_spec, used[:k], sigma=opts.floor_sigma, draws=opts.floor_draws,
                                          low=low, high=high, num_envs=opts.num_envs, draw_seed=10_000,
                                          executor=executor, shard_size=opts.executor.shard_size,
                                          progress=progress(f"{target}: noise floor ({opts.floor_draws} draws)",
                                                            opts.floor_draws * k))
            res["noise_floor"] = noise_floor(run.reference.returns[:k], run.candidate.returns[:k], fl,
                                             sigma=opts.floor_sigma)
            res["noise_floor"]["episodes"] = k
            res["noise_floor"]["seeds"] = used[:k]
            timings[f"{target}_noise_floor_s"] = time.perf_counter() - t0
        res["verdict"] = add_floor_text(verdict, res)
        res["verdict"]["files"] = {"float": res["float_model"], "int8": res["int8_model"], "target": target,
                                   "runtime": res["runtime"]}
        res["verdict"]["stop_reason"] = record.stop_reason
        if opts.latency_calls > 0 and forced_int8 is None:
            t0 = time.perf_counter()
            lat = measure_latency({"float": make_runtime(target, float_model, io, precision="fp32"),
                                   "int8": make_runtime(target, int8_here, io, precision="int8")},
                                  run.reference_traj.sample_observations(1024), calls=opts.latency_calls,
                                  large_batch=opts.latency_large_batch,
                                  progress=progress(f"{target}: latency", 2 * opts.latency_calls))
            res["latency"] = strip_samples(lat)
            note = slower_int8_note(target, res)
            if note:
                res["latency_notes"] = [*res.get("latency_notes", []), note]
            timings[f"{target}_latency_s"] = time.perf_counter() - t0
        if forced_int8 is None:
            traj_box.setdefault("first", (target, run, f_rt))
        return res

    for target in opts.targets:
        got = one_target(target)
        if isinstance(got, str):
            val["unavailable_targets"][target] = got
        else:
            val["targets"][target] = got
    float_traj_for_layers = traj_box.get("first")
    cpu_file = (int8_for_target or {}).get("cpu")
    if ("cpu" in val["targets"] and opts.all_int8_on_cpu and cpu_file is not None
            and Path(cpu_file).name != Path(int8_model).name and _computes_differently(cpu_file, int8_model)):
        # the all-INT8 file (what TensorRT / CUDA run) on the CPU too: its own row and verdict, same seeds
        got = one_target("cpu", Path(int8_model))
        if not isinstance(got, str):
            got["role"] = ("all-INT8 file on the CPU (what TensorRT/CUDA run); the cpu target's verdict is for "
                           f"{Path(cpu_file).name}")
            val["all_int8_cpu"] = got
    if not val["targets"]:
        raise EdgeqError("none of the requested targets can run here: " + "; ".join(
            f"{t}: {r}" for t, r in val["unavailable_targets"].items()))
    val["verdict"] = overall({t: r["verdict"] for t, r in val["targets"].items()})
    longest = max((r["float"]["seeds"] for r in val["targets"].values()), key=len)
    val["seeds"] = [int(s) for s in longest]  # every target used a prefix of the same seed sequence
    val["episodes"] = {t: r["episodes"]["episodes"] for t, r in val["targets"].items()}
    assert float_traj_for_layers is not None
    target, run, f_rt = float_traj_for_layers
    if opts.sensitivity and opts.sensitivity_levels:
        t0 = time.perf_counter()
        levels = sorted(float(s) for s in opts.sensitivity_levels)
        k = max(1, min(len(run.reference.seeds), opts.detail_episodes))
        sens_seeds = [int(s) for s in run.reference.seeds[:k]]
        adv = progress("sensitivity (float + action noise)", len(levels) * opts.sensitivity_draws * k)
        f_spec = RuntimeSpec.of(target, float_model, io, "fp32")
        by_level = {s: perturbed_returns_spread(make_env, f_spec, sens_seeds, sigma=s, draws=opts.sensitivity_draws,
                                                low=low, high=high, num_envs=opts.num_envs,
                                                draw_seed=20_000 + 100 * i, executor=executor,
                                                shard_size=opts.executor.shard_size, progress=adv)
                    for i, s in enumerate(levels)}
        tr = val["targets"][target]
        val["sensitivity"] = sensitivity_curve(
            run.reference.returns[:k], by_level, tolerance=opts.tolerance.relative,
            int8_normalized_rms=tr["action_error"]["on_float_trajectory"].get("normalized_rms"))
        val["sensitivity"]["target"] = target
        val["sensitivity"]["episodes"] = k
        val["sensitivity"]["int8_mean"] = tr["int8"]["mean"]
        timings["sensitivity_s"] = time.perf_counter() - t0
    if opts.per_layer:
        t0 = time.perf_counter()
        progress("per-layer error", None)
        assert run.reference_traj is not None
        episodes = _per_layer_episodes(run.reference_traj, seeds, stateless, opts.per_layer_states)
        val["per_layer"] = per_layer_error(onnx.load(str(layer_float_model or float_model)), str(int8_model), io,
                                           episodes, plan=plan)
        val["per_layer"]["target"] = "cpu"
        timings["per_layer_s"] = time.perf_counter() - t0
    val["sizes"] = {Path(float_model).name: Path(float_model).stat().st_size,
                    Path(int8_model).name: Path(int8_model).stat().st_size}
    val["validation_timings"] = {k: round(v, 3) for k, v in timings.items()}
    return cast(ValidationResult, json_safe(val))


def _computes_differently(a: str | Path, b: str | Path) -> bool:
    """True when two INT8 files run some layer in a different precision (read from the graphs)."""
    from edgeq.export.file_precision import layer_precisions

    def statuses(path: str | Path) -> list[tuple[str, str]]:
        return [(r.node, r.status.replace("int8-rounded, float32 compute", "int8"))
                for r in layer_precisions(onnx.load(str(path)))]

    return statuses(a) != statuses(b)


def validate_bundle(bundle: str | Path, *, seeds: Sequence[int], options: ValidationOptions = ValidationOptions(),
                    progress: ProgressFactory = _no_progress,
                    failure: str | None = None) -> tuple[ValidationResult, Manifest]:
    """Validate an existing bundle (files checked against the manifest first); returns (validation, manifest).

    ``failure`` (a rule, see :mod:`edgeq.validate.outcomes`) overrides the one the bundle was
    validated with (``manifest["decision"]["failure_rule"]``, else its recipe's ``failure``);
    without either, ``options.failure`` applies.
    """
    from edgeq.deploy.bundle_format import PLAN, read_manifest
    from edgeq.envs import env_factory_for

    root = Path(bundle)
    manifest = read_manifest(root, verify=False)
    from edgeq.deploy.bundle_format import verify_files

    models = manifest.get("models", {})
    if "fp32" not in models or "int8" not in models:
        raise EdgeqError(f"{root}: manifest lists models {sorted(models)}; expected both 'fp32' and 'int8'")
    verify_files(root, manifest, sorted(set(models.values())))
    env = manifest.get("env") or {}
    if not env.get("id"):
        raise EdgeqError(f"{root}: this bundle was made without an environment (calibrated from logged "
                         "observations, or env.id is missing); closed-loop validation needs one: quantize again "
                         "with --env")
    make_env = env_factory_for(env)  # with the wrappers / frame stack the policy was trained with
    decision = manifest.get("decision")
    stored = ((decision.get("failure_rule") or {}).get("rule") if decision else None) or (
        ((manifest.get("calibration") or {}).get("recipe") or {}).get("failure"))
    if failure is not None or stored:
        options = replace(options, failure=parse_failure(failure if failure is not None else stored))
    fpath, qpath = root / models["fp32"], root / models["int8"]
    plan = None
    quant = manifest.get("quantization")
    if quant:
        try:  # the stored plan; bundles made before plan.json existed: rebuilt from the manifest
            plan = (QuantPlan.from_bundle(root) if PLAN in manifest.get("files", {})
                    else plan_from_manifest(onnx.load(str(fpath)), quant, onnx.load(str(qpath))))
        except (KeyError, ValueError):
            plan = None
    act = manifest["action_space"]
    probe = make_env()
    try:
        spec = getattr(probe, "spec", None)
        ep_len = getattr(spec, "max_episode_steps", None)
    finally:
        probe.close()
    val = validate_models(fpath, qpath, manifest.get("io", {}), make_env, seeds, env_id=env["id"],
                          action_low=np.asarray(act["low"], np.float64),
                          action_high=np.asarray(act["high"], np.float64), options=options, plan=plan,
                          episode_steps=ep_len, progress=progress,
                          int8_for_target={t: root / models[f"int8-{t}"] for t in ("cpu", "cuda", "trt")
                                           if f"int8-{t}" in models},
                          layer_float_model=root / pruned if (pruned := (manifest.get("pruning") or {}).get("file"))
                          else None)
    return val, manifest


def decision_record(validation: Mapping[str, Any]) -> Decision:
    """What the bundle's manifest records of a validation (``manifest["decision"]``, docs/bundle-format.md).

    The verdict, the procedure with its parameters, the tolerance and failure rule, and per target
    the files and runtime that produced the numbers, the episodes used, why the loop stopped, the
    return interval and the success / failure / time-out counts.
    """
    v = validation["verdict"]
    opts = validation.get("options", {})
    record: Decision = {"status": v["status"], "exit_code": v["exit_code"], "procedure": opts.get("design"),
                        "tolerance": validation.get("tolerance"), "failure_rule": opts.get("failure"),
                        "targets": {t: _target_record(r) for t, r in validation["targets"].items()}}
    if validation.get("all_int8_cpu"):
        record["all_int8_cpu"] = _target_record(validation["all_int8_cpu"])
    return record


def _target_record(r: Mapping[str, Any]) -> DecisionTarget:
    """One target's (or the all-INT8 row's) entry in the decision record."""
    vd = r.get("verdict", {})
    ret, fail = vd.get("returns", {}), vd.get("failures", {})
    return {
        "status": vd.get("status"), "float_model": r.get("float_model"), "int8_model": r.get("int8_model"),
        "runtime": r.get("runtime"), "episodes": (r.get("episodes") or {}).get("episodes"),
        "stop_reason": vd.get("stop_reason"), "needed_episodes": vd.get("needed_episodes"),
        "returns": cast(DecisionReturns, {k: ret.get(k) for k in DecisionReturns.__annotations__}),
        "failures": cast(DecisionFailures, {k: fail.get(k) for k in DecisionFailures.__annotations__}),
        "outcomes": {side: (r.get("outcomes") or {}).get(side) for side in ("float", "int8")}}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600; a bundle's files are readable where the umask allows
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Keys whose values are measured on this machine at this time (wall-clock timings, latency): they go to
#: ``measurements.json``, outside the hashed, deterministic part of a bundle.
MEASURED_KEYS = ("timings", "validation_timings", "latency", "latency_notes", "seconds", "made_utc",
                 "cpu_layer_timing")


def split_measurements(validation: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``validation`` without :data:`MEASURED_KEYS` (at any depth), and those values in the same nesting.

    The first part is deterministic for the same inputs and seeds (``validation.json``); the second
    (``measurements.json``) differs from run to run and machine to machine.
    """
    def split(node: Any) -> tuple[Any, Any]:
        if isinstance(node, list):
            parts = [split(x) for x in node]
            measured_items = [m if m else {} for _, m in parts]
            return [k for k, _ in parts], (measured_items if any(measured_items) else None)
        if not isinstance(node, dict):
            return node, None
        kept: dict[str, Any] = {}
        measured: dict[str, Any] = {}
        for key, value in node.items():
            if key in MEASURED_KEYS:
                measured[key] = value
                continue
            k, m = split(value)
            kept[key] = k
            if m:
                measured[key] = m
        return kept, measured

    kept, measured = split(validation)
    return kept, measured


def save_validation(directory: str | Path, validation: ValidationResult, manifest: Mapping[str, Any] | None = None, *,
                    report: bool = True, update_manifest: bool = False) -> list[Path]:
    """Write ``validation.json``, ``measurements.json`` (and report.html, report.md, report/*.png) into
    ``directory``: the measured values (:data:`MEASURED_KEYS`) go to ``measurements.json`` only; the
    report shows everything.

    With ``update_manifest`` (``directory`` is the bundle) the manifest's SHA-256 entries of the
    files written are refreshed, so the bundle still verifies, and its ``decision`` is replaced by
    this validation's (:func:`decision_record`); the model entries are untouched. Every file is
    written to a temporary name and renamed into place.
    """
    from edgeq.deploy.bundle_format import MANIFEST, MEASUREMENTS, VALIDATION, is_measured, sha256_of
    from edgeq.validate.report import write_validation_report

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    written = [root / VALIDATION, root / MEASUREMENTS]
    deterministic, measured = split_measurements(validation)
    atomic_write(root / VALIDATION, (json.dumps(json_safe(deterministic), indent=2, allow_nan=False) + "\n").encode())
    atomic_write(root / MEASUREMENTS, (json.dumps(json_safe(measured), indent=2, allow_nan=False) + "\n").encode())
    if report:
        written += write_validation_report(root, validation, manifest)
    if update_manifest:
        mpath = root / MANIFEST
        current = json.loads(mpath.read_text())
        files = dict(current.get("files", {}))
        for p in written:
            name = p.relative_to(root).as_posix()
            if p.is_file() and not is_measured(name):
                files[name] = sha256_of(p)
        current["files"] = files
        if validation.get("verdict") and validation.get("targets"):
            current["decision"] = decision_record(validation)
        atomic_write(mpath, (json.dumps(current, indent=2) + "\n").encode())
        sig = root / "manifest.sig"
        if sig.exists():  # the manifest changed: its signature no longer holds
            sig.unlink()
            import warnings

            warnings.warn(f"{root}: the manifest changed, so its signature was removed; sign the bundle again "
                          "(edgeq sign BUNDLE --key KEY)", UserWarning, stacklevel=2)
    return written
