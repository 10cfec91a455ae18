"""PTQ methods compared in closed loop: every fixture × every method, the same seeds (issue 12 part 6).

Methods (each one file validated against the **unpruned float** ``policy.fp32.onnx`` on ONNX Runtime CPU,
paired episodes on seeds ``--seed``.., ``--episodes N`` or ``auto`` = the sequential verdict):

* ``default``: ``edgeq quantize`` with the defaults; the row is the all-INT8 ``policy.int8.onnx`` (every layer
  W8A8, what TensorRT runs) on the CPU, and the CPU file ``policy.int8.cpu.onnx``'s own row (``default/cpu``);
* ``nearest``, ``adaround``, ``gptq``, ``brecq``, ``gptq+brecq``, ``stochastic``, ``equalize-all``,
  ``crossquant-all``: ``edgeq quantize`` with that rounding / rewrite (issue 12 part 3), all-INT8 file;
* ``w4a8``, ``mixed``: ``edgeq.search.search`` on the default bundle at ``--max-loss`` (part 4): the W4A8
  candidate (every layer int4 weights, int8 activations) and the search's choice (smallest PASSing);
* ``prune10``, ``prune25``, ``prune50``: ``edgeq quantize --prune`` (part 5), all-INT8 file of the pruned policy;
* ``ort-static``: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, MinMax calibration, int8
  activations) on the same float graph, calibrated on the same calibration states as edgeq.

Per row: float and int8 mean return, return kept (int8/float mean) and the 95% interval of the paired
difference as a ratio, the verdict at ``--rel-tol`` (1%), failures (terminations) float/int8, the file's
size, and its batch-1 median latency on ONNX Runtime CPU (1 thread, best of interleaved rounds).

Designed to run in pieces (2 shared CPU cores): ``--fixture`` and ``--methods`` select, every finished row
goes to a JSON cache (``--cache``) and is skipped on the next run; ``--render`` rewrites the markdown
(``--out``) from the cache alone.

    python benchmarks/ptq_methods.py --fixture sac-pendulum --methods default,gptq,prune25,ort-static \\
        --episodes 20
    python benchmarks/ptq_methods.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures" / "policies"
CACHE = ROOT / "benchmarks" / "results" / "ptq_methods.json"
OUT = ROOT / "benchmarks" / "results" / "ptq_methods.md"

#: method -> the config overrides of ``edgeq quantize`` (all-INT8: no fp16 fallback, no float layers).
QUANTIZE_METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "nearest": {"quantization.rounding": "nearest"},
    "adaround": {"quantization.rounding": "adaround"},
    "gptq": {"quantization.rounding": "gptq"},
    "brecq": {"quantization.rounding": "brecq"},
    "gptq+brecq": {"quantization.rounding": "gptq+brecq"},
    "stochastic": {"quantization.rounding": "stochastic"},
    "equalize-all": {"quantization.transform": "equalize", "quantization.transform_layers": "all",
                     "quantization.alpha": 0.5, "quantization.auto": False},
    "crossquant-all": {"quantization.transform": "crossquant", "quantization.transform_layers": "all",
                       "quantization.alpha": 0.0, "quantization.auto": False},
    "prune10": {"quantization.prune": 0.10},
    "prune25": {"quantization.prune": 0.25},
    "prune50": {"quantization.prune": 0.50},
}
#: method -> (the bundle the precision search starts from, which row of the search)
SEARCH_METHODS = {"w4a8": ("default", "w4a8"), "mixed": ("default", "mixed"),
                  "prune25+w4a8": ("prune25", "w4a8"), "prune25+mixed": ("prune25", "mixed")}
METHODS = (*QUANTIZE_METHODS, *SEARCH_METHODS, "ort-static")
DEFAULT_METHODS = ("default", "gptq", "brecq", "w4a8", "mixed", "prune25", "prune25+mixed", "ort-static")


def fixtures(folder: Path | None = None) -> dict[str, str]:
    """``{name: env id}`` of every SB3 fixture (``*.zip`` with its ``.json``) in ``folder`` (default the repo's)."""
    out = {}
    for z in sorted((folder or FIXTURES).glob("*.zip")):
        meta = z.with_suffix(".json")
        if meta.is_file():
            out[z.stem] = json.loads(meta.read_text())["env_id"]
    return out


def _load_cache(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def _save_cache(path: Path, cache: dict[str, Any], keys: list[str] | None = None) -> None:
    """Write ``cache``; with ``keys``, only those rows are merged into the file as it is now (several pieces
    may run one after another or side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if keys is not None:
        on_disk = _load_cache(path)
        on_disk["rows"].update({k: cache["rows"][k] for k in keys})
        cache = on_disk
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def batch1_us(path: Path) -> float:
    """Batch-1 median latency (µs) of an ONNX file on ONNX Runtime CPU, one thread (edgeq.export.cpu_select)."""
    from edgeq.export.cpu_select import ort_batch1_timer

    return round(ort_batch1_timer(calls=300, rounds=3)([path.read_bytes()])[0], 2)


def _row_from_result(r: dict[str, Any], path: Path, method: str, **extra: Any) -> dict[str, Any]:
    """A row from one validation result (a target's or the all-INT8 one)."""
    vd = r["verdict"]
    fm, qm = float(r["float"]["mean"]), float(r["int8"]["mean"])
    iv = vd["returns"].get("interval") or r["paired_difference"]["ci95"]
    fails = vd.get("failures", {})
    return {"method": method, "file": path.name, "target": "cpu (onnxruntime)", "episodes": len(r["float"]["returns"]),
            "float_mean": fm, "int8_mean": qm, "kept": qm / fm if fm > 0 else 1 + (qm - fm) / abs(fm),
            "kept_ci": [None if x is None else 1 + x / abs(fm) for x in iv], "verdict": vd.get("status"),
            "failures": [fails.get("float_failures"), fails.get("int8_failures")],
            "file_bytes": path.stat().st_size, "batch1_us": batch1_us(path), **extra}


def _cpu_latency(bundle: Path) -> dict[str, float]:
    """Batch-1 µs of the bundle's CPU file and of its (unpruned) float file, timed together."""
    from edgeq.export.cpu_select import ort_batch1_timer

    cpu, flt = ort_batch1_timer(calls=300, rounds=3)([(bundle / "policy.int8.cpu.onnx").read_bytes(),
                                                       (bundle / "policy.fp32.onnx").read_bytes()])
    return {"cpu_file_b1_us": round(cpu, 2), "float_b1_us": round(flt, 2)}


def fill_latency(cache: dict[str, Any], work: Path) -> None:
    """Add the CPU-file and float batch-1 latency to cached edgeq rows whose bundle is still in ``work``."""
    for row in cache["rows"].values():
        method = row.get("method", "").removesuffix("/cpu")
        bundle = work / row.get("fixture", "") / method
        if method in SEARCH_METHODS and "confirmation" not in row:
            start = SEARCH_METHODS[method][0]
            rec = work / row.get("fixture", "") / f"search-{start}" / "search.json"
            rec = rec if rec.is_file() else work / row.get("fixture", "") / "search" / "search.json"
            name = (row.get("file") or "").split("/")[0]
            if rec.is_file() and name:
                cands = {c["name"]: c for c in json.loads(rec.read_text()).get("candidates", [])}
                row.update(_confirmation(cands.get(name, {})))
        if method in QUANTIZE_METHODS and "cpu_file_b1_us" not in row and (bundle / "manifest.json").is_file():
            row.update(_cpu_latency(bundle))
            print(f"{row['fixture']} {row['method']}: {row['cpu_file_b1_us']} us (float {row['float_b1_us']})")


def _validate_file(bundle: Path, candidate: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``candidate`` vs the bundle's float file on ONNX Runtime CPU (paired, same seeds, the verdict)."""
    import numpy as np

    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.envs import env_factory_for
    from edgeq.validate.outcomes import parse_failure
    from edgeq.validate.sequential import episode_design
    from edgeq.validate.validator import ValidationOptions, validate_models
    from edgeq.validate.verdict import Tolerance

    m = read_manifest(bundle, verify=False)
    design = episode_design(args.episodes if args.episodes == "auto" else int(args.episodes),
                            max_episodes=args.max_episodes)
    n = design.max_episodes if design.sequential else int(args.episodes)
    rule = ((m.get("decision") or {}).get("failure_rule") or {}).get("rule")
    opts = ValidationOptions(targets=("cpu",), floor_draws=0, sensitivity=False, per_layer=False, latency_calls=0,
                             design=design, failure=parse_failure(rule), tolerance=Tolerance(relative=args.rel_tol))
    make_env = env_factory_for(m["env"])
    probe = make_env()
    try:
        ep_len = getattr(getattr(probe, "spec", None), "max_episode_steps", None)
    finally:
        probe.close()
    act = m["action_space"]
    val = validate_models(bundle / "policy.fp32.onnx", candidate, m["io"], make_env,
                          list(range(args.seed, args.seed + n)), env_id=m["env"]["id"],
                          action_low=np.asarray(act["low"], np.float64),
                          action_high=np.asarray(act["high"], np.float64),
                          options=opts, episode_steps=ep_len)
    return dict(val["targets"]["cpu"])


def run_quantize(name: str, env: str, method: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from edgeq.pipeline import quantize

    bundle = Path(args.work) / name / method
    overrides = {**QUANTIZE_METHODS[method], "validation.rel_tol": args.rel_tol}
    t0 = time.perf_counter()
    res = quantize(Path(args.fixtures) / f"{name}.zip", env, bundle, overrides=overrides, episodes=args.episodes,
                   max_episodes=args.max_episodes, seed=args.seed, report=False, overwrite=True)
    secs = round(time.perf_counter() - t0, 1)
    val = res.validation
    fp = res.manifest.get("file_precision", {})
    all8 = val.get("all_int8_cpu") or val["targets"]["cpu"]  # the CPU target ran the same arithmetic
    heads = {f: rec.get("counts") for f, rec in fp.items()}
    pruning = res.manifest.get("pruning")
    extra = {"seconds": secs, "layers": heads.get("policy.int8.onnx"),
             "pruned_widths": [f"{r['width']}->{r['kept']}" for r in pruning["layers"]] if pruning else None}
    extra.update(_cpu_latency(bundle))
    rows = [_row_from_result(all8, bundle / "policy.int8.onnx", method, **extra)]
    if method == "default":  # the file the CPU target runs, next to the all-INT8 file
        rows.append(_row_from_result(val["targets"]["cpu"], bundle / "policy.int8.cpu.onnx", "default/cpu",
                                     **{**extra, "layers": heads.get("policy.int8.cpu.onnx")}))
    return rows


def run_search(name: str, env: str, method: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """W4A8 and the mixed search's choice (edgeq.search) on the default (or pruned) bundle: both rows of one
    search, each validated by the search itself (same seeds, the verdict at --rel-tol)."""
    from edgeq.search import search

    start, _ = SEARCH_METHODS[method]
    base = Path(args.work) / name / start
    if not (base / "manifest.json").is_file():
        run_quantize(name, env, start, args)
    prefix = "" if start == "default" else f"{start}+"
    sdir = Path(args.work) / name / f"search-{start}"
    t0 = time.perf_counter()
    res = search(base, sdir, max_loss=args.rel_tol, episodes=args.episodes, max_episodes=args.max_episodes,
                 seed=args.seed, evaluate_all=False, overwrite=True, log=lambda s: print(f"[{name}] {s}", flush=True))
    secs = round(time.perf_counter() - t0, 1)
    rows = {r["name"]: r for r in res.rows}
    out: list[dict[str, Any]] = []
    best_name = (res.best or {}).get("name")
    for method, cand in ((f"{prefix}w4a8", rows.get("W4A8")),
                         (f"{prefix}mixed", rows.get(best_name) if best_name else None)):
        if cand is None or cand.get("verdict") in (None, "NOT RUN"):
            note = ("no W4A8 candidate" if method.endswith("w4a8") else f"no candidate PASSed under the budget "
                    f"(search {res.status})") if cand is None else "not validated"
            out.append({"method": method, "verdict": "none", "note": note, "seconds": secs})
            continue
        path = sdir / "candidates" / cand["name"] / "policy.int8.onnx"
        fm = float(cand["float_mean"])
        iv = cand.get("loss_interval")
        fails = cand.get("failures") or {}
        qm = float(cand["mean"])
        out.append({"method": method, "file": f"{cand['name']}/policy.int8.onnx", "target": "cpu (onnxruntime)",
                    "episodes": cand.get("episodes"), "float_mean": fm, "int8_mean": qm,
                    "kept": qm / fm if fm > 0 else 1 + (qm - fm) / abs(fm),
                    "kept_ci": [None if x is None else 1 + x / abs(fm) for x in iv] if isinstance(iv, list) else None,
                    "verdict": cand.get("verdict"), "failures": [fails.get("float"), fails.get("candidate")],
                    "file_bytes": path.stat().st_size,
                    "batch1_us": batch1_us(sdir / "candidates" / cand["name"] / "policy.int8.cpu.onnx"),
                    "layers": cand.get("label"), "seconds": secs, **_confirmation(cand)})
    return out


def _confirmation(cand: dict[str, Any]) -> dict[str, Any]:
    """The search's confirmation of a PASS on fresh seeds (edgeq.search), when it ran."""
    conf = cand.get("confirmation")
    if not isinstance(conf, dict):
        return {}
    fm, qm = conf.get("float_mean"), conf.get("mean")
    kept = None if fm is None or qm is None or not fm else (qm / fm if fm > 0 else 1 + (qm - fm) / abs(fm))
    return {"confirmation": {"verdict": conf.get("verdict"), "return_ratio": kept,
                             "seeds": conf.get("seeds"), "episodes": conf.get("episodes")}}


def run_ort_static(name: str, env: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """ONNX Runtime's quantize_static (QDQ, per-channel, MinMax) on the default bundle's float graph and its
    calibration states (the same recipe seeds as edgeq), validated like every other file."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
    from edgeq.config import QuantizeConfig
    from edgeq.deploy.bundle_format import read_manifest
    from edgeq.envs import env_factory_for
    from edgeq.ingest import load_policy
    from edgeq.ingest.onnx_policy import bind_env_spaces

    base = Path(args.work) / name / "default"
    if not (base / "manifest.json").is_file():
        run_quantize(name, env, "default", args)
    m = read_manifest(base, verify=False)
    if m["io"].get("state"):
        return [{"method": "ort-static", "verdict": "n/a", "note": "recurrent policy (not attempted)"}]
    cal = QuantizeConfig.from_recipe(None, env=env).calibration
    make_env = env_factory_for(m["env"])
    probe = make_env()
    try:
        fp = bind_env_spaces(load_policy(base / "policy.fp32.onnx"), probe.observation_space, probe.action_space)
    finally:
        probe.close()
    seeds = list(range(cal.seed, cal.seed + cal.episodes))
    stats = calibrate_rollouts(fp, make_env, seeds, noise=ExplorationNoise(
        gaussian=cal.exploration.gaussian, epsilon=cal.exploration.epsilon), num_envs=cal.num_envs)
    obs = np.asarray(stats.observations, np.float32)
    inp = m["io"]["input"]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{inp: obs[i:i + 256]} for i in range(0, len(obs), 256)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = Path(args.work) / name / "ort-static"
    out.mkdir(parents=True, exist_ok=True)
    qpath = out / "policy.ort-static.onnx"
    t0 = time.perf_counter()
    quantize_static(str(base / "policy.fp32.onnx"), str(qpath), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": True})
    from edgeq.export.file_precision import file_record

    counts = file_record(onnx.load(str(qpath)))["counts"]
    r = _validate_file(base, qpath, args)
    return [_row_from_result(r, qpath, "ort-static", seconds=round(time.perf_counter() - t0, 1), layers=counts,
                             calibration_states=int(len(obs)))]


def _verdict(r: dict[str, Any]) -> str:
    conf = r.get("confirmation")
    if not conf:
        return str(r.get("verdict"))
    return (f"{r.get('verdict')}; on fresh seeds {conf['seeds'][0]}..{conf['seeds'][1]}: {conf.get('verdict')} "
            f"({_pct(conf.get('return_ratio'))})")


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def render(cache: dict[str, Any], out: Path, command: str) -> None:
    rows = list(cache["rows"].values())
    by_fix: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_fix.setdefault(r["fixture"], []).append(r)
    order: dict[str, int] = {}
    prunes = [m for m in METHODS if m.startswith("prune")]
    for m in ["default", "default/cpu", *[m for m in METHODS if m not in prunes and m != "ort-static"], *prunes,
              "ort-static"]:
        order.setdefault(m, len(order))
    lines = ["# PTQ methods in closed loop (issue 12 part 6)", "",
             "Generated by `benchmarks/ptq_methods.py` from its cache (`benchmarks/results/ptq_methods.json`); "
             f"last command: `{command}`.", "",
             "Every row: one file validated against the unpruned float `policy.fp32.onnx` on ONNX Runtime CPU "
             "(paired episodes, the same seeds for every method of a fixture; `auto` = the sequential verdict), "
             "verdict at a 1% return band. kept = int8 mean / float mean (for negative returns 1 + diff/|float|), "
             "CI = the verdict's 95% interval of the paired difference as a ratio; failures = terminations float/int8; "
             "file = bytes of that file; b1 = batch-1 median µs on ORT CPU, 1 thread, on a shared 2-core VM "
             "(the files differ: `default` is `policy.int8.onnx`, every layer W8A8, what TensorRT runs; "
             "`default/cpu` is `policy.int8.cpu.onnx`, whose float layers were chosen by measured latency; "
             "w4a8/mixed b1 is their CPU file with MatMulNBits; `CPU file b1` = the bundle's `policy.int8.cpu.onnx` "
             "and, in brackets, its unpruned float `policy.fp32.onnx`, timed together). "
             "The QDQ files (`policy.int8.onnx`, prune rows) are "
             "timed as they are: ONNX Runtime's CPU EP does not fuse edgeq's QDQ MatMul + bias Add into an integer "
             "kernel and dequantizes the weights on every call, which is why edgeq ships `policy.int8.cpu.onnx`; "
             "ort-static's QDQ Gemm is fused by ORT. INCONCLUSIVE is not a pass.", ""]
    for fix in sorted(by_fix):
        rs = sorted(by_fix[fix], key=lambda r: order.get(r["method"], 99))
        env = rs[0].get("env", "")
        lines += [f"## {fix} ({env})", "",
                  "| method | file | layers (counted from the file) | episodes | float | int8 | kept | 95% CI "
                  "| verdict | failures f/q | file bytes | b1 µs | CPU file b1 µs (float) |", "|---" * 13 + "|"]
        for r in rs:
            if r.get("note"):
                lines.append(f"| {r['method']} | - | {r['note']} | | | | | | {r.get('verdict')} | | | | |")
                continue
            ci = r.get("kept_ci") or [None, None]
            lay = r.get("layers")
            lay_s = ", ".join(f"{k} {v}" for k, v in lay.items()) if isinstance(lay, dict) else str(lay or "")
            if r.get("pruned_widths"):
                lay_s += f"; widths {', '.join(r['pruned_widths'])}"
            lines.append(f"| {r['method']} | {r.get('file')} | {lay_s} | {r.get('episodes')} | "
                         f"{r.get('float_mean', 0):.1f} | {r.get('int8_mean', 0):.1f} | {_pct(r.get('kept'))} | "
                         f"[{_pct(ci[0])}, {_pct(ci[1])}] | {_verdict(r)} | "
                         f"{r['failures'][0]}/{r['failures'][1]} | {r.get('file_bytes')} | {r.get('batch1_us')} | "
                         + (f"{r['cpu_file_b1_us']} ({r['float_b1_us']})" if "cpu_file_b1_us" in r else "-")
                         + " |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", action="append", help="fixture name (repeatable; default: every *.zip fixture)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--episodes", default="20", help="paired episodes per row, or 'auto'")
    ap.add_argument("--max-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rel-tol", type=float, default=0.01)
    ap.add_argument("--work", default="/tmp/edgeq-ptq-methods", help="where bundles are written")
    ap.add_argument("--fixtures", default=str(FIXTURES), help="folder of the fixture zips (default the repo's)")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", action="store_true", help="only rewrite --out from the cache")
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the cache")
    ap.add_argument("--fill-latency", action="store_true", help="time the CPU files of cached rows whose bundles "
                    "are still under --work, then render")
    args = ap.parse_args()
    command = "python benchmarks/ptq_methods.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    cache_path = Path(args.cache)
    cache = _load_cache(cache_path)
    if args.fill_latency:
        fill_latency(cache, Path(args.work))
        _save_cache(cache_path, cache, list(cache["rows"]))
    elif not args.render:
        known = fixtures(Path(args.fixtures))
        names = args.fixture or list(known)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS] + [n for n in names if n not in known]
        if bad:
            raise SystemExit(f"unknown method(s)/fixture(s) {bad}; methods: {', '.join(METHODS)}; fixtures: "
                             f"{', '.join(known)}")
        for name in names:
            env = known[name]
            for method in methods:
                key = f"{name}|{method}|{args.episodes}|{args.seed}"
                if method in SEARCH_METHODS and not args.redo and any(  # one search makes both rows
                        f"{name}|{m}|{args.episodes}|{args.seed}" in cache["rows"] for m in SEARCH_METHODS
                        if SEARCH_METHODS[m][0] == SEARCH_METHODS[method][0] and m != method) and key not in \
                        cache["rows"]:
                    print(f"cached (same search): {key}", flush=True)
                    continue
                if key in cache["rows"] and not args.redo:
                    print(f"cached: {key}", flush=True)
                    continue
                print(f"== {key}", flush=True)
                try:
                    if method in SEARCH_METHODS:
                        got = run_search(name, env, method, args)
                    elif method == "ort-static":
                        got = run_ort_static(name, env, args)
                    else:
                        got = run_quantize(name, env, method, args)
                except Exception as exc:  # a method that does not apply (recurrent policy, ...): recorded as such
                    traceback.print_exc()
                    got = [{"method": method, "verdict": "error", "note": f"{type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}"}]
                keys = []
                for row in got:
                    row.update(fixture=name, env=env, episodes_arg=args.episodes, seed=args.seed, command=command)
                    keys.append(f"{name}|{row['method']}|{args.episodes}|{args.seed}")
                    cache["rows"][keys[-1]] = row
                    print(json.dumps({k: row.get(k) for k in ("method", "kept", "kept_ci", "verdict", "failures",
                                                               "file_bytes", "batch1_us")}), flush=True)
                _save_cache(cache_path, cache, keys)
        cache = _load_cache(cache_path)
    render(cache, Path(args.out), command)


if __name__ == "__main__":
    main()
