"""CPU latency of float vs INT8 policies under ONNX Runtime (one thread), plus file sizes.

Compares, on the same SB3 policy and the same calibration observations:

* ``float``      the float ONNX policy edgeq exports;
* ``edgeq-int8`` edgeq's INT8 policy as ``edgeq.deploy`` runs it on CPU (``policy.int8.cpu.onnx``:
  integer kernels, the layers narrower than ``cpu_float_below`` in float on their int8 weights);
* ``edgeq-allint8`` the same CPU file with every layer in int8 (``cpu_float_below: 0``);
* ``edgeq-qdq``  edgeq's portable QDQ file (``policy.int8.onnx``, the TensorRT one) under ORT;
* ``ort-qdq``    ONNX Runtime's own ``quantize_static`` QDQ output (per-channel, symmetric, int8),
  run with default session options, for reference.

Usage::

    edgeq quantize tests/fixtures/policies/sac-halfcheetah.zip --env HalfCheetah-v5 --out /tmp/hc
    python benchmarks/cpu_latency.py tests/fixtures/policies/sac-halfcheetah.zip --env HalfCheetah-v5 \
        --bundle /tmp/hc

With ``--bundle`` the edgeq models are the bundle's own files (the default quantization settings);
without it a plain percentile plan is made here.

Per batch size: ``--rounds`` rounds, each timing ``--calls`` calls of every model in turn (interleaved,
so machine noise hits all models alike); the figure is the median over rounds of each round's
median. One intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.calibration.collect import ExplorationNoise, calibrate_rollouts
from edgeq.deploy.runtime import OrtPolicy
from edgeq.envs import env_factory
from edgeq.export.ort_cpu import DEFAULT_CPU_FLOAT_BELOW, specialize_for_ort_cpu
from edgeq.export.qdq import apply_plan
from edgeq.ingest import load_policy
from edgeq.quantizers.plan import make_plan


def ort_quantize_static(float_path: Path, out: Path, observations: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"obs": observations[i:i + 1]} for i in range(len(observations))])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def plain_session(path: Path) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def time_calls(run, x: np.ndarray, calls: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    for _ in range(max(200, calls // 10)):
        run(x)
    ts = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        run(x)
        ts[i] = time.perf_counter() - t0
    return {"median_us": float(np.median(ts) * 1e6), "p99_us": float(np.percentile(ts, 99) * 1e6)}


def file_size(path: Path) -> int:
    """Bytes of the model including any external-data files beside it."""
    m = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / e).stat().st_size for e in extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy")
    ap.add_argument("--env", required=True)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--bundle", type=Path, help="use this edgeq bundle's fp32/int8 files")
    args = ap.parse_args()

    policy = load_policy(args.policy)
    stats = calibrate_rollouts(policy, env_factory(args.env), list(range(1_000_000, 1_000_005)),
                               noise=ExplorationNoise(gaussian=0.1))
    plan = make_plan(policy.model, stats.observers)
    tmp = Path(tempfile.mkdtemp())
    fpath, qpath = tmp / "policy.fp32.onnx", tmp / "policy.int8.onnx"
    fpath.write_bytes(policy.model.SerializeToString())
    qmodel = apply_plan(policy.model, plan)
    qpath.write_bytes(qmodel.SerializeToString())
    cpath = tmp / "policy.int8.cpu.onnx"
    cpath.write_bytes(specialize_for_ort_cpu(qmodel, min_int8_width=DEFAULT_CPU_FLOAT_BELOW).SerializeToString())
    if args.bundle is not None:
        fpath, qpath, cpath = (args.bundle / n for n in ("policy.fp32.onnx", "policy.int8.onnx",
                                                         "policy.int8.cpu.onnx"))
        qmodel = onnx.load(str(qpath))
    # the CPU file with every layer in int8 (profile cpu_float_below: 0): same arithmetic as the QDQ file
    apath = tmp / "policy.int8.cpu.all-int8.onnx"
    apath.write_bytes(specialize_for_ort_cpu(qmodel, min_int8_width=0).SerializeToString())
    opath = ort_quantize_static(fpath, tmp / "ort.qdq.onnx", stats.observations[:512])

    runners = {
        "float": plain_session(fpath),
        "edgeq-int8": OrtPolicy(cpath).session,
        "edgeq-allint8": OrtPolicy(apath).session,
        "edgeq-qdq": OrtPolicy(qpath).session,
        "ort-qdq": plain_session(opath),
    }
    rows = {}
    rng = np.random.default_rng(0)
    for b in [int(s) for s in args.batches.split(",")]:
        x = stats.observations[rng.integers(0, len(stats.observations), b)].astype(np.float32)
        per_round: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, sess in runners.items():
                per_round[name].append(time_calls(lambda v, s=sess: s.run(None, {"obs": v}), x, args.calls))
        for name, rs in per_round.items():
            rows.setdefault(name, {})[b] = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
    sizes = {"float": file_size(fpath), "edgeq-int8": file_size(cpath), "edgeq-allint8": file_size(apath),
             "edgeq-qdq": file_size(qpath),
             "ort-qdq": file_size(opath)}
    result = {"policy": args.policy, "bundle": str(args.bundle) if args.bundle else None, "env": args.env,
              "ort": ort.__version__, "cpu": platform.processor(),
              "calls": args.calls, "rounds": args.rounds, "latency": rows, "sizes": sizes}
    print(f"{'model':13s} " + " ".join(f"{'b=' + str(b) + ' med µs':>14s}" for b in rows["float"])
          + "   ratio to float (median)" + "   size")
    for name, r in rows.items():
        meds = [r[b]["median_us"] for b in r]
        ratios = [r[b]["median_us"] / rows["float"][b]["median_us"] for b in r]
        print(f"{name:13s} " + " ".join(f"{m:14.1f}" for m in meds) + "   "
              + " ".join(f"{x:5.2f}" for x in ratios) + f"   {sizes[name] / 1024:.1f} KiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
