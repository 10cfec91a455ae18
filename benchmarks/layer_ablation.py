"""Which layer of an all-INT8 file costs the return, and which part of it (issue 12): clean ablations.

From one bundle's own plan (``plan.json``), re-lowered exactly as ``edgeq quantize`` writes ``policy.int8.onnx``
(:func:`edgeq.export.qdq.apply_plan`; the unchanged plan reproduces the bundle's file byte for byte, checked), it
writes variant bundles that differ from the bundle in one thing each, then validates each on the same explicit
seeds (``edgeq validate --seeds``, the cpu target running the variant's all-INT8 file) and joins the chunks into
one fixed-N verdict per variant (``benchmarks/merge_verdicts.py``'s rule). Variants (``LAYER`` = plan index):

* ``float:L``   layer L in float (weights and input), every other choice unchanged;
* ``nobias:L``  layer L int8 without its bias correction;
* ``input2:L``  layer L's input as two int8 terms, ``Q(x)`` and ``Q_r(x - DQ(Q(x)))`` with step/254 (two int8
  GEMMs on the same int8 weights, added): the input error of ~15 bits, the weight error of int8;
* ``weight2:L`` layer L's weights as two int8 terms, ``W ~ s*q + s_r*q_r`` (per output channel; two int8 GEMMs
  on the same int8 input), without its bias correction: the weight error of ~14 bits, the input error of int8.

These are diagnostics, not shipped formats: the extra branches are not what the CPU/CUDA specializations or
``edgeq check`` know. Example (session 7, PPO HalfCheetah, 2-core VM)::

    python benchmarks/layer_ablation.py B --variants float:0,float:1,input2:0,weight2:0,nobias:0 \\
        --seeds 400000-400799 --chunk 200 --workers 2 --work /tmp/ablation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_verdicts import merge  # noqa: E402

from edgeq.export.qdq import apply_plan  # noqa: E402
from edgeq.quantizers.plan import QuantPlan  # noqa: E402
from edgeq.validate.sequential import fixed_design  # noqa: E402
from edgeq.validate.verdict import Tolerance, judge  # noqa: E402

KEEP = ("manifest.json", "plan.json", "policy.fp32.onnx")


def slim_copy(bundle: Path, dst: Path, int8: bytes) -> None:
    """``dst``: ``bundle``'s float file and plan with ``int8`` as its only INT8 file (the cpu target runs it)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in KEEP:
        shutil.copy2(bundle / f, dst / f)
    (dst / "policy.int8.onnx").write_bytes(int8)
    man = json.loads((dst / "manifest.json").read_text())
    man["models"] = {k: v for k, v in man["models"].items() if k in ("fp32", "int8")}
    man["files"] = {k: v for k, v in man["files"].items() if k in KEEP}
    man["files"]["policy.int8.onnx"] = hashlib.sha256(int8).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(man, indent=1))


def _init(g: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in g.initializer if i.name == name))


def _insert_after(g: onnx.GraphProto, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
    at = list(g.node).index(node)
    for k, n in enumerate(nodes):
        g.node.insert(at + 1 + k, n)


def _layer_matmul(g: onnx.GraphProto, weight_name: str) -> onnx.NodeProto:
    return next(n for n in g.node if n.op_type == "MatMul" and n.input[1] == f"{weight_name}.dq")


def input_two_terms(m: onnx.ModelProto, weight_name: str) -> None:
    """``+ DQ(Q_r(x - DQ(Q(x)))) @ DQ(W)``: a second int8 GEMM on the first one's rounding residual."""
    g = m.graph
    mm = _layer_matmul(g, weight_name)
    dq = next(n for n in g.node if n.output[0] == mm.input[0])
    q = next(n for n in g.node if n.output[0] == dq.input[0])
    wdq = next(n for n in g.node if n.output[0] == mm.input[1])
    step = float(_init(g, q.input[1]))
    for src, new in zip(wdq.input, ("abl.w.int8", "abl.w.scale", "abl.w.zp"), strict=True):  # ORT: own copy
        t = onnx.TensorProto()
        t.CopyFrom(next(i for i in g.initializer if i.name == src))
        t.name = new
        g.initializer.append(t)
    g.initializer.extend([numpy_helper.from_array(np.array(step / 254, np.float32), "abl.r.scale"),
                          numpy_helper.from_array(np.array(0, np.int8), "abl.r.zp")])
    out = mm.output[0]
    mm.output[0] = out + ".main"
    axis = next(a.i for a in wdq.attribute if a.name == "axis")
    _insert_after(g, mm, [
        helper.make_node("Sub", [q.input[0], dq.output[0]], ["abl.r"]),
        helper.make_node("QuantizeLinear", ["abl.r", "abl.r.scale", "abl.r.zp"], ["abl.r.q"]),
        helper.make_node("DequantizeLinear", ["abl.r.q", "abl.r.scale", "abl.r.zp"], ["abl.r.dq"]),
        helper.make_node("DequantizeLinear", ["abl.w.int8", "abl.w.scale", "abl.w.zp"], ["abl.w.dq"], axis=axis),
        helper.make_node("MatMul", ["abl.r.dq", "abl.w.dq"], ["abl.r.mm"]),
        helper.make_node("Add", [out + ".main", "abl.r.mm"], [out])])


def weight_two_terms(m: onnx.ModelProto, w_float: np.ndarray, weight_name: str) -> float:
    """``+ DQ(x) @ DQ(q_r, s_r)``, ``q_r`` the int8 rounding of the weight's residual; returns its relative error."""
    g = m.graph
    mm = _layer_matmul(g, weight_name)
    q = _init(g, f"{weight_name}.int8").astype(np.float64)
    s = _init(g, f"{weight_name}.scale").astype(np.float64)
    wf = w_float if w_float.shape == q.shape else w_float.T  # the file stores [K, N], scale per N
    resid = wf - q * s
    s_r = np.maximum(np.abs(resid).max(axis=0), 1e-12) / 127.0
    q_r = np.clip(np.round(resid / s_r), -127, 127)
    g.initializer.extend([numpy_helper.from_array(q_r.astype(np.int8), "abl.wr.int8"),
                          numpy_helper.from_array(s_r.astype(np.float32), "abl.wr.scale"),
                          numpy_helper.from_array(np.zeros(s_r.shape, np.int8), "abl.wr.zp")])
    out = mm.output[0]
    mm.output[0] = out + ".main"
    _insert_after(g, mm, [
        helper.make_node("DequantizeLinear", ["abl.wr.int8", "abl.wr.scale", "abl.wr.zp"], ["abl.wr.dq"], axis=1),
        helper.make_node("MatMul", [mm.input[0], "abl.wr.dq"], ["abl.wr.mm"]),
        helper.make_node("Add", [out + ".main", "abl.wr.mm"], [out])])
    return float(np.abs(wf - q * s - q_r * s_r).mean() / np.abs(wf).mean())


def variant(bundle: Path, spec: str, dst: Path) -> dict[str, Any]:
    """Write variant ``spec`` of ``bundle`` to ``dst`` (a bundle whose only int8 file is the variant's)."""
    kind, _, idx = spec.partition(":")
    plan = QuantPlan.from_bundle(bundle)
    fp32 = onnx.load(str(bundle / "policy.fp32.onnx"))
    if apply_plan(fp32, plan).SerializeToString() != (bundle / "policy.int8.onnx").read_bytes():
        raise SystemExit(f"{bundle}: plan.json does not reproduce policy.int8.onnx with this edgeq")
    i = int(idx)
    layer = plan.layers[i]
    if layer.precision != "int8" or layer.scheme != "static":
        raise SystemExit(f"{spec}: layer {i} ({layer.node}) is not a static int8 layer")
    info: dict[str, Any] = {"variant": spec, "layer": layer.node}
    if kind == "float":
        layers = [replace(la, precision="float", weight=None, bias=None) if k == i else la
                  for k, la in enumerate(plan.layers)]
        plan = replace(plan, layers=layers)
        plan = replace(plan, activations={k: v for k, v in plan.activations.items() if k in plan.used_activations()})
    elif kind in ("nobias", "weight2"):
        plan = replace(plan, layers=[replace(la, bias=None) if k == i else la for k, la in enumerate(plan.layers)])
    elif kind != "input2":
        raise SystemExit(f"unknown variant {spec!r}: float:L, nobias:L, input2:L or weight2:L")
    model = apply_plan(fp32, plan)
    if kind == "input2":
        input_two_terms(model, layer.weight_name)
    elif kind == "weight2":
        info["weight_rel_error"] = weight_two_terms(
            model, _init(plan.rewritten(fp32).graph, layer.weight_name).astype(np.float64), layer.weight_name)
    onnx.checker.check_model(model)
    slim_copy(bundle, dst, model.SerializeToString())
    return info


def validate(bundle: Path, first: int, last: int, chunk: int, workers: int, work: Path) -> list[dict[str, Any]]:
    """``edgeq validate --seeds`` in chunks (the cpu target runs the variant's all-INT8 file)."""
    parts = []
    for a in range(first, last + 1, chunk):
        b = min(a + chunk - 1, last)
        out = work / f"{bundle.name}-{a}-{b}"
        if not (out / "validation.json").is_file():
            subprocess.run([sys.executable, "-m", "edgeq.cli", "validate", str(bundle), "--targets", "cpu",
                            "--seeds", f"{a}-{b}", "--workers", str(workers), "--floor-draws", "0",
                            "--no-sensitivity", "--no-per-layer", "--latency-calls", "0", "--no-report",
                            "--out", str(out), "-q"], check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        parts.append(json.loads((out / "validation.json").read_text())["targets"]["cpu"])
    return parts


def verdict_line(name: str, parts: list[dict[str, Any]], rel_tol: float) -> str:
    merged = merge(parts)
    v = judge(merged, Tolerance(relative=rel_tol), fixed_design())
    n = len(merged["float"]["returns"])
    f, q = float(np.mean(merged["float"]["returns"])), float(np.mean(merged["int8"]["returns"]))
    d = np.asarray(merged["int8"]["returns"]) - np.asarray(merged["float"]["returns"])
    lo, hi = v["returns"]["interval"]
    fails = v["failures"]
    return (f"| {name} | {n} | {f:.1f} | {q:.1f} | {100 * (1 + (q - f) / abs(f)):.2f}% | {d.mean():+.1f} "
            f"[{lo:+.1f}, {hi:+.1f}] vs -{v['returns']['band_size']:.1f} | {np.median(d):+.1f} | "
            f"{fails.get('float_failures')} / {fails.get('int8_failures')} | {v['status']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--variants", required=True, help="comma-separated: float:L, nobias:L, input2:L, weight2:L")
    ap.add_argument("--seeds", required=True, help="A-B, the pre-registered seeds of every variant")
    ap.add_argument("--chunk", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rel-tol", type=float, default=0.01)
    ap.add_argument("--work", type=Path, required=True, help="folder for the variant bundles and their chunks")
    args = ap.parse_args()
    first, last = (int(x) for x in args.seeds.split("-"))
    rows = ["| variant | N | float | all-INT8 | kept | paired diff [95% CI] vs band | median diff | "
            "falls float / int8 | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    base = args.work / "base"
    slim_copy(args.bundle, base, (args.bundle / "policy.int8.onnx").read_bytes())
    targets = [("bundle as made", base)]
    for spec in args.variants.split(","):
        dst = args.work / spec.replace(":", "-")
        print(json.dumps(variant(args.bundle, spec, dst)), flush=True)
        targets.append((spec, dst))
    for name, b in targets:
        rows.append(verdict_line(name, validate(b, first, last, args.chunk, args.workers, args.work / "chunks"),
                                 args.rel_tol))
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
