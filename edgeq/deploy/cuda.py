"""The CUDA side of edgeq's GPU backends, torch-free: context, streams, memory, NVRTC, CUDA graphs.

Everything goes through NVIDIA's ``cuda-python`` (``cuda.bindings.driver`` and ``cuda.bindings.nvrtc``,
``pip install edgeq[gpu]``); no torch, no CuPy. Used by the fused int8 MLP backend
(:mod:`edgeq.deploy.fused_mlp`), the pinned copies of the ONNX Runtime CUDA backend
(:mod:`edgeq.deploy.ort_cuda`) and the TensorRT runner (:mod:`edgeq.deploy.tensorrt_runner`).

All work happens in the device's *primary* context, the one the CUDA runtime (ONNX Runtime,
TensorRT) uses, so device pointers and streams made here can be handed to them.

* :class:`Stream`: a non-blocking stream; ``int(stream)`` is the ``cudaStream_t`` handle.
* :class:`DeviceBuffer` (``cuMemAlloc``) and :class:`PinnedBuffer` (``cuMemHostAlloc``, with a numpy
  view: the host side of every async copy).
* :func:`compile_module`: CUDA C++ → cubin for this GPU's architecture through NVRTC, loaded once.
* :class:`Graph`: stream capture → executable graph; ``launch`` replays it on a stream.

Each driver call's result is checked; a failure raises :class:`CudaError` naming the call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError


class CudaError(EdgeqError):
    """A CUDA driver or NVRTC call failed, or CUDA cannot be used here (the message says which)."""


_lock = threading.Lock()
_contexts: dict[int, Any] = {}


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise CudaError("edgeq's GPU backends need NVIDIA's cuda-python (pip install 'edgeq[gpu]', which brings "
                        f"cuda-bindings); it does not import here ({exc})") from None
    return driver


def bindings() -> Any:
    """``cuda.bindings.driver`` (raises :class:`CudaError` with the install hint if cuda-python is missing)."""
    return _driver()


def check(result: Any, what: str) -> Any:
    """``result`` of a cuda-bindings call (``(err, *values)``): raise :class:`CudaError` unless success.

    Returns the values: None for none, the value for one, a tuple for several.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        name = getattr(err, "name", str(int(err)))
        detail = ""
        try:
            driver = _driver()
            if isinstance(err, driver.CUresult):
                e2, s = driver.cuGetErrorString(err)
                if int(e2) == 0 and s:
                    detail = f": {s.decode() if isinstance(s, bytes) else s}"
        except CudaError:
            pass
        raise CudaError(f"{what} failed with {name}{detail}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def context(device: int = 0) -> Any:
    """Make the primary context of ``device`` current in this thread (initializing CUDA once).

    Raises :class:`CudaError` with the reason when there is no driver or no such GPU.
    """
    driver = _driver()
    with _lock:
        ctx = _contexts.get(device)
        if ctx is None:
            try:
                check(driver.cuInit(0), "cuInit")
            except CudaError:
                raise
            except Exception as exc:  # noqa: BLE001 - cuda-pathfinder raises when libcuda.so is missing
                raise CudaError(f"no NVIDIA driver here (libcuda could not be loaded: {str(exc)[:160]})") from None
            count = check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
            if device >= int(count):
                raise CudaError(f"CUDA device {device} does not exist ({count} GPU(s) visible)")
            dev = check(driver.cuDeviceGet(device), "cuDeviceGet")
            ctx = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _contexts[device] = ctx
    check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def available(device: int = 0) -> str | None:
    """None if CUDA can be used on ``device`` here, else the reason in one line."""
    try:
        context(device)
    except CudaError as exc:
        return str(exc)
    return None


def device_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability and multiprocessor count of ``device``."""
    driver = _driver()
    context(device)
    dev = check(driver.cuDeviceGet(device), "cuDeviceGet")
    name = check(driver.cuDeviceGetName(64, dev), "cuDeviceGetName")
    attr = driver.CUdevice_attribute
    major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attr")
    minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attr")
    sms = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "attr")
    smem = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev), "attr")
    text = name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)
    return {"gpu_name": text.strip(), "compute_capability": f"{int(major)}.{int(minor)}",
            "multiprocessors": int(sms), "max_shared_memory_per_block": int(smem)}


class Stream:
    """A non-blocking CUDA stream in the primary context of ``device``."""

    def __init__(self, device: int = 0) -> None:
        driver = _driver()
        context(device)
        self.device = device
        self.handle = check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")

    def __int__(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(_driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            _driver().cuStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (``cuMemAlloc``); ``int(buf)`` is the device address."""

    def __init__(self, nbytes: int, device: int = 0) -> None:
        driver = _driver()
        context(device)
        self.nbytes = max(int(nbytes), 1)
        self.ptr = check(driver.cuMemAlloc(self.nbytes), "cuMemAlloc")

    def __int__(self) -> int:
        return int(self.ptr)

    def upload(self, array: np.ndarray, stream: Stream | None = None) -> None:
        """Copy ``array`` (host) into the start of the buffer, synchronously (setup, not the hot path)."""
        data = np.ascontiguousarray(array)
        if data.nbytes > self.nbytes:
            raise ValueError(f"{data.nbytes} bytes do not fit a {self.nbytes}-byte device buffer")
        check(_driver().cuMemcpyHtoD(self.ptr, data.ctypes.data, data.nbytes), "cuMemcpyHtoD")

    def download(self, out: np.ndarray) -> np.ndarray:
        """Copy the start of the buffer into ``out`` (host), synchronously (tests and setup)."""
        check(_driver().cuMemcpyDtoH(out.ctypes.data, self.ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def free(self) -> None:
        if self.ptr is not None:
            _driver().cuMemFree(self.ptr)
            self.ptr = None


class PinnedBuffer:
    """Page-locked host memory (``cuMemHostAlloc``) with a numpy view ``array`` of ``shape``/``dtype``.

    The host side of asynchronous copies: only pinned memory lets ``cuMemcpy*Async`` run without a
    staging copy and lets the copy be captured in a CUDA graph.
    """

    def __init__(self, shape: Sequence[int], dtype: Any = np.float32, device: int = 0) -> None:
        driver = _driver()
        context(device)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self.ptr = check(driver.cuMemHostAlloc(self.nbytes, driver.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc")
        raw = (ctypes.c_char * self.nbytes).from_address(int(self.ptr))
        self.array: np.ndarray = np.frombuffer(raw, dtype=self.dtype,
                                               count=int(np.prod(self.shape))).reshape(self.shape)

    def __int__(self) -> int:
        return int(self.ptr)

    def free(self) -> None:
        if self.ptr is not None:
            self.array = np.empty(0, self.dtype)
            _driver().cuMemFreeHost(self.ptr)
            self.ptr = None


def copy_htod_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Host (pinned) → device copy of ``nbytes`` enqueued on ``stream``."""
    check(_driver().cuMemcpyHtoDAsync(dst, src, nbytes, stream.handle), "cuMemcpyHtoDAsync")


def copy_dtoh_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Device → host (pinned) copy of ``nbytes`` enqueued on ``stream``."""
    check(_driver().cuMemcpyDtoHAsync(dst, src, nbytes, stream.handle), "cuMemcpyDtoHAsync")


#: ``CUDA_ERROR_NOT_READY``: what ``cuStreamQuery`` returns while the stream still has work.
CUDA_ERROR_NOT_READY = 600


class HotCalls:
    """``cuGraphLaunch``, ``cuStreamQuery`` and ``cuStreamSynchronize`` as plain C calls, for a per-step hot path.

    The driver's own entry points, looked up once with cuda-python's ``cuGetProcAddress`` and called
    through ctypes with integer handles: each call returns the ``CUresult`` as an ``int``, with no
    argument wrapping and no result tuple (nothing allocated per call, so nothing for Python's
    garbage collector to walk later). The GIL is released during each call. Where the lookup fails
    (``native`` is False), the same calls go through cuda-python's bindings.
    """

    def __init__(self) -> None:
        driver = _driver()
        self.native = False
        vp = ctypes.c_void_p
        signatures = {"cuGraphLaunch": (vp, vp), "cuStreamQuery": (vp,), "cuStreamSynchronize": (vp,)}
        try:
            version = int(check(driver.cuDriverGetVersion(), "cuDriverGetVersion"))
            flags = driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT
            fns = {}
            for name, args in signatures.items():
                result = driver.cuGetProcAddress(name.encode(), version, flags)
                address = int(result[1]) if int(result[0]) == 0 and result[1] is not None else 0
                if not address:
                    raise CudaError(f"cuGetProcAddress({name}) found no entry point")
                fns[name] = ctypes.CFUNCTYPE(ctypes.c_int, *args)(address)
        except Exception:  # noqa: BLE001 - an older driver or bindings: the Python bindings do the same
            self.graph_launch: Callable[[int, int], int] = lambda g, s: int(
                driver.cuGraphLaunch(driver.CUgraphExec(g), driver.CUstream(s))[0])
            self.stream_query: Callable[[int], int] = lambda s: int(driver.cuStreamQuery(driver.CUstream(s))[0])
            self.stream_synchronize: Callable[[int], int] = lambda s: int(
                driver.cuStreamSynchronize(driver.CUstream(s))[0])
            return
        self.graph_launch = fns["cuGraphLaunch"]
        self.stream_query = fns["cuStreamQuery"]
        self.stream_synchronize = fns["cuStreamSynchronize"]
        self.native = True

    def spin(self, stream: int) -> int:
        """Poll ``stream`` until its work is done (busy wait, no sleep); returns the final ``CUresult``."""
        query = self.stream_query
        err = query(stream)
        while err == CUDA_ERROR_NOT_READY:
            err = query(stream)
        return int(err)


def raise_for(err: int, what: str) -> None:
    """Raise :class:`CudaError` for a non-zero ``CUresult`` ``err`` returned by a :class:`HotCalls` call."""
    if err:
        check((_driver().CUresult(err),), what)


class Module:
    """A compiled CUDA module and its kernels by name."""

    def __init__(self, handle: Any, names: Sequence[str], log: str) -> None:
        self.handle = handle
        self.log = log
        driver = _driver()
        self.functions = {n: check(driver.cuModuleGetFunction(handle, n.encode()), f"cuModuleGetFunction({n})")
                          for n in names}

    def function(self, name: str) -> Any:
        return self.functions[name]


def _fresh_buffer(size: int) -> bytes:
    """A new, unshared bytes object of at least ``size`` bytes for a C API to write into."""
    return bytes(bytearray(max(size, 1) + 64))


def compile_cubin(source: str, arch: str, *, name: str = "edgeq.cu", options: Sequence[str] = ()) -> tuple[bytes, str]:
    """Compile CUDA C++ ``source`` with NVRTC into a cubin for ``arch`` (``"90"`` for sm_90); no GPU needed.

    Returns the cubin and NVRTC's log; a compile error raises :class:`CudaError` with the log's start.
    """
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise CudaError(f"cuda-python's NVRTC bindings do not import ({exc}); pip install 'edgeq[gpu]'") from None
    try:
        prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    except CudaError:
        raise
    except Exception as exc:  # noqa: BLE001 - cuda-pathfinder raises when libnvrtc is not installed
        raise CudaError(f"NVRTC is not installed here ({str(exc)[:160]}); pip install 'edgeq[gpu]'") from None
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", *(o.encode() for o in options)]
    try:
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        # NVRTC writes into the buffer: never a 1-byte bytes object, which CPython shares process-wide
        # (an empty log is 1 byte; writing into the shared b" " broke unrelated code, e.g. torch.load)
        buf = _fresh_buffer(int(size))
        check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = bytes(buf).split(b"\0", 1)[0].decode(errors="replace").strip()
        if int(result[0]) != 0:
            raise CudaError(f"NVRTC could not compile {name} for sm_{arch}: {log[:600]}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = _fresh_buffer(int(size))
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        cubin = bytes(cubin[: int(size)])
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return cubin, log


def compile_module(source: str, kernels: Sequence[str], *, device: int = 0, name: str = "edgeq.cu",
                   options: Sequence[str] = ()) -> Module:
    """Compile ``source`` with NVRTC for this GPU's architecture (``sm_XY`` cubin) and load it.

    ``kernels`` are the ``extern "C"`` kernel names to look up. NVRTC's log is kept on the module;
    a compile error raises :class:`CudaError` with the log's first lines.
    """
    driver = _driver()
    arch = device_info(device)["compute_capability"].replace(".", "")
    cubin, log = compile_cubin(source, arch, name=name, options=options)
    context(device)
    handle = check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    return Module(handle, kernels, log)


def set_max_dynamic_shared_memory(function: Any, nbytes: int) -> None:
    """Allow ``function`` to take ``nbytes`` of dynamic shared memory (needed above 48 KiB)."""
    driver = _driver()
    attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(driver.cuFuncSetAttribute(function, attr, int(nbytes)), "cuFuncSetAttribute")


def launch(function: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[tuple[Any, Any]],
           stream: Stream | int, shared_bytes: int = 0) -> None:
    """Launch ``function`` with ``args`` as ``(value, ctypes type)`` pairs on ``stream`` (or a raw handle)."""
    driver = _driver()
    values = tuple(v for v, _ in args)
    types = tuple(t for _, t in args)
    handle = stream.handle if isinstance(stream, Stream) else driver.CUstream(int(stream))
    params: Any = (values, types) if values else 0
    check(driver.cuLaunchKernel(function, *grid, *block, int(shared_bytes), handle, params, 0), "cuLaunchKernel")


def graph_node_count(graph: Any) -> int:
    """The number of nodes (kernels, copies) in a captured graph; -1 if the driver does not say."""
    try:
        result = _driver().cuGraphGetNodes(graph, 0)
        return int(result[-1]) if int(result[0]) == 0 else -1
    except Exception:  # noqa: BLE001 - a count for reports only
        return -1


def graph_node_types(graph: Any) -> dict[str, int]:
    """Nodes of a captured graph by type (``KERNEL``, ``MEMCPY``, ...); empty if the driver does not say."""
    driver = _driver()
    try:
        n = graph_node_count(graph)
        if n <= 0:
            return {}
        err, nodes, _ = driver.cuGraphGetNodes(graph, n)
        if int(err) != 0:
            return {}
        counts: dict[str, int] = {}
        for node in nodes:
            err, kind = driver.cuGraphNodeGetType(node)
            if int(err) == 0:
                name = getattr(kind, "name", str(kind)).replace("CU_GRAPH_NODE_TYPE_", "")
                counts[name] = counts.get(name, 0) + 1
        return counts
    except Exception:  # noqa: BLE001 - a count for reports only
        return {}


class Graph:
    """An executable CUDA graph captured from the work ``body`` enqueues on ``stream``.

    ``body`` runs once under stream capture (nothing executes then); :meth:`launch` replays the
    captured copies and kernels with one call. Capture mode ``thread_local`` lets other threads use
    CUDA meanwhile; ``relaxed`` also allows calls that are unsafe under capture (allocation), which
    third-party code (ONNX Runtime) may make.
    """

    def __init__(self, stream: Stream, body: Callable[[], object], mode: str = "thread_local") -> None:
        driver = _driver()
        modes = {"thread_local": driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                 "global": driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL,
                 "relaxed": driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED}
        self.stream = stream
        check(driver.cuStreamBeginCapture(stream.handle, modes[mode]), "cuStreamBeginCapture")
        try:
            body()
        except BaseException:
            result = driver.cuStreamEndCapture(stream.handle)
            if int(result[0]) == 0 and result[1] is not None:
                driver.cuGraphDestroy(result[1])
            raise
        self.graph = check(driver.cuStreamEndCapture(stream.handle), "cuStreamEndCapture")
        self.exec = check(driver.cuGraphInstantiate(self.graph, 0), "cuGraphInstantiate")
        self.nodes = graph_node_count(self.graph)

    def node_types(self) -> dict[str, int]:
        """The captured nodes by type: kernels and copies per replay."""
        return graph_node_types(self.graph)

    def launch(self, stream: Stream | None = None) -> None:
        check(_driver().cuGraphLaunch(self.exec, (stream or self.stream).handle), "cuGraphLaunch")

    def close(self) -> None:
        driver = _driver()
        if self.exec is not None:
            driver.cuGraphExecDestroy(self.exec)
            self.exec = None
        if self.graph is not None:
            driver.cuGraphDestroy(self.graph)
            self.graph = None


__all__ = ["CUDA_ERROR_NOT_READY", "CudaError", "DeviceBuffer", "Graph", "HotCalls", "Module", "PinnedBuffer", "Stream",
           "available", "bindings", "check",
           "compile_cubin", "compile_module", "context", "copy_dtoh_async", "copy_htod_async", "device_info",
           "graph_node_count", "graph_node_types", "launch", "raise_for", "set_max_dynamic_shared_memory"]
