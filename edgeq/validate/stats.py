"""Statistics for paired float-vs-quantized rollouts (pure numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_ci(values: np.ndarray, *, confidence: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (deterministic for a given seed).

    Constant ``values`` give the degenerate interval ``(v, v)``; an empty array gives NaNs.
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    if np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def describe(returns: np.ndarray) -> dict[str, float]:
    """Mean, sample std, min, max and count of a set of episode returns."""
    r = np.asarray(returns, np.float64)
    return {"mean": float(r.mean()), "std": float(r.std(ddof=1)) if r.size > 1 else 0.0,
            "min": float(r.min()), "max": float(r.max()), "episodes": int(r.size)}


def paired_difference(reference: np.ndarray, candidate: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """``candidate - reference`` per seed: mean, std, bootstrap 95% CI, and the relative change."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    d = cand - ref
    lo, hi = bootstrap_ci(d, seed=seed)
    denom = abs(float(ref.mean())) or 1.0
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "ci95": [lo, hi], "relative_mean": float(d.mean()) / denom,
            "ratio_of_means": float(cand.mean() / ref.mean()) if ref.mean() != 0 else float("nan"),
            "per_episode": [float(x) for x in d]}


def rms(values: np.ndarray) -> float:
    v = np.asarray(values, np.float64)
    return float(np.sqrt(np.mean(v * v))) if v.size else 0.0


class ActionErrorAccumulator:
    """Streaming |a_candidate - a_reference| statistics: mean, RMS, max, p99, per action dimension.

    Percentiles come from a bounded uniform reservoir of per-step error rows (at most ``capacity``
    steps kept), so memory stays bounded on long validations. ``scale`` (e.g. the action
    half-range) gives the normalized figures used against the sensitivity curve.
    """

    def __init__(self, act_dim: int, capacity: int = 100_000, seed: int = 0,
                 scale: np.ndarray | None = None) -> None:
        self.act_dim = act_dim
        self.sum = np.zeros(act_dim)
        self.sumsq = np.zeros(act_dim)
        self.max = np.zeros(act_dim)
        self.count = 0
        self._res = np.zeros((capacity, act_dim))
        self._seen = 0
        self._rng = np.random.default_rng(seed)
        self.scale = np.ones(act_dim) if scale is None else np.asarray(scale, np.float64).reshape(act_dim)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        err = np.abs(np.asarray(candidate, np.float64) - np.asarray(reference, np.float64))
        err = err.reshape(len(err), -1) if err.size else err
        if err.size == 0:
            return
        self.sum += err.sum(axis=0)
        self.sumsq += (err * err).sum(axis=0)
        self.max = np.maximum(self.max, err.max(axis=0))
        self.count += err.shape[0]
        cap = self._res.shape[0]
        fill = max(0, min(cap - self._seen, len(err)))
        if fill:
            self._res[self._seen:self._seen + fill] = err[:fill]
            self._seen += fill
        for row in err[fill:]:
            if self._seen < cap:
                self._res[self._seen] = row
            else:
                j = int(self._rng.integers(0, self._seen + 1))
                if j < cap:
                    self._res[j] = row
            self._seen += 1

    @classmethod
    def merge(cls, parts: list[ActionErrorAccumulator]) -> ActionErrorAccumulator:
        """One accumulator from several over disjoint steps, in the given order (deterministic).

        Sums, maxima and counts are exact; the percentile reservoir keeps every row while they fit
        and otherwise a sample in which each part is weighted by the steps it saw.
        """
        if not parts:
            raise ValueError("merge needs at least one accumulator")
        first = parts[0]
        cap = first._res.shape[0]
        out = cls(first.act_dim, capacity=cap, scale=first.scale)
        for p in parts:
            out.sum += p.sum
            out.sumsq += p.sumsq
            out.max = np.maximum(out.max, p.max)
            out.count += p.count
        kept = [p._res[: min(p._seen, p._res.shape[0])] for p in parts]
        rows = np.concatenate(kept) if kept else np.zeros((0, first.act_dim))
        seen = sum(p._seen for p in parts)
        if len(rows) > cap:
            weights = np.concatenate([np.full(len(k), p._seen / max(len(k), 1)) for k, p in zip(kept, parts,
                                                                                               strict=True)])
            idx = np.sort(np.random.default_rng(0).choice(len(rows), size=cap, replace=False,
                                                          p=weights / weights.sum()))
            rows = rows[idx]
        out._res[: len(rows)] = rows
        out._seen = seen
        return out

    def summary(self) -> dict[str, Any]:
        """Mean/RMS/max/p99 over all steps and per action dimension (absolute and normalized)."""
        if self.count == 0:
            return {"steps": 0}
        per_dim_mean = self.sum / self.count
        per_dim_rms = np.sqrt(self.sumsq / self.count)
        kept = self._res[: min(self._seen, self._res.shape[0])]
        normalized = kept / self.scale
        return {"steps": int(self.count), "mean_abs": float(per_dim_mean.mean()), "max_abs": float(self.max.max()),
                "rms": float(np.sqrt(self.sumsq.sum() / (self.count * self.act_dim))),
                "p99_step_max_abs": float(np.percentile(kept.max(axis=1), 99)),
                "per_dim_mean_abs": [float(x) for x in per_dim_mean],
                "per_dim_rms": [float(x) for x in per_dim_rms],
                "per_dim_p99_abs": [float(x) for x in np.percentile(kept, 99, axis=0)],
                "per_dim_max_abs": [float(x) for x in self.max],
                "normalized_rms": float(np.sqrt(np.mean(normalized * normalized))),
                "normalized_by": "action half-range"}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (inf, nan) replaced by None, so the JSON is strict.

    Infinite SQNR (no error at all) and undefined ratios become ``null``; readers treat that as
    "not applicable".
    """
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
