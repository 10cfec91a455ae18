"""Validation targets: which runtime runs the bundle's models (cpu, cuda, trt), and whether it can here.

``cpu`` is ONNX Runtime's CPU provider; ``cuda`` its CUDA provider (needs onnxruntime-gpu);
``trt`` its TensorRT provider (needs the ``tensorrt`` package and an onnxruntime build with the
TensorRT provider). A target that cannot run here is reported as unavailable with the reason;
it never fails a validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeq.deploy.runtime import OrtPolicy
from edgeq.errors import EdgeqError
from edgeq.validate.paired import paired_rollouts

TARGETS = ("cpu", "cuda", "trt")
_ORT_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}


def parse_targets(text: str) -> list[str]:
    """``"cpu,cuda"`` → ``["cpu", "cuda"]``; ``"all"``/``"auto"`` → every known target."""
    if text.strip() in ("all", "auto"):
        return list(TARGETS)
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise EdgeqError(f"--targets {text!r}: unknown target(s) {bad}; expected a comma-separated subset of "
                         f"{', '.join(TARGETS)} (or 'all')")
    return list(dict.fromkeys(names))


def unavailable_reason(target: str) -> str | None:
    """Why ``target`` cannot run on this machine, or None when it can."""
    import onnxruntime as ort

    if target not in TARGETS:
        return f"unknown target {target!r}; expected one of {TARGETS}"
    have = ort.get_available_providers()
    if target == "cpu":
        return None
    if target == "cuda":
        if _ORT_NAME["cuda"] in have:
            return None
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    if _ORT_NAME["trt"] not in have:
        return "onnxruntime has no TensorrtExecutionProvider"
    return None


def target_providers(target: str, *, precision: str = "int8") -> list[Any]:
    """ONNX Runtime providers for a target; raises :class:`EdgeqError` if the target cannot run here."""
    reason = unavailable_reason(target)
    if reason is not None:
        raise EdgeqError(f"target {target!r} is not available: {reason}")
    if target == "cpu":
        return ["CPUExecutionProvider"]
    if target == "cuda":
        return ["CUDAExecutionProvider"]
    opts = {"trt_int8_enable": precision == "int8", "trt_fp16_enable": False}
    return [("TensorrtExecutionProvider", opts)]


def available_targets() -> list[str]:
    return [t for t in TARGETS if unavailable_reason(t) is None]


def make_runtime(target: str, path: str | Path | bytes, io: dict[str, Any], *, precision: str = "int8",
                 intra_op_threads: int = 1) -> OrtPolicy:
    """A session for ``path`` on ``target``; raises if ONNX Runtime silently fell back to another provider."""
    providers = target_providers(target, precision=precision)
    rt = OrtPolicy(path, input_name=io.get("input", "obs"), output_name=io.get("output", "actions"),
                   state=io.get("state", []), providers=providers, intra_op_threads=intra_op_threads)
    want = _ORT_NAME[target]
    if not rt.providers or rt.providers[0] != want:
        raise EdgeqError(f"target {target!r}: ONNX Runtime could not start {want} (session uses {rt.providers})")
    return rt


def validate_target(target: str, float_model: Path, int8_model: Path, io: dict[str, Any],
                    make_env: Callable[[], Any], seeds: Sequence[int], *, act_dim: int, num_envs: int = 8,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Paired float/int8 rollouts of the two model files on ``target`` (summary dict)."""

    def runtime(path: Path, precision: str) -> OrtPolicy:
        return make_runtime(target, path, io, precision=precision)

    result = paired_rollouts(make_env, runtime(float_model, "fp32"), runtime(int8_model, "int8"),
                             runtime(float_model, "fp32"), runtime(int8_model, "int8"), seeds, num_envs=num_envs,
                             act_dim=act_dim, progress=progress)
    return {"providers": target_providers(target), **result}
