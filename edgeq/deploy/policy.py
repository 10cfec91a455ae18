"""``edgeq.deploy.load``: a verified bundle as a callable policy with input checks."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.bundle_format import PRECISIONS, inside_path, model_for, read_manifest, read_verified
from edgeq.deploy.fused_mlp import FusedCudaPolicy
from edgeq.deploy.fused_rnn import FusedRnnPolicy, fused_rnn_support
from edgeq.deploy.history import ObservationHistory, history_spec, with_history
from edgeq.deploy.ort_cuda import OrtCudaPolicy
from edgeq.deploy.runtime import NAN_POLICIES, LatencyStats, OrtPolicy, PolicyRuntime, ort_providers
from edgeq.deploy.trt_backend import engines_for, load_trt_runtime, tensorrt_available
from edgeq.errors import BundleError, InputError

#: ``cuda`` is edgeq's default CUDA backend: the fused kernel (``cuda-fused``) where it can run the
#: model, else ONNX Runtime's CUDA EP (``cuda-ort``). ``policy.backend`` names the one that runs.
BACKENDS = ("auto", "cpu", "cuda", "cuda-fused", "cuda-ort", "trt")
#: The order in which ``auto`` tries the backends: fastest first (benchmarks/results/gpu.md).
AUTO_ORDER = ("cuda-fused", "trt", "cuda-ort", "cpu")

_log = logging.getLogger("edgeq.deploy")
_F32 = np.dtype(np.float32)


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _fused_reason(root: Path | None, manifest: Mapping[str, Any] | None, precision: str) -> str | None:
    """Why the fused kernel cannot run this bundle here (None: it can)."""
    if precision != "int8":
        return f"the fused kernel runs INT8 models (precision {precision!r})"
    from edgeq.deploy import cuda

    reason = cuda.available()
    if reason is not None:
        return reason
    if root is not None and manifest is not None:
        io = manifest.get("io", {})
        model = root / manifest["models"][precision]
        if io.get("state"):  # recurrent: the fused LSTM/GRU kernel (edgeq.deploy.fused_rnn)
            return fused_rnn_support(model, list(io["state"]), input_name=io.get("input", "obs"),
                                     output_name=io.get("output", "actions"))
        from edgeq.deploy.fused_mlp import fused_support

        return fused_support(model)
    return None


def unavailable_backend_reason(backend: str, manifest: Mapping[str, Any] | None = None, precision: str = "int8",
                               root: Path | None = None) -> str | None:
    """Why ``backend`` (a concrete one, not ``auto``/``cuda``) cannot run this bundle here; None if it can."""
    if backend == "cpu":
        return None
    if backend == "cuda-fused":
        return _fused_reason(root, manifest, precision)
    if backend == "trt":
        if manifest is not None and not engines_for(manifest, precision):
            return f"the bundle has no TensorRT engine of precision {precision!r}"
        return None if tensorrt_available() else "TensorRT's Python package does not import here"
    if backend == "cuda-ort":
        return None if _ort_has_cuda() else "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    raise BundleError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, manifest: dict[str, Any] | None = None, precision: str = "int8",
                    root: Path | None = None) -> str:
    """The concrete backend that ``backend`` means here: ``auto`` → the first of :data:`AUTO_ORDER`
    that can run the bundle (``trt`` only with TensorRT *and* an engine of ``precision``); ``cuda``
    → ``cuda-fused`` if the fused kernel runs the model, else ``cuda-ort``. Named backends are
    returned as is."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        for name in AUTO_ORDER:
            if unavailable_backend_reason(name, manifest, precision, root) is None:
                return name
        return "cpu"
    if backend == "cuda":
        return "cuda-fused" if _fused_reason(root, manifest, precision) is None else "cuda-ort"
    return backend


Runtime = PolicyRuntime | OrtCudaPolicy | FusedCudaPolicy | FusedRnnPolicy


def _finite_fast(batch: np.ndarray) -> bool:
    """True if every value is finite: x·x is finite only then (NaN and inf propagate). An overflow of x·x
    (|x| > 1e19) reads as False too; the caller's element-wise check then decides."""
    flat = batch.reshape(-1)
    return math.isfinite(float(flat.dot(flat)))


def _no_check(batch: np.ndarray) -> bool:
    """``nan_policy="pass"``: nothing to check."""
    return True


class DeployedPolicy:
    """A bundle's policy: checks inputs, carries recurrent state, records latency; thread-safe.

    ``act(obs)`` takes one observation of the observation space's shape (returns one action) or a
    batch ``[batch, *obs_shape]`` (returns ``[batch, *action_shape]``); any real dtype is accepted
    and converted to float32. Non-finite observations raise :class:`InputError` by default
    (``nan_policy="error"``); ``"zero"`` replaces them with 0, ``"pass"`` hands them on unchanged.

    One policy may be shared by threads (ONNX Runtime calls of feed-forward policies run
    concurrently; recurrent policies and TensorRT engines are serialized). A recurrent policy's
    state is shared by all callers, so give each robot (or episode stream) its own policy.
    """

    def __init__(self, runtime: Runtime | ObservationHistory, manifest: Mapping[str, Any], *,
                 precision: str, backend: str, nan_policy: str = "error", bundle: Path | None = None) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}; expected one of {NAN_POLICIES}")
        self.runtime, self.manifest, self.bundle = runtime, manifest, bundle
        self.precision, self.backend, self.nan_policy = precision, backend, nan_policy
        self.obs_shape = tuple(int(s) for s in manifest["observation_space"]["shape"])
        self.action_shape = tuple(int(s) for s in manifest["action_space"]["shape"])
        self.max_batch = int(manifest.get("profile", {}).get("max_batch", 0)) or None
        #: Why faster backends were not used (``load(backend="auto"|"cuda")``).
        self.backend_notes: list[str] = []
        self._act_latency = LatencyStats()
        # the fused kernel's hot path (see act): bound once. Not the recurrent kernel: its observation is
        # checked before the call, since a refused observation must not advance the state on the GPU
        self._fused = runtime if type(runtime) is FusedCudaPolicy and len(self.obs_shape) == 1 else None
        self._batch_limit = self.max_batch or (1 << 62)
        self._check = _no_check if nan_policy == "pass" else _finite_fast

    def __repr__(self) -> str:
        return (f"DeployedPolicy({str(self.bundle)!r}, precision={self.precision!r}, backend={self.backend!r}, "
                f"obs_shape={self.obs_shape}, action_shape={self.action_shape})")

    @property
    def providers(self) -> list[str]:
        """What runs the graph: ONNX Runtime execution providers, or the TensorRT version."""
        return self.runtime.providers

    @property
    def recurrent(self) -> bool:
        return bool(self.runtime.state_specs)

    @property
    def latency(self) -> dict[str, float]:
        """Latency of whole ``act`` calls (checks and conversion included) in microseconds: calls,
        mean, median, p90, p99, p99.9, max (the last 100 000 calls)."""
        return self._act_latency.summary()

    @property
    def backend_latency(self) -> dict[str, float]:
        """The same statistics for the backend call alone (ONNX Runtime ``run`` / TensorRT execute)."""
        return self.runtime.latency.summary()

    def reset_latency(self) -> None:
        """Forget the recorded latencies (e.g. after warm-up)."""
        self._act_latency.clear()
        self.runtime.latency.clear()

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes: zero the recurrent state and observation history (of the rows in ``mask``)."""
        self.runtime.reset(mask)

    def _expected(self) -> str:
        dims = ", ".join(map(str, self.obs_shape))
        return f"shape {self.obs_shape} for one observation or (batch, {dims}) for a batch"

    def check_obs(self, obs: Any) -> tuple[np.ndarray, bool]:
        """``obs`` as a contiguous float32 batch, and whether it was a single observation.

        Raises :class:`InputError` for a wrong shape, a non-real dtype, an empty or too large batch,
        or (with ``nan_policy="error"``) a non-finite value.
        """
        if (type(obs) is np.ndarray and obs.dtype == _F32 and obs.shape[1:] == self.obs_shape
                and obs.flags.c_contiguous and 0 < obs.shape[0] <= (self.max_batch or obs.shape[0])):
            return self._finite(obs, False), False  # the hot path: already a float32 batch
        try:
            arr = np.asarray(obs)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise InputError(f"observation is not an array ({exc}); expected float32 {self._expected()}") from None
        if arr.dtype.kind not in "fiu":
            raise InputError(f"observation dtype {arr.dtype} is not a real number type; expected float32 "
                             f"{self._expected()}")
        if arr.shape == self.obs_shape:
            single = True
            arr = arr[None]
        elif arr.ndim == len(self.obs_shape) + 1 and arr.shape[1:] == self.obs_shape:
            single = False
            if arr.shape[0] == 0:
                raise InputError(f"observation batch is empty (shape {arr.shape}); expected {self._expected()}")
            if self.max_batch and arr.shape[0] > self.max_batch:
                raise InputError(f"observation batch of {arr.shape[0]} is larger than the bundle's max_batch "
                                 f"{self.max_batch}; split it")
        else:
            raise InputError(f"observation shape {arr.shape}; expected {self._expected()}")
        batch = np.ascontiguousarray(arr, dtype=np.float32)
        return self._finite(batch, single), single

    def _finite(self, batch: np.ndarray, single: bool) -> np.ndarray:
        """``batch`` after the NaN policy (raises for ``"error"``, zeroes for ``"zero"``)."""
        if self.nan_policy == "pass":
            return batch
        if _finite_fast(batch):  # else an element-wise look (an overflow of x·x is no error)
            return batch
        finite = np.isfinite(batch)
        if not finite.all():
            if self.nan_policy == "error":
                bad = tuple(int(i) for i in np.argwhere(~finite)[0])
                where = bad[1:] if single else bad
                raise InputError(f"observation has a non-finite value ({batch[bad]}) at index {where}; "
                                 "pass nan_policy='zero' or 'pass' to accept such input")
            batch = np.where(finite, batch, np.float32(0.0))
        return batch

    def act(self, obs: Any) -> np.ndarray:
        """Actions for one observation or a batch (numpy in, float32 numpy out)."""
        t0 = time.perf_counter()
        fused = self._fused
        if fused is not None and type(obs) is np.ndarray and obs.dtype is _F32 and obs.flags.c_contiguous:
            # the hot path (cuda-fused, a C-contiguous float32 array): one shape test, then the copy into
            # the pinned buffer and the graph launch; the finite check runs while the GPU computes
            shape = obs.shape
            if shape == self.obs_shape:
                out, ok = fused.act_overlapped(obs, 1, self._check)
                if ok:
                    actions = out[0]
                    self._act_latency.add(time.perf_counter() - t0)
                    return actions
            elif len(shape) == 2 and shape[1] == self.obs_shape[0] and 0 < shape[0] <= self._batch_limit:
                out, ok = fused.act_overlapped(obs, shape[0], self._check)
                if ok:
                    self._act_latency.add(time.perf_counter() - t0)
                    return out
            # anything else (a non-finite value, a wrong shape): the general path says what is wrong
        batch, single = self.check_obs(obs)
        actions = self.runtime.act(batch)
        out = actions[0] if single else actions
        self._act_latency.add(time.perf_counter() - t0)
        return out

    __call__ = act


def _check_input_shape(path: Path, runtime: Any, manifest: Mapping[str, Any]) -> None:
    """The graph's observation input must take ``[batch, *observation_space.shape]`` (a manifest edited to
    another shape would otherwise fail inside ONNX Runtime on the first call)."""
    io = manifest["io"]
    session = getattr(runtime, "session", None)
    if session is None or history_spec(io) is not None:
        return
    inputs = {i.name: i.shape for i in session.get_inputs()}
    dims = list(inputs.get(io["input"], []))[1:]
    expected = [int(s) for s in manifest["observation_space"]["shape"]]
    if dims and all(isinstance(d, int) for d in dims) and dims != expected:
        raise BundleError(f"{path}: the model's input {io['input']!r} takes [batch, {', '.join(map(str, dims))}] "
                          f"but the manifest's observation_space.shape is {expected}; the manifest does not "
                          "describe this model")


def _make_runtime(chosen: str, root: Path, manifest: Mapping[str, Any], precision: str, *, intra_op_threads: int,
                  cuda_graph: bool, verify: bool = True) -> Runtime:
    """The runtime of one concrete backend; raises on any problem (the caller decides what follows).

    The model is read once, checked against its SHA-256 (``verify``) and handed over as those bytes."""
    io = manifest["io"]
    models = manifest["models"]
    if chosen == "trt":
        if not engines_for(manifest, precision):
            raise BundleError(f"{root}: backend 'trt' needs a TensorRT engine of precision {precision!r} in the "
                              "bundle (it has none); build one on the target GPU, or use backend 'cuda' or 'cpu'")
        if not tensorrt_available():
            raise BundleError("backend 'trt' needs TensorRT's Python package (JetPack's python3-libnvinfer, or "
                              "`pip install tensorrt` on x86-64); it does not import here")
        return load_trt_runtime(root, manifest, precision)
    if precision not in models:
        raise BundleError(f"{root}: no {precision!r} model in this bundle (it has {', '.join(sorted(models))})")
    # the fused kernel reads the portable all-INT8 file (the one TensorRT builds from)
    model_file = models[precision] if chosen == "cuda-fused" else model_for(
        manifest, precision, "cuda" if chosen == "cuda-ort" else chosen)
    if model_file not in manifest["files"]:
        raise BundleError(f"{root}: {model_file} is not listed in the manifest's files, so it cannot be verified")
    data = read_verified(root, manifest, model_file) if verify else inside_path(root, model_file).read_bytes()
    runtime: Runtime
    if chosen == "cuda-fused":
        reason = _fused_reason(root, manifest, precision)
        if reason is not None:
            raise BundleError(f"{root}: backend 'cuda-fused' cannot run here: {reason}")
        if io.get("state"):
            runtime = FusedRnnPolicy(data, state=list(io["state"]), input_name=io["input"], output_name=io["output"],
                                     cuda_graph=cuda_graph)
        else:
            runtime = FusedCudaPolicy(data, input_name=io["input"], output_name=io["output"], cuda_graph=cuda_graph)
    elif chosen == "cuda-ort":
        runtime = OrtCudaPolicy(data, input_name=io["input"], output_name=io["output"],
                                state=io.get("state", []), io_binding=True, cuda_graph=cuda_graph)
    else:
        runtime = OrtPolicy(data, providers=ort_providers(chosen), require_provider=True,
                            input_name=io["input"], output_name=io["output"], state=io.get("state", []),
                            intra_op_threads=intra_op_threads)
    if io["output"] not in runtime.output_names:
        raise BundleError(f"{root / model_file}: the model has no output {io['output']!r} named by the "
                          f"manifest's io.output (outputs: {', '.join(runtime.output_names)})")
    _check_input_shape(root / model_file, runtime, manifest)
    return runtime


def load(bundle: str | Path, backend: str = "auto", *, precision: str = "int8", nan_policy: str = "error",
         intra_op_threads: int = 1, verify: bool = True, warmup: int = 3,
         cuda_graph: bool = True, trusted_keys: Any = None, allow_unsigned: bool = False) -> DeployedPolicy:
    """Load ``bundle`` after checking its signature, format version and every file against the manifest's
    SHA-256.

    ``trusted_keys``: the Ed25519 public keys (``.pub`` files from ``edgeq keygen``, PEM bytes or key
    objects) one of which must have signed the manifest (``manifest.sig``); the manifest hashes every
    file the robot runs, so the signature covers them. Without trusted keys the bundle loads only with
    ``allow_unsigned=True``, and then with a ``UserWarning`` (nothing proves who made it).
    The model is read once, checked against its SHA-256 and handed to the runtime as those bytes (no
    external data files, no symbolic links; a file swapped after the check is never run).

    ``backend``: ``"auto"`` picks the fastest backend that can run the bundle here, in the order
    :data:`AUTO_ORDER`: ``cuda-fused`` (edgeq's fused INT8 kernel, one CUDA graph per call;
    feed-forward INT8 policies, and LSTM/GRU INT8 policies with their state kept on the GPU
    (:mod:`edgeq.deploy.fused_rnn`); cuda-python and an NVIDIA GPU), ``trt`` (TensorRT installed
    *and* an engine of ``precision`` in the bundle), ``cuda-ort`` (ONNX Runtime's CUDA EP: fp32, and
    INT8 graphs the fused kernels do not run), ``cpu``; a backend that fails to start is skipped with a
    ``RuntimeWarning``. ``"cuda"`` is ``cuda-fused`` where it can run the model, else ``cuda-ort``
    (with a ``RuntimeWarning`` saying why). A named backend that cannot run here raises
    :class:`BundleError`; so does a TensorRT engine built for another GPU or TensorRT version.
    ``policy.backend`` names the backend that runs and ``policy.backend_notes`` why the faster ones
    were skipped (also logged on ``edgeq.deploy``).

    ``precision``: ``"int8"`` (default) or ``"fp32"``. A bundle's backend-specialized copy of the
    model (``policy.int8.cpu.onnx``, ``policy.int8.cuda.onnx``: fewer kernels; the CPU file runs the
    manifest's ``cpu_float_layers`` in float) is used where there is one; ``cuda-fused`` runs the
    portable ``policy.int8.onnx``. On ``cuda-ort`` inputs and outputs are bound to device buffers
    and, with ``cuda_graph``, each batch size's run is captured once as a CUDA graph and replayed
    (``cuda-fused`` captures copies + kernel likewise). ``warmup`` calls on a zero observation are
    made (and then forgotten: state and latency statistics) so the first real call is not slow.
    """
    root = Path(bundle)
    if precision not in PRECISIONS:
        raise BundleError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    manifest = read_manifest(root, verify=verify, trusted_keys=trusted_keys, allow_unsigned=allow_unsigned)
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    notes: list[str] = []
    if backend == "auto":
        candidates = []
        for name in AUTO_ORDER:
            reason = unavailable_backend_reason(name, manifest, precision, root)
            if reason is None:
                candidates.append(name)
            else:
                notes.append(f"{name}: {reason}")
    elif backend == "cuda":
        reason = _fused_reason(root, manifest, precision)
        if reason is None:
            candidates = ["cuda-fused"]
        else:
            candidates = ["cuda-ort"]
            notes.append(f"cuda-fused: {reason}")
            warnings.warn(f"edgeq.deploy: the fused CUDA kernel cannot run {root} ({reason}); using ONNX Runtime's "
                          "CUDA EP (cuda-ort)", RuntimeWarning, stacklevel=2)
    else:
        candidates = [backend]
    runtime: Runtime | None = None
    chosen = candidates[0]
    for chosen in candidates:
        try:
            runtime = _make_runtime(chosen, root, manifest, precision, intra_op_threads=intra_op_threads,
                                    cuda_graph=cuda_graph, verify=verify)
            break
        except Exception as exc:  # noqa: BLE001 - a GPU backend that cannot start, for any reason
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if backend != "auto" or chosen == "cpu":
                if isinstance(exc, BundleError) and backend != "cuda":
                    raise
                extra = f" ({'; '.join(notes)})" if notes else ""
                raise BundleError(f"{root}: backend {backend!r} cannot start: {first}{extra}") from None
            notes.append(f"{chosen}: failed to start: {first}")
            warnings.warn(f"edgeq.deploy: backend {chosen!r} failed to start ({first}); trying the next one",
                          RuntimeWarning, stacklevel=2)
    assert runtime is not None
    _log.info("edgeq.deploy: %s runs on backend %r%s", root, chosen, f" (skipped: {'; '.join(notes)})" if notes else "")
    policy = DeployedPolicy(with_history(runtime, manifest["io"]), manifest, precision=precision, backend=chosen,
                            nan_policy=nan_policy, bundle=root)
    policy.backend_notes = notes
    if warmup > 0:
        zero = np.zeros((1, *policy.obs_shape), np.float32)
        for _ in range(warmup):
            policy.runtime.act(zero)
        policy.reset()
        policy.reset_latency()
    return policy
