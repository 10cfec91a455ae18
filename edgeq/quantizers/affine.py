"""AffineQuant (Ma et al., ICLR 2024) where it folds exactly: a learned affine transform of the observation input.

AffineQuant quantizes ``Q(X A) Q(A⁻¹ Wᵀ)`` instead of ``Q(X) Q(Wᵀ)`` with an invertible ``A`` (and, as
OmniQuant, a translation ``δ``) learned by minimizing the layer's quantized output error against the
float output. A full ``A`` would need an ``obs_dim × obs_dim`` float GEMM in front of the first layer:
a float layer, which edgeq never ships under an INT8 label. The part that folds exactly is the diagonal
``A = diag(1/d)`` with the translation, i.e. per channel ``X' = (X − δ) / d``, ``W' = W diag(d)``,
``b' = b + W δ``: one elementwise ``Sub``/``Mul`` pre-op on the (normalized) observation, exactly where
the observation normalization is, and the first layer's weight and bias (:class:`InputScaling` with a
``shift``, :mod:`edgeq.quantizers.transforms`). Unlike CrossQuant's or SmoothQuant's closed-form factors,
``d`` and ``δ`` are learned, AffineQuant's way: Adam on

    L(d, δ) = mean_n || Q_a((x_n − δ) / d) · Q_w(W diag d)ᵀ + W δ − W x_n ||²

with straight-through rounding, the per-tensor input range ``a`` learned in log space (LSQ) and the
per-output-channel weight scale the absmax of ``W diag d``, started from the plan's current factors.
:func:`edgeq.quantizers.build.build_plan` keeps it only if the policy's held-out score drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeq.quantizers.adam import Adam

__all__ = ["AffineResult", "learn_input_affine"]


@dataclass(frozen=True)
class AffineResult:
    """The learned factors ``d`` and shift ``δ`` (float64 ``[in]``) and the layer output errors."""

    factors: np.ndarray
    shift: np.ndarray
    loss_start: float
    loss_end: float
    iters: int

    def to_json(self) -> dict[str, Any]:
        return {"loss_start": self.loss_start, "loss_end": self.loss_end, "iters": self.iters,
                "shift_max_abs": float(np.abs(self.shift).max()), "factor_min": float(self.factors.min()),
                "factor_max": float(self.factors.max())}


def learn_input_affine(x: npt.ArrayLike, weight: npt.ArrayLike, factors0: npt.ArrayLike, amax0: float, *,
                       shift: bool = True, iters: int = 300, batch: int = 1024, lr: float = 0.01,
                       seed: int = 0, weight_qmax: int = 127) -> AffineResult:
    """Learn ``(d, δ)`` for a layer with float inputs ``x`` ``[N, in]`` and weight ``[out, in]`` (see the module).

    ``factors0``: the starting ``d`` (the plan's current input scaling, or ones); ``amax0``: the starting
    input range of ``(x − δ) / d``; ``shift=False`` learns ``d`` only.
    ``weight_qmax``: the weight grid the transform is fitted for (127: int8; 7: the int4 grid of a W4A8
    layer, per-channel absmax scale). Deterministic for a given ``seed``
    (one torch thread). The returned point is the best of the start and the end on all rows.
    """
    import torch

    xs = np.asarray(x, np.float32)
    w = np.asarray(weight, np.float64)
    d0 = np.asarray(factors0, np.float64)
    if xs.ndim != 2 or xs.shape[1] != w.shape[1] or d0.shape != (w.shape[1],) or amax0 <= 0:
        raise ValueError(f"x must be [rows, {w.shape[1]}], factors0 [{w.shape[1]}] and amax0 > 0")
    qw = float(weight_qmax)
    if not 1 <= qw <= 127:
        raise ValueError(f"weight_qmax must be in [1, 127], got {weight_qmax}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        xt = torch.from_numpy(xs).double()
        wt = torch.from_numpy(w)
        target = xt @ wt.T
        log_d = torch.nn.Parameter(torch.from_numpy(np.log(d0)))
        # δ in units of each channel's range, so one learning rate fits channels of any scale
        unit = torch.from_numpy(np.maximum(np.abs(xs).max(axis=0), 1e-8).astype(np.float64))
        delta = torch.nn.Parameter(torch.zeros(w.shape[1], dtype=torch.float64))
        log_a = torch.nn.Parameter(torch.tensor(float(np.log(amax0)), dtype=torch.float64))

        def ste(z: Any) -> Any:
            return z + (torch.round(z) - z).detach()

        def loss_on(rows: Any) -> Any:
            d = torch.exp(log_d)
            dl = delta * unit if shift else torch.zeros_like(delta)
            s_a = torch.exp(log_a) / 127.0
            xq = torch.clamp(ste((xt[rows] - dl) / d / s_a), -128.0, 127.0) * s_a
            wp = wt * d[None, :]
            s_w = (wp.abs().amax(dim=1, keepdim=True) / qw).clamp_min(1e-12)
            wq = torch.clamp(ste(wp / s_w), -qw, qw) * s_w
            y = xq @ wq.T + dl @ wt.T
            return ((y - target[rows]) ** 2).mean()

        every = torch.arange(len(xs))
        with torch.no_grad():
            start = float(loss_on(every))
        params = [log_d, log_a] + ([delta] if shift else [])
        opt = Adam(params, lr=lr)
        for _ in range(int(iters)):
            rows = torch.randint(0, len(xs), (min(batch, len(xs)),), generator=gen)
            loss = loss_on(rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            end = float(loss_on(every))
            d_end = torch.exp(log_d).numpy().copy()
            sh_end = (delta * unit).numpy().copy() if shift else np.zeros(w.shape[1])
    finally:
        torch.set_num_threads(threads)
    if not end < start:
        return AffineResult(d0.copy(), np.zeros(w.shape[1]), start, start, int(iters))
    return AffineResult(d_end.astype(np.float64), sh_end.astype(np.float64), start, end, int(iters))
