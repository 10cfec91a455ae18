"""Outlier channel splitting of the *first* layer's input (OCS, Zhao et al. 2019): duplicate observation columns.

:mod:`edgeq.quantizers.split` widens hidden layers; the first layer reads the (normalized, rescaled)
observation, which has no producing unit to copy. Its input column ``k`` is duplicated instead: a
``Gather`` on the input's last axis appends a copy of column ``k`` (indices ``[0 .. K-1, k, ...]``), and
the layer's weight column ``k`` is halved and copied, so the layer computes ``W[:, k]/2 · x_k + W[:, k]/2 ·
x_k = W[:, k] x_k``: exact in float (halving is exact; only the order of the float sum changes). With
per-output-channel weight scales, every row whose largest weight sat in column ``k`` gets a scale up to
half as large: on a 15-level int4 grid that is what the first layer of a small policy needs (17 inputs,
a few of them holding the rows' outliers). With GPTQ rounding the copy also compensates the first copy's
rounding error exactly (the two inputs are equal), so the column gets about one more bit.

The ``Gather`` is an fp32 index pre-op in front of the input's int8 ``QuantizeLinear`` (the same values
quantized identically, one per copy); the layer stays one W4A8 (or INT8) GEMM, ``K + n`` inputs wide.

:func:`choose_input_split` picks the columns greedily by the layer's modelled output error on its own
weight grid (``qmax`` 7 for int4, 127 for int8): each step the column whose split lowers
``trace(ΔᵀΔ Σ)`` most (``Δ`` the rounding error of the MSE-clipped per-channel weight, ``Σ = E[x xᵀ]`` on
calibration rows), until ``n`` columns are added or no split lowers it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.graph.ir import const, make_node, to_ir, to_onnx
from edgeq.quantizers.split import _append_unit
from edgeq.quantizers.transforms import _weighted_layers

__all__ = ["InputSplit", "apply_input_splits", "choose_input_split", "insert_input_splits", "split_columns",
           "split_input_rows"]


@dataclass(frozen=True)
class InputSplit:
    """Duplicate input columns of layer ``layer`` (node name): ``columns[i]`` (an index into the input widened
    so far) is halved in the weight and a copy appended, in order."""

    layer: str
    columns: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.columns or any(int(c) < 0 for c in self.columns):
            raise ValueError(f"{self.layer}: an input split needs non-negative column indices, got {self.columns}")

    def indices(self, width: int) -> list[int]:
        """Gather indices into the original ``width`` inputs (the source column of every widened input)."""
        src = list(range(width))
        for c in self.columns:
            if not 0 <= c < len(src):
                raise ValueError(f"{self.layer}: input split column {c} is out of range (width {len(src)})")
            src.append(src[c])
        return src

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "columns": [int(c) for c in self.columns]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSplit:
        return cls(str(d["layer"]), tuple(int(c) for c in d["columns"]))


def split_columns(w_oi: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """The ``[out, in]`` weight with each of ``columns`` halved and a copy appended (float64, in order)."""
    w = np.asarray(w_oi, np.float64)
    for c in columns:
        w = _append_unit(w, c, 0.5, 1)
    return w


def split_input_rows(x: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """Input rows ``[n, in]`` widened as the split layer reads them (dtype kept)."""
    out = np.asarray(x)
    for c in columns:
        out = _append_unit(out, c, 1.0, 1).astype(out.dtype, copy=False)
    return out


def insert_input_splits(graph: ir.Graph, splits: Sequence[InputSplit]) -> None:
    """:func:`apply_input_splits` on an IR graph, in place."""
    for sp in splits:
        wl = _weighted_layers(graph).get(sp.layer)
        if wl is None:
            raise ValueError(f"input split names layer {sp.layer!r}, which is not a weighted layer of the graph")
        if not wl.weight.is_initializer() or len(wl.weight.uses()) != 1:
            raise ValueError(f"{sp.layer}: weight {wl.weight.name!r} is not an initializer read by this layer alone")
        idx = sp.indices(wl.in_features)
        assert wl.weight.const_value is not None
        w0 = wl.weight.const_value.numpy()
        w_oi = split_columns(w0 if wl.weight_axis == 0 else w0.T, sp.columns)
        w_new = (w_oi if wl.weight_axis == 0 else w_oi.T).astype(w0.dtype)
        wl.weight.const_value = ir.Tensor(np.ascontiguousarray(w_new), name=wl.weight.name)
        ind = const(graph, np.asarray(idx, np.int64), f"{sp.layer}/input_split.indices")
        gather = make_node("Gather", [wl.input, ind], f"{wl.input.name}.split_for.{sp.layer}",
                           name=f"{sp.layer}/input_split", axis=-1)
        graph.insert_before(wl.node, gather)
        wl.node.replace_input_with(0, gather.outputs[0])


def apply_input_splits(model: onnx.ModelProto, splits: Sequence[InputSplit]) -> onnx.ModelProto:
    """A float model computing the same function with every input split applied (node names kept; the split
    layer reads ``<input>.split_for.<layer>``).

    Raises:
        ValueError: an unknown layer, a column out of range, or a weight shared with another node.
    """
    irm = to_ir(model)
    insert_input_splits(irm.graph, splits)
    return to_onnx(irm, model, value_info=False)


def split_input_name(x: str, layer: str) -> str:
    """The tensor the split layer reads (its int8 activation quantizer's key)."""
    return f"{x}.split_for.{layer}"


Quantizer = Callable[[np.ndarray], np.ndarray]


def choose_input_split(w_oi: np.ndarray, x: np.ndarray, n: int, quantize: Quantizer) -> tuple[list[int], float, float]:
    """Up to ``n`` columns to split (greedy, see the module) and the modelled error before and after.

    ``w_oi``: the layer's float weight ``[out, in]``; ``x``: its float input rows; ``quantize(w)`` returns the
    dequantized weight on the target grid (e.g. MSE-clipped int4 per channel).
    """
    xs = np.asarray(x, np.float64)
    sigma = xs.T @ xs / max(1, len(xs))

    def err(cols: list[int]) -> float:
        w = split_columns(w_oi, cols)
        s = _widen_sigma(sigma, cols)
        d = quantize(w) - w
        return float(np.einsum("ij,jk,ik->", d, s, d))

    cols: list[int] = []
    e0 = e = err(cols)
    for _ in range(int(n)):
        width = w_oi.shape[1] + len(cols)
        trials = [(err([*cols, c]), c) for c in range(width)]
        best_e, best_c = min(trials)
        if not best_e < e * (1.0 - 1e-9):
            break
        cols.append(best_c)
        e = best_e
    return cols, e0, e


def _widen_sigma(sigma: np.ndarray, cols: Sequence[int]) -> np.ndarray:
    s = np.asarray(sigma, np.float64)
    for c in cols:
        s = _append_unit(_append_unit(s, c, 1.0, 0), c, 1.0, 1)
    return s
