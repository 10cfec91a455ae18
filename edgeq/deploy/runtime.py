"""Running a policy graph with ONNX Runtime: numpy in, numpy out, recurrent state carried.

Only numpy and onnxruntime are imported here; this is what runs on the robot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import InputError

NAN_POLICIES = ("error", "zero", "pass")

#: ONNX Runtime graph rewrites that edgeq turns off. ``MatMulAddFusion`` merges ``MatMul + Add``
#: into a float ``Gemm`` *before* the QDQ fusions run, which hides edgeq's ``DQ, DQ → MatMul``
#: layers from the fusion into the integer kernel ``MatMulIntegerToFloat``; with it on, ORT
#: dequantizes the weights and runs float GEMMs (about 10x slower at batch 1).
DISABLED_ORT_OPTIMIZERS = ("MatMulAddFusion",)


class LatencyStats:
    """Bounded record of call latencies (the last ``capacity`` calls)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0

    def add(self, seconds: float) -> None:
        self._buf[self._n % len(self._buf)] = seconds
        self._n += 1

    def summary(self) -> dict[str, float]:
        """Median, p99, p99.9 and max in microseconds over the recorded calls."""
        n = min(self._n, len(self._buf))
        if n == 0:
            return {"calls": 0}
        x = self._buf[:n] * 1e6
        return {"calls": int(self._n), "median_us": float(np.median(x)), "p99_us": float(np.percentile(x, 99)),
                "p999_us": float(np.percentile(x, 99.9)), "max_us": float(x.max()), "mean_us": float(x.mean())}


class OrtPolicy:
    """An ONNX policy in an ONNX Runtime session.

    ``state`` lists recurrent state tensors as ``{"input", "output", "shape"}`` dicts; their values
    are kept per batch row and zeroed by :meth:`reset`. ``extra_outputs`` names intermediate
    tensors to return as well (calibration uses this).
    """

    def __init__(self, model: str | Path | bytes, *, input_name: str = "obs", output_name: str = "actions",
                 state: Sequence[dict[str, Any]] = (), providers: Sequence[Any] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 1, optimization: str = "all",
                 optimized_model_path: str | Path | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        if optimized_model_path is not None:
            opts.optimized_model_filepath = str(optimized_model_path)
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, sess_options=opts, providers=list(providers),
                                            disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
        self.input_name, self.output_name = input_name, output_name
        self.state_specs = [dict(s) for s in state]
        self._state: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.latency = LatencyStats()
        inputs = {i.name: i for i in self.session.get_inputs()}
        if input_name not in inputs:
            raise InputError(f"model has no input {input_name!r} (inputs: {sorted(inputs)})")
        self.obs_dim = inputs[input_name].shape[-1]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Zero the recurrent state of the rows where ``mask`` is True (all rows if None)."""
        with self._lock:
            if mask is None:
                self._state.clear()
                return
            for value in self._state.values():
                value[np.asarray(mask, bool)] = 0.0

    def _state_feeds(self, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.state_specs:
            cur = self._state.get(spec["input"])
            if cur is None or cur.shape[0] != batch:
                cur = np.zeros((batch, *spec["shape"]), np.float32)
                self._state[spec["input"]] = cur
            feeds[spec["input"]] = cur
        return feeds

    def run(self, obs: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one step for a batch ``obs`` [batch, obs_dim]; returns the requested outputs by name."""
        names = list(outputs) if outputs is not None else [self.output_name]
        with self._lock:
            feeds = {self.input_name: obs, **self._state_feeds(obs.shape[0])}
            state_out = [s["output"] for s in self.state_specs]
            t0 = time.perf_counter()
            values = self.session.run(names + state_out, feeds)
            self.latency.add(time.perf_counter() - t0)
            for spec, value in zip(self.state_specs, values[len(names):], strict=True):
                self._state[spec["input"]] = np.ascontiguousarray(value)
        return dict(zip(names, values[: len(names)], strict=True))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations (float32 [batch, obs_dim] → [batch, act_dim])."""
        return self.run(np.ascontiguousarray(obs, dtype=np.float32))[self.output_name]
