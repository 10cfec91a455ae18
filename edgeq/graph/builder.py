"""A small, deterministic builder for float policy graphs (MLPs with pre/post ops) in ONNX.

Ingest sources that hold plain weights (SB3 archives, state dicts) describe their policy as a
sequence of layers; this module turns that into an ONNX graph with stable node and tensor names,
so the same weights always give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

#: Activation names accepted in layer descriptions, mapped from torch module class names.
TORCH_ACTIVATIONS = {
    "ReLU": "relu",
    "Tanh": "tanh",
    "ELU": "elu",
    "LeakyReLU": "leaky_relu",
    "SiLU": "silu",
    "Sigmoid": "sigmoid",
    "GELU": "gelu",
    "Softplus": "softplus",
    "Identity": "identity",
}


class GraphBuilder:
    """Accumulates nodes and initializers; every name is derived from a readable prefix."""

    def __init__(self, name: str = "edgeq_policy") -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def const(self, base: str, value: np.ndarray, dtype: np.dtype = np.dtype(np.float32)) -> str:
        name = self.unique(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs: Any) -> str:
        out = self.unique(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.unique(f"{base}/{op_type}"),
                                           **attrs))
        return out

    def op_multi(self, op_type: str, inputs: Sequence[str], bases: Sequence[str], name: str,
                 **attrs: Any) -> list[str]:
        """A node with several outputs (``Split``); returns the output names in order."""
        outs = [self.unique(b) for b in bases]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.unique(f"{name}/{op_type}"),
                                           **attrs))
        return outs

    # -- layers -------------------------------------------------------------------------------
    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None, base: str) -> str:
        """``x @ weight.T + bias`` as a Gemm with ``transB=1`` (nn.Linear's [out, in] layout)."""
        w = self.const(f"{base}.weight", weight)
        inputs = [x, w]
        if bias is not None:
            inputs.append(self.const(f"{base}.bias", bias))
        return self.op("Gemm", inputs, f"{base}", transB=1)

    def activation(self, x: str, kind: str, base: str, alpha: float | None = None) -> str:
        kind = kind.lower()
        if kind == "identity":
            return x
        if kind == "relu":
            return self.op("Relu", [x], base)
        if kind == "tanh":
            return self.op("Tanh", [x], base)
        if kind == "sigmoid":
            return self.op("Sigmoid", [x], base)
        if kind == "elu":
            return self.op("Elu", [x], base, alpha=1.0 if alpha is None else float(alpha))
        if kind == "leaky_relu":
            return self.op("LeakyRelu", [x], base, alpha=0.01 if alpha is None else float(alpha))
        if kind == "softplus":
            return self.op("Softplus", [x], base)
        if kind == "silu":
            s = self.op("Sigmoid", [x], f"{base}_sigmoid")
            return self.op("Mul", [x, s], base)
        if kind == "gelu":
            # exact (erf) GELU, as torch.nn.GELU() computes it
            half = self.const(f"{base}.half", np.array(0.5))
            one = self.const(f"{base}.one", np.array(1.0))
            inv_sqrt2 = self.const(f"{base}.inv_sqrt2", np.array(1.0 / np.sqrt(2.0)))
            e = self.op("Erf", [self.op("Mul", [x, inv_sqrt2], f"{base}_scaled")], f"{base}_erf")
            return self.op("Mul", [self.op("Mul", [x, half], f"{base}_half"), self.op("Add", [e, one], f"{base}_1p")],
                           base)
        raise ValueError(f"unsupported activation {kind!r}; expected one of {sorted(set(TORCH_ACTIVATIONS.values()))}")

    def clip(self, x: str, low: np.ndarray | float, high: np.ndarray | float, base: str) -> str:
        """Elementwise clip; per-element bounds use Max/Min (Clip only takes scalars)."""
        low_a, high_a = np.asarray(low, np.float32), np.asarray(high, np.float32)
        if low_a.ndim == 0 or np.all(low_a == low_a.flat[0]) and np.all(high_a == high_a.flat[0]):
            lo = self.const(f"{base}.min", np.array(low_a.flat[0]))
            hi = self.const(f"{base}.max", np.array(high_a.flat[0]))
            return self.op("Clip", [x, lo, hi], base)
        y = self.op("Max", [x, self.const(f"{base}.min", low_a)], f"{base}_lo")
        return self.op("Min", [y, self.const(f"{base}.max", high_a)], base)

    def normalize(self, x: str, mean: np.ndarray, std: np.ndarray, clip: float | None, base: str) -> str:
        """``clip((x - mean) / std, -clip, clip)`` in float32 (observation normalization)."""
        y = self.op("Sub", [x, self.const(f"{base}.mean", mean)], f"{base}_centered")
        y = self.op("Div", [y, self.const(f"{base}.std", std)], f"{base}_scaled" if clip else base)
        if clip is not None:
            y = self.clip(y, -float(clip), float(clip), base)
        return y

    def rescale_from_unit(self, x: str, low: np.ndarray, high: np.ndarray, base: str) -> str:
        """Map [-1, 1] to [low, high] as SB3's ``unscale_action``: ``low + 0.5 (x + 1)(high - low)``."""
        low64, high64 = np.asarray(low, np.float64), np.asarray(high, np.float64)
        half_range = (0.5 * (high64 - low64)).astype(np.float32)
        center = (low64 + 0.5 * (high64 - low64)).astype(np.float32)
        if np.all(half_range == 1.0) and np.all(center == 0.0):
            return x
        y = self.op("Mul", [x, self.const(f"{base}.half_range", half_range)], f"{base}_scaled")
        return self.op("Add", [y, self.const(f"{base}.center", center)], base)

    def output(self, x: str, name: str) -> None:
        """Route tensor ``x`` to the graph output ``name`` with an Identity (keeps names stable)."""
        self.nodes.append(helper.make_node("Identity", [x], [name], name=self.unique(f"{name}/Identity")))

    def make_model(self, inputs: Sequence[tuple[str, Sequence[int | str]]],
                   outputs: Sequence[tuple[str, Sequence[int | str]]],
                   doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edgeq", doc_string=doc)
        model.ir_version = 8
        for k, v in sorted((metadata or {}).items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(model, full_check=True)
        return model
