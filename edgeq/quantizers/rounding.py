"""Per-layer rounding of int8 weights beyond nearest: GPTQ/OBQ error compensation and stochastic rounding.

Both keep the per-output-channel scales of the nearest quantization (``[out, in]`` view, axis 0) and
change only the integers, so the layer stays W8 exactly as TensorRT runs it.

**GPTQ** (Frantar et al. 2023, the OBQ solver in column order). The layer's target is the float
model's output ``W x`` on calibration rows, while the int8 graph feeds it ``x^`` (the quantized
input). First the weight is moved to the least-squares target for the input it will really see,
``W_t = W + W (C - H) (H + lam I)^-1`` with ``H = X^^T X^ / N`` and ``C = X^T X^ / N`` (the ridge
solution of ``min || W_t X^ - W X ||^2 + lam || W_t - W ||^2``: it compensates the input's
quantization error and is ``W`` itself when the input is exact), then its columns are quantized one at a
time, each column's rounding error spread over the not-yet-quantized columns with the inverse
Hessian's Cholesky factor, so that ``|| (W~ - W_t) X^ ||`` stays small. A weight whose target would
need more than the channel's range is clipped to ``[-127, 127]``.

**Stochastic rounding**: each weight rounds up with probability equal to its fractional part
(seeded): unbiased, a candidate that the plan keeps only if it lowers the action error.

:func:`gptq_round` keeps the result only if its output error on held-out rows is below nearest
rounding's (like :func:`edgeq.quantizers.adaround.adaround`), and reports which was used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeq.quantizers.adaround import output_error, split_rows
from edgeq.quantizers.weights import QMAX, QuantizedWeight

__all__ = ["RoundingResult", "gptq_round", "gptq_quantize", "stochastic_round"]


@dataclass(frozen=True)
class RoundingResult:
    """The chosen weight (``[out, in]`` view, axis 0) and the held-out output errors."""

    weight: QuantizedWeight
    used: bool
    method: str
    nearest_error: float
    method_error: float
    changed_fraction: float

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "used": self.used, "heldout_output_mse_nearest": self.nearest_error,
                f"heldout_output_mse_{self.method}": self.method_error,
                "changed_fraction": round(self.changed_fraction, 6)}


def gptq_quantize(w_target: npt.ArrayLike, scale: npt.ArrayLike, hessian: npt.ArrayLike, *,
                  live: npt.ArrayLike | None = None, damp: float = 0.01, qmax: int = QMAX) -> np.ndarray:
    """The GPTQ integers of ``w_target`` (``[out, in]``) for fixed per-row ``scale`` and input Gram ``hessian``.

    Columns are quantized in order; after column ``j`` the error ``(w_j - s q_j) / U_jj`` times row
    ``j`` of ``U`` (the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``) is subtracted
    from the later columns. Returns float64 integers in ``[-qmax, qmax]`` (dead rows: 0). ``scale`` is
    per row (``[out]``) or per element (``[out, in]``: int4 blocks, :mod:`edgeq.quantizers.int4`).
    """
    w = np.array(w_target, np.float64, copy=True)
    s_in = np.asarray(scale, np.float64)
    s = s_in if s_in.ndim == 2 else s_in.reshape(-1, 1)
    h = np.array(hessian, np.float64, copy=True)
    n = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += float(damp) * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(n)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.zeros_like(w)
    for j in range(n):
        col = w[:, j]
        sj = s[:, j] if s.shape[1] > 1 else s[:, 0]
        qj = np.clip(np.rint(col / sj), -qmax, qmax)
        q[:, j] = qj
        err = (col - sj * qj) / hinv[j, j]
        if j + 1 < n:
            w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    if live is not None:
        q[~np.asarray(live, bool)] = 0.0
    return q


def gptq_target(w: np.ndarray, x_quant: np.ndarray, x_float: np.ndarray, damp: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """The Hessian ``H = X̂ᵀX̂ / n`` of the quantized inputs and the least-squares weight target for them,
    ridge-regularized towards ``w`` (not towards 0): ``w + w (C - H) (H + λI)⁻¹`` with ``C = XᵀX̂ / n``,
    so that ``target · x̂ ≈ w · x`` (the float layer's output on the float model's inputs)."""
    h = x_quant.T @ x_quant / len(x_quant)
    c = x_float.T @ x_quant / len(x_quant)
    lam = float(damp) * max(float(np.mean(np.diag(h))), 1e-12)
    return h, w + w @ (c - h) @ np.linalg.inv(h + lam * np.eye(len(h)))


def gptq_round(weight: npt.ArrayLike, nearest: QuantizedWeight, x_quant: npt.ArrayLike, x_float: npt.ArrayLike, *,
               damp: float = 0.01, holdout_fraction: float = 0.25, seed: int = 0) -> RoundingResult:
    """GPTQ rounding of one layer (``weight`` and ``nearest`` in the ``[out, in]`` view, axis 0).

    ``x_quant``: ``[rows, in]`` inputs as the quantized graph feeds the layer; ``x_float``: the float
    model's inputs on the same states. A quarter of the rows (``holdout_fraction``) is kept out of
    the fit and decides between GPTQ and nearest rounding.
    """
    w = np.asarray(weight, np.float64)
    if nearest.axis != 0 or nearest.q.shape != w.shape:
        raise ValueError(f"nearest must quantize the [out, in] weight {w.shape} along axis 0")
    xq, xf = np.asarray(x_quant, np.float64), np.asarray(x_float, np.float64)
    if xq.shape != xf.shape or xq.ndim != 2 or xq.shape[1] != w.shape[1] or len(xq) < 2:
        raise ValueError(f"inputs must be matching [rows >= 2, {w.shape[1]}] arrays, got {xq.shape}, {xf.shape}")
    hold, fit = split_rows(len(xq), holdout_fraction, seed)
    h, w_t = gptq_target(w, xq[fit], xf[fit], damp)
    live = ~np.all(nearest.q == 0, axis=1)
    q = gptq_quantize(w_t, nearest.scale, h, live=live, damp=damp)
    cand = QuantizedWeight(q.astype(np.int8), nearest.scale.copy(), 0)
    e_near = output_error(xq[hold], nearest.dequantize(), xf[hold], w)
    e_new = output_error(xq[hold], cand.dequantize(), xf[hold], w)
    used = e_new < e_near
    return RoundingResult(cand if used else nearest, used, "gptq", e_near, e_new,
                          float(np.mean(cand.q != nearest.q)))


def stochastic_round(weight: npt.ArrayLike, nearest: QuantizedWeight, *, seed: int = 0) -> QuantizedWeight:
    """Round each weight up with probability equal to its fractional part (scales of ``nearest``, any axis)."""
    w = np.asarray(weight, np.float64)
    if nearest.q.shape != w.shape:
        raise ValueError(f"nearest has shape {nearest.q.shape}, the weight {w.shape}")
    s = nearest.scale_broadcast().astype(np.float64)
    x = w / s
    lo = np.floor(x)
    u = np.random.default_rng(seed).random(w.shape)
    q = np.clip(lo + (u < (x - lo)), -QMAX, QMAX)
    dead = np.all(nearest.q == 0, axis=tuple(i for i in range(w.ndim) if i != nearest.axis), keepdims=True)
    q = np.where(dead, 0.0, q)
    return QuantizedWeight(q.astype(np.int8), nearest.scale.copy(), nearest.axis)
