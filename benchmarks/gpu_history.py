"""Batch-1 GPU latency of the history policies (issue 16's fixtures: frame stack MLP, Conv1d encoder +
body, causal Transformer; K = 8 observations of HalfCheetah-v5).

Per bundle (made on a CPU with ``edgeq quantize``, see benchmarks/results/history_gpu.md), per-call
wall-clock time of one observation in (host numpy) → one action out, after warm-up, cycling through
16 random observations (the history window is carried by the runtime, as on the robot):

* ``deploy.load(bundle, "cuda").act``      edgeq's default CUDA backend for the bundle (the fused INT8
  kernel where it runs the model, else ONNX Runtime's CUDA EP on ``policy.int8.cuda.onnx``);
* ``deploy.load(bundle, "cuda-ort").act``  the INT8 file on ONNX Runtime's CUDA EP (pinned copies, graph);
* ``ORT CUDA fp32``                        the float model (``policy.fp32.onnx``) on ONNX Runtime's CUDA EP,
  IO binding + CUDA graph + pinned async copies, fed the same windows (no edgeq input checks);
* ``ORT CPU int8``                         ``deploy.load(bundle, "cpu")`` for reference (1 thread).

Each row also gives the largest |action − ONNX Runtime CPU on the same file| over 16 steps (the
file the backend runs: ``policy.int8.onnx`` for the fused kernel, ``policy.int8.cuda.onnx`` for
``cuda-ort``, ``policy.int8.cpu.onnx`` for ``cpu``, ``policy.fp32.onnx`` for the fp32 row).

    python benchmarks/gpu_history.py LABEL=BUNDLE ... --calls 5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def timed(call: Callable[[np.ndarray], Any], pool: list[np.ndarray], calls: int, warmup: int = 300) -> dict[str, float]:
    for i in range(warmup):
        call(pool[i % len(pool)])
    ts = np.empty(calls)
    perf = time.perf_counter
    for i in range(calls):
        x = pool[i % len(pool)]
        t0 = perf()
        call(x)
        ts[i] = perf() - t0
    us = ts * 1e6
    p50, p99, p999 = (float(v) for v in np.percentile(us, [50, 99, 99.9]))
    return {"p50_us": p50, "p99_us": p99, "p999_us": p999, "calls": calls}


def _windows(policy: Any, pool: list[np.ndarray]) -> list[np.ndarray]:
    """The windows the runtime feeds for ``pool`` stepped in order from a reset (what ORT fp32 gets)."""
    from edgeq.deploy.history import HistoryBuffer

    h = policy.manifest["io"]["history"]
    buf = HistoryBuffer(int(h["length"]), int(h["obs_dim"]))
    return [buf.push(x[None]) for x in pool]


def run(bundles: list[tuple[str, Path]], calls: int) -> dict[str, Any]:
    import onnxruntime as ort

    import edgeq.deploy
    from edgeq.deploy.ort_cuda import OrtCudaPolicy

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "bundles": {}}
    for label, bundle in bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        obs_dim = int(manifest["observation_space"]["shape"][0])
        pool = [(rng.standard_normal(obs_dim) * 1.5).astype(np.float32) for _ in range(16)]
        rows: dict[str, Any] = {}
        out["bundles"][label] = rows
        cpu = edgeq.deploy.load(bundle, backend="cpu", allow_unsigned=True)
        windows = _windows(cpu, pool)
        # ONNX Runtime CPU on the file each backend runs (fused: the portable policy.int8.onnx; cuda-ort: the
        # CUDA-specialized file; cpu: the CPU file), on the windows the runtime feeds
        files = {"cuda-fused": manifest["models"]["int8"],
                 "cuda-ort": manifest["models"].get("int8-cuda", manifest["models"]["int8"]),
                 "cpu": manifest["models"].get("int8-cpu", manifest["models"]["int8"])}
        refs = {k: [r[0] for r in _ort_cpu(bundle / f, windows)] for k, f in files.items()}

        def check(policy: Any, pool: list[np.ndarray] = pool, refs: dict[str, list[np.ndarray]] = refs) -> float:
            policy.reset()
            ref = refs[policy.backend]
            errs = [float(np.abs(np.asarray(policy.act(x)) - r).max()) for x, r in zip(pool, ref, strict=True)]
            return max(errs)

        for name, backend in (("deploy.load(bundle, \"cuda\").act", "cuda"),
                              ("deploy.load(bundle, \"cuda-ort\").act", "cuda-ort"),
                              ("ORT CPU int8: deploy.load(bundle, \"cpu\").act", "cpu")):
            try:
                pol = cpu if backend == "cpu" else edgeq.deploy.load(bundle, backend=backend, allow_unsigned=True)
                err = check(pol)
                pol.reset()
                rows[name] = {"backend": pol.backend, "notes": pol.backend_notes, "providers": pol.providers[:1],
                              **timed(pol.act, pool, calls), "max_abs_err_vs_ort_cpu_same_file": err}
            except Exception as exc:  # noqa: BLE001 - a refused variant is a result
                rows[name] = {"error": str(exc)[:400]}
        fp32 = bundle / manifest["models"]["fp32"]
        h = manifest["io"]["history"]
        try:
            sess = OrtCudaPolicy(fp32, input_name=h.get("input", manifest["io"]["input"]),
                                 output_name=manifest["io"]["output"], cuda_graph=True, pinned=True)
            fp_ref = [np.asarray(cpu_fp32) for cpu_fp32 in _ort_cpu(fp32, windows)]
            err = max(float(np.abs(sess.act(w) - r).max()) for w, r in zip(windows, fp_ref, strict=True))
            rows["ORT CUDA fp32 (IO binding + graph + pinned)"] = {**timed(sess.act, windows, calls),
                                                                   "max_abs_err_vs_ort_cpu_fp32": err}
        except Exception as exc:  # noqa: BLE001
            rows["ORT CUDA fp32 (IO binding + graph + pinned)"] = {"error": str(exc)[:400]}
        for name, r in rows.items():
            cell = (f"p50 {r['p50_us']:7.1f}  p99 {r['p99_us']:7.1f}  p99.9 {r['p999_us']:7.1f} us  "
                    f"{r.get('backend', '')}"
                    if "p50_us" in r else f"refused: {r['error'][:200]}")
            print(f"[{label}] {name:48s} {cell}", flush=True)
    return out


def _ort_cpu(path: Path, windows: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options("all", 1), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    name = sess.get_inputs()[0].name
    return [np.asarray(sess.run(None, {name: w})[0]) for w in windows]


def print_table(res: dict[str, Any]) -> None:
    print("\n| policy | variant | backend | p50 / p99 / p99.9 µs | max abs err vs ORT CPU on the same file |")
    print("|---|---|---|---|---|")
    for label, rows in res["bundles"].items():
        for name, r in rows.items():
            if "p50_us" not in r:
                print(f"| {label} | {name} | refused: {r['error'][:160]} | | |")
                continue
            err = r.get("max_abs_err_vs_ort_cpu_same_file", r.get("max_abs_err_vs_ort_cpu_fp32"))
            print(f"| {label} | {name} | {r.get('backend', 'onnxruntime CUDA EP')} | "
                  f"{r['p50_us']:.1f} / {r['p99_us']:.1f} / {r['p999_us']:.1f} | {err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="LABEL=BUNDLE")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bundles = [(s.partition("=")[0], Path(s.partition("=")[2])) for s in args.bundles]
    res = run(bundles, args.calls)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    print_table(res)


if __name__ == "__main__":
    main()
