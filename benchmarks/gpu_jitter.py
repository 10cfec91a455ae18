"""Where the batch-1 tail (p99 / p50) of a GPU policy call comes from: one factor changed at a time.

Each configuration runs in a fresh process (the context's scheduling flags can only be set before the
context starts) and times, at batch 1, ``--calls`` calls each of:

* ``host no-op``            two ``perf_counter`` reads around nothing: the host's own jitter;
* ``host: 20 µs of CPU work`` a busy loop of 20 µs, no GPU: what the host alone does to a call that long;
* ``floor``                 an empty-kernel CUDA graph launch + wait (the configuration's wait);
* ``<policy> runner``       :class:`FusedMlpRunner.run` (copy in, graph launch, wait, copy out);
* ``<policy> deploy.act``   ``edgeq.deploy.load(bundle, "cuda").act`` on a ``[1, obs_dim]`` batch;
* ``<policy> torch graph``  torch's CUDA graph of the float actor (``--torch`` configurations only);
* ``<policy> device time``  CUDA events around each graph replay (the GPU side alone; base only).

Factors: the primary context's scheduling flag (``auto``/``spin``/``yield``/``blocking``), the wait
(``block`` = ``cuStreamSynchronize``, ``spin`` = polling ``cuStreamQuery``), the calls through the
driver's C entry points (``native``) or cuda-python's wrappers, Python's garbage collector (on, or
``gc.freeze()`` + ``gc.disable()`` after setup) and the calling thread's CPU affinity (one core).
Configurations run twice, interleaved, so run-to-run spread shows next to the factor's effect.

    python benchmarks/gpu_jitter.py bundles/halfcheetah bundles/elu512 --calls 20000 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS: dict[str, dict[str, Any]] = {
    "before (bindings, block)": dict(ctx="auto", sync="block", native=False, gc="on", pin=False, torch=True),
    "native, block": dict(ctx="auto", sync="block", native=True, gc="on", pin=False),
    "bindings, spin": dict(ctx="auto", sync="spin", native=False, gc="on", pin=False),
    "native, spin (new default)": dict(ctx="auto", sync="spin", native=True, gc="on", pin=False, torch=True),
    "ctx SPIN, native, block": dict(ctx="spin", sync="block", native=True, gc="on", pin=False),
    "ctx BLOCKING, native, block": dict(ctx="blocking", sync="block", native=True, gc="on", pin=False),
    "native, spin, gc frozen": dict(ctx="auto", sync="spin", native=True, gc="freeze", pin=False),
    "native, spin, pinned core": dict(ctx="auto", sync="spin", native=True, gc="on", pin=True),
    "native, spin, gc frozen, pinned": dict(ctx="auto", sync="spin", native=True, gc="freeze", pin=True, torch=True),
}


def stats(ts: np.ndarray) -> dict[str, float]:
    us = ts * 1e6
    p50, p99, p999 = (float(v) for v in np.percentile(us, [50, 99, 99.9]))
    return {"p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": float(us.max()), "p99_over_p50": p99 / p50}


def busy_20us(_: Any = None) -> None:
    """20 µs of pure CPU work (a busy loop on the clock): how the host stretches a call this long."""
    perf = time.perf_counter
    end = perf() + 20e-6
    while perf() < end:
        pass


def timed(call: Callable[[np.ndarray], Any], pool: list[np.ndarray], calls: int, warmup: int = 500) -> dict[str, float]:
    for i in range(warmup):
        call(pool[i % len(pool)])
    ts = np.empty(calls)
    perf = time.perf_counter
    for i in range(calls):
        x = pool[i & 15]
        t0 = perf()
        call(x)
        ts[i] = perf() - t0
    return stats(ts)


def child(cfg: dict[str, Any], bundles: list[Path], calls: int) -> dict[str, Any]:
    from cuda.bindings import driver

    from edgeq.deploy import cuda

    flags = {"auto": driver.CUctx_flags.CU_CTX_SCHED_AUTO, "spin": driver.CUctx_flags.CU_CTX_SCHED_SPIN,
             "yield": driver.CUctx_flags.CU_CTX_SCHED_YIELD,
             "blocking": driver.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC}[cfg["ctx"]]
    cuda.check(driver.cuInit(0), "cuInit")
    dev = cuda.check(driver.cuDeviceGet(0), "cuDeviceGet")
    cuda.check(driver.cuDevicePrimaryCtxSetFlags(dev, int(flags)), "cuDevicePrimaryCtxSetFlags")
    import edgeq.deploy
    from edgeq.deploy import fused_mlp

    fused_mlp.FusedMlpRunner.__init__.__kwdefaults__["native_calls"] = cfg["native"]
    fused_mlp.FusedCudaPolicy.__init__.__kwdefaults__["sync"] = cfg["sync"]
    res: dict[str, Any] = {"config": cfg}
    rng = np.random.default_rng(0)
    # floor: an empty graph, waited for as the configuration says
    stream = cuda.Stream()
    mod = cuda.compile_module('extern "C" __global__ void nop() {}', ["nop"])
    empty = cuda.Graph(stream, lambda: cuda.launch(mod.function("nop"), (1, 1, 1), (1, 1, 1), [], stream))
    hot = cuda.HotCalls()
    s_int, g_int = int(stream.handle), int(empty.exec)
    if cfg["native"]:
        wait = (lambda: hot.spin(s_int)) if cfg["sync"] == "spin" else (lambda: hot.stream_synchronize(s_int))

        def floor(_: np.ndarray) -> None:
            hot.graph_launch(g_int, s_int)
            wait()
    else:
        def floor(_: np.ndarray) -> None:
            driver.cuGraphLaunch(empty.exec, stream.handle)
            if cfg["sync"] == "spin":
                while int(driver.cuStreamQuery(stream.handle)[0]) == cuda.CUDA_ERROR_NOT_READY:
                    pass
            else:
                driver.cuStreamSynchronize(stream.handle)
    policies = []
    for b in bundles:
        pol = edgeq.deploy.load(b, backend="cuda", allow_unsigned=True)
        pool = [(rng.standard_normal((1, pol.obs_shape[0])) * 1.5).astype(np.float32) for _ in range(16)]
        policies.append((b.name, pol, pool))
    torch_calls = {}
    if cfg.get("torch"):
        from gpu_latency import torch_graph, torch_module_from_onnx

        for name, pol, _ in policies:
            m = json.loads((pol.bundle / "manifest.json").read_text())
            torch_calls[name] = torch_graph(torch_module_from_onnx(pol.bundle / m["models"]["fp32"]), 1,
                                            pol.obs_shape[0], int(m["action_space"]["shape"][0]))
    if cfg["pin"]:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[len(cpus) // 2]})
    if cfg["gc"] == "freeze":
        gc.collect()
        gc.freeze()
        gc.disable()
    res["host no-op"] = timed(lambda x: None, [np.zeros(1)] * 16, calls)
    res["host: 20 µs of CPU work"] = timed(busy_20us, [np.zeros(1)] * 16, calls)
    res["floor"] = timed(floor, [np.zeros(1)] * 16, calls)
    for name, pol, pool in policies:
        runner = pol.runtime.runner
        res[f"{name} runner"] = timed(runner.run, pool, calls)
        res[f"{name} deploy.act"] = timed(pol.act, pool, calls)
        if name in torch_calls:
            res[f"{name} torch graph"] = timed(torch_calls[name], pool, calls)
        if cfg.get("devtime"):
            p = runner.path(1)
            start = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
            stop = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
            ts = np.empty(2000)
            for i in range(2000):
                driver.cuEventRecord(start, runner.stream.handle)
                driver.cuGraphLaunch(p.graph.exec, runner.stream.handle)
                driver.cuEventRecord(stop, runner.stream.handle)
                driver.cuEventSynchronize(stop)
                ts[i] = float(driver.cuEventElapsedTime(start, stop)[1]) * 1e-3
            res[f"{name} device time (graph, events)"] = stats(ts)
    gc.enable()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        cfg = json.loads(args.child)
        print("RESULT " + json.dumps(child(cfg, args.bundles, args.calls)), flush=True)
        return
    names = args.configs or list(CONFIGS)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for name in names:
            cfg = dict(CONFIGS[name], devtime=(rep == 0 and name == names[0]))
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, *map(str, args.bundles), "--calls", str(args.calls),
                                   "--child", json.dumps(cfg)], capture_output=True, text=True, timeout=240)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{name} (run {rep + 1}) failed: {proc.stderr[-800:]}", flush=True)
                continue
            res = json.loads(line[-1][7:])
            runs.append({"name": name, "run": rep + 1, "seconds": round(time.time() - t0, 1), **res})
            cells = "  ".join(f"{k}: {v['p50_us']:.1f}/{v['p99_us']:.1f} ({v['p99_over_p50']:.2f}x)"
                              for k, v in res.items() if isinstance(v, dict) and "p50_us" in v)
            print(f"[{name} | run {rep + 1}] {cells}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    keys: list[str] = []
    for r in runs:
        keys += [k for k, v in r.items() if isinstance(v, dict) and "p50_us" in v and k not in keys]
    print("\n| config | run | " + " | ".join(f"{k} p50 / p99 µs (p99/p50)" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in runs:
        cells = [f"{r[k]['p50_us']:.1f} / {r[k]['p99_us']:.1f} ({r[k]['p99_over_p50']:.2f}×)" if k in r else "-"
                 for k in keys]
        print(f"| {r['name']} | {r['run']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
