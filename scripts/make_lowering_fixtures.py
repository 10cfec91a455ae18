"""Freeze plans and the old lowering's outputs as test fixtures (tests/fixtures/lowering/*.json).

Reads a directory written by ``python scripts/compare_lowering.py --keep DIR`` (one plan per fixture
and variant, lowered by the old code of ``--old`` and by the current code) and stores, per chosen
job: the plan (``QuantPlan.to_dict``, exact), the float model's sha256, the sha256 of each file the
**old** lowering wrote, and those files' actions (ONNX Runtime CPU) on 16 states. The fast test
``tests/test_ir_lowering.py`` lowers the stored plan with the current code and compares.

    python scripts/make_lowering_fixtures.py DIR transformer-pendulum__fp16-layer sac-pendulum__crossquant-dynamic
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lowering"
FILES = ("policy.int8.onnx", "policy.int8.cpu.onnx", "policy.int8.cuda.onnx", "policy.fp16.onnx")


def _actions(path: Path, states: np.ndarray) -> list[list[float]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: (states if k == 0 else np.zeros([len(states), *i.shape[1:]], np.float32))
             for k, i in enumerate(sess.get_inputs())}
    return np.asarray(sess.run(None, feeds)[0], np.float32).tolist()


def main() -> int:
    keep, names = Path(sys.argv[1]), sys.argv[2:]
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        job = keep / "jobs" / name
        with open(job / "plan.pkl", "rb") as f:  # written by compare_lowering.py
            plan, keep_int8 = pickle.load(f)  # noqa: S301
        fp32 = (job / "policy.fp32.onnx").read_bytes()
        sess = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
        width = int(sess.get_inputs()[0].shape[-1])
        states = np.random.default_rng(0).normal(0.0, 2.0, (16, width)).astype(np.float32)
        files = [f for f in FILES if (job / "old" / f).exists()
                 and not (job / "old" / f).read_bytes().startswith(b"refused:")]
        record = {
            "job": name,
            "made_by": "the old lowering (git revision fc4f45a, before the IR) in python scripts/compare_lowering.py "
                       f"--keep DIR, then python scripts/make_lowering_fixtures.py DIR {' '.join(names)}",
            "float_sha256": hashlib.sha256(fp32).hexdigest(),
            "keep_int8": list(keep_int8),
            "cpu_float_below": 32,
            "sha256": {f: hashlib.sha256((job / "old" / f).read_bytes()).hexdigest() for f in files},
            "states": states.tolist(),
            "actions": {f: _actions(job / "old" / f, states) for f in files},
            "plan": plan.to_dict(),
        }
        (OUT / f"{name}.json").write_text(json.dumps(record) + "\n")
        print(name, {f: record["sha256"][f][:12] for f in files})
    return 0


if __name__ == "__main__":
    sys.exit(main())
