"""Inference latency of a bundle's models on a target: batch 1 tail latency and large-batch throughput.

Timed through :class:`~edgeq.deploy.runtime.OrtPolicy` (what ``edgeq.deploy`` runs on the robot),
one intra-op thread, after a warm-up. Float and int8 are measured in alternating blocks so that
load from other processes affects both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeq.deploy.runtime import OrtPolicy

HIST_BINS = 60


def _summary(us: np.ndarray) -> dict[str, float]:
    return {"calls": int(us.size), "median_us": float(np.median(us)), "mean_us": float(us.mean()),
            "p90_us": float(np.percentile(us, 90)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "max_us": float(us.max())}


def measure_latency(sessions: dict[str, OrtPolicy], observations: np.ndarray, *, calls: int = 10_000,
                    warmup: int = 500, block: int = 1000, large_batch: int = 4096, large_calls: int = 20,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Batch-1 latency over ``calls`` calls per session and per-call/per-sample time at ``large_batch``.

    ``sessions`` maps a model name ("float", "int8", ...) to its runtime. ``observations`` are real
    visited states (cycled through). Returns per model name the summaries
    and the raw batch-1 samples under ``"_samples_us"`` (for histograms; drop before saving JSON).
    """
    obs = np.ascontiguousarray(observations, np.float32)
    if obs.ndim != 2 or len(obs) == 0:
        raise ValueError("measure_latency needs a non-empty [N, obs_dim] array of observations")
    samples = {name: np.zeros(calls) for name in sessions}
    rows = [obs[i:i + 1] for i in range(min(len(obs), 1024))]
    for rt in sessions.values():
        for i in range(warmup):
            rt.act(rows[i % len(rows)])
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name, rt in sessions.items():
            buf = samples[name]
            for i in range(n):
                x = rows[(done + i) % len(rows)]
                t0 = time.perf_counter_ns()
                rt.act(x)
                buf[done + i] = (time.perf_counter_ns() - t0) / 1000.0
        done += n
        if progress is not None:
            progress(n * len(sessions))
    big = obs[np.arange(large_batch) % len(obs)] if large_batch > 0 else None
    out: dict[str, Any] = {"providers": {name: rt.providers[:1] for name, rt in sessions.items()},
                           "warmup_calls": warmup, "models": {}}
    for name, rt in sessions.items():
        entry: dict[str, Any] = {"batch1": _summary(samples[name])}
        if big is not None:
            rt.reset(None)
            rt.act(big)
            rt.act(big)
            ts = []
            for _ in range(large_calls):
                rt.reset(None)
                t0 = time.perf_counter_ns()
                rt.act(big)
                ts.append((time.perf_counter_ns() - t0) / 1000.0)
            t = np.asarray(ts)
            entry["large_batch"] = {"batch": int(large_batch), "calls": large_calls,
                                    "median_us_per_call": float(np.median(t)),
                                    "median_us_per_sample": float(np.median(t) / large_batch),
                                    "samples_per_s": float(large_batch / (np.median(t) * 1e-6))}
        hist, edges = np.histogram(np.log10(np.clip(samples[name], 1e-3, None)), bins=HIST_BINS)
        entry["batch1_histogram"] = {"log10_us_edges": [float(e) for e in edges], "counts": [int(c) for c in hist]}
        entry["_samples_us"] = samples[name]
        out["models"][name] = entry
    f, q = out["models"].get("float"), out["models"].get("int8")
    if f and q:
        out["int8_speedup_batch1_median"] = f["batch1"]["median_us"] / q["batch1"]["median_us"]
        if "large_batch" in f:
            out["int8_speedup_large_batch"] = (f["large_batch"]["median_us_per_call"]
                                               / q["large_batch"]["median_us_per_call"])
    return out


def strip_samples(latency: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy without the raw samples."""
    return {**latency, "models": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                  for k, v in latency.get("models", {}).items()}}
