"""Running a policy graph on an NVIDIA GPU through ONNX Runtime's CUDA execution provider.

:class:`OrtCudaPolicy` is the ``cuda`` backend when TensorRT is not installed: numpy in, numpy out,
with the inputs and outputs bound to device buffers (IO binding: one host→device copy in, one
device→host copy out per call, no allocation) and, optionally, the whole policy captured once per
batch size as a CUDA graph and replayed (``enable_cuda_graph``; for batch-1 latency the launches
dominate, and a replay costs about one launch). CUDA graphs need every node on the GPU and fixed
device addresses; this class keeps one set of device buffers per batch size for that, and turns off
ONNX Runtime's ``MatMulAddFusion``, whose int32 bias ``DequantizeLinear`` has no CUDA kernel and would
put nodes of edgeq's INT8 graphs on the CPU (see :mod:`edgeq.export.ort_cuda`).

:func:`node_placement` answers "which execution provider ran each node": it profiles one run and
reads the provider of every kernel, including the ``Memcpy`` nodes ONNX Runtime inserts between
CPU and GPU nodes (a graph with such copies cannot be captured as a CUDA graph).

Only numpy and onnxruntime (the ``onnxruntime-gpu`` build) are imported here; this is what runs on
the robot.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, LatencyStats, RecurrentStateMixin, session_options
from edgeq.errors import EdgeqError, InputError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

#: Batch sizes that get their own captured CUDA graph (and device buffers); further batch sizes run
#: through IO binding without a graph.
DEFAULT_MAX_GRAPHS = 4


class CudaUnavailableError(EdgeqError):
    """ONNX Runtime's CUDA execution provider cannot be used here."""


def cuda_ep_available() -> bool:
    """True if the installed onnxruntime lists ``CUDAExecutionProvider`` (the onnxruntime-gpu build)."""
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


def require_cuda_ep() -> None:
    """Raise :class:`CudaUnavailableError` (one line, with the fix) unless the CUDA EP is installed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise CudaUnavailableError(
            f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider (available: {', '.join(available)}); "
            "install the GPU build with 'pip install edgeq[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA "
            "driver, or use target/backend 'cpu'")


def cuda_provider_options(device_id: int = 0, *, cuda_graph: bool = False, tf32: bool = False) -> dict[str, str]:
    """CUDA EP options: the device, CUDA graphs on/off, and TF32 GEMMs off by default.

    TF32 (on by default in ONNX Runtime) rounds GEMM inputs to 10 mantissa bits; edgeq turns it off so
    that the GPU computes the float32 arithmetic that was validated on the CPU.
    """
    return {"device_id": str(int(device_id)), "enable_cuda_graph": "1" if cuda_graph else "0",
            "use_tf32": "1" if tf32 else "0"}


@dataclass(frozen=True)
class NodePlacement:
    """One executed kernel: the node (after ONNX Runtime's graph rewrites), its op and its provider."""

    node: str
    op_type: str
    provider: str

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "op_type": self.op_type, "provider": self.provider}


def _session_options(optimization: str = "all") -> Any:
    opts = session_options(optimization)
    opts.log_severity_level = 3  # the CUDA EP's per-session notices are not the user's business
    return opts


def _model_source(model: str | Path | bytes) -> str | bytes:
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise InputError(f"ONNX model not found: {path}")
    return str(path)


def _random_feeds(session: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal random float32 values for every input (dynamic axes → ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def node_placement(model: str | Path | bytes, providers: Sequence[Any] | None = None, *, batch: int = 1,
                   optimization: str = "all") -> list[NodePlacement]:
    """The execution provider of every kernel ONNX Runtime runs for ``model``, in execution order.

    Profiles one run on random inputs (ONNX Runtime's profiler records each kernel's provider).
    ``providers`` defaults to the CUDA EP with CPU fallback, the way ONNX Runtime partitions a graph
    for a GPU; nodes with no CUDA kernel, and the ``MemcpyFromHost``/``MemcpyToHost`` copies around
    them, show up as such.
    """
    import onnxruntime as ort

    if providers is None:
        require_cuda_ep()
        providers = [(CUDA_EP, cuda_provider_options()), CPU_EP]
    with tempfile.TemporaryDirectory(prefix="edgeq-placement-") as tmp:
        opts = _session_options(optimization)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(_model_source(model), sess_options=opts, providers=list(providers),
                                       disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
        session.run(None, _random_feeds(session, batch))
        profile = Path(session.end_profiling())
        if not profile.is_absolute():
            profile = Path(tmp) / profile.name
        events = json.loads(profile.read_text())
    placed: list[NodePlacement] = []
    seen: set[str] = set()
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        name = str(ev["name"])[: -len("_kernel_time")]
        if name in seen:
            continue
        seen.add(name)
        args = ev.get("args", {})
        placed.append(NodePlacement(name, str(args.get("op_name", "?")), str(args.get("provider", "?"))))
    return placed


def summarize_placement(placement: Sequence[NodePlacement]) -> dict[str, Any]:
    """Kernels per provider, and every kernel not on the CUDA EP (CPU fallbacks and copies)."""
    counts: dict[str, int] = {}
    for p in placement:
        counts[p.provider] = counts.get(p.provider, 0) + 1
    off_gpu = [p.to_json() for p in placement if p.provider != CUDA_EP or p.op_type.startswith("Memcpy")]
    return {"kernels": len(placement), "by_provider": dict(sorted(counts.items())),
            "all_on_gpu": not off_gpu, "not_on_gpu": off_gpu}


class _Bound:
    """Device buffers and an IO binding for one batch size (and, with a stream, pinned host buffers)."""

    def __init__(self, session: Any, inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]],
                 device_id: int, graph_id: int | None, stream: Any = None) -> None:
        import onnxruntime as ort

        self.inputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(s), np.float32, "cuda", device_id)
                       for n, s in inputs.items()}
        self.outputs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(s), np.float32, "cuda", device_id)
                        for n, s in outputs.items()}
        self.binding = session.io_binding()
        for n, v in self.inputs.items():
            self.binding.bind_ortvalue_input(n, v)
        for n, v in self.outputs.items():
            self.binding.bind_ortvalue_output(n, v)
        self.run_options = ort.RunOptions()
        self.graph_id = graph_id  # None: no CUDA graphs in this session; -1: this batch size runs without one
        if graph_id is not None:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.stream = stream
        self.host_in: dict[str, Any] = {}
        self.host_out: dict[str, Any] = {}
        if stream is not None:
            from edgeq.deploy import cuda

            # the run is enqueued on our stream (ORT's user_compute_stream) and not waited for: the
            # device -> host copies follow it on the same stream, and one synchronize ends the call
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            self.host_in = {n: cuda.PinnedBuffer(s, np.float32, device_id) for n, s in inputs.items()}
            self.host_out = {n: cuda.PinnedBuffer(s, np.float32, device_id) for n, s in outputs.items()}
            self.in_ptrs = {n: int(v.data_ptr()) for n, v in self.inputs.items()}
            self.out_ptrs = {n: int(v.data_ptr()) for n, v in self.outputs.items()}

    def run_pinned(self, session: Any, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """Pinned copies in (async, on the stream), the run, pinned copies out, one synchronize."""
        from edgeq.deploy import cuda

        for n, arr in feeds.items():
            host = self.host_in[n]
            np.copyto(host.array, arr)
            cuda.copy_htod_async(self.in_ptrs[n], int(host), host.nbytes, self.stream)
        session.run_with_iobinding(self.binding, self.run_options)
        for n in names:
            host = self.host_out[n]
            cuda.copy_dtoh_async(int(host), self.out_ptrs[n], host.nbytes, self.stream)
        self.stream.synchronize()
        return [self.host_out[n].array.copy() for n in names]


class OrtCudaPolicy(RecurrentStateMixin):
    """An ONNX policy on the GPU through ONNX Runtime's CUDA EP; the same interface as ``OrtPolicy``.

    Args:
        model: the ONNX file (or its bytes): a float policy, or an INT8 QDQ policy (for the CUDA EP,
            best the file from :func:`edgeq.export.ort_cuda.specialize_for_ort_cuda`).
        input_name, output_name, state: as for :class:`edgeq.deploy.runtime.OrtPolicy`.
        device_id: the CUDA device.
        io_binding: bind inputs and outputs to device buffers allocated once per batch size (else
            ``session.run`` with numpy, which allocates and copies through ONNX Runtime each call).
        cuda_graph: capture the policy as a CUDA graph per batch size (needs ``io_binding`` and every
            node on the GPU; raises :class:`CudaUnavailableError` naming the nodes that are not).
        max_graphs: batch sizes that get a graph; calls with further batch sizes run without one.
        tf32: allow TF32 GEMMs (faster large batches, ~1e-3 relative error); off by default.
        pinned: with IO binding, copy through pinned host buffers asynchronously on a stream of our own
            that ONNX Runtime runs on (``user_compute_stream``), with ONNX Runtime's end-of-run
            synchronize off: one ``cuStreamSynchronize`` per call. Needs cuda-python
            (:mod:`edgeq.deploy.cuda`); without it (or with ``pinned=False``) the copies go through
            ``OrtValue.update_inplace`` / ``.numpy()`` (pageable, blocking: two extra syncs).

    Raises:
        CudaUnavailableError: no CUDA EP, no usable GPU, or a CUDA graph that cannot be captured.
        InputError: the model file is missing or lacks the named input.
    """

    def __init__(self, model: str | Path | bytes, *, input_name: str = "obs", output_name: str = "actions",
                 state: Sequence[dict[str, Any]] = (), device_id: int = 0, io_binding: bool = True,
                 cuda_graph: bool = False, max_graphs: int = DEFAULT_MAX_GRAPHS, tf32: bool = False,
                 optimization: str = "all", pinned: bool = True) -> None:
        import onnxruntime as ort

        require_cuda_ep()
        if cuda_graph and not io_binding:
            raise ValueError("cuda_graph=True needs io_binding=True (CUDA graphs replay fixed device addresses)")
        self.model_source = _model_source(model)
        self.device_id, self.io_binding, self.cuda_graph = int(device_id), io_binding, cuda_graph
        self.max_graphs = max_graphs
        self._stream: Any = None
        self.pinned_reason: str | None = None
        if io_binding and pinned:
            from edgeq.deploy import cuda

            self.pinned_reason = cuda.available(int(device_id))
            if self.pinned_reason is None:
                self._stream = cuda.Stream(int(device_id))
        options = cuda_provider_options(device_id, cuda_graph=cuda_graph, tf32=tf32)
        if self._stream is not None:
            options["user_compute_stream"] = str(int(self._stream))
        providers = [(CUDA_EP, options), CPU_EP]
        try:
            self.session = ort.InferenceSession(self.model_source, sess_options=_session_options(optimization),
                                                providers=providers, disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
        except Exception as exc:  # ORT raises its own Fail/RuntimeException types
            if cuda_graph:
                off = summarize_placement(node_placement(self.model_source, optimization=optimization))["not_on_gpu"]
                where = ", ".join(f"{p['node']} ({p['op_type']} on {p['provider']})" for p in off[:8])
                raise CudaUnavailableError(
                    f"ONNX Runtime refused a CUDA graph for this model: {len(off)} kernel(s) not on the GPU"
                    f"{': ' + where if where else ''}; use the CUDA-specialized INT8 file or cuda_graph=False "
                    f"({str(exc).splitlines()[0][:200]})") from None
            raise CudaUnavailableError(f"ONNX Runtime could not start the CUDA EP: {str(exc)[:300]}") from None
        if self.session.get_providers()[0] != CUDA_EP:
            raise CudaUnavailableError(
                f"ONNX Runtime fell back to {self.session.get_providers()} (the CUDA libraries or the GPU driver "
                "could not be loaded); check LD_LIBRARY_PATH and nvidia-smi")
        self.input_name, self.output_name = input_name, output_name
        self.state_specs = [dict(s) for s in state]
        self._state: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.latency = LatencyStats()
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = {o.name: o for o in self.session.get_outputs()}
        if input_name not in self._inputs:
            raise InputError(f"model has no input {input_name!r} (inputs: {sorted(self._inputs)})")
        self.obs_dim = self._inputs[input_name].shape[-1]
        self.output_names = list(self._outputs)
        self._bound: dict[int, _Bound] = {}
        self._graphs = 0

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def describe(self) -> dict[str, Any]:
        """What runs: provider, IO binding, CUDA graphs, ONNX Runtime version (for validation.json)."""
        import onnxruntime as ort

        return {"runtime": "onnxruntime-cuda", "onnxruntime_version": ort.__version__,
                "providers": self.providers, "io_binding": self.io_binding, "cuda_graph": self.cuda_graph,
                "pinned_async_copies": self._stream is not None, "device_id": self.device_id}


    def _shape(self, arg: Any, batch: int) -> tuple[int, ...]:
        dims = list(arg.shape)
        out = []
        for k, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                out.append(d)
            elif k == 0:
                out.append(batch)
            else:
                raise InputError(f"tensor {arg.name!r} has a dynamic axis {k} ({d!r}) besides the batch axis; "
                                 "IO binding needs fixed feature dimensions")
        return tuple(out)

    def _binding(self, feeds: dict[str, np.ndarray], batch: int) -> _Bound:
        bound = self._bound.get(batch)
        if bound is None:
            graph_id: int | None = -1 if self.cuda_graph else None
            if self.cuda_graph and self._graphs < self.max_graphs:
                self._graphs += 1
                graph_id = self._graphs  # ids from 1, as ONNX Runtime's own CUDA graph tests use them
            inputs = {n: tuple(a.shape) for n, a in feeds.items()}
            outputs = {n: self._shape(o, batch) for n, o in self._outputs.items()}
            bound = _Bound(self.session, inputs, outputs, self.device_id, graph_id, self._stream)
            self._bound[batch] = bound
        return bound

    def _run_bound(self, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        bound = self._binding(feeds, batch)
        if bound.stream is not None:
            return bound.run_pinned(self.session, feeds, names)
        for n, arr in feeds.items():
            bound.inputs[n].update_inplace(arr)
        self.session.run_with_iobinding(bound.binding, bound.run_options)
        return [bound.outputs[n].numpy() for n in names]

    def run(self, obs: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one step for a batch ``obs`` [batch, obs_dim]; returns the requested outputs by name."""
        names = list(outputs) if outputs is not None else [self.output_name]
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise InputError(f"model has no output(s) {unknown} (outputs: {self.output_names})")
        with self._lock:
            obs = np.ascontiguousarray(obs, dtype=np.float32)
            feeds = {self.input_name: obs, **self._state_feeds(obs.shape[0])}
            state_out = [s["output"] for s in self.state_specs]
            t0 = time.perf_counter()
            if self.io_binding:
                values = self._run_bound(feeds, names + state_out)
            else:
                values = self.session.run(names + state_out, feeds)
            self.latency.add(time.perf_counter() - t0)
            for spec, value in zip(self.state_specs, values[len(names):], strict=True):
                self._state[spec["input"]] = np.ascontiguousarray(value)
        return dict(zip(names, values[: len(names)], strict=True))

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations (float32 [batch, obs_dim] → [batch, act_dim])."""
        if self.state_specs or not self.io_binding:
            return self.run(obs)[self.output_name]
        # the hot path: one pinned copy in, one run (a graph replay), one pinned copy out, one sync
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        with self._lock:
            t0 = time.perf_counter()
            bound = self._bound.get(obs.shape[0]) or self._binding({self.input_name: obs}, obs.shape[0])
            if bound.stream is not None:
                actions = bound.run_pinned(self.session, {self.input_name: obs}, [self.output_name])[0]
            else:
                bound.inputs[self.input_name].update_inplace(obs)
                self.session.run_with_iobinding(bound.binding, bound.run_options)
                actions = bound.outputs[self.output_name].numpy()
            self.latency.add(time.perf_counter() - t0)
        return actions
