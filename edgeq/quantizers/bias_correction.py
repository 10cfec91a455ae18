"""Empirical bias correction: remove the mean output shift that int8 rounding leaves in a layer.

With the layer's int8 input ``X^`` (what the quantized graph feeds it: upstream layers quantized,
its own input fake-quantized) and dequantized weight ``W^``, and the float model's ``X``, ``W``,
the output error has the per-channel mean::

    delta = E[X^ W^^T - X W^T] = E[X^] W^^T - E[X] W^T          (linearity: means suffice)

over the calibration states, and the corrected bias is ``b' = b - delta``: the quantized layer's
output then has the float layer's mean on those states (Nagel et al. 2019, "Data-Free
Quantization", in its empirical form).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["bias_correction_delta", "corrected_bias"]


def bias_correction_delta(x_quant: npt.ArrayLike, w_quant: npt.ArrayLike, x_float: npt.ArrayLike,
                          w_float: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Mean output error per output channel (``[out]``, float64); weights as ``[out, in]``.

    Raises:
        ValueError: For mismatched shapes or no rows.
    """
    xq, xf = np.asarray(x_quant, np.float64), np.asarray(x_float, np.float64)
    wq, wf = np.asarray(w_quant, np.float64), np.asarray(w_float, np.float64)
    if xq.ndim != 2 or xq.shape != xf.shape or xq.shape[0] == 0:
        raise ValueError(f"inputs must be matching non-empty [rows, in] arrays, got {xq.shape} and {xf.shape}")
    if wq.shape != wf.shape or wq.shape[1] != xq.shape[1]:
        raise ValueError(f"weights must be matching [out, {xq.shape[1]}] arrays, got {wq.shape} and {wf.shape}")
    return np.asarray(xq.mean(axis=0) @ wq.T - xf.mean(axis=0) @ wf.T, np.float64)


def corrected_bias(bias: npt.ArrayLike | None, delta: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``b - delta`` in float32 (``b = 0`` when the layer has no bias)."""
    d = np.asarray(delta, np.float64)
    b = np.zeros_like(d) if bias is None else np.asarray(bias, np.float64).reshape(d.shape)
    return (b - d).astype(np.float32)
