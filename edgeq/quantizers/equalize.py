"""SmoothQuant-style equalization: migrate range from a layer's input channels to its weights.

For input channel ``j`` with calibrated absmax ``c_j = max_i |X_ij|`` and weight column absmax
``w_j = max_k |W_kj|`` (``W`` as ``[out, in]``), the migration strength ``alpha`` gives::

    d_j = c_j^alpha / w_j^(1 - alpha)          X' = X diag(1/d),   W' = W diag(d)

so ``X' W'^T = X W^T`` exactly (:mod:`edgeq.quantizers.transforms` applies it). After the rewrite
``max|X'_j| = c_j^(1-alpha) w_j^(1-alpha)`` and ``max|W'_j| = c_j^alpha w_j^alpha``: with
``alpha = 0.5`` both have the range ``sqrt(c_j w_j)``, which flattens the input channels a
per-tensor activation scale would otherwise crush, at the price of unequal weight columns (which a
per-output-channel weight scale partly absorbs).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_ALPHA", "equalization_factors"]

DEFAULT_ALPHA = 0.5
"""SmoothQuant's default migration strength."""

_RELATIVE_FLOOR = 1e-6


def equalization_factors(channel_absmax: npt.ArrayLike, weight_column_absmax: npt.ArrayLike,
                         alpha: float = DEFAULT_ALPHA) -> npt.NDArray[np.float64]:
    """``d_j = c_j^alpha / w_j^(1 - alpha)`` (float64, strictly positive).

    Channels whose activation or weight column is (numerically) zero get ``d_j = 1``: there is
    nothing to migrate, and a zero would make the rewrite singular.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1]``, mismatched lengths or negative/non-finite input.
    """
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"equalization alpha must be in [0, 1], got {alpha}")
    c = np.asarray(channel_absmax, np.float64).reshape(-1)
    w = np.asarray(weight_column_absmax, np.float64).reshape(-1)
    if c.shape != w.shape or c.size == 0:
        raise ValueError(f"channel_absmax ({c.size}) and weight_column_absmax ({w.size}) must have the same "
                         "non-zero length")
    for name, v in (("channel_absmax", c), ("weight_column_absmax", w)):
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{name} must be finite and non-negative")
    live = (c > _RELATIVE_FLOOR * max(float(c.max()), 1e-30)) & (w > _RELATIVE_FLOOR * max(float(w.max()), 1e-30))
    d = np.ones_like(c)
    d[live] = np.power(c[live], a) / np.power(w[live], 1.0 - a)
    return d
