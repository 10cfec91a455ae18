"""History policies (frame stack, causal Transformer, Conv1d encoder + body): float vs INT8 per bundle.

Summarizes bundles made by ``edgeq quantize`` (the commands are in ``benchmarks/results/history.md``):
per target, the files compared, float and INT8 returns (mean ± std over the paired episodes), failures,
the verdict, batch-1 latency (median and p99 of ``validation.json``'s 2,000-call measurement, the
model files that target runs), and which matrix products are INT8 in the portable QDQ file
(``policy.int8.onnx``, what TensorRT gets) and in the target's file.

Usage::

    python benchmarks/history_policies.py LABEL=BUNDLE ... --out benchmarks/results/history.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import onnx

from benchmarks._results import append_section


def _products(path: Path) -> tuple[int, int, int, int]:
    """(int8 matrix products, all matrix products, int8 attention products, attention products) of a file.

    A product is INT8 when it is an ONNX Runtime integer kernel (``MatMulIntegerToFloat``, ``MatMulInteger``)
    or a MatMul/Gemm/Conv whose first two inputs are both DequantizeLinear outputs.
    """
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    consts = {t.name for t in m.graph.initializer}

    def dq(t: str) -> bool:
        p = producer.get(t)
        return p is not None and p.op_type == "DequantizeLinear"

    constant = set(consts)  # tensors computed from constants only (a weight, however it is stored)
    for n in m.graph.node:
        if all(i in constant for i in n.input if i):
            constant.update(n.output)

    n8 = total = a8 = atotal = 0
    for n in m.graph.node:
        if n.op_type in ("MatMulIntegerToFloat", "MatMulInteger"):
            is_int8, attn = True, n.input[1] not in constant
        elif n.op_type in ("MatMul", "Gemm", "Conv"):
            is_int8 = len(n.input) >= 2 and dq(n.input[0]) and dq(n.input[1])
            attn = not any(i in constant or (dq(i) and producer[i].input[0] in constant) for i in n.input[:2])
        else:
            continue
        total += 1
        n8 += is_int8
        atotal += attn
        a8 += attn and is_int8
    return n8, total, a8, atotal


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def _interval(verdict: dict[str, Any]) -> str:
    ret = verdict.get("returns", {})
    iv, band = ret.get("interval"), ret.get("band")
    if not iv or not band:
        return ""
    lo = "-inf" if band[0] is None else f"{band[0]:.3g}"
    hi = "+inf" if band[1] is None else f"{band[1]:.3g}"
    return f"[{iv[0]:+.3g}, {iv[1]:+.3g}] in band [{lo}, {hi}]"


def summarize(label: str, bundle: Path) -> list[str]:
    val = json.loads((bundle / "validation.json").read_text())
    if (bundle / "measurements.json").is_file():  # latency and timings live there since bundle format 2
        _merge(val, json.loads((bundle / "measurements.json").read_text()))
    rows = []
    q8, qt, qa8, qat = _products(bundle / "policy.int8.onnx")
    for target, r in val["targets"].items():
        v = r.get("verdict", {})
        files = v.get("files", {})
        f, i = r["float"], r["int8"]
        lat = (r.get("latency") or {}).get("models", {})
        b1 = {k: lat.get(k, {}).get("batch1", {}) for k in ("float", "int8")}
        fails = v.get("failures", {})
        c8, ct, ca8, cat = _products(bundle / files.get("int8", "policy.int8.onnx"))
        rows.append(
            f"| {label} | {target}: {files.get('float', '?')} vs {files.get('int8', '?')} "
            f"({files.get('runtime', '?')}) "
            f"| {f['mean']:.1f} ± {f['std']:.1f} | {i['mean']:.1f} ± {i['std']:.1f} | {i['mean'] / f['mean']:.2%} "
            f"| {r['paired_difference']['mean']:+.3f} {_interval(v)} "
            f"| {fails.get('float_failures', '?')} / {fails.get('int8_failures', '?')} "
            f"of {v.get('episodes', f['episodes'])} | **{v.get('status', '?')}** "
            f"| {b1['float'].get('median_us', float('nan')):.1f} / {b1['int8'].get('median_us', float('nan')):.1f} us "
            f"(p99 {b1['float'].get('p99_us', float('nan')):.0f} / {b1['int8'].get('p99_us', float('nan')):.0f}) "
            f"| QDQ {q8}/{qt} (attention {qa8}/{qat}); {target} file {c8}/{ct} (attention {ca8}/{cat}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", help="LABEL=BUNDLE_DIR")
    ap.add_argument("--out", default="benchmarks/results/history.md")
    args = ap.parse_args()
    lines = ["| policy | target: files compared | float return | INT8 return | INT8/float "
             "| paired diff, 95% interval vs band | failures float / int8 | verdict "
             "| batch-1 latency float / int8 median | INT8 matrix products |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for item in args.bundles:
        label, _, path = item.partition("=")
        lines += summarize(label, Path(path))
    append_section(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
