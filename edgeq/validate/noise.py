"""How much closed-loop returns move under tiny and growing action perturbations of the float policy.

* **Noise floor**: the float policy re-rolled on the same seeds with Gaussian action noise at
  float32-rounding level (``1e-6`` of the action half-range), several independent draws. Chaotic
  tasks move their returns under *any* perturbation; a quantized policy whose paired difference
  looks like these draws' differences cannot be told apart from rounding noise.
* **Sensitivity**: the same with noise of increasing size. The return-vs-noise curve is the error
  budget the policy has for quantization; the quantized policy's measured action error is marked on
  it.

Noise is i.i.d. per step, while quantization error is a deterministic function of the state; the
curve is a guide to the scale of tolerable error, not an exact model of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeq.calibration.collect import ExplorationNoise
from edgeq.rollout import BatchPolicy, run_episodes
from edgeq.validate.stats import bootstrap_ci, rms

FLOOR_NOISE = 1e-6
DEFAULT_SENSITIVITY_LEVELS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def perturbed_returns(make_env: Callable[[], Any], policy: BatchPolicy, seeds: Sequence[int], *, sigma: float,
                      draws: int, low: np.ndarray, high: np.ndarray, num_envs: int = 8, draw_seed: int = 0,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Returns [draws, len(seeds)] of ``policy`` with Gaussian action noise ``sigma`` × half-range.

    Draw ``k`` uses noise seed ``draw_seed + k``; actions are clipped to the bounds after noise.
    """
    perturb = ExplorationNoise(gaussian=float(sigma)).make(np.asarray(low, np.float32).ravel(),
                                                           np.asarray(high, np.float32).ravel())
    out = np.zeros((draws, len(seeds)))
    for k in range(draws):
        res = run_episodes(make_env, policy, seeds, num_envs=num_envs, perturb=perturb, noise_seed=draw_seed + k,
                           progress=progress)
        out[k] = res.returns
    return out


def noise_floor(float_returns: np.ndarray, int8_returns: np.ndarray, floor_returns: np.ndarray,
                *, sigma: float = FLOOR_NOISE, seed: int = 0) -> dict[str, Any]:
    """Compare int8's per-seed differences with those of float re-rolled under rounding-level noise.

    ``floor_returns`` is [draws, seeds]. ``int8_minus_floor`` is the per-seed ``int8 - mean over
    draws of floor``, with a bootstrap CI of its mean: when the CI excludes 0 the quantized policy is
    distinguishable from the floor. ``spread_ratio`` = RMS of int8's per-episode differences over
    the RMS of the floor draws' per-episode differences (how much more int8 moves single episodes).
    """
    f = np.asarray(float_returns, np.float64)
    q = np.asarray(int8_returns, np.float64)
    fl = np.atleast_2d(np.asarray(floor_returns, np.float64))
    floor_diff = fl - f[None, :]
    per_draw_mean = floor_diff.mean(axis=1)
    d_q = q - f
    vs_floor = q - fl.mean(axis=0)
    lo, hi = bootstrap_ci(vs_floor, seed=seed)
    floor_rms = rms(floor_diff)
    int8_rms = rms(d_q)
    # The floor band: the spread of a draw's mean paired difference (the floor for the mean).
    band = (float(per_draw_mean.min()), float(per_draw_mean.max()))
    distinguishable = not (lo <= 0.0 <= hi)
    return {
        "relative_noise": sigma, "draws": int(fl.shape[0]),
        "per_draw_mean_difference": [float(x) for x in per_draw_mean],
        "mean_difference": float(per_draw_mean.mean()),
        "std_of_draw_means": float(per_draw_mean.std(ddof=1)) if fl.shape[0] > 1 else 0.0,
        "band": list(band),
        "per_episode_rms": floor_rms,
        "per_seed_mean_difference": [float(x) for x in floor_diff.mean(axis=0)],
        "int8_per_episode_rms": int8_rms,
        "spread_ratio": int8_rms / floor_rms if floor_rms > 0 else (float("inf") if int8_rms > 0 else 1.0),
        "int8_minus_floor": {"mean": float(vs_floor.mean()), "ci95": [lo, hi]},
        "distinguishable": bool(distinguishable),
        "returns": [[float(x) for x in row] for row in fl],
    }


def sensitivity_curve(float_returns: np.ndarray, returns_by_level: dict[float, np.ndarray],
                      *, tolerance: float, int8_normalized_rms: float | None = None) -> dict[str, Any]:
    """Mean return vs action-noise level, and the level where the drop first exceeds ``tolerance``.

    ``returns_by_level[sigma]`` is [draws, seeds]. ``budget`` interpolates, in log-noise, the level
    where the mean paired drop crosses ``tolerance`` × |float mean| (None if no level crosses).
    """
    f = np.asarray(float_returns, np.float64)
    base = float(f.mean())
    levels = sorted(returns_by_level)
    rows = []
    for s in levels:
        r = np.atleast_2d(np.asarray(returns_by_level[s], np.float64))
        draw_means = r.mean(axis=1)
        d = (r - f[None, :]).mean(axis=0)
        rows.append({"sigma": float(s), "mean": float(draw_means.mean()),
                     "std_of_draw_means": float(draw_means.std(ddof=1)) if len(draw_means) > 1 else 0.0,
                     "min_draw_mean": float(draw_means.min()), "max_draw_mean": float(draw_means.max()),
                     "mean_difference": float(d.mean()),
                     "relative_drop": float(-d.mean() / abs(base)) if base != 0 else float("nan"),
                     "draws": int(r.shape[0])})
    limit = tolerance * abs(base)
    budget = None
    prev_s, prev_drop = None, 0.0
    for row in rows:
        drop = -row["mean_difference"]
        if drop > limit:
            if prev_s is None:
                budget = row["sigma"]
            else:
                t = (limit - prev_drop) / (drop - prev_drop) if drop != prev_drop else 0.0
                budget = float(10 ** (np.log10(prev_s) + t * (np.log10(row["sigma"]) - np.log10(prev_s))))
            break
        prev_s, prev_drop = row["sigma"], drop
    out: dict[str, Any] = {"float_mean": base, "levels": rows, "tolerance": tolerance, "budget_sigma": budget,
                           "noise": "Gaussian per step, std = sigma x action half-range, clipped to bounds"}
    if int8_normalized_rms is not None:
        out["int8_normalized_rms"] = float(int8_normalized_rms)
        if budget is not None:
            out["int8_fraction_of_budget"] = float(int8_normalized_rms / budget)
    return out
