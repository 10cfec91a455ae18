"""Validation targets: which runtime runs the bundle's models (cpu, cuda, trt)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import EdgeqError
from edgeq.validate.paired import paired_rollouts

TARGETS = ("cpu", "cuda", "trt")


def target_providers(target: str) -> list[str]:
    """ONNX Runtime providers for a target; raises if the target cannot run here."""
    import onnxruntime as ort

    if target == "cpu":
        return ["CPUExecutionProvider"]
    if target == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EdgeqError("target 'cuda' needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
        return ["CUDAExecutionProvider"]
    raise EdgeqError(f"target {target!r} is not available through ONNX Runtime; expected one of {TARGETS}")


def available_targets() -> list[str]:
    import onnxruntime as ort

    found = ["cpu"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        found.append("cuda")
    return found


def validate_target(target: str, float_model: Path, int8_model: Path, io: dict[str, Any],
                    make_env: Callable[[], Any], seeds: Sequence[int], *, act_dim: int, num_envs: int = 8,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Paired float/int8 rollouts of the two model files on ``target``."""
    providers = target_providers(target)

    def runtime(path: Path) -> OrtPolicy:
        return OrtPolicy(path, input_name=io.get("input", "obs"), output_name=io.get("output", "actions"),
                         state=io.get("state", []), providers=providers)

    result = paired_rollouts(make_env, runtime(float_model), runtime(int8_model), runtime(float_model),
                             runtime(int8_model), seeds, num_envs=num_envs, act_dim=act_dim, progress=progress)
    return {"providers": providers, **result}
