"""Validation targets: which runtime runs the bundle's models (cpu, cuda, trt).

* ``cpu``: ONNX Runtime's CPU provider.
* ``cuda``: an NVIDIA GPU. TensorRT when its Python package (with its runtime, not only type stubs)
  imports, else ONNX Runtime's CUDA EP (:class:`edgeq.deploy.ort_cuda.OrtCudaPolicy`, IO binding and
  CUDA graphs) running the CUDA-specialized INT8 graph. The result says which (``runtime``).
* ``trt``: TensorRT only: engines are built from the float and the QDQ ONNX in a temporary folder and
  run with :class:`edgeq.deploy.tensorrt_runner.TrtPolicyRunner`.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.history import with_history
from edgeq.deploy.runtime import OrtPolicy, ort_providers, provider_names
from edgeq.errors import EdgeqError
from edgeq.validate.paired import paired_rollouts

TARGETS = ("cpu", "cuda", "trt")
RUNTIME_ORT_CPU = "onnxruntime-cpu"
RUNTIME_ORT_CUDA = "onnxruntime-cuda"
#: The INT8 policy on the ``cuda`` target runs edgeq's fused kernel where it can (the default CUDA backend
#: of ``edgeq.deploy``): feed-forward INT8 graphs, cuda-python and a GPU.
RUNTIME_FUSED_CUDA = "edgeq-fused-cuda"
RUNTIME_TENSORRT = "tensorrt"


def tensorrt_available() -> bool:
    """True if TensorRT itself imports (``tensorrt-stubs`` alone import as an empty package: False)."""
    from edgeq.deploy.tensorrt_runner import TENSORRT_AVAILABLE

    return bool(TENSORRT_AVAILABLE)


def target_runtime(target: str) -> str:
    """The runtime that ``target`` uses here: onnxruntime-cpu, onnxruntime-cuda or tensorrt.

    Raises :class:`EdgeqError` (one line, with the fix) if the target cannot run on this machine.
    """
    if target == "cpu":
        return RUNTIME_ORT_CPU
    if target == "trt":
        if not tensorrt_available():
            from edgeq.deploy.tensorrt_runner import TENSORRT_IMPORT_ERROR

            raise EdgeqError(f"target 'trt' needs TensorRT with its runtime libraries ({TENSORRT_IMPORT_ERROR}); "
                             "install it on the GPU machine, or use target 'cuda' (ONNX Runtime's CUDA EP)")
        return RUNTIME_TENSORRT
    if target == "cuda":
        if tensorrt_available():
            return RUNTIME_TENSORRT
        from edgeq.deploy.ort_cuda import require_cuda_ep

        require_cuda_ep()
        return RUNTIME_ORT_CUDA
    raise EdgeqError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


def target_providers(target: str, *, precision: str = "int8") -> list[Any]:
    """ONNX Runtime providers (with their options) for a target, exactly as ``edgeq.deploy`` sets them
    (CUDA: TF32 off); raises if the target cannot run here through ONNX Runtime."""
    runtime = target_runtime(target)
    if runtime == RUNTIME_ORT_CPU:
        return ort_providers("cpu")
    if runtime == RUNTIME_ORT_CUDA:
        return ort_providers("cuda")
    raise EdgeqError(f"target {target!r} runs through TensorRT here, not ONNX Runtime")


def available_targets() -> list[str]:
    """The targets that can run on this machine."""
    found = ["cpu"]
    for target in ("cuda", "trt"):
        try:
            target_runtime(target)
        except EdgeqError:
            continue
        found.append(target)
    return found


def cuda_int8_bytes(int8_model: Path) -> bytes:
    """The CUDA-specialized INT8 graph of a QDQ file (:func:`edgeq.export.ort_cuda.specialize_for_ort_cuda`)."""
    import onnx

    from edgeq.export.ort_cuda import specialize_for_ort_cuda

    return specialize_for_ort_cuda(onnx.load(str(int8_model))).SerializeToString(deterministic=True)


class TrtBatchPolicy:
    """:class:`TrtPolicyRunner` as a rollout policy (``act``/``reset``), carrying recurrent state on the host."""

    def __init__(self, runner: Any, io: dict[str, Any]) -> None:
        self.runner = runner
        self.output_name = io.get("output", "actions")
        self.state_specs = [dict(s) for s in io.get("state", [])]
        self._state: dict[str, np.ndarray] = {}

    def reset(self, mask: np.ndarray | None = None) -> None:
        if mask is None:
            self._state.clear()
            return
        for value in self._state.values():
            value[np.asarray(mask, bool)] = 0.0

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        state = {}
        for spec in self.state_specs:
            cur = self._state.get(spec["input"])
            if cur is None or cur.shape[0] != obs.shape[0]:
                cur = np.zeros((obs.shape[0], *spec["shape"]), np.float32)
            state[spec["input"]] = cur
        out = self.runner.run(obs, **state)
        if not isinstance(out, dict):
            return np.asarray(out)
        for spec in self.state_specs:
            self._state[spec["input"]] = np.ascontiguousarray(out[spec["output"]])
        return np.asarray(out[self.output_name])


def _tensorrt_runtimes(float_model: Path, int8_model: Path, io: dict[str, Any], num_envs: int,
                       workdir: Path) -> tuple[Callable[[str], TrtBatchPolicy], dict[str, Any]]:
    from edgeq.deploy.tensorrt_runner import TrtPolicyRunner
    from edgeq.export.tensorrt_engine import EngineBuildConfig, Precision, build_engine

    input_name = io.get("input", "obs")
    infos: dict[str, Any] = {}
    builds: tuple[tuple[Precision, Path], ...] = (("fp32", float_model), ("int8", int8_model))
    for precision, src in builds:
        config = EngineBuildConfig(precision=precision, min_batch=1, opt_batch=num_envs, max_batch=num_envs,
                                   timing_cache=workdir / "timing.cache")
        infos[precision] = build_engine(src, workdir / f"policy.{precision}.engine", config, input_name=input_name)

    def make(precision: str) -> Any:
        info = infos[precision]
        return with_history(TrtBatchPolicy(TrtPolicyRunner(info.engine_path, expected=info.to_dict(),
                                                           input_name=input_name), io), io)

    first = infos["int8"]
    described = {"runtime": RUNTIME_TENSORRT, "tensorrt_version": first.tensorrt_version, "gpu": first.gpu_name,
                 "compute_capability": first.compute_capability,
                 "engines": {p: {"precision_counts": i.precision_counts, "int8_layers": i.int8_layers,
                                 "reformat_layers": i.reformat_layers} for p, i in infos.items()}}
    return make, described


def fused_cuda_reason(int8_model: str | Path | bytes, io: dict[str, Any]) -> str | None:
    """Why edgeq's fused INT8 kernels cannot run ``int8_model`` here (None: they can, and ``edgeq.deploy``'s
    ``cuda`` backend runs it there): the feed-forward kernel (:mod:`edgeq.deploy.fused_mlp`), or for a
    recurrent policy (``io.state``) the LSTM/GRU kernel (:mod:`edgeq.deploy.fused_rnn`)."""
    if isinstance(int8_model, bytes):
        return "the model is not a file"
    from edgeq.deploy import cuda

    reason = cuda.available()
    if reason is not None:
        return reason
    if io.get("state"):
        from edgeq.deploy.fused_rnn import fused_rnn_support

        return fused_rnn_support(int8_model, list(io["state"]), input_name=io.get("input", "obs"),
                                 output_name=io.get("output", "actions"))
    from edgeq.deploy.fused_mlp import fused_support

    return fused_support(int8_model)


def fused_cuda_policy(int8_model: str | Path, io: dict[str, Any], *, cuda_graph: bool = True) -> Any:
    """The fused INT8 kernel's policy for ``int8_model`` (check :func:`fused_cuda_reason` first): the LSTM/GRU
    kernel for a recurrent policy, else the feed-forward one; what ``edgeq.deploy.load(b, "cuda")`` runs."""
    inp, out, state = io.get("input", "obs"), io.get("output", "actions"), io.get("state", [])
    if state:
        from edgeq.deploy.fused_rnn import FusedRnnPolicy

        return FusedRnnPolicy(Path(str(int8_model)), state=list(state), input_name=inp, output_name=out,
                              cuda_graph=cuda_graph)
    from edgeq.deploy.fused_mlp import FusedCudaPolicy

    return FusedCudaPolicy(Path(str(int8_model)), input_name=inp, output_name=out, cuda_graph=cuda_graph)


def validate_target(target: str, float_model: Path, int8_model: Path, io: dict[str, Any],
                    make_env: Callable[[], Any], seeds: Sequence[int], *, act_dim: int, num_envs: int = 8,
                    progress: Callable[[int], None] | None = None, cuda_int8_model: Path | None = None,
                    cuda_graph: bool = True) -> dict[str, Any]:
    """Paired float/int8 rollouts of the two model files on ``target``.

    ``int8_model`` is the portable QDQ file (for ``cpu``, its CPU-specialized copy). On the ``cuda``
    target through ONNX Runtime the INT8 policy runs ``cuda_int8_model`` (the bundle's
    ``policy.int8.cuda.onnx``) or, if None, the CUDA specialization of ``int8_model`` made here; with
    ``cuda_graph`` each policy is captured as a CUDA graph (what ``edgeq.deploy`` runs). Where the
    fused INT8 kernel can run ``int8_model`` (:func:`fused_cuda_reason`), the INT8 policy runs there
    instead, on the very file the CPU target's ``int8_model`` comes from: what ``edgeq.deploy``'s
    ``cuda`` backend ships. The result names the runtimes (``int8_runtime``), and for ONNX Runtime's
    CUDA EP where each kernel ran. The verdict is computed from the result by the same code for
    every target.
    """
    runtime = target_runtime(target)
    inp, out, state = io.get("input", "obs"), io.get("output", "actions"), io.get("state", [])
    if runtime == RUNTIME_ORT_CPU:
        providers = target_providers(target)

        def cpu(path: Path) -> Any:
            return with_history(OrtPolicy(path, input_name=inp, output_name=out, state=state, providers=providers), io)

        result = paired_rollouts(make_env, cpu(float_model), cpu(int8_model), cpu(float_model), cpu(int8_model),
                                 seeds, num_envs=num_envs, act_dim=act_dim, progress=progress)
        return {"runtime": runtime, "providers": provider_names(providers), **result}

    if runtime == RUNTIME_ORT_CUDA:
        from edgeq.deploy.ort_cuda import OrtCudaPolicy, node_placement, summarize_placement

        def gpu(src: Path | bytes) -> Any:
            return with_history(OrtCudaPolicy(src, input_name=inp, output_name=out, state=state, io_binding=True,
                                              cuda_graph=cuda_graph), io)

        fused_reason = fused_cuda_reason(int8_model, io)
        int8_src: Path | bytes
        if fused_reason is None:
            int8_src = int8_model

            def gpu8(src: Path | bytes) -> Any:
                return with_history(fused_cuda_policy(int8_model, io, cuda_graph=cuda_graph), io)

            int8_desc = {"int8_runtime": RUNTIME_FUSED_CUDA, "int8_model": int8_model.name}
        else:
            int8_src = cuda_int8_model if cuda_int8_model is not None else cuda_int8_bytes(int8_model)
            gpu8 = gpu
            int8_desc = {"int8_runtime": RUNTIME_ORT_CUDA, "fused_unavailable": fused_reason,
                         "int8_model": cuda_int8_model.name if cuda_int8_model is not None
                         else f"{int8_model.name} (CUDA-specialized at validation)"}
        ref, cand = gpu(float_model), gpu8(int8_src)
        result = paired_rollouts(make_env, ref, cand, gpu(float_model), gpu8(int8_src), seeds, num_envs=num_envs,
                                 act_dim=act_dim, progress=progress)
        placed = [("float", float_model)] + ([("int8", int8_src)] if fused_reason is not None else [])
        placement = {name: summarize_placement(node_placement(src, batch=num_envs)) for name, src in placed}
        return {**ref.describe(), **int8_desc, "placement": placement, **result}

    with tempfile.TemporaryDirectory(prefix="edgeq-trt-") as tmp:
        make, described = _tensorrt_runtimes(float_model, int8_model, io, num_envs, Path(tmp))
        result = paired_rollouts(make_env, make("fp32"), make("int8"), make("fp32"), make("int8"), seeds,
                                 num_envs=num_envs, act_dim=act_dim, progress=progress)
    return {**described, **result}


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
    """Why ``target`` cannot run on this machine (one line), or None when it can."""
    if target not in TARGETS:
        return f"unknown target {target!r}; expected one of {TARGETS}"
    try:
        target_runtime(target)
    except (EdgeqError, ImportError) as exc:
        return str(exc).splitlines()[0]
    return None


_TRT_BUILDS: dict[tuple[str, str], Any] = {}


def make_runtime(target: str, path: str | Path | bytes, io: dict[str, Any], *, precision: str = "int8",
                 intra_op_threads: int = 1, num_envs: int = 8) -> Any:
    """A rollout policy (``act``/``reset``) running ``path`` on ``target`` the way deployment runs it.

    ``cpu``: :class:`OrtPolicy` on the CPU provider. ``cuda`` through ONNX Runtime:
    :class:`~edgeq.deploy.ort_cuda.OrtCudaPolicy` with IO binding and CUDA graphs (pass the
    CUDA-specialized INT8 file for int8), or, for an INT8 file a fused kernel runs,
    :class:`~edgeq.deploy.fused_mlp.FusedCudaPolicy` or (recurrent)
    :class:`~edgeq.deploy.fused_rnn.FusedRnnPolicy` (what ``edgeq.deploy``'s ``cuda`` backend runs).
    TensorRT (``trt``, or ``cuda`` where TensorRT is installed): an engine built once per model file
    and precision in a temporary folder. A history policy (``io.history``) gets its observation
    window kept by :class:`~edgeq.deploy.history.ObservationHistory`.
    """
    return with_history(_make_runtime(target, path, io, precision=precision, intra_op_threads=intra_op_threads,
                                      num_envs=num_envs), io)


def _make_runtime(target: str, path: str | Path | bytes, io: dict[str, Any], *, precision: str,
                  intra_op_threads: int, num_envs: int) -> Any:
    runtime = target_runtime(target)
    inp, out, state = io.get("input", "obs"), io.get("output", "actions"), io.get("state", [])
    if runtime == RUNTIME_ORT_CPU:
        return OrtPolicy(path, input_name=inp, output_name=out, state=state, providers=target_providers(target),
                         intra_op_threads=intra_op_threads)
    if runtime == RUNTIME_ORT_CUDA:
        from edgeq.deploy.ort_cuda import OrtCudaPolicy

        if precision == "int8" and fused_cuda_reason(path, io) is None:
            return fused_cuda_policy(Path(str(path)), io)
        return OrtCudaPolicy(path, input_name=inp, output_name=out, state=state, io_binding=True, cuda_graph=True)
    if isinstance(path, bytes):
        raise EdgeqError("TensorRT targets build engines from model files, not bytes")
    key = (str(path), precision)
    if key not in _TRT_BUILDS:
        from edgeq.deploy.tensorrt_runner import TrtPolicyRunner
        from edgeq.export.tensorrt_engine import EngineBuildConfig, build_engine

        workdir = Path(tempfile.mkdtemp(prefix="edgeq-trt-"))
        config = EngineBuildConfig(precision="int8" if precision == "int8" else "fp32", min_batch=1,
                                   opt_batch=num_envs, max_batch=max(num_envs, 1),
                                   timing_cache=workdir / "timing.cache")
        info = build_engine(Path(path), workdir / f"policy.{precision}.engine", config, input_name=inp)
        _TRT_BUILDS[key] = (info, TrtPolicyRunner)
    info, runner_cls = _TRT_BUILDS[key]
    return TrtBatchPolicy(runner_cls(info.engine_path, expected=info.to_dict(), input_name=inp), io)


@dataclass(frozen=True)
class RuntimeSpec:
    """A picklable recipe for a rollout policy: ``target`` runs model ``path`` (a file or bytes).

    Worker processes and Ray tasks build the runtime from it with
    :func:`edgeq.validate.targets.make_runtime`; instances are cached per process (:func:`runtime_for`).
    """

    target: str
    path: str | bytes
    io: tuple[tuple[str, Any], ...]
    precision: str = "int8"

    @classmethod
    def of(cls, target: str, path: str | Path | bytes, io: dict[str, Any], precision: str = "int8") -> RuntimeSpec:
        frozen_io = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in io.items()))
        return cls(target, path if isinstance(path, bytes) else str(path), frozen_io, precision)

    def io_dict(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.io}

    def build(self) -> Any:
        return make_runtime(self.target, self.path, self.io_dict(), precision=self.precision)


_RUNTIMES: OrderedDict[tuple[RuntimeSpec, int], Any] = OrderedDict()
_RUNTIME_CACHE_SIZE = 8


def runtime_for(spec: RuntimeSpec, slot: int = 0) -> Any:
    """A built runtime for ``spec`` (``slot`` tells apart instances that must keep separate state),
    cached in this process (at most 8, least recently used dropped)."""
    key = (spec, slot)
    rt = _RUNTIMES.pop(key, None)
    if rt is None:
        rt = spec.build()
    _RUNTIMES[key] = rt
    while len(_RUNTIMES) > _RUNTIME_CACHE_SIZE:
        _RUNTIMES.popitem(last=False)
    return rt
