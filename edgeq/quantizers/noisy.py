"""NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias added before an activation quantizer, removed after the GEMM.

For an int8 layer ``Y = Q(X) W_qᵀ + b``, NoisyQuant quantizes ``X + N`` instead, with ``N`` a fixed
vector (one value per input channel, the same for every call) drawn once from ``U(-K/2, K/2)``, and
removes it through the bias::

    Y = Q(X + N) W_qᵀ + (b − N W_qᵀ)

``N W_qᵀ`` uses the layer's **int8** weight, so without the input quantizer the noise cancels exactly
(``(X + N) W_qᵀ − N W_qᵀ = X W_qᵀ``); with it, each channel's rounding error is that of a shifted grid,
which flattens the peaks of a channel's distribution relative to the grid (the paper's result: a lower
expected quantization error for heavy-tailed/peaked inputs, under conditions on ``K``). In the graph the
noise is one fp32 ``Add`` of a constant in front of the layer's ``QuantizeLinear`` (a pre-op like
CrossQuant's ``Mul``) and a changed float bias: every layer stays one INT8 GEMM (TensorRT's QDQ rules hold).

:func:`noisy_bias` chooses ``K`` per layer among fractions of the quantization step ``Δ = amax / 127``
on calibration rows and keeps the noise only if the layer's output error on held-out rows drops (as
GPTQ/AdaRound keep their rounding); the noise itself is seeded, so the same inputs give the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeq.quantizers.adaround import split_rows

__all__ = ["DEFAULT_FRACTIONS", "NoisyResult", "fake_quant_noisy", "noisy_bias"]

#: Candidate noise ranges ``K`` as fractions of the input's quantization step.
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class NoisyResult:
    """The chosen noise (``None``: none beat the plain quantizer) and the held-out output errors."""

    noise: np.ndarray | None
    fraction: float
    plain_error: float
    noisy_error: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"used": self.noise is not None, "range_in_steps": self.fraction, "seed": self.seed,
                "heldout_output_mse_plain": self.plain_error, "heldout_output_mse_noisy": self.noisy_error}


def fake_quant_noisy(x: npt.ArrayLike, amax: float, noise: npt.ArrayLike | None = None) -> np.ndarray:
    """``Q(x + N) − N`` in float (what the layer's GEMM effectively reads); ``noise=None``: ``Q(x)``."""
    s = np.float32(amax / 127.0)
    xv = np.asarray(x, np.float32)
    n = np.zeros(xv.shape[-1], np.float32) if noise is None else np.asarray(noise, np.float32)
    return (np.clip(np.rint((xv + n) / s), -127, 127) * s - n).astype(np.float32)


def noisy_bias(weight: npt.ArrayLike, weight_q: npt.ArrayLike, x_quant: npt.ArrayLike, x_float: npt.ArrayLike,
               amax: float, *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
               holdout_fraction: float = 0.25) -> NoisyResult:
    """Choose NoisyQuant's fixed noise for one layer (weights ``[out, in]``).

    ``x_quant``: ``[rows, in]`` float inputs as the quantized graph feeds the layer (before its own input
    quantizer); ``x_float``: the float model's inputs; ``amax``: the layer's input threshold. The target is
    the float output ``x_float Wᵀ``; the candidate outputs are ``(Q(x + N) − N) W_qᵀ``.
    """
    w, wq = np.asarray(weight, np.float64), np.asarray(weight_q, np.float64)
    xq, xf = np.asarray(x_quant, np.float32), np.asarray(x_float, np.float64)
    if xq.shape != xf.shape or xq.ndim != 2 or xq.shape[1] != w.shape[1] or len(xq) < 2 or amax <= 0:
        raise ValueError(f"inputs must be matching [rows >= 2, {w.shape[1]}] arrays and amax > 0")
    hold, fit = split_rows(len(xq), holdout_fraction, seed)
    target = xf @ w.T
    u = np.asarray(np.random.default_rng(seed).random(w.shape[1]), np.float64) - 0.5  # one draw, scaled per candidate
    step = amax / 127.0

    def err(rows: np.ndarray, noise: np.ndarray | None) -> float:
        y = fake_quant_noisy(xq[rows], amax, noise).astype(np.float64) @ wq.T
        return float(np.mean((y - target[rows]) ** 2))

    best_f, best_e = 0.0, err(fit, None)
    for f in fractions:
        e = err(fit, (u * f * step).astype(np.float32))
        if e < best_e:
            best_f, best_e = float(f), e
    plain = err(hold, None)
    if best_f == 0.0:
        return NoisyResult(None, 0.0, plain, plain, seed)
    noise = (u * best_f * step).astype(np.float32)
    noisy = err(hold, noise)
    return NoisyResult(noise if noisy < plain else None, best_f, plain, noisy, seed)
