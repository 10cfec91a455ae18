"""Run TensorRT policy engines on the robot: the engine runner, this machine's facts, the compatibility rule.

The runtime half of edgeq's TensorRT support (the build half, :func:`edgeq.export.tensorrt_engine.build_engine`,
stays on the workstation side and imports this module, never the other way round):

* :class:`TrtPolicyRunner` loads an engine, refuses one built for another GPU or TensorRT version
  (:func:`check_engine_compat`, a pure function), and runs batches from numpy with buffers allocated
  once, ``execute_async_v3`` on a CUDA stream and, optionally, a CUDA graph per batch size.
* :func:`current_platform`: the TensorRT version, GPU name and compute capability of this machine.

Dependencies: ``tensorrt`` (10.x or 11.x); the runner's CUDA side (device and pinned host buffers,
the stream, CUDA graph capture and replay) is NVIDIA's ``cuda-python`` through
:mod:`edgeq.deploy.cuda`, the library of the fused INT8 backend: no torch. Only the engine calls
(deserialize, shapes, tensor addresses, ``execute_async_v3``) are TensorRT's, type-checked against
``tensorrt-stubs`` (``scripts/typecheck_tensorrt.sh``). The GPU name and compute capability come
from cuda-python. Importing this module never fails for lack of TensorRT: :data:`TENSORRT_AVAILABLE` says
whether it can be used (:data:`TENSORRT_IMPORT_ERROR` why not), and every function that needs it
raises :class:`TensorRTUnavailableError` (an ``ImportError``) with the install hint.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy import cuda
from edgeq.errors import BundleError, InputError

TENSORRT_IMPORT_ERROR: str | None
try:
    import tensorrt as trt
except (ImportError, OSError) as _exc:  # OSError: the package is there but its libraries are not
    TENSORRT_AVAILABLE = False
    TENSORRT_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    # `tensorrt-stubs` installs a `tensorrt/` folder of .pyi files only, which imports as an empty
    # namespace package: that is not TensorRT.
    TENSORRT_AVAILABLE = hasattr(trt, "Builder")
    TENSORRT_IMPORT_ERROR = None if TENSORRT_AVAILABLE else "only type stubs are installed (no runtime)"

__all__ = [
    "TENSORRT_AVAILABLE",
    "TENSORRT_IMPORT_ERROR",
    "TensorRTUnavailableError",
    "MAX_GRAPHS",
    "TrtPolicyRunner",
    "check_engine_compat",
    "current_platform",
    "engine_dims",
    "make_logger",
    "require_tensorrt",
]

_log = logging.getLogger("edgeq.tensorrt")


class TensorRTUnavailableError(ImportError):
    """TensorRT's Python package cannot be imported here (no GPU stack, or only the type stubs)."""


def require_tensorrt(available: bool = TENSORRT_AVAILABLE, error: str | None = TENSORRT_IMPORT_ERROR) -> None:
    """Raise :class:`TensorRTUnavailableError` with the install hint unless TensorRT can be used.

    ``available``/``error`` default to this module's import of ``tensorrt``; the build side passes its own.
    """
    if not available:
        raise TensorRTUnavailableError(
            f"TensorRT's Python package could not be imported ({error}). Building or running "
            "TensorRT engines needs an NVIDIA GPU machine with TensorRT 10 or 11: `pip install tensorrt` "
            "on x86-64, JetPack's python3-libnvinfer on Jetson. fp16_onnx_with_casts() and "
            "check_engine_compat() work without it."
        )


# --- platform and compatibility --------------------------------------------------------------------


def _normalize_cc(value: object) -> str | None:
    """Compute capability as ``"major.minor"`` from "8.7", "sm_87", "87", (8, 7) or [8, 7]."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, _, minor = text.partition(".")
        if major.isdigit() and minor.isdigit():
            return f"{int(major)}.{int(minor)}"
    elif text.isdigit() and len(text) in (2, 3):
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise BundleError(f"compute capability {value!r} is not of the form '8.7', 'sm_87' or [8, 7]")


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_engine_compat(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> None:
    """Refuse to run an engine on a machine it was not built for.

    A serialized TensorRT engine loads only in the TensorRT version that built it and runs only on GPUs
    of the compute capability it was built for (unless built hardware-compatible, "ampere_plus").

    Args:
        expected: the manifest record of the engine (:meth:`EngineInfo.to_dict`); keys used:
            ``tensorrt_version``, ``compute_capability``, ``gpu_name`` (for the message),
            ``engine_sha256``, ``hardware_compatibility_level`` (optional).
        actual: the same keys for this machine and engine file (:func:`current_platform`, plus the
            file's ``engine_sha256``). A key missing on either side is not compared.

    Raises:
        BundleError: naming every mismatch and what to do about it.
    """
    problems: list[str] = []
    exp_v, act_v = expected.get("tensorrt_version"), actual.get("tensorrt_version")
    if exp_v and act_v and _version_key(str(exp_v)) != _version_key(str(act_v)):
        problems.append(
            f"TensorRT version mismatch: the engine was built with TensorRT {exp_v} but this machine has "
            f"TensorRT {act_v} (an engine loads only in the TensorRT version that built it): install "
            f"TensorRT {exp_v} or rebuild the engine here"
        )
    exp_cc = _normalize_cc(expected.get("compute_capability"))
    act_cc = _normalize_cc(actual.get("compute_capability"))
    if exp_cc and act_cc and exp_cc != act_cc:
        level = str(expected.get("hardware_compatibility_level") or "").lower()
        portable = level in ("ampere_plus", "hardwarecompatibilitylevel.ampere_plus") and float(act_cc) >= 8.0
        if not portable:
            exp_gpu = expected.get("gpu_name") or "unknown GPU"
            act_gpu = actual.get("gpu_name") or "unknown GPU"
            problems.append(
                f"GPU mismatch: the engine was built for compute capability {exp_cc} ({exp_gpu}) but this "
                f"GPU is compute capability {act_cc} ({act_gpu}): rebuild the engine on the target GPU "
                "(TensorRT engines are specific to the GPU architecture)"
            )
    exp_sha, act_sha = expected.get("engine_sha256"), actual.get("engine_sha256")
    if exp_sha and act_sha and str(exp_sha).lower() != str(act_sha).lower():
        problems.append(
            f"engine file changed after export: sha256 {str(act_sha)[:12]}... does not match the "
            f"manifest's {str(exp_sha)[:12]}...: re-export the bundle"
        )
    if problems:
        raise BundleError("; ".join(problems))


def current_platform(device: int = 0) -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability of this machine (None where unknown).

    The GPU facts come from cuda-python (:func:`edgeq.deploy.cuda.device_info`) where it reaches a
    GPU, else from ``torch.cuda`` if a CUDA build of torch happens to be installed.
    """
    info: dict[str, Any] = {
        "tensorrt_version": str(trt.__version__) if TENSORRT_AVAILABLE else None,
        "gpu_name": None,
        "compute_capability": None,
    }
    if cuda.available(device) is None:
        facts = cuda.device_info(device)
        info["gpu_name"] = facts["gpu_name"]
        info["compute_capability"] = facts["compute_capability"]
        return info
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        return info
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["compute_capability"] = f"{major}.{minor}"
    return info


# --- TensorRT helpers (shared with the build side) ---------------------------------------------------


def make_logger(sink: list[str]) -> trt.ILogger:
    """A TensorRT logger that forwards to Python logging and keeps warnings and errors in ``sink``."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                _log.error("TensorRT: %s", msg)
                sink.append(f"[{severity.name}] {msg}")
            elif severity == trt.ILogger.Severity.WARNING:
                _log.warning("TensorRT: %s", msg)
                sink.append(f"[{severity.name}] {msg}")
            else:
                _log.debug("TensorRT: %s", msg)

    return _Logger()


def engine_dims(dims: trt.Dims) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]

# --- runner ------------------------------------------------------------------------------------------

_NP_DTYPES: dict[str, type[np.generic]] = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


#: Batch sizes that get their own captured CUDA graph.
MAX_GRAPHS = 8


@dataclass
class _IOBuffer:
    name: str
    np_dtype: np.dtype[Any]
    shape: list[int]  # engine shape, -1 for the batch axis
    max_shape: list[int]
    device: cuda.DeviceBuffer  # max size
    host: cuda.PinnedBuffer  # flat, pinned, max size


class TrtPolicyRunner:
    """Run a TensorRT policy engine from numpy: ``actions = runner.run(obs)``.

    Device buffers (for the profile's largest batch) and pinned host buffers are allocated once;
    each call copies the inputs in, sets the input shapes if the batch changed, enqueues
    ``execute_async_v3`` on a private CUDA stream, copies the outputs back and waits once. With
    ``use_cuda_graph=True`` each batch size's copies + engine are captured once as a CUDA graph
    and replayed (rule 18 of the QDQ notes). Returns one array for a single-output engine, else a
    dict of arrays by output name (recurrent policies: pass the state inputs as keywords).

    Needs ``tensorrt`` and cuda-python (``pip install 'edgeq[gpu]'``); no torch.
    """

    def __init__(
        self,
        engine_path: str | Path,
        expected: Mapping[str, Any] | None = None,
        use_cuda_graph: bool = False,
        device: int = 0,
        input_name: str = "obs",
    ) -> None:
        """Load an engine and allocate its buffers.

        Args:
            engine_path: the serialized engine.
            expected: the engine's manifest record (``EngineInfo.to_dict()``); if given, the TensorRT
                version, compute capability and file hash are checked first (``check_engine_compat``).
            use_cuda_graph: capture and replay each batch size's call as a CUDA graph.
            device: the CUDA device index.
            input_name: the input that ``run``'s first argument feeds.

        Raises:
            BundleError: the file is missing, was built for another GPU/TensorRT, or does not load.
            TensorRTUnavailableError: TensorRT is missing; CudaError: CUDA cannot be used here.
        """
        require_tensorrt()
        reason = cuda.available(device)
        if reason is not None:
            raise TensorRTUnavailableError(f"TrtPolicyRunner needs CUDA through cuda-python: {reason}")
        path = Path(engine_path)
        if not path.is_file():
            raise BundleError(f"TensorRT engine not found: {path}")
        data = path.read_bytes()
        platform = current_platform(device)
        platform["engine_sha256"] = hashlib.sha256(data).hexdigest()
        if expected is not None:
            check_engine_compat(expected, platform)
        sink: list[str] = []
        logger = make_logger(sink)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} could not load {path} (built with another TensorRT version, for "
                f"another GPU, or corrupt): {'; '.join(sink[-3:]) or 'no details'}"
            )
        self._runtime: trt.Runtime | None = runtime
        self._setup(engine, trt.TensorIOMode.INPUT, sink, use_cuda_graph=use_cuda_graph, device=device,
                    input_name=input_name, where=str(path))
        self.platform = platform

    @classmethod
    def from_engine(cls, engine: Any, input_mode: Any, *, use_cuda_graph: bool = False, device: int = 0,
                    input_name: str = "obs") -> TrtPolicyRunner:
        """A runner around an already deserialized engine (or an object with the same methods:
        the GPU tests run the CUDA side with a stand-in engine). ``input_mode`` is the value
        ``engine.get_tensor_mode`` returns for inputs (``trt.TensorIOMode.INPUT``)."""
        reason = cuda.available(device)
        if reason is not None:
            raise cuda.CudaError(reason)
        self = cls.__new__(cls)
        self._runtime = None
        self.platform = {}
        self._setup(engine, input_mode, [], use_cuda_graph=use_cuda_graph, device=device, input_name=input_name,
                    where="engine")
        return self

    def _setup(self, engine: trt.ICudaEngine, input_mode: Any, sink: list[str], *, use_cuda_graph: bool,
               device: int, input_name: str, where: str) -> None:
        self._sink = sink
        self._device = device
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise BundleError(f"could not create an execution context for {where} (out of GPU memory?)")
        self._context = context
        self._stream = cuda.Stream(device)
        self._use_cuda_graph = use_cuda_graph
        self._graphs: dict[int, cuda.Graph] = {}
        self._graph_failed = False
        self._shapes_batch: int | None = None
        self._inputs: dict[str, _IOBuffer] = {}
        self._outputs: dict[str, _IOBuffer] = {}
        input_specs: list[tuple[str, np.dtype[Any], list[int], list[int]]] = []
        batch_ranges: list[tuple[int, int]] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype_name = engine.get_tensor_dtype(name).name
            if dtype_name not in _NP_DTYPES:
                raise BundleError(f"engine tensor {name!r} has type {dtype_name}, which numpy cannot hold")
            if engine.get_tensor_mode(name) != input_mode:
                continue
            shape = engine_dims(engine.get_tensor_shape(name))
            if not shape:
                raise BundleError(f"engine input {name!r} is a scalar; edgeq needs a batch axis on every input")
            if any(d < 0 for d in shape):
                lo, _opt, hi = (engine_dims(d) for d in engine.get_tensor_profile_shape(name, 0))
                max_shape = hi
                batch_ranges.append((lo[0], hi[0]))
            else:
                max_shape = shape
                batch_ranges.append((shape[0], shape[0]))
            input_specs.append((name, np.dtype(_NP_DTYPES[dtype_name]), shape, max_shape))
        if not input_specs:
            raise BundleError(f"{where} has no input")
        self._min_batch = max(lo for lo, _ in batch_ranges)
        self._max_batch = min(hi for _, hi in batch_ranges)
        for name, np_dtype, shape, max_shape in input_specs:
            self._inputs[name] = self._alloc(name, np_dtype, shape, max_shape)
            self._context.set_input_shape(name, tuple(max_shape))
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != input_mode:
                np_dtype = np.dtype(_NP_DTYPES[engine.get_tensor_dtype(name).name])
                max_shape = engine_dims(self._context.get_tensor_shape(name))
                if any(d < 0 for d in max_shape):
                    raise BundleError(f"output {name!r} has a data-dependent shape {max_shape}: not supported")
                self._outputs[name] = self._alloc(name, np_dtype, engine_dims(engine.get_tensor_shape(name)), max_shape)
        for buf in (*self._inputs.values(), *self._outputs.values()):
            if not self._context.set_tensor_address(buf.name, int(buf.device)):
                raise BundleError(f"TensorRT refused the device buffer of {buf.name!r}")
        self._shapes_batch = self._max_batch
        self.input_names = list(self._inputs)
        self.output_names = list(self._outputs)
        self._primary = input_name if input_name in self._inputs else self.input_names[0]

    @property
    def max_batch(self) -> int:
        """The largest batch the engine's optimization profile accepts."""
        return self._max_batch

    @property
    def graphs(self) -> dict[int, cuda.Graph]:
        """The captured CUDA graphs by batch size."""
        return dict(self._graphs)

    def _alloc(self, name: str, np_dtype: np.dtype[Any], shape: list[int], max_shape: list[int]) -> _IOBuffer:
        numel = max(1, math.prod(max_shape))
        device = cuda.DeviceBuffer(numel * np_dtype.itemsize, self._device)
        host = cuda.PinnedBuffer((numel,), np_dtype, self._device)
        return _IOBuffer(name, np_dtype, shape, max_shape, device, host)

    def _prepare(self, obs: np.ndarray, state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, bool]:
        feeds: dict[str, Any] = {self._primary: obs, **state}
        missing = [n for n in self._inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self._inputs]
        if missing or unknown:
            raise InputError(
                f"engine inputs are {self.input_names}; missing {missing}, unknown {unknown}"
                if missing
                else f"engine inputs are {self.input_names}; unknown {unknown}"
            )
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        squeeze = False
        for name, value in feeds.items():
            buf = self._inputs[name]
            arr = np.asarray(value)
            if arr.dtype != buf.np_dtype:
                same_kind = arr.dtype.kind == buf.np_dtype.kind
                if not (same_kind or (buf.np_dtype.kind == "f" and arr.dtype.kind in "iub")):
                    raise InputError(f"input {name!r} has dtype {arr.dtype}; the engine expects {buf.np_dtype}")
                arr = arr.astype(buf.np_dtype)
            feature_shape = buf.shape[1:]
            if arr.ndim == len(buf.shape) - 1 and list(arr.shape) == feature_shape:
                arr = arr[None]
                squeeze = True
            if arr.ndim != len(buf.shape) or list(arr.shape[1:]) != feature_shape:
                raise InputError(
                    f"input {name!r} has shape {list(np.shape(value))}; the engine expects "
                    f"[batch, {', '.join(map(str, feature_shape))}]"
                )
            if batch is not None and arr.shape[0] != batch:
                raise InputError(f"inputs disagree on the batch size ({batch} vs {arr.shape[0]} for {name!r})")
            batch = int(arr.shape[0])
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise InputError(f"input {name!r} holds NaN or infinite values")
            arrays[name] = np.ascontiguousarray(arr)
        assert batch is not None
        if not self._min_batch <= batch <= self._max_batch:
            raise InputError(f"batch {batch} is outside the engine's profile [{self._min_batch}, {self._max_batch}]")
        return arrays, batch, squeeze

    def _set_shapes(self, arrays: Mapping[str, np.ndarray], batch: int) -> None:
        if self._shapes_batch == batch:
            return
        for name, arr in arrays.items():
            if not self._context.set_input_shape(name, tuple(int(d) for d in arr.shape)):
                raise InputError(f"TensorRT rejected shape {list(arr.shape)} for input {name!r}")
        self._shapes_batch = batch

    def _out_shapes(self) -> list[tuple[_IOBuffer, list[int]]]:
        return [(buf, engine_dims(self._context.get_tensor_shape(buf.name))) for buf in self._outputs.values()]

    def _enqueue(self, arrays: Mapping[str, np.ndarray]) -> list[tuple[_IOBuffer, list[int]]]:
        """Copies in, engine, copies out, on the private stream (the body of a CUDA graph too)."""
        for name, arr in arrays.items():
            buf = self._inputs[name]
            cuda.copy_htod_async(int(buf.device), int(buf.host), arr.nbytes, self._stream)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"TensorRT execution failed: {'; '.join(self._sink[-3:]) or 'no details'}")
        results = self._out_shapes()
        for buf, shape in results:
            n = math.prod(shape) * buf.np_dtype.itemsize
            cuda.copy_dtoh_async(int(buf.host), int(buf.device), n, self._stream)
        return results

    def _stage(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            self._inputs[name].host.array[: arr.size] = arr.ravel()

    def _capture_graph(self, arrays: Mapping[str, np.ndarray], batch: int) -> None:
        try:
            graph = cuda.Graph(self._stream, lambda: self._enqueue(arrays))
        except Exception as exc:  # noqa: BLE001 - some engines cannot be captured; run them eagerly
            warnings.warn(f"CUDA graph capture failed ({exc}); running without CUDA graphs", stacklevel=3)
            self._graph_failed = True
            return
        self._graphs[batch] = graph

    def run(self, obs: np.ndarray, **state: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Run the policy on a batch (or one unbatched observation).

        Args:
            obs: ``[batch, *obs_shape]`` or ``obs_shape`` (then the outputs are unbatched too).
            **state: further engine inputs by name (recurrent state), batched like ``obs``.

        Returns:
            The output array for a single-output engine, else ``{output name: array}``.

        Raises:
            InputError: wrong input names, shapes, dtypes, non-finite values or batch size.
        """
        arrays, batch, squeeze = self._prepare(obs, state)
        self._stage(arrays)
        self._set_shapes(arrays, batch)
        graph = self._graphs.get(batch)
        if graph is None and self._use_cuda_graph and not self._graph_failed and len(self._graphs) < MAX_GRAPHS:
            self._enqueue(arrays)  # warm-up after the shape change, as TensorRT requires
            self._stream.synchronize()
            self._capture_graph(arrays, batch)
            graph = self._graphs.get(batch)
        if graph is not None:
            graph.launch(self._stream)
            results = self._out_shapes()
        else:
            results = self._enqueue(arrays)
        self._stream.synchronize()
        out: dict[str, np.ndarray] = {}
        for buf, shape in results:
            value = buf.host.array[: math.prod(shape)].reshape(shape).copy()
            out[buf.name] = value[0] if squeeze and value.ndim > 0 and value.shape[0] == 1 else value
        if len(out) == 1:
            return next(iter(out.values()))
        return out
