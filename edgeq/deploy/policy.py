"""``edgeq.deploy.load``: a verified bundle as a callable policy with input checks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.bundle_format import model_for, read_manifest, verify_files
from edgeq.deploy.ort_cuda import OrtCudaPolicy
from edgeq.deploy.runtime import NAN_POLICIES, OrtPolicy
from edgeq.errors import BundleError, InputError

BACKENDS = ("auto", "cpu", "cuda", "trt")


def _ort_providers(backend: str) -> list[Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if backend == "cpu":
        return ["CPUExecutionProvider"]
    if backend == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BundleError("backend 'cuda' needs onnxruntime-gpu with CUDAExecutionProvider "
                              f"(available: {available})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BundleError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(backend: str) -> str:
    """``auto`` → ``trt`` if TensorRT imports, else ``cuda`` if ORT has CUDA, else ``cpu``."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    try:
        import tensorrt

        if hasattr(tensorrt, "Builder"):  # type-checking stubs alone import as an empty package
            return "trt"
    except ImportError:
        pass
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


class DeployedPolicy:
    """A bundle's policy: checks inputs, carries recurrent state, records latency; thread-safe.

    ``act(obs)`` takes one observation ``[obs_dim]`` (returns ``[act_dim]``) or a batch
    ``[batch, obs_dim]`` (returns ``[batch, act_dim]``). Non-finite observations raise by default
    (``nan_policy="error"``); ``"zero"`` replaces them with 0, ``"pass"`` hands them on unchanged.
    """

    def __init__(self, runtime: OrtPolicy | OrtCudaPolicy, manifest: dict[str, Any], *, precision: str, backend: str,
                 nan_policy: str = "error") -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy {nan_policy!r}; expected one of {NAN_POLICIES}")
        self.runtime, self.manifest = runtime, manifest
        self.precision, self.backend, self.nan_policy = precision, backend, nan_policy
        self.obs_shape = tuple(manifest["observation_space"]["shape"])
        self.action_shape = tuple(manifest["action_space"]["shape"])
        self._lock = threading.Lock()

    @property
    def latency(self) -> dict[str, float]:
        """Median/p99/p99.9/max latency of the backend calls so far, in microseconds."""
        return self.runtime.latency.summary()

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes: zero the recurrent state (of the rows in ``mask``)."""
        self.runtime.reset(mask)

    def _check(self, obs: Any) -> tuple[np.ndarray, bool]:
        arr = np.asarray(obs)
        if arr.dtype.kind not in "fiu":
            raise InputError(f"observation dtype {arr.dtype} is not numeric; expected float32 of shape "
                             f"{self.obs_shape} or [batch, *{self.obs_shape}]")
        single = arr.shape == self.obs_shape
        if not single and arr.shape[1:] != self.obs_shape:
            raise InputError(f"observation shape {arr.shape}; expected {self.obs_shape} or "
                             f"[batch, {', '.join(map(str, self.obs_shape))}]")
        batch = arr.reshape(1, -1) if single else arr.reshape(arr.shape[0], -1)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.nan_policy != "pass" and not np.all(np.isfinite(batch)):
            if self.nan_policy == "error":
                bad = np.argwhere(~np.isfinite(batch))[0]
                raise InputError(f"observation has a non-finite value at index {tuple(int(i) for i in bad)}; "
                                 "pass nan_policy='zero' or 'pass' to accept such input")
            batch = np.where(np.isfinite(batch), batch, 0.0).astype(np.float32)
        return batch, single

    def act(self, obs: Any) -> np.ndarray:
        batch, single = self._check(obs)
        actions = self.runtime.act(batch)
        return actions[0] if single else actions


def load(bundle: str | Path, backend: str = "auto", *, precision: str = "int8", nan_policy: str = "error",
         intra_op_threads: int = 1, verify: bool = True, cuda_graph: bool = True) -> DeployedPolicy:
    """Load ``bundle`` after checking every file against the manifest's SHA-256.

    On ``cuda`` (ONNX Runtime's CUDA EP) inputs and outputs are bound to device buffers and, with
    ``cuda_graph``, each batch size's run is captured once as a CUDA graph and replayed.
    """
    root = Path(bundle)
    manifest = read_manifest(root, verify=False)
    chosen = resolve_backend(backend)
    try:
        model_file = model_for(manifest, precision, chosen)
    except BundleError as exc:
        raise BundleError(f"{root}: {exc}") from None
    if verify:
        verify_files(root, manifest, [model_file])
    if chosen == "trt":
        raise BundleError(f"{root}: backend 'trt' needs an engine in the bundle; build one with "
                          "'edgeq build-engine' on the target GPU")
    io = manifest.get("io", {})
    if chosen == "cuda":
        gpu = OrtCudaPolicy(root / model_file, input_name=io.get("input", "obs"),
                            output_name=io.get("output", "actions"), state=io.get("state", []), io_binding=True,
                            cuda_graph=cuda_graph)
        return DeployedPolicy(gpu, manifest, precision=precision, backend=chosen, nan_policy=nan_policy)
    runtime = OrtPolicy(root / model_file, input_name=io.get("input", "obs"),
                        output_name=io.get("output", "actions"), state=io.get("state", []),
                        providers=_ort_providers(chosen), intra_op_threads=intra_op_threads)
    return DeployedPolicy(runtime, manifest, precision=precision, backend=chosen, nan_policy=nan_policy)
