"""Closed-loop-aware weights for the action error: how much value an action error costs at each state.

The held-out action error treats every state and action dimension alike; the return does not. Where
the policy's own Q critic is available (off-policy SB3 archives: :mod:`edgeq.ingest.sb3_critic`),
the value an action error costs is measured directly: at state ``s`` with the float action ``a``,

    w_sj = ( |Q(s, a) - Q(s, a + eps h_j e_j)| + |Q(s, a) - Q(s, a - eps h_j e_j)| ) / (2 eps)

(``h_j`` the action half-range, ``eps`` a fraction of it), the value lost per unit of normalized
error in dimension ``j``; the weights are divided by their mean, so a uniform sensitivity gives the
plain error back. :class:`~edgeq.quantizers.evaluate.ActionErrorScorer` multiplies the per-state,
per-dimension errors by them (``objective: critic``), and the whole-network reconstruction weights
its squared errors by them. :func:`value_loss` is the critic's estimate of the value a quantized
policy loses, per state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["OBJECTIVES", "ValueFn", "value_loss", "value_sensitivity"]

#: ``QuantOptions.objective``: the plain action error, or the action error weighted by the critic's value sensitivity.
OBJECTIVES = ("action", "critic")

#: ``Q(obs [N, o], actions [N, a]) -> [N]`` in env units (e.g. :class:`edgeq.ingest.sb3_critic.Critic`).
ValueFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def value_sensitivity(critic: ValueFn, states: np.ndarray, actions: np.ndarray, half_range: np.ndarray, *,
                      eps: float = 0.05, low: np.ndarray | None = None, high: np.ndarray | None = None,
                      floor: float = 0.05) -> np.ndarray:
    """``[N, act]`` weights (mean 1) of the normalized action error, from the critic's response to ``±eps``.

    Perturbed actions are clipped to ``[low, high]`` when given. ``floor`` (a fraction of the mean)
    keeps every weight positive, so no state's error is ignored entirely.
    """
    s = np.asarray(states, np.float64)
    a = np.asarray(actions, np.float64)
    hr = np.asarray(half_range, np.float64).reshape(-1)
    q0 = np.asarray(critic(s, a), np.float64)
    w = np.zeros_like(a)
    for j in range(a.shape[1]):
        for sign in (1.0, -1.0):
            ap = a.copy()
            ap[:, j] += sign * eps * hr[j]
            if low is not None and high is not None:
                ap = np.clip(ap, low, high)
            w[:, j] += np.abs(q0 - np.asarray(critic(s, ap), np.float64)) / (2.0 * eps)
    mean = float(w.mean())
    if not np.isfinite(mean) or mean <= 0:
        return np.ones_like(w)
    w = w / mean
    return np.maximum(w, floor)


def value_loss(critic: ValueFn, states: np.ndarray, float_actions: np.ndarray,
               quant_actions: np.ndarray) -> np.ndarray:
    """``[N]``: ``Q(s, a_float) - Q(s, a_int8)``, the value the quantized action gives up per state."""
    s = np.asarray(states, np.float64)
    return np.asarray(critic(s, float_actions), np.float64) - np.asarray(critic(s, quant_actions), np.float64)
