"""The lowering before and after a refactoring, on one plan per fixture and variant.

For every policy fixture this builds the quantization plan **once** (calibration rollouts in the
fixture's env, seed 0; the plan search of the current code), then lowers it twice: with the code of
a git revision (``--old``, default ``fc4f45a``: exported with ``git archive`` into a temporary
directory and run in a subprocess with that tree first on ``PYTHONPATH``) and with the current
code. Each lowering writes the three files of a bundle: ``policy.int8.onnx`` (``apply_plan``),
``policy.int8.cpu.onnx`` (``specialize_for_ort_cpu``; the width rule of the default profile, 32,
so the choice is the same on both sides instead of a timing) and ``policy.int8.cuda.onnx``
(``specialize_for_ort_cuda``). Reported per file: byte-identical or not, and the largest
|Δaction| over 10,000 states in ONNX Runtime's CPU provider (``scripts/compare_bundles.py``:
states from N(0, 2²); recurrent policies 100 envs × 100 steps, state carried).

Variants beyond the default plan (on the SAC fixtures): an fp16 layer, CrossQuant dynamic,
equalization, bias correction, CrossQuant static on all layers.

    python scripts/compare_lowering.py [--old fc4f45a] [--fixtures sac-pendulum ...] [--out FILE.md]

Exit 1 when any file differs numerically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "policies"
sys.path.insert(0, str(ROOT / "scripts"))

FILES = ("policy.int8.onnx", "policy.int8.cpu.onnx", "policy.int8.cuda.onnx")
CPU_FLOAT_BELOW = 32
FP16_FILE = "policy.fp16.onnx"


def _lower(job_dir: Path) -> None:
    """Write the three files of every job under ``job_dir`` with the ``edgeq`` on ``sys.path``."""
    import onnx

    import edgeq
    from edgeq.export.ort_cpu import specialize_for_ort_cpu
    from edgeq.export.ort_cuda import specialize_for_ort_cuda
    from edgeq.export.qdq import apply_plan

    (job_dir / f"{sys.argv[-1]}.edgeq").write_text(str(Path(edgeq.__file__).resolve()))
    for job in sorted(p for p in job_dir.iterdir() if p.is_dir()):
        model = onnx.load(str(job / "policy.fp32.onnx"))
        with open(job / "plan.pkl", "rb") as f:  # written by this script in this run
            plan, keep_int8 = pickle.load(f)  # noqa: S301
        out = job / sys.argv[-1]
        out.mkdir(exist_ok=True)
        q = apply_plan(model, plan)
        cpu = specialize_for_ort_cpu(q, min_int8_width=CPU_FLOAT_BELOW, keep_int8=keep_int8)
        for name, m in zip(FILES, (q, cpu, specialize_for_ort_cuda(q)), strict=True):
            (out / name).write_bytes(m.SerializeToString(deterministic=True))
        if job.name.endswith("__default"):  # the fp16 pass of TensorRT's strongly typed fp16 build
            from edgeq.export.tensorrt_engine import fp16_onnx_with_casts

            try:
                half = fp16_onnx_with_casts(model).SerializeToString(deterministic=True)
            except ValueError as exc:
                half = f"refused: {exc}".encode()
            (out / FP16_FILE).write_bytes(half)


def _fixtures(names: list[str] | None) -> list[dict[str, Any]]:
    out = []
    for meta in sorted(FIXTURES.glob("*.json")):
        record = json.loads(meta.read_text())
        name = meta.stem
        files = record.get("files") or [f"{name}.zip" if (FIXTURES / f"{name}.zip").exists() else f"{name}.pt"]
        if not all((FIXTURES / f).exists() for f in files) or not record.get("env_id"):
            continue
        if names and name not in names:
            continue
        history = record.get("history")
        options: dict[str, Any] = {}
        if isinstance(history, dict):
            options["history"] = history.get("length")
            if files[0].endswith(".pt"):  # a scripted module's own forward(): torch.onnx needs the size
                options["obs_dim"] = history.get("obs_dim")
        out.append({"name": name, "paths": [FIXTURES / f for f in files], "env": record["env_id"], "options": options})
    return out


def _plans(fx: dict[str, Any], job_root: Path) -> list[str]:
    """Calibrate, plan and store (float model, plan) per variant; returns the job names."""
    import numpy as np

    from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
    from edgeq.envs import env_factory
    from edgeq.export.qdq import apply_plan
    from edgeq.ingest import load_policy
    from edgeq.quantizers.build import QuantOptions, build_plan
    from edgeq.quantizers.evaluate import action_half_range
    from edgeq.quantizers.precision import with_precision

    paths = fx["paths"]
    policy = load_policy(paths if len(paths) > 1 else paths[0], **fx["options"])
    stats = calibrate_rollouts(policy, env_factory(fx["env"]), [0, 1], noise=ExplorationNoise(gaussian=0.1),
                               num_envs=2, max_steps_per_episode=200, holdout_seeds=[2])
    hr = action_half_range(policy.action_space.low_array, policy.action_space.high_array)
    gate = list(policy.gate_nodes)
    base = QuantOptions(keep_float=gate) if gate else QuantOptions()
    variants: dict[str, Any] = {"default": base}
    if fx["name"].startswith("sac-"):
        variants.update({"crossquant-dynamic": replace(base, dynamic=True, alpha=0.5),
                         "equalize": replace(base, transform="equalize", alpha=0.5),
                         "crossquant-all": replace(base, transform="crossquant", transform_layers="all"),
                         "bias-correction": replace(base, bias_correction=True)})
    jobs = []
    for variant, options in variants.items():
        plan = build_plan(policy.model, stats, options, lower=apply_plan, recurrent=policy.recurrent,
                          half_range=np.asarray(hr))
        todo = [(variant, plan)]
        if variant == "default" and plan.int8_layers():
            todo.append(("fp16-layer", with_precision(plan, plan.int8_layers()[0].node, "fp16", "compare")))
        for label, p in todo:
            job = job_root / f"{fx['name']}__{label}"
            job.mkdir()
            (job / "policy.fp32.onnx").write_bytes(policy.model.SerializeToString(deterministic=True))
            with open(job / "plan.pkl", "wb") as f:
                pickle.dump((p, gate), f)
            jobs.append(job.name)
    return jobs


def _old_tree(rev: str, into: Path) -> Path:
    archive = into / "old.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "edgeq"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "old", filter="data")
    return into / "old"


def _run_lowering(tree: Path, job_root: Path, label: str) -> None:
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, __file__, "--lower", str(job_root), label], env=env, check=True)


def _delta(a: Path, b: Path, measure: Any) -> float | str:
    """max |Δaction| of two files, or why it cannot be measured (a refusal both sides wrote, no CPU kernel)."""
    if a.read_bytes().startswith(b"refused:"):
        return "both refused" if a.read_bytes() == b.read_bytes() else "refusals differ"
    try:
        return float(measure(a, b))
    except Exception as exc:  # noqa: BLE001 - e.g. ONNX Runtime's CPU provider lacks an fp16 kernel
        return f"not run on ORT CPU ({type(exc).__name__})"


def _without_tensor_docs(path: Path) -> bytes:
    """The file with its initializers' doc strings cleared (0c7ed69 marks the CUDA file's dequantized weights)."""
    import onnx

    if path.read_bytes().startswith(b"refused:"):
        return path.read_bytes()
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        t.ClearField("doc_string")
    return m.SerializeToString(deterministic=True)


def _same(same: bool | str) -> str:
    return same if isinstance(same, str) else "yes" if same else "no"


def _fmt(delta: float | str) -> str:
    return f"{delta:.3g}" if isinstance(delta, float) else delta


def main() -> int:
    if "--lower" in sys.argv:
        _lower(Path(sys.argv[sys.argv.index("--lower") + 1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="fc4f45a", help="git revision of the old lowering")
    ap.add_argument("--fixtures", nargs="*", help="fixture names (default: all with an env)")
    ap.add_argument("--out", type=Path, help="write the table (markdown) here")
    ap.add_argument("--keep", type=Path, help="keep the plans and both lowerings in this (new) directory")
    args = ap.parse_args()
    from compare_bundles import max_action_difference

    t0 = time.perf_counter()
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory(prefix="edgeq-lowering-") as tmp:
        tmpd = Path(tmp) if args.keep is None else args.keep
        tmpd.mkdir(parents=True, exist_ok=True)
        jobs = tmpd / "jobs"
        jobs.mkdir()
        for fx in _fixtures(args.fixtures):
            print(f"plan: {fx['name']}", flush=True)
            _plans(fx, jobs)
        old_tree = _old_tree(args.old, tmpd)
        _run_lowering(old_tree, jobs, "old")
        _run_lowering(ROOT, jobs, "new")
        for label, tree in (("old", old_tree), ("new", ROOT)):  # each side ran the code it names
            used = Path((jobs / f"{label}.edgeq").read_text())
            if not used.is_relative_to(tree.resolve()):
                raise SystemExit(f"the {label} lowering imported {used}, not the tree {tree}")
        for job in sorted(p for p in jobs.iterdir() if p.is_dir()):
            fixture, variant = job.name.split("__")
            for name in (*FILES, FP16_FILE):
                a, b = job / "old" / name, job / "new" / name
                if not a.exists():
                    continue
                same: bool | str = a.read_bytes() == b.read_bytes()
                if not same and _without_tensor_docs(a) == _without_tensor_docs(b):
                    same = "initializer doc strings only"
                delta = _delta(a, b, max_action_difference)
                worst = max(worst, delta if isinstance(delta, float) else 0.0 if same else float("inf"))
                rows.append((fixture, variant, name, same, delta, hashlib.sha256(b.read_bytes()).hexdigest()[:12]))
                print(f"{fixture:34s} {variant:20s} {name:22s} bytes {_same(same):6s} "
                      f"max|Δaction| {_fmt(delta)}", flush=True)
    table = ["| fixture | plan | file | bytes identical | max abs Δaction (10k states) | sha256 (new) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {f} | {v} | {n} | {_same(s)} | {_fmt(d)} | {h} |" for f, v, n, s, d, h in rows]
    marks = sum(isinstance(r[3], str) for r in rows)
    summary = (f"{len(rows)} files, {sum(r[3] is True for r in rows)} byte-identical, {marks} identical but for "
               f"initializer doc strings, worst max|Δaction| {worst:.3g} "
               f"({time.perf_counter() - t0:.0f} s)")
    print(summary)
    if args.out:
        cmd = "python scripts/compare_lowering.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Lowering before ({args.old}) and after, same plan\n\nCommand: `{cmd}`\n\n"
                            + "\n".join(table) + f"\n\n{summary}\n")
    return 1 if worst > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
