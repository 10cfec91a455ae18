"""Which layers of ``policy.int8.cpu.onnx`` run INT8 and which run float on their int8 weights, by measurement.

ONNX Runtime's integer GEMM (``MatMulIntegerToFloat``) has a fixed per-call cost that a small
layer's arithmetic never earns back at batch 1: on a 64×64 policy every layer can be slower in
INT8 than in float. A width threshold guesses; this module measures. At export it times the CPU
file at batch 1 (one thread, as ``edgeq.deploy`` runs it) for candidate choices: the width rule's,
every layer float, every layer INT8, then one layer switched at a time from the best so far, and
keeps the fastest. A switch is kept only when it is faster by a clear margin (``margin`` and
``min_gain_us``), so that timing noise does not flip choices; ties go to fewer INT8 layers.

Timing is not reproducible bit for bit, so the choice is *recorded* (``manifest["cpu_layer_selection"]``:
every candidate's time and the chosen float layers) and can be *replayed*: the export profile's
``cpu_float_layers`` (or ``edgeq quantize --cpu-float-layers``) names them and no timing runs. A layer
that runs in float is never called INT8: the manifest's ``cpu_float_layers`` lists it, the summary
and the report say "float (int8 weights)" for it in the CPU file. Its weights stay stored as int8.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import onnx

from edgeq.export.ort_cpu import int8_layer_names, specialize_for_ort_cpu

#: ``timer(model_bytes) -> median µs per batch-1 call`` (injectable for tests).
Timer = Callable[[bytes], float]


def ort_batch1_timer(calls: int = 400, rounds: int = 5) -> Callable[[Sequence[bytes]], list[float]]:
    """Time several models at batch 1 on ONNX Runtime CPU, one thread, in interleaved rounds.

    Returns each model's best (lowest) per-round median in µs: interleaving spreads the machine's
    load over all candidates, the minimum over rounds discards rounds another process disturbed.
    """
    def time_all(models: Sequence[bytes]) -> list[float]:
        import onnxruntime as ort

        from edgeq.deploy.runtime import session_options

        sessions = []
        for blob in models:
            sess = ort.InferenceSession(blob, session_options(intra_op_threads=1),
                                        providers=["CPUExecutionProvider"])
            feeds = {i.name: np.zeros([1 if not isinstance(d, int) or d <= 0 else d for d in i.shape], np.float32)
                     for i in sess.get_inputs()}
            for _ in range(50):  # warm-up
                sess.run(None, feeds)
            sessions.append((sess, feeds))
        best = [float("inf")] * len(sessions)
        samples = np.empty(calls)
        for _ in range(rounds):
            for k, (sess, feeds) in enumerate(sessions):
                for c in range(calls):
                    t0 = time.perf_counter_ns()
                    sess.run(None, feeds)
                    samples[c] = time.perf_counter_ns() - t0
                best[k] = min(best[k], float(np.median(samples)) / 1000.0)
        return best

    return time_all


def select_cpu_float_layers(qdq: onnx.ModelProto, fp32: onnx.ModelProto, *, width_rule: int,
                            keep_int8: Collection[str] = (),
                            timer: Callable[[Sequence[bytes]], list[float]] | None = None,
                            margin: float = 0.03, min_gain_us: float = 0.2) -> tuple[list[str], dict[str, Any]]:
    """Measure and choose the layers the CPU file runs in float; returns them and the record for the manifest."""
    time_all = timer or ort_batch1_timer()
    layers = [n for n in int8_layer_names(qdq) if n not in keep_int8]
    width = specialize_for_ort_cpu(qdq, min_int8_width=width_rule, keep_int8=keep_int8)
    width_set = frozenset(p for p in _float_of(width))
    cache: dict[frozenset[str], float] = {}

    def measure(configs: list[frozenset[str]]) -> None:
        todo = [c for c in dict.fromkeys(configs) if c not in cache]
        if not todo:
            return
        blobs = [specialize_for_ort_cpu(qdq, keep_int8=keep_int8, float_layers=c).SerializeToString() for c in todo]
        for c, us in zip(todo, time_all(blobs), strict=True):
            cache[c] = us

    def better(a: frozenset[str], b: frozenset[str]) -> bool:
        """``a`` clearly faster than ``b`` (or as fast with fewer INT8 layers)."""
        ta, tb = cache[a], cache[b]
        if ta < tb * (1 - margin) and tb - ta >= min_gain_us:
            return True
        return abs(ta - tb) < max(tb * margin, min_gain_us) and len(a) > len(b)

    everything: frozenset[str] = frozenset(layers)
    nothing: frozenset[str] = frozenset()
    measure([width_set, everything, nothing])
    best = width_set
    for cand in (everything, nothing):
        if better(cand, best):
            best = cand
    for name in layers:  # one layer at a time from the best so far
        cand = best ^ {name}
        measure([cand, best])
        if better(cand, best):
            best = cand
    fp32_us = time_all([fp32.SerializeToString()])[0]
    chosen = [n for n in layers if n in best]

    def label(c: frozenset[str]) -> str:
        return "all int8" if not c else "all float" if c == everything else "float: " + ", ".join(
            n for n in layers if n in c)

    record = {"method": "measured", "float_layers": chosen, "int8_layers": [n for n in layers if n not in best],
              "batch1_median_us": {label(c): round(us, 3) for c, us in cache.items()},
              "chosen_us": round(cache[best], 3), "fp32_us": round(fp32_us, 3),
              "width_rule": {"cpu_float_below": width_rule, "float_layers": sorted(width_set)},
              "margin": margin, "min_gain_us": min_gain_us,
              "summary": f"{label(best)} {cache[best]:.1f} us vs all int8 {cache[nothing]:.1f} us, policy.fp32.onnx "
                         f"{fp32_us:.1f} us (batch 1, one thread, best of interleaved rounds)"}
    return chosen, record


def _float_of(model: onnx.ModelProto) -> list[str]:
    from edgeq.export.ort_cpu import cpu_float_layers

    return cpu_float_layers(model)


def replay_record(float_layers: Sequence[str], qdq: onnx.ModelProto, keep_int8: Collection[str] = ()
                  ) -> dict[str, Any]:
    """The manifest record of a replayed choice (no timing)."""
    layers = [n for n in int8_layer_names(qdq) if n not in keep_int8]
    unknown = sorted(set(float_layers) - set(layers))
    if unknown:
        from edgeq.errors import EdgeqError

        raise EdgeqError(f"cpu_float_layers names {unknown}, which are not INT8 layers of this policy; its layers are "
                         f"{layers}")
    return {"method": "replayed", "float_layers": [n for n in layers if n in float_layers],
            "int8_layers": [n for n in layers if n not in float_layers]}
