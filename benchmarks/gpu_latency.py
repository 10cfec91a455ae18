"""GPU latency of a policy call, observation in (host numpy) → action out (host numpy).

For each bundle and batch size, times:

* ``torch eager``         the float actor rebuilt as a ``torch.nn.Sequential`` from the float ONNX weights,
  ``torch.from_numpy(obs).cuda()`` → forward → ``.cpu().numpy()``;
* ``torch CUDA graph``    the same module captured with its copies (pinned host → device, forward, device →
  pinned host) as one CUDA graph and replayed;
* ONNX Runtime's CUDA EP (:class:`edgeq.deploy.ort_cuda.OrtCudaPolicy`) on four models, each three ways
  (``session.run`` with numpy; IO binding; IO binding + CUDA graph):
  ``fp32`` (policy.fp32.onnx), ``edgeq int8 QDQ`` (policy.int8.onnx, the portable TensorRT file),
  ``edgeq int8 CUDA`` (policy.int8.cuda.onnx, the CUDA-specialized file) and ``ORT quantize_static int8``
  (ONNX Runtime's own QDQ output of the float model: int32 bias DequantizeLinear; calibrated on random
  observations, for latency and placement only);
* the floor: a one-kernel CUDA graph replay + synchronize, and a 16-byte host → device → host round trip
  through pinned buffers.

Also prints where ONNX Runtime placed every kernel of each model (:func:`edgeq.deploy.ort_cuda.node_placement`).
Each number is the median of per-call wall-clock times (``time.perf_counter``) after warm-up, cycling
through 16 different random observation batches; ``spread`` is the medians of the two halves of the run.

Usage (on the GPU machine; ``benchmarks/gpu_device.sh`` runs it there)::

    python benchmarks/gpu_latency.py run BUNDLE[=LABEL] ... --batches 1 4096 --json out.json

and, here on a CPU, the random-weight [512, 256, 128] ELU policy bundle used for the latency table only::

    python benchmarks/gpu_latency.py make-elu --out bundles/elu512
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

Call = Callable[[np.ndarray], np.ndarray]


# --- the random-weight ELU policy (made here, on a CPU) ---------------------------------------------------


def make_elu_bundle(out: Path, hidden: tuple[int, ...] = (512, 256, 128), seed: int = 0) -> None:
    """A HalfCheetah-v5-shaped actor (17 → hidden ELU → 6, tanh) with random weights, built as a torch
    module and read through :func:`edgeq.ingest.from_torch_module`, then quantized by edgeq."""
    import torch
    from torch import nn

    from edgeq.ingest import from_torch_module
    from edgeq.pipeline import quantize
    from edgeq.spaces import BoxSpec

    torch.manual_seed(seed)
    obs_dim, act_dim = 17, 6
    layers: list[nn.Module] = []
    fan_in = obs_dim
    for width in hidden:
        layers += [nn.Linear(fan_in, width), nn.ELU()]
        fan_in = width
    layers += [nn.Linear(fan_in, act_dim), nn.Tanh()]
    module = nn.Sequential(*layers).eval()
    inf = float("inf")
    policy = from_torch_module(module, BoxSpec((obs_dim,), (-inf,) * obs_dim, (inf,) * obs_dim),
                               BoxSpec((act_dim,), (-1.0,) * act_dim, (1.0,) * act_dim),
                               name=f"random-weight ELU MLP {list(hidden)} (torch seed {seed})")
    quantize(policy, "HalfCheetah-v5", out, episodes=2, calib_episodes=2, overwrite=True)


# --- torch from the float ONNX ------------------------------------------------------------------------------


def torch_module_from_onnx(path: Path) -> Any:
    """The float policy graph (a chain of Gemm / activations / elementwise constants) as ``nn.Sequential``."""
    import torch
    from torch import nn

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    class Const(nn.Module):
        def __init__(self, op: str, value: np.ndarray) -> None:
            super().__init__()
            self.op = op
            self.register_buffer("value", torch.from_numpy(np.array(value, np.float32)))

        def forward(self, x: Any) -> Any:
            v = self.value
            return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
                    "Max": torch.maximum, "Min": torch.minimum}[self.op](x, v)

    class Clip(nn.Module):
        def __init__(self, lo: float, hi: float) -> None:
            super().__init__()
            self.lo, self.hi = lo, hi

        def forward(self, x: Any) -> Any:
            return torch.clamp(x, self.lo, self.hi)

    layers: list[nn.Module] = []
    cur = model.graph.input[0].name
    for node in model.graph.node:
        data = [i for i in node.input if i and i not in inits]
        if data != [cur]:
            raise ValueError(f"{path}: node {node.name} does not continue a chain; the benchmark needs an MLP")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "Gemm":
            w = inits[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            lin = nn.Linear(w.shape[1], w.shape[0], bias=len(node.input) > 2)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                if lin.bias is not None:
                    lin.bias.copy_(torch.from_numpy(inits[node.input[2]]))
            layers.append(lin)
        elif op == "Relu":
            layers.append(nn.ReLU())
        elif op == "Elu":
            layers.append(nn.ELU(alpha=float(attrs.get("alpha", 1.0))))
        elif op == "Tanh":
            layers.append(nn.Tanh())
        elif op == "Sigmoid":
            layers.append(nn.Sigmoid())
        elif op == "LeakyRelu":
            layers.append(nn.LeakyReLU(float(attrs.get("alpha", 0.01))))
        elif op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            const = [i for i in node.input if i in inits]
            if len(const) != 1 or node.input[0] != cur:
                raise ValueError(f"{path}: {op} {node.name} is not x <op> constant")
            layers.append(Const(op, inits[const[0]]))
        elif op == "Clip":
            layers.append(Clip(float(inits[node.input[1]]), float(inits[node.input[2]])))
        elif op != "Identity":
            raise ValueError(f"{path}: op {op} is not supported by this benchmark's torch rebuild")
        cur = node.output[0]
    return nn.Sequential(*layers).eval()


def torch_eager(module: Any) -> Call:
    import torch

    dev = torch.device("cuda")
    module = module.to(dev)

    def call(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(obs).to(dev)).cpu().numpy()

    return call


def torch_graph(module: Any, batch: int, obs_dim: int, act_dim: int) -> Call:
    """Copies in, forward, copies out captured as one CUDA graph; pinned host buffers."""
    import torch

    dev = torch.device("cuda")
    module = module.to(dev)
    h_in = torch.zeros((batch, obs_dim), dtype=torch.float32).pin_memory()
    h_out = torch.zeros((batch, act_dim), dtype=torch.float32).pin_memory()
    d_in = torch.zeros((batch, obs_dim), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream before capture (cuBLAS handles, workspaces)
            d_in.copy_(h_in, non_blocking=True)
            h_out.copy_(module(d_in), non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        d_in.copy_(h_in, non_blocking=True)
        h_out.copy_(module(d_in), non_blocking=True)
    in_np, out_np = h_in.numpy(), h_out.numpy()
    stream = torch.cuda.current_stream()

    def call(obs: np.ndarray) -> np.ndarray:
        np.copyto(in_np, obs)
        graph.replay()
        stream.synchronize()
        return out_np.copy()

    return call


def floor_calls() -> dict[str, Call]:
    import torch

    dev = torch.device("cuda")
    x = torch.zeros(4, device=dev)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        x.add_(1.0)
    stream = torch.cuda.current_stream()

    def replay(obs: np.ndarray) -> np.ndarray:
        graph.replay()
        stream.synchronize()
        return obs

    h_in = torch.zeros(4, dtype=torch.float32).pin_memory()
    h_out = torch.zeros(4, dtype=torch.float32).pin_memory()
    d = torch.zeros(4, device=dev)
    in_np, out_np = h_in.numpy(), h_out.numpy()

    def round_trip(obs: np.ndarray) -> np.ndarray:
        np.copyto(in_np, obs)
        d.copy_(h_in, non_blocking=True)
        h_out.copy_(d, non_blocking=True)
        stream.synchronize()
        return out_np.copy()

    return {"one-kernel CUDA graph replay + sync": replay, "16-byte host→device→host round trip": round_trip}


# --- ONNX Runtime ---------------------------------------------------------------------------------------


def ort_quantize_static_model(float_path: Path, out: Path, obs_dim: int) -> Path:
    """ONNX Runtime's own QDQ int8 (per-channel symmetric int8, int32 bias), on random calibration data."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_latency import ort_quantize_static  # the same quantizer settings as the CPU benchmark

    obs = np.random.default_rng(1).standard_normal((256, obs_dim)).astype(np.float32)
    return ort_quantize_static(float_path, out, obs)


def cpu_reference(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime on the CPU running the graph's operators as written (no graph rewrites: its CPU-only
    QDQ fusions, e.g. MatMulAddFusion's int32 bias, change the int8 arithmetic)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda obs: session.run(None, {name: obs})[0]


# --- timing ------------------------------------------------------------------------------------------------


def bench(call: Call, pool: list[np.ndarray], warmup: int, calls: int) -> dict[str, float]:
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
    return {"median_us": float(np.median(us)), "p90_us": float(np.percentile(us, 90)),
            "p99_us": float(np.percentile(us, 99)),
            "spread_us": [float(np.median(us[:half])), float(np.median(us[half:]))], "calls": calls}


def time_variant(key: str, make: Callable[[], Call], ref: Call, pool: list[np.ndarray], warmup: int, calls: int,
                 tag: str) -> dict[str, Any]:
    """Time one variant; its error against ONNX Runtime on the CPU before and after the timed calls."""
    try:
        call = make()
        err = float(np.abs(call(pool[0]) - ref(pool[0])).max())
        timing = bench(call, pool, warmup, calls)
        err = max(err, float(np.abs(call(pool[5]) - ref(pool[5])).max()))
    except Exception as exc:  # noqa: BLE001 - a refused variant (e.g. a CUDA graph ORT cannot capture) is a result
        print(f"{tag}  {key:50s} refused: {str(exc)[:300]}", flush=True)
        return {"error": str(exc)[:400]}
    print(f"{tag}  {key:50s} {timing['median_us']:9.1f} us  (p99 {timing['p99_us']:.1f}, err {err:.1e})", flush=True)
    return {**timing, "max_abs_err_vs_cpu": err}


def run(bundles: list[tuple[Path, str]], batches: list[int], json_out: Path | None, scale_calls: float) -> None:
    import onnxruntime as ort
    import torch

    from edgeq.deploy.ort_cuda import OrtCudaPolicy, node_placement, summarize_placement

    info = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "gpu": torch.cuda.get_device_name(0), "providers": ort.get_available_providers()}
    print(json.dumps(info), flush=True)
    results: dict[str, Any] = {"info": info, "floor": {}, "policies": {}}
    rng = np.random.default_rng(0)
    for name, call in floor_calls().items():
        pool = [rng.standard_normal(4).astype(np.float32) for _ in range(16)]
        results["floor"][name] = bench(call, pool, 500, int(5000 * scale_calls))
        print(f"floor  {name}: {results['floor'][name]['median_us']:.1f} us", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="gpu-latency-"))
    for bundle, label in bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        obs_dim = int(manifest["observation_space"]["shape"][0])
        act_dim = int(manifest["action_space"]["shape"][0])
        models = {"fp32": bundle / manifest["models"]["fp32"], "edgeq int8 QDQ": bundle / manifest["models"]["int8"],
                  "edgeq int8 CUDA": bundle / manifest["models"]["int8-cuda"]}
        try:
            models["ORT quantize_static int8"] = ort_quantize_static_model(models["fp32"], tmp / f"{label}.ortq.onnx",
                                                                           obs_dim)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"ORT quantize_static failed: {exc}", flush=True)
        pres: dict[str, Any] = {"obs_dim": obs_dim, "act_dim": act_dim, "placement": {}, "batches": {}}
        results["policies"][label] = pres
        for mname, path in models.items():
            try:
                summary = summarize_placement(node_placement(path, batch=1))
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"[{label}] placement {mname} failed: {exc}", flush=True)
                continue
            pres["placement"][mname] = summary
            print(f"[{label}] placement {mname}: {summary['by_provider']}; not on GPU: "
                  f"{[(p['node'], p['op_type'], p['provider']) for p in summary['not_on_gpu']]}", flush=True)
        module = torch_module_from_onnx(models["fp32"])
        for batch in batches:
            warmup, calls = (300, int(3000 * scale_calls)) if batch <= 64 else (30, int(400 * scale_calls))
            pool = [(rng.standard_normal((batch, obs_dim)) * 1.5).astype(np.float32) for _ in range(16)]
            rows: dict[str, Any] = {}
            pres["batches"][str(batch)] = rows
            fp32_ref = cpu_reference(models["fp32"])

            def record(key: str, make: Callable[[], Call], ref: Call, rows: dict[str, Any] = rows,
                       pool: list[np.ndarray] = pool, warmup: int = warmup, calls: int = calls,
                       tag: str = f"[{label}] batch {batch:5d}") -> None:
                rows[key] = time_variant(key, make, ref, pool, warmup, calls, tag)

            record("torch eager (fp32)", lambda m=module: torch_eager(m), fp32_ref)
            record("torch CUDA graph (fp32)", lambda m=module, b=batch, o=obs_dim, a=act_dim: torch_graph(m, b, o, a),
                   fp32_ref)
            for mname, path in models.items():
                ref = cpu_reference(path)
                for mode, kw in (("session.run", {"io_binding": False, "cuda_graph": False}),
                                 ("IO binding", {"io_binding": True, "cuda_graph": False}),
                                 ("IO binding + CUDA graph", {"io_binding": True, "cuda_graph": True})):
                    record(f"ORT CUDA {mname}, {mode}",
                           lambda path=path, kw=kw: OrtCudaPolicy(path, **kw).act, ref)
            torch.cuda.synchronize()
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict[str, Any]) -> None:
    print("\n## floor")
    for name, r in results["floor"].items():
        print(f"| {name} | {r['median_us']:.1f} |")
    for label, pres in results["policies"].items():
        batches = list(pres["batches"])
        print(f"\n## {label}\n\n| variant | " + " | ".join(f"batch {b} median µs (p99)" for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        keys = list(pres["batches"][batches[0]])
        for key in keys:
            cells = []
            for b in batches:
                r = pres["batches"][b].get(key, {})
                cells.append(f"{r['median_us']:.1f} ({r['p99_us']:.0f})" if "median_us" in r else "refused")
            print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-elu", help="write the random-weight ELU bundle (runs on a CPU)")
    mk.add_argument("--out", type=Path, required=True)
    rn = sub.add_parser("run", help="time every variant (needs a CUDA GPU, torch and onnxruntime-gpu)")
    rn.add_argument("bundles", nargs="+", help="BUNDLE or BUNDLE=LABEL")
    rn.add_argument("--batches", type=int, nargs="+", default=[1, 4096])
    rn.add_argument("--json", type=Path, default=None)
    rn.add_argument("--scale-calls", type=float, default=1.0, help="multiply the number of timed calls")
    args = ap.parse_args()
    if args.cmd == "make-elu":
        make_elu_bundle(args.out)
        return
    bundles = []
    for spec in args.bundles:
        path, _, label = spec.partition("=")
        bundles.append((Path(path), label or Path(path).name))
    run(bundles, args.batches, args.json, args.scale_calls)


if __name__ == "__main__":
    main()
