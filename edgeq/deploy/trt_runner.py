"""Run a TensorRT policy engine from numpy, torch-free: ``actions = TrtPolicyRunner(path).run(obs)``.

The CUDA side (device and pinned host buffers, the stream, CUDA graph capture and replay) goes
through :mod:`edgeq.deploy.cuda` (NVIDIA's cuda-python), the same library as the fused int8
backend; only the engine calls (deserialize, shapes, tensor addresses, ``execute_async_v3``) are
TensorRT's, type-checked against ``tensorrt-stubs`` by ``scripts/typecheck_tensorrt.sh``. The engine
helpers (compatibility check, platform facts, logger) live in :mod:`edgeq.export.tensorrt_engine`,
which re-exports this class.

Each call: copy the inputs into pinned buffers, then on one stream: pinned → device copies,
``execute_async_v3``, device → pinned copies; then one ``cuStreamSynchronize``. With
``use_cuda_graph=True`` those three steps are captured once per batch size (after one eager run, as
TensorRT requires after a shape change) and replayed with one ``cuGraphLaunch``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeq.deploy import cuda
from edgeq.errors import BundleError, InputError

if TYPE_CHECKING:
    import tensorrt as trt

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


def _dims(dims: Any) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


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
        from edgeq.export import tensorrt_engine as te

        te._require_trt()
        reason = cuda.available(device)
        if reason is not None:
            raise te.TensorRTUnavailableError(f"TrtPolicyRunner needs CUDA through cuda-python: {reason}")
        path = Path(engine_path)
        if not path.is_file():
            raise BundleError(f"TensorRT engine not found: {path}")
        data = path.read_bytes()
        platform = te.current_platform(device)
        platform["engine_sha256"] = hashlib.sha256(data).hexdigest()
        if expected is not None:
            te.check_engine_compat(expected, platform)
        sink: list[str] = []
        logger = te._make_logger(sink)
        runtime = te.trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(
                f"TensorRT {te.trt.__version__} could not load {path} (built with another TensorRT version, for "
                f"another GPU, or corrupt): {'; '.join(sink[-3:]) or 'no details'}"
            )
        self._runtime = runtime
        self._setup(engine, te.trt.TensorIOMode.INPUT, sink, use_cuda_graph=use_cuda_graph, device=device,
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
        from edgeq.export.tensorrt_engine import _NP_DTYPES

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
            shape = _dims(engine.get_tensor_shape(name))
            if not shape:
                raise BundleError(f"engine input {name!r} is a scalar; edgeq needs a batch axis on every input")
            if any(d < 0 for d in shape):
                lo, _opt, hi = (_dims(d) for d in engine.get_tensor_profile_shape(name, 0))
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
                max_shape = _dims(self._context.get_tensor_shape(name))
                if any(d < 0 for d in max_shape):
                    raise BundleError(f"output {name!r} has a data-dependent shape {max_shape}: not supported")
                self._outputs[name] = self._alloc(name, np_dtype, _dims(engine.get_tensor_shape(name)), max_shape)
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
        return [(buf, _dims(self._context.get_tensor_shape(buf.name))) for buf in self._outputs.values()]

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


__all__ = ["MAX_GRAPHS", "TrtPolicyRunner"]
