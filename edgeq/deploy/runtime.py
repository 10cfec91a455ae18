"""Running a policy graph: numpy in, numpy out, recurrent state carried, latency recorded.

Only numpy and onnxruntime are imported here (onnxruntime lazily, inside :class:`OrtPolicy`); this
is what runs on the robot. :class:`PolicyRuntime` holds what every backend shares (recurrent state
per batch row, a lock, latency statistics); :class:`OrtPolicy` runs an ONNX Runtime session and
:class:`edgeq.deploy.trt_backend.TrtRuntime` a TensorRT engine.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import BundleError, InputError

NAN_POLICIES = ("error", "zero", "pass")

# ONNX Runtime >= 1.29 sends usage telemetry on Linux (and keeps a device-ID file in $HOME) unless this is
# set before it initializes. A robot should make no outbound connections: off unless the user set it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: ONNX Runtime graph rewrites that edgeq turns off. ``MatMulAddFusion`` merges ``MatMul + Add``
#: into a float ``Gemm`` *before* the QDQ fusions run, which hides edgeq's ``DQ, DQ → MatMul``
#: layers from the fusion into the integer kernel ``MatMulIntegerToFloat``; with it on, ORT
#: dequantizes the weights and runs float GEMMs (about 10x slower at batch 1).
DISABLED_ORT_OPTIMIZERS = ("MatMulAddFusion",)

#: ONNX Runtime execution providers per edgeq backend name (the CPU provider is the fallback for
#: nodes a GPU provider does not take). TF32 is off on the CUDA provider: with it (ONNX Runtime's
#: default on Ampere and newer) float matrix products keep 10 mantissa bits; on an H100 that moved
#: batched actions away from the CPU's by up to 0.02 (fp32) and 0.1 (int8, through activation
#: rounding) for SAC HalfCheetah (actions in [-1, 1]), against 1e-5 and 2e-6 with it off. A policy
#: this small gains nothing from TF32, and its actions should be those that were validated.
ORT_PROVIDERS: dict[str, list[Any]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
}


#: ONNX Runtime session option that keeps the CPU provider's int8 matrix products exact on x86-64 CPUs
#: without VNNI (SSE4.1 / AVX2 / AVX-512 without VNNI). There ONNX Runtime multiplies int8 by int8 as
#: u8 x s8 with ``vpmaddubsw``, which adds pairs of products into int16 and saturates: with weights
#: outside [-64, 63] (every per-channel absmax int8 weight reaches +-127) a product row can be off by
#: 25-40% of its range (measured on an AMD EPYC with AVX2, ORT 1.32: SAC Hopper's actions moved by up to
#: 0.91, mean 0.073, from the QDQ file's own reference semantics). With this option on, such layers run
#: as u8 x u8 (exact); on a CPU with VNNI (and on every other provider) it changes nothing.
#: See docs/ort-int8-x86.md.
X64_QUANT_PRECISION = ("session.x64quantprecision", "1")

_OPTIMIZATION_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                        "none": "ORT_DISABLE_ALL"}


def session_options(optimization: str = "all", intra_op_threads: int | None = None) -> Any:
    """ONNX Runtime session options as edgeq runs policies: sequential execution, the graph
    optimization level ``optimization`` (all | extended | basic | none), exact int8 products on x86-64
    CPUs without VNNI (:data:`X64_QUANT_PRECISION`) and, if given, that many intra-op threads (one
    inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[optimization])
    opts.add_session_config_entry(*X64_QUANT_PRECISION)
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
    return opts


def _provider_name(provider: Any) -> str:
    return provider if isinstance(provider, str) else str(provider[0])


def provider_names(providers: Sequence[Any]) -> list[str]:
    """The names of an ONNX Runtime provider list whose entries may be ``(name, options)`` pairs."""
    return [_provider_name(p) for p in providers]


class LatencyStats:
    """Thread-safe, bounded record of call latencies (the last ``capacity`` calls)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._buf[self._n % len(self._buf)] = seconds
            self._n += 1

    def add_serialized(self, seconds: float) -> None:
        """:meth:`add` without taking the lock, for a caller whose own lock already serializes every
        ``add`` to this record (a backend's hot path)."""
        n = self._n
        self._buf[n % len(self._buf)] = seconds
        self._n = n + 1

    def clear(self) -> None:
        with self._lock:
            self._n = 0

    def summary(self) -> dict[str, float]:
        """Call count, then mean, median, p90, p99, p99.9 and max in microseconds over the recorded calls."""
        with self._lock:
            n = min(self._n, len(self._buf))
            calls = self._n
            x = self._buf[:n] * 1e6
        if n == 0:
            return {"calls": 0}
        p50, p90, p99, p999 = np.percentile(x, [50, 90, 99, 99.9])
        return {"calls": int(calls), "mean_us": float(x.mean()), "median_us": float(p50), "p90_us": float(p90),
                "p99_us": float(p99), "p999_us": float(p999), "max_us": float(x.max())}


class RecurrentStateMixin:
    """Recurrent state per batch row (``state_specs``, ``_state``, guarded by ``_lock``)."""

    state_specs: list[dict[str, Any]]
    _state: dict[str, np.ndarray]
    _lock: Any

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Zero the recurrent state of the rows where ``mask`` is True (all rows if None)."""
        with self._lock:
            if mask is None:
                self._state.clear()
                return
            for value in self._state.values():
                value[np.asarray(mask, bool)] = 0.0

    def _state_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """The state to feed a batch of ``batch`` rows: the carried state, or zeros after :meth:`reset`.

        A batch of another size than the carried state's is refused (:class:`InputError`) rather than
        silently starting every row from zero: row ``i`` of the state belongs to row ``i`` of the batch,
        so call :meth:`reset` (new episodes) before changing the batch size.
        """
        feeds = {}
        for spec in self.state_specs:
            cur = self._state.get(spec["input"])
            if cur is not None and cur.shape[0] != batch:
                raise InputError(f"batch of {batch} observation(s) but the recurrent state carries {cur.shape[0]} "
                                 "row(s) from the previous calls; call reset() before changing the batch size "
                                 "(it starts new episodes), or keep one batch size per episode")
            if cur is None:
                cur = np.zeros((batch, *spec["shape"]), np.float32)
                self._state[spec["input"]] = cur
            feeds[spec["input"]] = cur
        return feeds


class PolicyRuntime(RecurrentStateMixin):
    """What every backend shares: recurrent state per batch row, a lock, latency statistics.

    ``state`` lists recurrent state tensors as ``{"input", "output", "shape"}`` dicts; their values
    are kept per batch row and zeroed by :meth:`reset`. Subclasses implement :meth:`_infer`.
    One runtime may be shared by threads: calls are serialized by a lock when the policy has
    recurrent state (which all callers share) or the backend is not thread-safe
    (``concurrent_calls = False``); otherwise they run concurrently.
    """

    input_name: str
    output_name: str
    #: Whether :meth:`_infer` may run in several threads at once (ONNX Runtime's ``run`` may).
    concurrent_calls = False

    def __init__(self, *, input_name: str, output_name: str, state: Sequence[dict[str, Any]]) -> None:
        self.input_name, self.output_name = input_name, output_name
        self.state_specs = [dict(s) for s in state]
        self._state: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.latency = LatencyStats()

    @property
    def providers(self) -> list[str]:
        """What runs the graph (ONNX Runtime providers, or ``["TensorRT"]``)."""
        raise NotImplementedError

    def _infer(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError


    def run(self, obs: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one step for a batch ``obs`` [batch, obs_dim]; returns the requested outputs by name."""
        names = list(outputs) if outputs is not None else [self.output_name]
        if self.concurrent_calls and not self.state_specs:
            t0 = time.perf_counter()
            values = self._infer({self.input_name: obs}, names)
            self.latency.add(time.perf_counter() - t0)
            return dict(zip(names, values, strict=True))
        with self._lock:
            feeds = {self.input_name: obs, **self._state_feeds(obs.shape[0])}
            state_out = [s["output"] for s in self.state_specs]
            t0 = time.perf_counter()
            values = self._infer(feeds, names + state_out)
            self.latency.add(time.perf_counter() - t0)
            for spec, value in zip(self.state_specs, values[len(names):], strict=True):
                self._state[spec["input"]] = np.ascontiguousarray(value)
        return dict(zip(names, values[: len(names)], strict=True))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations (float32 [batch, obs_dim] → [batch, act_dim])."""
        return self.run(np.ascontiguousarray(obs, dtype=np.float32))[self.output_name]


class OrtPolicy(PolicyRuntime):
    """An ONNX policy in an ONNX Runtime session.

    ``extra`` outputs: :meth:`run` returns any tensors named in ``outputs`` (calibration uses this
    on instrumented models). ``require_provider`` makes construction fail if ONNX Runtime silently
    fell back from the first requested provider (e.g. CUDA failed to start) to the CPU.
    """

    concurrent_calls = True  # InferenceSession.run may be called from several threads at once

    def __init__(self, model: str | Path | bytes, *, input_name: str = "obs", output_name: str = "actions",
                 state: Sequence[dict[str, Any]] = (), providers: Sequence[Any] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 1, optimization: str = "all",
                 optimized_model_path: str | Path | None = None, require_provider: bool = False) -> None:
        import onnxruntime as ort

        super().__init__(input_name=input_name, output_name=output_name, state=state)
        opts = session_options(optimization, intra_op_threads)
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, sess_options=opts, providers=list(providers),
                                            disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
        wanted = _provider_name(providers[0])
        if require_provider and self.session.get_providers()[0] != wanted:
            raise BundleError(f"ONNX Runtime could not start {wanted} (it fell back to "
                              f"{self.session.get_providers()}); check the GPU driver and CUDA libraries")
        inputs = {i.name: i for i in self.session.get_inputs()}
        if input_name not in inputs:
            raise InputError(f"model has no input {input_name!r} (inputs: {sorted(inputs)})")
        self.obs_dim = inputs[input_name].shape[-1]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _infer(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return list(self.session.run(outputs, feeds))


def ort_providers(backend: str) -> list[Any]:
    """ONNX Runtime providers (with their options) for ``backend`` ("cpu" or "cuda"); raises if that
    provider is not installed. Validation should use the same list, so that what it measured ships."""
    import onnxruntime as ort

    if backend not in ORT_PROVIDERS:
        raise BundleError(f"backend {backend!r} does not run on ONNX Runtime; expected one of {sorted(ORT_PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = _provider_name(ORT_PROVIDERS[backend][0])
    if wanted not in available:
        raise BundleError(f"backend {backend!r} needs onnxruntime-gpu with {wanted} "
                          f"(this onnxruntime {ort.__version__} has: {', '.join(available)})")
    return list(ORT_PROVIDERS[backend])
