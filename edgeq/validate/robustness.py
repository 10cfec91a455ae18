"""Robustness validation: float vs INT8 nominally *and* under a disturbance schedule, with range coverage.

For each target, the paired validator (:func:`edgeq.validate.paired.paired_rollouts`) runs the two
bundle models on the same seeds in each condition: ``nominal`` (the validation env as given) and,
when disturbances are named, ``perturbed`` (the same env wrapped in them, see :mod:`edgeq.perturb`;
the push schedule is a function of the episode seed, so both precisions meet the same pushes).
Each condition reports returns, per-episode ``terminated`` flags, termination (fall) rates with
Wilson 95% intervals and their paired difference, the action error, and the saturation rate of
every INT8 tensor (:mod:`edgeq.validate.saturation`) on the INT8 policy's own trajectory and on the
float policy's trajectory.

The result for a target keeps the nominal results at its top level (the layout
:func:`edgeq.validate.targets.validate_target` writes) and adds ``saturation`` and ``perturbed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeq.deploy.history import with_history
from edgeq.deploy.runtime import OrtPolicy, provider_names
from edgeq.validate.paired import paired_rollouts
from edgeq.validate.saturation import (
    DEFAULT_SATURATION_WARN,
    SaturationMonitor,
    instrument_model,
)
from edgeq.validate.targets import target_providers


def _runtime(model: Path | bytes, io: Mapping[str, Any], providers: list[Any]) -> Any:
    return with_history(OrtPolicy(model, input_name=io.get("input", "obs"), output_name=io.get("output", "actions"),
                                  state=io.get("state", []), providers=providers), io)


def validate_condition(make_env: Callable[[], Any], float_model: Path, int8_model: Path, io: Mapping[str, Any],
                       seeds: Sequence[int], *, providers: list[Any], act_dim: int, ranges: Mapping[str, float],
                       saturation_warn: float = DEFAULT_SATURATION_WARN, num_envs: int = 8,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Paired float/int8 rollouts in one env, with saturation counted on both trajectories."""
    if ranges:
        instrumented = instrument_model(int8_model, list(ranges))
        cand: Any = SaturationMonitor(_runtime(instrumented, io, providers), ranges)
        shadow_cand: Any = SaturationMonitor(_runtime(instrumented, io, providers), ranges)
    else:
        cand, shadow_cand = _runtime(int8_model, io, providers), _runtime(int8_model, io, providers)
    result = paired_rollouts(make_env, _runtime(float_model, io, providers), cand, _runtime(float_model, io, providers),
                             shadow_cand, seeds, num_envs=num_envs, act_dim=act_dim, progress=progress)
    if ranges:
        own = cand.report(saturation_warn)
        result["saturation"] = {"threshold": saturation_warn, "on_int8_trajectory": own,
                                "on_float_trajectory": shadow_cand.report(saturation_warn),
                                "max_rate": own["max_rate"], "max_tensor": own["max_tensor"],
                                "warnings": own["warnings"]}
    return result


def validate_target_robustness(target: str, float_model: Path, int8_model: Path, io: Mapping[str, Any],
                               make_env: Callable[[], Any], seeds: Sequence[int], *, act_dim: int,
                               ranges: Mapping[str, float], perturbed_env: Callable[[], Any] | None = None,
                               perturbation: Sequence[dict[str, Any]] = (),
                               saturation_warn: float = DEFAULT_SATURATION_WARN, num_envs: int = 8,
                               progress: Callable[[str], Callable[[int], None] | None] | None = None
                               ) -> dict[str, Any]:
    """Nominal (and, with ``perturbed_env``, perturbed) paired validation of a bundle's models on ``target``."""
    providers = target_providers(target)

    def prog(stage: str) -> Callable[[int], None] | None:
        return progress(stage) if progress is not None else None

    result: dict[str, Any] = {"providers": provider_names(providers)}
    result.update(validate_condition(make_env, float_model, int8_model, io, seeds, providers=providers,
                                     act_dim=act_dim, ranges=ranges, saturation_warn=saturation_warn,
                                     num_envs=num_envs, progress=prog("nominal")))
    if perturbed_env is not None:
        perturbed = validate_condition(perturbed_env, float_model, int8_model, io, seeds, providers=providers,
                                       act_dim=act_dim, ranges=ranges, saturation_warn=saturation_warn,
                                       num_envs=num_envs, progress=prog("perturbed"))
        result["perturbed"] = {"perturbation": list(perturbation), **perturbed}
    return result
