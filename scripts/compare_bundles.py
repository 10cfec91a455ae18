"""Compare two sets of bundles made with the same seeds (say before and after a refactoring).

For every bundle directory that both BEFORE and AFTER hold: whether each ONNX file is byte-identical,
the largest |Δaction| of the two files over 10,000 random states (recurrent policies: 100 envs ×
100 steps, state carried), and whether the validation returns are identical. Exit 1 on any difference.

    python scripts/compare_bundles.py BEFORE_DIR AFTER_DIR

Make the two sets with the same command and seed, e.g.
``edgeq quantize tests/fixtures/policies/sac-pendulum.zip --env Pendulum-v1 --out BEFORE/sac-pendulum --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

FILES = ("policy.int8.onnx", "policy.int8.cpu.onnx", "policy.int8.cuda.onnx", "policy.fp32.onnx")


def max_action_difference(a: Path, b: Path, n: int = 10_000, seed: int = 0) -> float:
    """Largest |action_a - action_b| over ``n`` states drawn from N(0, 2²) (state carried if recurrent)."""
    sa = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"])
    inputs = sa.get_inputs()
    obs = inputs[0]
    x = np.random.default_rng(seed).normal(0.0, 2.0, (n, int(obs.shape[-1]))).astype(np.float32)
    if len(inputs) == 1:
        return float(np.abs(sa.run(None, {obs.name: x})[0] - sb.run(None, {obs.name: x})[0]).max())
    envs = 100
    zeros = {i.name: np.zeros([envs, *i.shape[1:]], np.float32) for i in inputs[1:]}
    state_a, state_b, worst = dict(zeros), dict(zeros), 0.0
    for t in range(n // envs):
        xt = x[t * envs:(t + 1) * envs]
        ra, rb = sa.run(None, {obs.name: xt, **state_a}), sb.run(None, {obs.name: xt, **state_b})
        worst = max(worst, float(np.abs(ra[0] - rb[0]).max()))
        state_a = {i.name: ra[k + 1] for k, i in enumerate(inputs[1:])}
        state_b = {i.name: rb[k + 1] for k, i in enumerate(inputs[1:])}
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    names = sorted(p.name for p in args.before.iterdir() if (p / "manifest.json").is_file()
                   and (args.after / p.name / "manifest.json").is_file())
    if not names:
        print(f"no bundle directory is in both {args.before} and {args.after}", file=sys.stderr)
        return 2
    same = True
    for name in names:
        a, b = args.before / name, args.after / name
        for f in FILES:
            if not (a / f).is_file() or not (b / f).is_file():
                continue
            identical = (a / f).read_bytes() == (b / f).read_bytes()
            d = max_action_difference(a / f, b / f)
            same &= identical or d == 0.0
            print(f"{name:20s} {f:24s} bytes identical: {identical}   max|Δaction| = {d:.3g} (10,000 states)")
        va, vb = (json.loads((d / "validation.json").read_text()) for d in (a, b))
        for target in sorted(set(va.get("targets", {})) & set(vb.get("targets", {}))):
            for side in ("float", "int8"):
                ra, rb = va["targets"][target][side]["returns"], vb["targets"][target][side]["returns"]
                same &= ra == rb
                print(f"{name:20s} validation {target}/{side}: returns identical: {ra == rb}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
