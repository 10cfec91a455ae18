"""AdaRound (Nagel et al. 2020): round each int8 weight up or down to minimize the layer's output error.

Nearest rounding minimizes each weight's own error; what the policy needs is a small error of the
layer's **output** on the states it visits. With the per-output-channel scale ``s_k`` fixed, each
weight becomes ``s_k (floor(w_kj / s_k) + h_kj)`` with ``h_kj`` in ``{0, 1}``, and the objective on
calibration rows ``n`` (``x^_n``: the layer's int8 input as the quantized graph feeds it; ``x_n``: the
float model's input; ``W~``: the rounded weight) is::

    L(W~) = 1/N sum_n || W~ x^_n - W x_n ||^2
          = sum_k  w~_k^T H w~_k - 2 w~_k^T C w_k + const,   H = X^^T X^ / N,  C = X^^T X / N

so every step works on the ``[in, in]`` Gram matrices ``H`` and ``C`` (computed once): the cost of
an iteration does not grow with the number of calibration states, and the optimization is
full-batch and deterministic.

1. **Soft rounding** (AdaRound proper): ``h = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` with
   ``zeta = 1.1``, ``gamma = -0.1``, ``V`` started at the nearest point's fractional part, Adam on
   ``L / L(nearest) + lam * mean(1 - |2h - 1|^beta)``, ``beta`` annealed from 20 to 2 after a
   warm-up, which drives every ``h`` to 0 or 1; then ``h >= 0.5`` rounds hard.
2. **Flip polish**: coordinate descent on the exact ``L``: for each input column ``j`` (all output
   rows at once), move ``h_kj`` to the other rounding where that lowers ``L``
   (``dL = 2 delta g_kj + delta^2 H_jj``, ``g_k = H w~_k - C w_k``). It never increases ``L``.

The result is clipped to the narrow range ``[-127, 127]`` and **kept only if its output error on
held-out rows is below nearest rounding's**; otherwise nearest rounding is returned, and the report
says which was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeq.quantizers.weights import QMAX, QuantizedWeight

__all__ = ["AdaRoundResult", "adaround", "output_error"]

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundResult:
    """The chosen weight and the output errors (mean over rows of the summed squared error)."""

    weight: QuantizedWeight
    used: bool
    nearest_error: float
    adaround_error: float
    changed_fraction: float

    def to_json(self) -> dict[str, Any]:
        return {"used": self.used, "heldout_output_mse_nearest": self.nearest_error,
                "heldout_output_mse_adaround": self.adaround_error,
                "flipped_fraction": round(self.changed_fraction, 6)}


def split_rows(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``n`` rows into held-out and fit indices (at least one row in each): the rows a
    rounding method fits on and the ones that decide whether it is kept."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(max(1, int(round(holdout_fraction * n))), n - 1)
    return order[:n_hold], order[n_hold:]


def output_error(x_quant: npt.ArrayLike, w_quant: npt.ArrayLike, x_float: npt.ArrayLike,
                 w_float: npt.ArrayLike) -> float:
    """``mean_n || W~ x^_n - W x_n ||^2`` (weights ``[out, in]``), in float64."""
    xq, xf = np.asarray(x_quant, np.float64), np.asarray(x_float, np.float64)
    d = xq @ np.asarray(w_quant, np.float64).T - xf @ np.asarray(w_float, np.float64).T
    return float(np.mean(np.sum(d * d, axis=1)))


def _soft(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``h(V)`` and ``dh/dV``."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0.0) & (raw < 1.0)
    return np.clip(raw, 0.0, 1.0), np.where(inside, (ZETA - GAMMA) * sig * (1.0 - sig), 0.0)


def adaround(weight: npt.ArrayLike, nearest: QuantizedWeight, x_quant: npt.ArrayLike, x_float: npt.ArrayLike,
             *, iters: int = 0, lr: float = 1e-2, reg: float = 0.01, warmup: float = 0.2,
             polish_sweeps: int = 4, holdout_fraction: float = 0.25, seed: int = 0) -> AdaRoundResult:
    """Data-dependent rounding of one layer's weight.

    Args:
        weight: Float weight as ``[out, in]`` (the view the layer multiplies by).
        nearest: Its nearest-rounding quantization in the same ``[out, in]`` view (axis 0): gives
            the per-output-channel scales, which AdaRound keeps.
        x_quant: ``[rows, in]`` inputs as the quantized graph feeds the layer (fake-quantized).
        x_float: ``[rows, in]`` float-model inputs on the same states (target ``x_float @ weight.T``).
        iters: Adam steps of the soft-rounding stage (default 0: flip polish from nearest, which
            measured as good on policy layers at a fraction of the time; see benchmarks/results).
        lr: Adam's learning rate on ``V``. reg: ``lam``. warmup: fraction of steps without the
            rounding regularizer. polish_sweeps: flip-polish sweeps over the input columns.
        holdout_fraction: Rows kept out of the fit, used to accept or reject the result.
        seed: Row split.

    Returns:
        An :class:`AdaRoundResult` whose ``weight`` is in the ``[out, in]`` view (axis 0).
    """
    w = np.asarray(weight, np.float64)
    if nearest.axis != 0 or nearest.q.shape != w.shape:
        raise ValueError(f"nearest must quantize the [out, in] weight {w.shape} along axis 0")
    xq, xf = np.asarray(x_quant, np.float64), np.asarray(x_float, np.float64)
    if xq.shape != xf.shape or xq.ndim != 2 or xq.shape[1] != w.shape[1] or len(xq) < 2:
        raise ValueError(f"inputs must be matching [rows >= 2, {w.shape[1]}] arrays, got {xq.shape}, {xf.shape}")
    hold, fit = split_rows(len(xq), holdout_fraction, seed)
    h_mat = xq[fit].T @ xq[fit] / len(fit)
    c_mat = xq[fit].T @ xf[fit] / len(fit)
    wc = w @ c_mat.T  # rows: C w_k

    scale = nearest.scale.astype(np.float64)[:, None]
    live = ~np.all(nearest.q == 0, axis=1)
    floor = np.floor(w / scale)
    w_near = nearest.dequantize().astype(np.float64)

    def loss_grad(wt: np.ndarray) -> tuple[float, np.ndarray]:
        wh = wt @ h_mat
        return float(np.sum(wh * wt) - 2.0 * np.sum(wt * wc)), 2.0 * (wh - wc)

    base, _ = loss_grad(w_near)
    const = float(np.sum((w @ (xf[fit].T @ xf[fit] / len(fit))) * w))
    norm = max(base + const, 1e-30)

    q = nearest.q.astype(np.float64)
    if iters > 0:
        rest = np.clip(w / scale - floor, 0.0, 1.0)
        p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
        v = np.log(p / (1 - p))
        m1, m2 = np.zeros_like(v), np.zeros_like(v)
        b1, b2, eps = 0.9, 0.999, 1e-8
        warm = int(warmup * iters)
        for it in range(int(iters)):
            h, dh = _soft(v)
            pre = floor + h
            inside = (pre > -QMAX) & (pre < QMAX)
            wt = scale * np.clip(pre, -QMAX, QMAX)
            _, g_w = loss_grad(wt)
            g_h = g_w * scale * inside / norm
            if it >= warm:
                beta = 20.0 + (2.0 - 20.0) * (it - warm) / max(1, iters - warm)
                t = 2.0 * h - 1.0
                g_h = g_h - reg * beta * np.abs(t) ** (beta - 1.0) * np.sign(t) * 2.0 / t.size
            g = g_h * dh
            m1 = b1 * m1 + (1 - b1) * g
            m2 = b2 * m2 + (1 - b2) * g * g
            v = v - lr * (m1 / (1 - b1 ** (it + 1))) / (np.sqrt(m2 / (1 - b2 ** (it + 1))) + eps)
        h, _ = _soft(v)
        q = np.clip(floor + (h >= 0.5), -QMAX, QMAX)
        q[~live] = 0.0
        if loss_grad(scale * q)[0] > base:  # the soft stage lost to nearest on the fit rows: restart there
            q = nearest.q.astype(np.float64)

    # flip polish: exact coordinate descent on L, every output row at once
    wt = scale * q
    g = 2.0 * (wt @ h_mat - wc) / 2.0  # g_k = H w~_k - C w_k
    diag = np.diag(h_mat)
    for _ in range(max(0, int(polish_sweeps))):
        flips = 0
        for j in range(w.shape[1]):
            up = q[:, j] <= floor[:, j]  # at the lower candidate: try +1, else -1
            step = np.where(up, 1.0, -1.0)
            target = q[:, j] + step
            ok = live & (target >= -QMAX) & (target <= QMAX) & (target >= floor[:, j]) & (target <= floor[:, j] + 1)
            delta = step * scale[:, 0]
            gain = 2.0 * delta * g[:, j] + delta * delta * diag[j]
            do = ok & (gain < -1e-12 * norm)
            if do.any():
                q[do, j] = target[do]
                g[do] += delta[do, None] * h_mat[j][None, :]
                flips += int(do.sum())
        if flips == 0:
            break

    cand = QuantizedWeight(q.astype(np.int8), nearest.scale.copy(), 0)
    e_near = output_error(xq[hold], w_near, xf[hold], w)
    e_ada = output_error(xq[hold], cand.dequantize(), xf[hold], w)
    used = e_ada < e_near
    return AdaRoundResult(cand if used else nearest, used, e_near, e_ada, float(np.mean(cand.q != nearest.q)))
