"""GPU latency of every edgeq backend next to torch and ONNX Runtime: p50 / p99 / p99.9, batch 1 to 4096.

Observation in (host numpy) → action out (host numpy), copies and synchronization included, per-call
wall-clock time (``time.perf_counter``) after warm-up, cycling through 16 random observation batches.
Variants (each where it can run on the machine):

* ``floor: graph launch + sync``       an empty-kernel CUDA graph replayed + ``cuStreamSynchronize``;
* ``floor: pinned copies``              the call's own bytes (obs in, actions out) as a captured graph of
  two pinned copies + sync: what any GPU backend pays before computing anything;
* ``torch eager (fp32)`` / ``torch CUDA graph (fp32)``  the float actor rebuilt in torch
  (``gpu_latency.torch_module_from_onnx``); the graph captures pinned copies + forward;
* ``ORT fp32, IO binding + CUDA graph``  ONNX Runtime's CUDA EP on ``policy.fp32.onnx`` (pageable
  copies: ``update_inplace`` / ``numpy()``, as before issue 15) and the same with edgeq's pinned async
  copies on ONNX Runtime's stream (one sync);
* ``edgeq cuda-ort``                   ``policy.int8.cuda.onnx`` through :class:`OrtCudaPolicy`, CUDA
  graph, without and with pinned async copies;
* ``edgeq cuda-fused``                 the fused INT8 kernel (:class:`FusedCudaPolicy`), one CUDA graph
  per batch size; ``... via deploy.load`` adds ``DeployedPolicy.act``'s input checks;
* ``edgeq cuda-fused kernel only``     CUDA-event time of the kernel alone (device time, no copies);
* ``host: 20 µs of CPU work``           a busy loop, no GPU: the host's own tail on a call that long.

Each variant's output is checked against ONNX Runtime on the CPU running the same file with edgeq's
session options (int8: the integer ``MatMulIntegerToFloat`` path; fp32: the float graph).

    python benchmarks/gpu_backends.py BUNDLE=LABEL ... --batches 1 32 256 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

Call = Callable[[np.ndarray], np.ndarray]


def bench(call: Call, pool: list[np.ndarray], warmup: int, calls: int) -> dict[str, Any]:
    for i in range(warmup):
        call(pool[i % len(pool)])
    ts = np.empty(calls)
    for i in range(calls):
        x = pool[i % len(pool)]
        t0 = time.perf_counter()
        call(x)
        ts[i] = time.perf_counter() - t0
    us = ts * 1e6
    half = calls // 2
    return {"p50_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "max_us": float(us.max()),
            "halves_p50_us": [float(np.median(us[:half])), float(np.median(us[half:]))], "calls": calls}


def ort_cpu_reference(path: Path) -> Call:
    import onnxruntime as ort

    from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options("all", 1), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    name = sess.get_inputs()[0].name
    return lambda obs: np.asarray(sess.run(None, {name: obs})[0])


def floor_calls(batch: int, obs_dim: int, act_dim: int) -> dict[str, Call]:
    from edgeq.deploy import cuda

    stream = cuda.Stream()
    mod = cuda.compile_module('extern "C" __global__ void nop() {}', ["nop"])
    empty = cuda.Graph(stream, lambda: cuda.launch(mod.function("nop"), (1, 1, 1), (1, 1, 1), [], stream))
    h_in, h_out = cuda.PinnedBuffer((batch, obs_dim)), cuda.PinnedBuffer((batch, act_dim))
    d_in, d_out = cuda.DeviceBuffer(h_in.nbytes), cuda.DeviceBuffer(max(h_in.nbytes, h_out.nbytes))

    def copies() -> None:
        cuda.copy_htod_async(int(d_in), int(h_in), h_in.nbytes, stream)
        cuda.copy_dtoh_async(int(h_out), int(d_out), h_out.nbytes, stream)

    copy_graph = cuda.Graph(stream, copies)

    def launch_sync(obs: np.ndarray) -> np.ndarray:
        empty.launch()
        stream.synchronize()
        return obs

    def copy_round_trip(obs: np.ndarray) -> np.ndarray:
        np.copyto(h_in.array, obs)
        copy_graph.launch()
        stream.synchronize()
        return h_out.array.copy()

    def busy_20us(obs: np.ndarray) -> np.ndarray:
        end = time.perf_counter() + 20e-6
        while time.perf_counter() < end:
            pass
        return obs

    return {"floor: graph launch + sync": launch_sync, "floor: pinned copies (graph) + sync": copy_round_trip,
            "host: 20 µs of CPU work, no GPU (the host's own tail)": busy_20us}


def fused_kernel_time(runner: Any, batch: int, reps: int = 200) -> float:
    """Mean device time of the fused kernel alone (CUDA events around ``reps`` launches), µs."""
    from cuda.bindings import driver

    from edgeq.deploy import cuda

    p = runner.path(batch)
    start = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
    stop = cuda.check(driver.cuEventCreate(0), "cuEventCreate")
    for _ in range(10):
        runner.launch(batch, int(p.dev_in), int(p.dev_out))
    cuda.check(driver.cuEventRecord(start, runner.stream.handle), "cuEventRecord")
    for _ in range(reps):
        runner.launch(batch, int(p.dev_in), int(p.dev_out))
    cuda.check(driver.cuEventRecord(stop, runner.stream.handle), "cuEventRecord")
    cuda.check(driver.cuEventSynchronize(stop), "cuEventSynchronize")
    ms = cuda.check(driver.cuEventElapsedTime(start, stop), "cuEventElapsedTime")
    return float(ms) * 1000.0 / reps


def torch_graph_nodes(module: Any, batch: int, obs_dim: int, act_dim: int) -> dict[str, int]:
    """Kernels and copies in torch's captured graph (through cuda-python on ``raw_cuda_graph``)."""
    import torch
    from cuda.bindings import driver

    from edgeq.deploy.cuda import graph_node_types

    dev = torch.device("cuda")
    module = module.to(dev)
    h_in = torch.zeros((batch, obs_dim)).pin_memory()
    h_out = torch.zeros((batch, act_dim)).pin_memory()
    d_in = torch.zeros((batch, obs_dim), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            d_in.copy_(h_in, non_blocking=True)
            h_out.copy_(module(d_in), non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.no_grad(), torch.cuda.graph(graph):
        d_in.copy_(h_in, non_blocking=True)
        h_out.copy_(module(d_in), non_blocking=True)
    return graph_node_types(driver.CUgraph(int(graph.raw_cuda_graph())))


def run_info() -> dict[str, Any]:
    """The machine and versions a GPU benchmark ran with (printed as one JSON line, and returned)."""
    import onnxruntime as ort
    import torch

    from edgeq.deploy import cuda

    info = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "ort_cuda": "CUDAExecutionProvider" in ort.get_available_providers(), "device": cuda.device_info(),
            "cuda_python": _version("cuda-bindings")}
    print(json.dumps(info), flush=True)
    return info


def run(bundles: list[tuple[Path, str]], batches: list[int], json_out: Path | None, scale: float) -> dict[str, Any]:
    import torch
    from gpu_latency import torch_eager, torch_graph, torch_module_from_onnx

    import edgeq.deploy
    from edgeq.deploy.fused_mlp import FusedCudaPolicy

    info = run_info()
    has_ort_cuda = bool(info["ort_cuda"])
    results: dict[str, Any] = {"info": info, "policies": {}}
    rng = np.random.default_rng(0)
    for bundle, label in bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        obs_dim = int(manifest["observation_space"]["shape"][0])
        act_dim = int(manifest["action_space"]["shape"][0])
        fp32 = bundle / manifest["models"]["fp32"]
        int8 = bundle / manifest["models"]["int8"]
        int8_cuda = bundle / manifest["models"].get("int8-cuda", manifest["models"]["int8"])
        ref_fp32, ref_int8, ref_int8_cuda = ort_cpu_reference(fp32), ort_cpu_reference(int8), ort_cpu_reference(
            int8_cuda)
        module = torch_module_from_onnx(fp32)
        fused = FusedCudaPolicy(int8, input_name=manifest["io"]["input"], output_name=manifest["io"]["output"])
        try:
            deployed: Any = edgeq.deploy.load(bundle, backend="cuda", allow_unsigned=True)
        except Exception as exc:  # noqa: BLE001 - report and go on without that row
            print(f"[{label}] deploy.load failed: {exc}", flush=True)
            deployed = None
        pres: dict[str, Any] = {"obs_dim": obs_dim, "act_dim": act_dim, "batches": {}, "kernels_per_act": {},
                                "deploy_cuda_backend": getattr(deployed, "backend", None)}
        results["policies"][label] = pres
        pres["kernels_per_act"]["edgeq cuda-fused"] = fused.runner.graph_nodes(1)
        try:
            pres["kernels_per_act"]["torch CUDA graph (fp32)"] = torch_graph_nodes(module, 1, obs_dim, act_dim)
        except Exception as exc:  # noqa: BLE001 - a count for the report only
            pres["kernels_per_act"]["torch CUDA graph (fp32)"] = {"error": str(exc)[:200]}
        if has_ort_cuda:
            from edgeq.deploy.ort_cuda import node_placement, summarize_placement

            for name, path in (("ORT fp32", fp32), ("edgeq cuda-ort", int8_cuda)):
                try:
                    pres["kernels_per_act"][name] = summarize_placement(node_placement(path, batch=1))["by_provider"]
                except Exception as exc:  # noqa: BLE001 - a count for the report only
                    pres["kernels_per_act"][name] = {"error": str(exc)[:200]}
        print(f"[{label}] kernels per act: {pres['kernels_per_act']}", flush=True)
        for batch in batches:
            warmup = 300 if batch <= 256 else 50
            calls = int((5000 if batch == 1 else 3000 if batch <= 256 else 1000) * scale)
            pool = [(rng.standard_normal((batch, obs_dim)) * 1.5).astype(np.float32) for _ in range(16)]
            rows: dict[str, Any] = {}
            pres["batches"][str(batch)] = rows
            tag = f"[{label}] batch {batch:5d}"

            def record(key: str, make: Callable[[], Call], ref: Call | None, rows: dict[str, Any] = rows,
                       pool: list[np.ndarray] = pool, warmup: int = warmup, calls: int = calls,
                       tag: str = tag) -> None:
                try:
                    call = make()
                    err = None if ref is None else max(float(np.abs(call(x) - ref(x)).max()) for x in pool[:4])
                    timing = bench(call, pool, warmup, calls)
                except Exception as exc:  # noqa: BLE001 - a refused variant is a result
                    print(f"{tag}  {key:48s} refused: {str(exc)[:300]}", flush=True)
                    rows[key] = {"error": str(exc)[:400]}
                    return
                rows[key] = {**timing, "max_abs_err_vs_ort_cpu": err}
                print(f"{tag}  {key:48s} p50 {timing['p50_us']:8.1f}  p99 {timing['p99_us']:8.1f}  "
                      f"p99.9 {timing['p999_us']:8.1f} us  err {err if err is None else f'{err:.1e}'}", flush=True)

            for key, call in floor_calls(batch, obs_dim, act_dim).items():
                record(key, lambda c=call: c, None)
            record("torch eager (fp32)", lambda m=module: torch_eager(m), ref_fp32)
            record("torch CUDA graph (fp32)", lambda m=module, b=batch, o=obs_dim, a=act_dim: torch_graph(m, b, o, a),
                   ref_fp32)
            if has_ort_cuda:
                from edgeq.deploy.ort_cuda import OrtCudaPolicy

                record("ORT fp32, IO binding + CUDA graph (pageable copies)",
                       lambda: OrtCudaPolicy(fp32, cuda_graph=True, pinned=False).act, ref_fp32)  # noqa: B023 - called at once
                record("ORT fp32, IO binding + CUDA graph (pinned async copies)",
                       lambda: OrtCudaPolicy(fp32, cuda_graph=True, pinned=True).act, ref_fp32)  # noqa: B023 - called at once
                record("edgeq cuda-ort int8 (before: pageable copies)",
                       lambda: OrtCudaPolicy(int8_cuda, cuda_graph=True, pinned=False).act, ref_int8_cuda)  # noqa: B023 - called at once
                record("edgeq cuda-ort int8 (pinned async copies, 1 sync)",
                       lambda: OrtCudaPolicy(int8_cuda, cuda_graph=True, pinned=True).act, ref_int8_cuda)  # noqa: B023 - called at once
            record("edgeq cuda-fused int8", lambda: fused.act, ref_int8)  # noqa: B023 - called at once
            if deployed is not None:
                record("edgeq cuda-fused int8 via deploy.load (input checks)", lambda: deployed.act, ref_int8)  # noqa: B023 - called at once
                if batch == 1:
                    record("edgeq cuda-fused int8 via deploy.load, one observation [obs_dim]",
                           lambda: lambda x: deployed.act(x[0])[None], ref_int8)  # noqa: B023 - called at once
            rows["edgeq cuda-fused kernel only (device time)"] = {"p50_us": fused_kernel_time(fused.runner, batch)}
            print(f"{tag}  fused kernel alone {rows['edgeq cuda-fused kernel only (device time)']['p50_us']:.1f} us",
                  flush=True)
            torch.cuda.synchronize()
        pres["fused_kernel_choice"] = {str(b): n for b, n in fused.runner.choice.items()}
        pres["fused_autotune_us"] = {str(b): t for b, t in fused.runner.tuning.items()}
        print(f"[{label}] fused kernel per batch: {pres['fused_kernel_choice']}; autotune µs: "
              f"{pres['fused_autotune_us']}", flush=True)
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    return results


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def print_tables(results: dict[str, Any]) -> None:
    for label, pres in results["policies"].items():
        batches = list(pres["batches"])
        print(f"\n## {label}\n\n| variant | " + " | ".join(f"batch {b}: p50 / p99 / p99.9 µs" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        keys: list[str] = []
        for b in batches:
            keys += [k for k in pres["batches"][b] if k not in keys]
        tg = "torch CUDA graph (fp32)"
        for key in keys:
            cells = []
            for b in batches:
                r = pres["batches"][b].get(key, {})
                if "p99_us" in r:
                    base = pres["batches"][b].get(tg, {}).get("p50_us")
                    ratio = f" ({r['p50_us'] / base:.2f}×)" if base else ""
                    cells.append(f"{r['p50_us']:.1f} / {r['p99_us']:.1f} / {r['p999_us']:.1f}{ratio}")
                elif "p50_us" in r:
                    cells.append(f"{r['p50_us']:.1f}")
                else:
                    cells.append("refused")
            print(f"| {key} | " + " | ".join(cells) + " |")
        print(f"\nkernels per act: {pres['kernels_per_act']}")
        print(f"fused kernel per batch: {pres.get('fused_kernel_choice')}; autotune µs per launch: "
              f"{pres.get('fused_autotune_us')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="BUNDLE or BUNDLE=LABEL")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 4096])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--scale-calls", type=float, default=1.0)
    args = ap.parse_args()
    bundles = []
    for spec in args.bundles:
        path, _, label = spec.partition("=")
        bundles.append((Path(path), label or Path(path).name))
    run(bundles, args.batches, args.json, args.scale_calls)


if __name__ == "__main__":
    main()
