"""Confidence intervals for rates (termination / fall rates over validation episodes)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgeq.validate.stats import bootstrap_ci

#: two-sided 95% normal quantile
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (well-behaved at 0 and at ``trials``)."""
    if trials <= 0:
        return (float("nan"), float("nan"))
    p = successes / trials
    denom = 1.0 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def termination_stats(terminated: np.ndarray) -> dict[str, Any]:
    """Rate of terminated episodes with its Wilson 95% interval."""
    t = np.asarray(terminated, bool)
    lo, hi = wilson_interval(int(t.sum()), int(t.size))
    return {"termination_rate": float(t.mean()) if t.size else float("nan"), "terminations": int(t.sum()),
            "termination_ci95": [lo, hi]}


def paired_rate_difference(reference: np.ndarray, candidate: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """``candidate - reference`` termination rate on the same seeds, with a paired bootstrap 95% CI.

    ``discordant`` counts the seeds where only one of the two terminated (McNemar's pairs).
    """
    ref, cand = np.asarray(reference, bool), np.asarray(candidate, bool)
    d = cand.astype(np.float64) - ref.astype(np.float64)
    lo, hi = bootstrap_ci(d, seed=seed)
    return {"mean": float(d.mean()) if d.size else float("nan"), "ci95": [lo, hi],
            "only_int8": int(np.sum(cand & ~ref)), "only_float": int(np.sum(ref & ~cand))}
