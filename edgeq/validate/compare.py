"""Several quantized policies side by side against one float reference, on the same seeds.

A candidate is an edgeq bundle (its INT8 model; its plan allows the per-layer ranking) or a plain
ONNX file — e.g. a QDQ model made by another tool — mapping observations to actions in the env's
units (first graph input → first graph output). Everything is rolled out on one target, and
judged with the same tolerance and noise floor as ``edgeq validate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeq.deploy.bundle_format import PLAN, read_manifest, sha256_of, verify_files
from edgeq.errors import EdgeqError
from edgeq.quantizers.plan import QuantPlan
from edgeq.validate.latency import measure_latency, strip_samples
from edgeq.validate.layers import per_layer_error, plan_from_manifest
from edgeq.validate.noise import FLOOR_NOISE, noise_floor, perturbed_returns
from edgeq.validate.paired import action_error_series, run_paired
from edgeq.validate.stats import json_safe
from edgeq.validate.targets import make_runtime, unavailable_reason
from edgeq.validate.verdict import Tolerance, judge

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(stage: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class Candidate:
    """One model to compare: where it came from and how to run it."""

    name: str
    model: Path
    io: dict[str, Any]
    kind: str  # "bundle" | "onnx"
    manifest: Mapping[str, Any] | None = None
    float_model: Path | None = None  # the bundle's own fp32 model

    def plan_for(self, reference: Path) -> QuantPlan | None:
        """The bundle's plan, when its float model is the reference (so one-layer variants are meaningful)."""
        if self.manifest is None or self.float_model is None or not self.manifest.get("quantization"):
            return None
        if sha256_of(self.float_model) != sha256_of(reference):
            return None
        try:
            root = self.float_model.parent
            if PLAN in self.manifest.get("files", {}):
                return QuantPlan.from_bundle(root)
            int8 = root / self.manifest.get("models", {}).get("int8", "policy.int8.onnx")  # before plan.json
            return plan_from_manifest(onnx.load(str(self.float_model)), self.manifest["quantization"],
                                      onnx.load(str(int8)) if int8.is_file() else None)
        except (KeyError, ValueError):
            return None


def onnx_io(path: Path) -> dict[str, Any]:
    """IO names of a plain ONNX policy: its first non-initializer input and first output."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise EdgeqError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or not model.graph.output:
        raise EdgeqError(f"{path}: expected an ONNX policy with one input (observations) and an output (actions); "
                         f"it has inputs {inputs} and outputs {[o.name for o in model.graph.output]}")
    return {"input": inputs[0], "output": model.graph.output[0].name, "state": []}


def load_candidate(spec: str | Path, name: str | None = None, *, precision: str = "int8",
                   target: str = "cpu") -> Candidate:
    """A bundle directory or an ``.onnx`` file.

    For a bundle, the ``precision`` file that ``edgeq validate`` runs on ``target``: the
    target-specialized copy where the bundle has one (``policy.int8.cpu.onnx`` on cpu,
    ``policy.int8.cuda.onnx`` on cuda through ONNX Runtime), the portable file for TensorRT.
    """
    path = Path(spec)
    if path.is_dir():
        manifest = read_manifest(path, verify=False)
        models = manifest.get("models", {})
        if precision not in models:
            raise EdgeqError(f"{path}: no {precision!r} model in this bundle (has {sorted(models)})")
        chosen = _file_for_target(models, precision, target)
        verify_files(path, manifest, [chosen, *([models["fp32"]] if "fp32" in models else [])])
        return Candidate(name or path.name, path / chosen, dict(manifest.get("io", {})), "bundle",
                         manifest, path / models["fp32"] if "fp32" in models else None)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return Candidate(name or path.stem, path, onnx_io(path), "onnx")
    raise EdgeqError(f"{path}: expected an edgeq bundle directory or an .onnx file")


def _file_for_target(models: dict[str, str], precision: str, target: str) -> str:
    """The same choice as :func:`edgeq.validate.validator.validate_models` (TensorRT builds from the QDQ file)."""
    if target == "trt" or precision != "int8":
        return models[precision]
    if target == "cuda":
        from edgeq.validate.targets import RUNTIME_TENSORRT, target_runtime

        try:
            if target_runtime("cuda") == RUNTIME_TENSORRT:
                return models[precision]
        except EdgeqError:
            pass
    return models.get(f"{precision}-{target}", models[precision])


def source_warnings(reference: Candidate, candidates: Sequence[Candidate]) -> list[str]:
    """One line per bundle made from a different source policy (SHA-256 in the manifest) than the reference's."""
    def source(c: Candidate) -> tuple[str | None, str | None]:
        src = (c.manifest or {}).get("source") or {}
        return src.get("sha256"), src.get("path")

    bundles = [c for c in (reference, *candidates) if c.kind == "bundle" and source(c)[0]]
    if not bundles:
        return []
    first = bundles[0]
    out = []
    for c in bundles[1:]:
        if source(c)[0] != source(first)[0]:
            out.append(f"{c.name} was made from a different source policy than {first.name} "
                       f"({source(c)[1]} sha256 {str(source(c)[0])[:12]}… vs {source(first)[1]} sha256 "
                       f"{str(source(first)[0])[:12]}…): its differences include the policies' own differences, "
                       "not only quantization")
    return out


def compare_models(reference: Candidate, candidates: Sequence[Candidate], make_env: Callable[[], Any],
                   seeds: Sequence[int], *, env_id: str, action_low: np.ndarray, action_high: np.ndarray,
                   target: str = "cpu", tolerance: Tolerance = Tolerance(), num_envs: int = 8, floor_draws: int = 3,
                   latency_calls: int = 2000, large_batch: int = 1024, per_layer: bool = True,
                   episode_steps: int | None = None, progress: ProgressFactory = _no_progress) -> dict[str, Any]:
    """Roll the reference and each candidate out on ``seeds`` on ``target``; returns ``compare.json``'s content."""
    reason = unavailable_reason(target)
    if reason is not None:
        raise EdgeqError(f"target {target!r} is not available here: {reason}")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names) or reference.name in names:
        raise EdgeqError(f"candidate names must be unique and differ from the reference; got {names} "
                         f"(reference {reference.name!r}); pass --names")
    seeds = [int(s) for s in seeds]
    low = np.asarray(action_low, np.float64).ravel()
    high = np.asarray(action_high, np.float64).ravel()
    half = np.where(np.isfinite(high - low), (high - low) / 2, 1.0)
    steps = len(seeds) * episode_steps if episode_steps else None
    out: dict[str, Any] = {"env_id": env_id, "seeds": seeds, "target": target, "tolerance": tolerance.to_json(),
                           "reference": {"name": reference.name, "model": str(reference.model),
                                         "file": reference.model.name}, "candidates": {},
                           "warnings": source_warnings(reference, candidates)}
    f_rt = make_runtime(target, reference.model, reference.io, precision="fp32")
    f_shadow = make_runtime(target, reference.model, reference.io, precision="fp32")
    floor_returns = None
    latency_sessions = {"float": make_runtime(target, reference.model, reference.io, precision="fp32")}
    first_run = None
    for cand in candidates:
        t0 = time.perf_counter()
        try:
            q_rt = make_runtime(target, cand.model, cand.io)
            q_shadow = make_runtime(target, cand.model, cand.io)
        except EdgeqError:
            raise
        except Exception as exc:
            raise EdgeqError(f"{cand.model}: ONNX Runtime cannot load it on {target}: {exc}") from None
        run = run_paired(make_env, f_rt, q_rt, f_shadow, q_shadow, seeds, num_envs=num_envs, act_dim=low.size,
                         action_scale=half, record=True,
                         progress=progress(f"{cand.name}: rollouts", 2 * steps if steps else None))
        res = run.to_json()
        res["kind"] = cand.kind
        res["model"] = str(cand.model)
        res["file"] = cand.model.name
        res["float_model"] = reference.model.name
        res["int8_model"] = cand.model.name
        res["target"] = target
        res["size"] = cand.model.stat().st_size
        assert run.reference_traj is not None
        res["action_error_series"] = {
            "seed": seeds[0], "trajectory": "float",
            "abs_error": [[float(f"{v:.6g}") for v in row] for row in action_error_series(
                f_shadow, q_shadow, run.reference_traj.observations(seeds[0])[:-1])]}
        if floor_draws > 0:
            if floor_returns is None:
                floor_returns = perturbed_returns(make_env, f_rt, seeds, sigma=FLOOR_NOISE, draws=floor_draws,
                                                  low=low, high=high, num_envs=num_envs, draw_seed=10_000,
                                                  progress=progress("noise floor", floor_draws * steps
                                                                    if steps else None))
            res["noise_floor"] = noise_floor(run.reference.returns, run.candidate.returns, floor_returns)
        res["verdict"] = judge(res, tolerance)
        if per_layer:
            stateless = not reference.io.get("state")
            episodes = ([run.reference_traj.sample_observations(2048)] if stateless
                        else [run.reference_traj.observations(s)[:-1] for s in seeds[:2]])
            res["per_layer"] = per_layer_error(onnx.load(str(reference.model)), str(cand.model), reference.io,
                                               episodes, plan=cand.plan_for(reference.model))
        res["seconds"] = round(time.perf_counter() - t0, 3)
        out["candidates"][cand.name] = res
        latency_sessions[cand.name] = make_runtime(target, cand.model, cand.io)
        if first_run is None:
            first_run = run
    assert first_run is not None and first_run.reference_traj is not None
    out["float"] = {k: v for k, v in next(iter(out["candidates"].values()))["float"].items()}
    out["float"]["size"] = reference.model.stat().st_size
    if latency_calls > 0:
        t0 = time.perf_counter()
        lat = measure_latency(latency_sessions, first_run.reference_traj.sample_observations(1024),
                              calls=latency_calls, large_batch=large_batch,
                              progress=progress("latency", latency_calls * len(latency_sessions)))
        out["latency"] = strip_samples(lat)
        out["latency_s"] = round(time.perf_counter() - t0, 3)
    return json_safe(out)  # type: ignore[no-any-return]
