"""Low bits under a return budget: W8A8, W4A8 and the mixed-precision search's choice, per fixture (issue 12 part 4).

For each fixture: ``edgeq quantize`` (defaults) makes the all-INT8 base bundle; ``edgeq.search.search`` with
``evaluate_all`` builds every candidate (W4A8 = every layer int4 with int8 activations; k least sensitive
layers int4; all-INT8 W8A8; the most sensitive layer in fp16), measures each CPU file's batch-1/32
latency and validates every candidate in closed loop (paired episodes, the verdict at ``--max-loss``);
the mixed row is the smallest PASSing candidate (what ``edgeq search`` returns). A second part measures
which int4 kernels ONNX Runtime's CPU provider runs (one layer, batch 1 and 32).

    python benchmarks/low_bit.py --fixture sac-halfcheetah:HalfCheetah-v5 --episodes 20 --block-size 0 \\
        --out benchmarks/results/low_bit.md
    python benchmarks/low_bit.py --kernels --out benchmarks/results/low_bit.md

Results are appended (one table per fixture, with the command) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append_section  # noqa: E402


def _row(r: dict[str, Any], base_bytes: int, kind: str) -> str:
    lat = r["latency_us"]
    fails = r.get("failures") or {}
    iv = r.get("loss_interval")
    iv_s = f"[{iv[0]:+.1f}, {iv[1]:+.1f}]" if isinstance(iv, list) and len(iv) == 2 else ""
    f, q = r.get("float_mean"), r.get("mean")
    kept = "" if not f or q is None else f"{100 * (1 + (q - f) / abs(f)):.2f}%"
    return (f"| {kind} | {r['name']} | {r['label']} | {r['file_bytes']} ({r['file_bytes'] / base_bytes:.2f}x) | "
            f"{lat['batch1_median']} | {lat['batch32_median']} | {kept} | {iv_s} | {r.get('verdict')} | "
            f"{r.get('episodes', '')} | {fails.get('float', '')}/{fails.get('candidate', '')} |")


def run_fixture(spec: str, args: argparse.Namespace, cmd: str) -> None:
    from edgeq.pipeline import quantize
    from edgeq.search import search

    name, env = spec.split(":", 1)
    policy = Path(args.policies) / f"{name}.zip"
    work = Path(args.work) / name
    bundle = work / f"bundle-{args.seed}"
    sdir = work / f"search-b{args.block_size}-{args.rounding.replace(',', '_')}{args.tag}"
    t_q = t_s = 0.0
    rec_path = sdir / "search.json"
    done = rec_path.is_file() and json.loads(rec_path.read_text()).get("status") != "RUNNING"
    if not (args.render and done):
        t0 = time.perf_counter()
        if not (bundle / "manifest.json").is_file():
            quantize(policy, env, bundle, episodes=args.episodes, max_episodes=args.max_episodes, seed=args.seed,
                     report=False, overwrite=True)
        t_q = time.perf_counter() - t0
        t0 = time.perf_counter()
        search(bundle, sdir, max_loss=args.max_loss, episodes=args.episodes, max_episodes=args.max_episodes,
               seed=args.seed, block_size=args.block_size, evaluate_all=not args.first_pass, rounding=args.rounding,
               overwrite=True, only=args.only.split(",") if args.only else None,
               reconstruct_iters=args.reconstruct_iters, reconstruct_states=args.reconstruct_states,
               state_episodes=args.state_episodes, max_states=args.max_states,
               int4_input_scaling=args.int4_input_scaling, int4_input_affine=args.int4_input_affine,
               int4_input_split=args.int4_input_split, int4_hidden_split=args.int4_hidden_split,
               reconstruct_options={k: json.loads(v) for k, v in (o.split("=", 1) for o in args.reconstruct)},
               log=lambda s: print(f"[{name}] {s}", flush=True))
        t_s = time.perf_counter() - t0
    rec = json.loads((sdir / "search.json").read_text())
    all_rows = rec["candidates"]
    rows = {r["name"]: r for r in all_rows}
    best = rec.get("best")
    base = rows["W8A8"]
    gran = "per channel" if args.block_size == 0 else f"blocks of {args.block_size}"
    lines = [f"### {name} ({env}), int4 {gran}, {args.rounding} rounding",
             "", f"`{cmd}`", "",
             f"Float policy.fp32.onnx: batch 1 {rec['float_latency_us']['batch1_median']} us, batch 32 "
             f"{rec['float_latency_us']['batch32_median']} us. Validation: CPU target, each candidate's "
             f"policy.int8.cpu.onnx (int8 layers MatMulIntegerToFloat, int4 layers MatMulNBits after their int8 "
             f"activation Q/DQ: int4 weights, fp32 accumulation), seeds {args.seed}.., "
             f"`--episodes {args.episodes}`, band {100 * args.max_loss:g}% of |float mean|. "
             "Return kept = 1 + mean(cand - float) / |mean(float)|; CI = 95% interval of the paired difference "
             "cand - float (return units). File = portable policy.int8.onnx bytes (x W8A8). Latency: median us, "
             "1 ORT thread, shared 2-core VM.",
             "", "| row | candidate | precisions | file bytes | CPU b1 us | CPU b32 us | return kept | diff CI "
             "| verdict | episodes | failures float/cand |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(_row(base, base["file_bytes"], "W8A8 (all-INT8)"))
    if "W4A8" in rows:
        lines.append(_row(rows["W4A8"], base["file_bytes"], "W4A8 (all int4)"))
    if best is not None:
        lines.append(_row(best, base["file_bytes"], f"mixed, {100 * args.max_loss:g}% budget"))
    else:
        lines.append(f"| mixed, {100 * args.max_loss:g}% budget | none PASSed ({rec['status']}) | | | | | | | | | |")
    for r in all_rows:
        if r["name"] not in ("W8A8", "W4A8") and (best is None or r["name"] != best["name"]):
            lines.append(_row(r, base["file_bytes"], "other candidate"))
    recon = []
    for r in all_rows:
        rc = r.get("reconstruction")
        if rc:
            recon.append(f"{r['name']} {rc['heldout_action_error_start']:.4g} -> {rc['heldout_action_error']:.4g} "
                         f"({'kept' if rc['kept'] else 'not kept'}, {rc['iters']} steps, {rc['seconds']} s)")
    if recon:
        lines += ["", "Joint reconstruction (`+brecq`: every int4 and int8 layer's rounding and every input scale "
                  "against the float actions; held-out action error before -> after): " + "; ".join(recon) + "."]
    ranking = ", ".join(f"{x['layer']} {x['heldout_action_error']:.4g}" for x in rec["int4_sensitivity_ranking"])
    timing = f"; quantize {t_q:.0f} s, search {t_s:.0f} s" if t_s else " (rendered from search.json)"
    lines += ["", f"int4 moves in ranked order (held-out action error with that layer alone in int4): {ranking}. "
              f"Search status {rec['status']}{timing}.", ""]
    append_section(args.out, "\n".join(lines))


def kernels(args: argparse.Namespace, cmd: str) -> None:
    """One layer [K, N] in each form ONNX Runtime's CPU EP might run, and what its optimizer makes of it."""
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.export.int4 import int4_tensor, specialize_int4_for_ort_cpu
    from edgeq.export.ort_cpu import specialize_for_ort_cpu

    rng = np.random.default_rng(0)

    def model(k: int, n: int, form: str) -> onnx.ModelProto:
        w = rng.standard_normal((k, n)).astype(np.float32)
        inits: list[onnx.TensorProto] = []
        nodes: list[onnx.NodeProto] = []
        x = "x"
        if form != "float":
            inits += [numpy_helper.from_array(np.array(0.05, np.float32), "as"),
                      numpy_helper.from_array(np.array(0, np.int8), "az")]
            if not form.startswith("w4-only"):
                nodes += [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
                          helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"])]
                x = "xd"
        if form == "float":
            inits.append(numpy_helper.from_array(w, "W"))
            wd = "W"
        elif form == "w8a8":
            s = np.abs(w).max(0) / 127
            inits += [numpy_helper.from_array(np.clip(np.rint(w / s), -127, 127).astype(np.int8), "Wq"),
                      numpy_helper.from_array(s.astype(np.float32), "Ws"),
                      numpy_helper.from_array(np.zeros(n, np.int8), "Wz")]
            nodes.append(helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=1))
            wd = "Wd"
        else:
            block = 32 if "b32" in form else 0
            if block:
                s = np.abs(w.reshape(k // block, block, n)).max(1) / 7
                q = np.clip(np.rint(w / np.repeat(s, block, 0)), -7, 7).astype(np.int8)
                dq = helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=0, block_size=block)
            else:
                s = np.abs(w).max(0) / 7
                q = np.clip(np.rint(w / s), -7, 7).astype(np.int8)
                dq = helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=1)
            inits += [int4_tensor(q, "Wq"), numpy_helper.from_array(s.astype(np.float32), "Ws"),
                      int4_tensor(np.zeros(s.shape, np.int8), "Wz")]
            nodes.append(dq)
            wd = "Wd"
        nodes.append(helper.make_node("MatMul", [x, wd], ["y"]))
        g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        return m

    def timed(m: onnx.ModelProto, k: int, batch: int, calls: int) -> tuple[float, list[str]]:
        with tempfile.TemporaryDirectory() as d:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.optimized_model_filepath = str(Path(d) / "opt.onnx")
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        x = rng.standard_normal((batch, k)).astype(np.float32)
        for _ in range(200):
            sess.run(None, {"x": x})
        t = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter_ns()
            sess.run(None, {"x": x})
            t[i] = (time.perf_counter_ns() - t0) / 1e3
        return float(np.median(t)), ops

    lines = ["### Which int4 kernels ONNX Runtime's CPU provider runs", "", f"`{cmd}`", "",
             f"ONNX Runtime {ort.__version__}, 1 thread, {platform.machine()}, shared 2-core VM; one MatMul layer, "
             "median of the calls. 'ORT runs' = the op types of the session's optimized graph (level all).", "",
             "| layer | form | ORT runs | b1 us | b32 us | compute |", "|---|---|---|---|---|---|"]
    forms = {
        "float": ("float", "fp32"),
        "w8a8": ("W8A8 QDQ (portable)", "int8 GEMM (ORT fuses to MatMulIntegerToFloat)"),
        "w8a8-cpu": ("W8A8 edgeq CPU file", "int8 GEMM"),
        "w4-only": ("W4 weight-only QDQ, per channel", "ORT's fusion: MatMulNBits accuracy_level 4"),
        "w4-only-b32": ("W4 weight-only QDQ, blocks of 32", "ORT's fusion: MatMulNBits accuracy_level 4"),
        "w4a8": ("W4A8 QDQ (portable), per channel", "not fused: int4 DQ every call + fp32 MatMul"),
        "w4a8-b32": ("W4A8 QDQ (portable), blocks of 32", "not fused: int4 DQ every call + fp32 MatMul"),
        "w4a8-cpu0": ("W4A8 edgeq CPU file (Q/DQ + MatMulNBits acc 0)", "int4 weights dequantized in kernel, fp32"),
        "w4a8-cpu4": ("W4A8 CPU file with MatMulNBits acc 4", "int4 x int8 dot products (input re-quantized)"),
    }
    for k, n in ((17, 256), (256, 256)):
        for form, (label, compute) in forms.items():
            if "b32" in form and k % 32:
                continue
            base_form = form.replace("-cpu0", "").replace("-cpu4", "").replace("-cpu", "")
            m = model(k, n, base_form)
            if form == "w8a8-cpu":
                m = specialize_for_ort_cpu(m, float_layers=[])
            elif form.endswith("-cpu0") or form.endswith("-cpu4"):
                m = specialize_int4_for_ort_cpu(m, accuracy_level=0 if form.endswith("0") else 4)
            b1, ops = timed(m, k, 1, args.calls)
            b32, _ = timed(m, k, 32, max(200, args.calls // 4))
            lines.append(f"| {k}x{n} | {label} | {', '.join(ops)} | {b1:.1f} | {b32:.1f} | {compute} |")
    lines.append("")
    append_section(args.out, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", action="append", default=[], help="NAME:ENV_ID (repeatable)")
    ap.add_argument("--episodes", default="20", help="paired episodes per candidate (N or auto)")
    ap.add_argument("--max-episodes", type=int, default=200)
    ap.add_argument("--max-loss", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=0)
    ap.add_argument("--rounding", default="both",
                    help="int4 rounding (edgeq search --int4-rounding): nearest, gptq, brecq, gptq+brecq, both, all, "
                         "or a comma list")
    ap.add_argument("--only", default="", help="validate only these candidates (comma list of names, e.g. "
                                               "W4A8,W4A8+gptq+brecq); the others are built and timed, NOT RUN")
    ap.add_argument("--reconstruct-iters", type=int, default=600, help="Adam steps of each +brecq reconstruction")
    ap.add_argument("--reconstruct", action="append", default=[], metavar="KEY=JSON",
                    help="more options of edgeq.quantizers.reconstruct.reconstruct, e.g. learn_scales=false")
    ap.add_argument("--reconstruct-states", default="float", choices=["float", "closed-loop"],
                    help="states of the +brecq reconstruction: the float policy's, or also the candidate's own")
    ap.add_argument("--state-episodes", type=int, default=6, help="float episodes giving the search its states")
    ap.add_argument("--max-states", type=int, default=6000, help="cap of those states (3/4 calibration, 1/4 held out)")
    ap.add_argument("--int4-input-scaling", action="store_true",
                    help="the first layer's int4 weight gets its own input scaling (edgeq search --int4-input-scaling)")
    ap.add_argument("--int4-input-affine", action="store_true",
                    help="also AffineQuant's observation transform fitted for the first layer's int4 grid "
                         "(edgeq search --int4-input-affine)")
    ap.add_argument("--int4-input-split", type=float, default=0.0,
                    help="duplicate up to this fraction of the first layer's observation columns (input OCS; "
                         "edgeq search --int4-input-split F)")
    ap.add_argument("--int4-hidden-split", type=float, default=0.0,
                    help="also W4A8-ocs: W4A8 with up to this fraction of each hidden width added as weight splits "
                         "chosen on the int4 grid (edgeq search --int4-hidden-split F)")
    ap.add_argument("--first-pass", action="store_true",
                    help="stop at the first accepted candidate, as edgeq search does (default: evaluate all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", action="store_true", help="measure ORT's int4 kernels (one layer)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--tag", default="", help="suffix of the search directory name")
    ap.add_argument("--render", action="store_true", help="re-render a finished search (its search.json) only")
    ap.add_argument("--work", default="/tmp/edgeq-low-bit")
    ap.add_argument("--policies", default=str(ROOT / "tests" / "fixtures" / "policies"), help="fixture folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "low_bit.md"))
    args = ap.parse_args()
    args.episodes = args.episodes if args.episodes == "auto" else int(args.episodes)
    cmd = "python benchmarks/low_bit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.kernels:
        kernels(args, cmd)
    for spec in args.fixture:
        run_fixture(spec, args, cmd)


if __name__ == "__main__":
    main()
