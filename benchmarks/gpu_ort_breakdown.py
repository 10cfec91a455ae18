"""Where a batch-1 call of edgeq's CUDA backend spends its time (ONNX Runtime CUDA EP, IO binding + CUDA graph).

Times, each as the median of per-call wall-clock times over 3000 calls after the policy ran 300 times
(so the CUDA graph is captured): the whole ``OrtCudaPolicy.act``; ``OrtValue.update_inplace`` (host →
device copy into the bound input); ``run_with_iobinding`` (graph replay and the wait for it);
``OrtValue.numpy()`` (device → host copy of the bound output); and the replay alone with ONNX Runtime's
end-of-run synchronization turned off (``disable_synchronize_execution_providers``; launch cost only,
its outputs are not read). For comparison, IO binding without a graph and plain ``session.run``.

    python benchmarks/gpu_ort_breakdown.py BUNDLE/policy.int8.cuda.onnx
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from edgeq.deploy.ort_cuda import OrtCudaPolicy


def median_us(fn: Callable[[np.ndarray], object], pool: list[np.ndarray], n: int = 3000) -> float:
    ts = np.empty(n)
    for i in range(n):
        x = pool[i % len(pool)]
        t0 = time.perf_counter()
        fn(x)
        ts[i] = time.perf_counter() - t0
    return float(np.median(ts) * 1e6)


def main(path: str) -> None:
    graph = OrtCudaPolicy(path, io_binding=True, cuda_graph=True)
    obs_dim = graph.obs_dim
    pool = [np.random.default_rng(i).standard_normal((1, obs_dim)).astype(np.float32) for i in range(16)]
    for i in range(300):
        graph.act(pool[i % 16])
    bound = graph._bound[1]
    inp, out = bound.inputs[graph.input_name], bound.outputs[graph.output_name]
    no_sync = ort.RunOptions()
    no_sync.add_run_config_entry("gpu_graph_id", str(bound.graph_id))
    no_sync.add_run_config_entry("disable_synchronize_execution_providers", "1")
    rows = {
        "act (IO binding + CUDA graph), total": median_us(graph.act, pool),
        "  update_inplace (host → device)": median_us(inp.update_inplace, pool),
        "  run_with_iobinding (replay + wait)": median_us(
            lambda x: graph.session.run_with_iobinding(bound.binding, bound.run_options), pool),
        "  numpy() (device → host)": median_us(lambda x: out.numpy(), pool),
        "  replay launch only (no end-of-run sync)": median_us(
            lambda x: graph.session.run_with_iobinding(bound.binding, no_sync), pool),
    }
    plain = OrtCudaPolicy(path, io_binding=True, cuda_graph=False)
    for i in range(300):
        plain.act(pool[i % 16])
    rows["act (IO binding, no graph)"] = median_us(plain.act, pool)
    run = OrtCudaPolicy(path, io_binding=False)
    for i in range(300):
        run.act(pool[i % 16])
    rows["act (session.run with numpy)"] = median_us(run.act, pool)
    print(f"{path} (batch 1)")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
