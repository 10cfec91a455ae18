"""Small policies on the CPU: batch-1 latency of policy.int8.cpu.onnx (measured layer choice) vs float.

For each bundle: policy.fp32.onnx, the bundle's CPU file (each layer INT8 or float on int8 weights as
measured at export), the same file with the width rule (cpu_float_below 32) and with every layer INT8,
timed at batch 1 on ONNX Runtime CPU with one thread, in interleaved rounds (best per-round median).

    python benchmarks/cpu_small_policy.py BUNDLE [BUNDLE ...] --calls 2000 --rounds 7 \\
        --out benchmarks/results/cpu_small.md
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnx
import onnxruntime as ort

from benchmarks._results import append_section
from edgeq.export.cpu_select import ort_batch1_timer
from edgeq.export.ort_cpu import specialize_for_ort_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_small.md"))
    args = ap.parse_args()
    timer = ort_batch1_timer(calls=args.calls, rounds=args.rounds)
    lines = [f"## Small policies on the CPU (batch 1, one thread; {platform.machine()}, onnxruntime {ort.__version__})",
             "", "```", "python benchmarks/cpu_small_policy.py " + " ".join(map(str, args.bundles))
             + f" --calls {args.calls} --rounds {args.rounds}", "```", "",
             "| bundle | layers (net) | policy.fp32.onnx | CPU file as shipped (layers in float) | width rule (32) | "
             "every layer INT8 | shipped / float | fp32 / int8 file size |", "|---|---|---|---|---|---|---|---|"]
    for bundle in args.bundles:
        m = json.loads((bundle / "manifest.json").read_text())
        qdq = onnx.load(str(bundle / "policy.int8.onnx"))
        blobs = [(bundle / "policy.fp32.onnx").read_bytes(), (bundle / "policy.int8.cpu.onnx").read_bytes(),
                 specialize_for_ort_cpu(qdq, min_int8_width=32).SerializeToString(),
                 specialize_for_ort_cpu(qdq, float_layers=[]).SerializeToString()]
        fp32, shipped, width, allint8 = timer(blobs)
        floats = m.get("cpu_float_layers") or []
        n = len(m["quantization"]["layers"])
        arch = m["source"]["details"].get("net_arch", "?")
        sizes = f"{len(blobs[0]) / 1024:.1f} / {(bundle / 'policy.int8.onnx').stat().st_size / 1024:.1f} KiB"
        lines.append(f"| {m['source']['algorithm']} {m['env']['id']} | {n} ({arch}) | {fp32:.2f} us | {shipped:.2f} us "
                     f"({len(floats)}/{n}) | {width:.2f} us | {allint8:.2f} us | {shipped / fp32:.2f}x | {sizes} |")
    lines.append("")
    append_section(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
