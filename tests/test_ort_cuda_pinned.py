"""ONNX Runtime's CUDA backend with pinned host buffers and async copies on ONNX Runtime's own stream
(``user_compute_stream``), one synchronize per call: same results as the pageable path and the CPU.

Needs onnxruntime-gpu, cuda-python and a GPU: skips here (CI has no GPU), runs on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES
from fused_helpers import ort_cpu

from edgeq.deploy import cuda

V1 = FIXTURES / "bundles" / "v1" / "sac-pendulum"
ORT_CUDA = "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
pytestmark = pytest.mark.skipif(not ORT_CUDA or cuda.available() is not None,
                                reason="needs onnxruntime-gpu, cuda-python and a GPU (run on the GPU machine)")


@pytest.mark.parametrize("graph", [True, False])
def test_pinned_copies_match_pageable_and_cpu(graph: bool) -> None:
    from edgeq.deploy.ort_cuda import OrtCudaPolicy

    path = V1 / "policy.int8.onnx"
    pinned = OrtCudaPolicy(path, cuda_graph=graph, pinned=True)
    pageable = OrtCudaPolicy(path, cuda_graph=graph, pinned=False)
    assert pinned.describe()["pinned_async_copies"] is True and pageable.describe()["pinned_async_copies"] is False
    rng = np.random.default_rng(0)
    for batch in (1, 1, 8, 300, 1, 8):
        obs = rng.standard_normal((batch, 3)).astype(np.float32)
        a, b = pinned.act(obs), pageable.act(obs)
        assert a.shape == (batch, 1)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ort_cpu(path, obs), atol=1e-4)  # float GEMM order on the GPU
        np.testing.assert_array_equal(pinned.run(obs)["actions"], a)
