"""The robot side of edgeq: load a bundle and act. Imports only numpy and the chosen backend.

.. code-block:: python

    import edgeq.deploy
    policy = edgeq.deploy.load("bundle/", backend="auto")   # cuda-fused > trt > cuda-ort > cpu, or named
    action = policy.act(obs)                                # numpy in, numpy out, batch or single
    policy.latency                                          # {"calls", "median_us", "p99_us", ...}

Never imports torch, gymnasium, Stable-Baselines3 or onnx (tests/test_deploy_imports.py checks it);
TensorRT is imported only for the ``trt`` backend; NVIDIA's cuda-python only for the GPU backends
(``cuda-fused``: :mod:`edgeq.deploy.fused_mlp`; pinned copies of ``cuda-ort``; the TensorRT runner).
``python -m edgeq.deploy`` (``edgeq-deploy``) is the matching command line: verify, selftest, act,
bench, serve.
"""

from __future__ import annotations

from edgeq.deploy.bundle_format import FORMAT_VERSION, read_manifest
from edgeq.deploy.policy import BACKENDS, DeployedPolicy, load, resolve_backend

__all__ = ["BACKENDS", "FORMAT_VERSION", "DeployedPolicy", "load", "read_manifest", "resolve_backend"]
