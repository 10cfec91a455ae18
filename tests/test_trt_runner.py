"""The TensorRT runner's CUDA side (torch-free: cuda-python buffers, pinned copies, stream, CUDA graphs).

No TensorRT engine can be built on the machines here, so a stand-in engine with TensorRT's method
names runs a real CUDA kernel (``actions = 2 * obs[:, :3] + j``) from ``execute_async_v3`` on the
runner's stream: the copies, the graph capture per batch size and the replays are the real ones.
The engine calls themselves are type-checked against tensorrt-stubs (scripts/typecheck_tensorrt.sh).
The GPU tests skip here (no GPU in CI) and run on the GPU machine.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgeq.deploy import cuda
from edgeq.deploy.tensorrt_runner import TrtPolicyRunner
from edgeq.errors import InputError

GPU = cuda.available()
needs_gpu = pytest.mark.skipif(GPU is not None, reason=f"needs an NVIDIA GPU and cuda-python ({GPU})")
OBS, ACT, MAX_BATCH = 5, 3, 64
KERNEL = r"""
extern "C" __global__ void affine(const float* x, float* y, int batch) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < batch * 3) { int b = i / 3, j = i % 3; y[i] = 2.0f * x[b * 5 + j] + (float)j; }
}
"""


class _Dims(list):  # type: ignore[type-arg]
    """TensorRT's Dims stand-in: a list with a type of its own."""


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes = {"obs": [MAX_BATCH, OBS]}
        self.addresses: dict[str, int] = {}
        self.calls = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = list(shape)
        return True

    def get_tensor_shape(self, name: str) -> _Dims:
        batch = self.shapes["obs"][0]
        return _Dims([batch, OBS] if name == "obs" else [batch, ACT])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.calls += 1
        batch = self.shapes["obs"][0]
        cuda.launch(self.engine.kernel, (-(-batch * ACT // 128), 1, 1), (128, 1, 1),
                    [(self.addresses["obs"], ctypes.c_void_p), (self.addresses["actions"], ctypes.c_void_p),
                     (batch, ctypes.c_int)], stream)
        return True


class FakeEngine:
    """TensorRT's ICudaEngine methods that the runner calls, for one input and one output."""

    num_io_tensors = 2

    def __init__(self) -> None:
        self.kernel = cuda.compile_module(KERNEL, ["affine"]).function("affine")
        self.context: FakeContext | None = None

    def get_tensor_name(self, i: int) -> str:
        return ["obs", "actions"][i]

    def get_tensor_dtype(self, name: str) -> Any:
        return SimpleNamespace(name="FLOAT")

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "obs" else "OUTPUT"

    def get_tensor_shape(self, name: str) -> _Dims:
        return _Dims([-1, OBS] if name == "obs" else [-1, ACT])

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[_Dims]:
        return [_Dims([1, OBS]), _Dims([8, OBS]), _Dims([MAX_BATCH, OBS])]

    def create_execution_context(self) -> FakeContext:
        self.context = FakeContext(self)
        return self.context


def _want(obs: np.ndarray) -> np.ndarray:
    return 2.0 * obs[..., :ACT] + np.arange(ACT, dtype=np.float32)


def test_runner_is_torch_free() -> None:
    import inspect
    import re

    import edgeq.deploy.tensorrt_runner as mod

    assert not re.search(r"^\s*(import|from)\s+torch", inspect.getsource(mod), re.M)
    assert not re.search(r"^\s*(import|from)\s+torch", inspect.getsource(cuda), re.M)


@pytest.mark.skipif(GPU is None, reason="a GPU is here")
def test_without_gpu_the_runner_says_why() -> None:
    with pytest.raises(cuda.CudaError, match="driver|cuda-python"):
        TrtPolicyRunner.from_engine(object(), "INPUT")


@needs_gpu
@pytest.mark.parametrize("graph", [False, True])
def test_runner_cuda_side_on_the_gpu(graph: bool) -> None:
    engine = FakeEngine()
    runner = TrtPolicyRunner.from_engine(engine, "INPUT", use_cuda_graph=graph)
    assert runner.max_batch == MAX_BATCH and runner.input_names == ["obs"] and runner.output_names == ["actions"]
    rng = np.random.default_rng(0)
    for batch in (1, 1, 7, 1, MAX_BATCH, 7):
        obs = rng.standard_normal((batch, OBS)).astype(np.float32)
        out = runner.run(obs)
        assert isinstance(out, np.ndarray) and out.shape == (batch, ACT)
        np.testing.assert_allclose(out, _want(obs), rtol=0, atol=1e-6)
    single = runner.run(obs[0])
    assert isinstance(single, np.ndarray) and single.shape == (ACT,)
    np.testing.assert_allclose(single, _want(obs[0]), atol=1e-6)
    assert engine.context is not None
    if graph:
        assert sorted(runner.graphs) == [1, 7, MAX_BATCH]
        assert runner.graphs[1].node_types() == {"KERNEL": 1, "MEMCPY": 2}
        calls = engine.context.calls
        runner.run(obs[:1])  # a replay: the engine's enqueue is not called again
        assert engine.context.calls == calls
    else:
        assert runner.graphs == {}
    with pytest.raises(InputError, match="outside the engine's profile"):
        runner.run(np.zeros((MAX_BATCH + 1, OBS), np.float32))
