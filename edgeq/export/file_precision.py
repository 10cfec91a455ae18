"""What each layer of an ONNX file really computes in: read from the graph itself, not from the plan.

A bundle ships several files (``policy.int8.onnx`` for TensorRT, ``policy.int8.cpu.onnx`` for ONNX
Runtime's CPU EP, ``policy.int8.cuda.onnx`` for its CUDA EP) and they differ: the CPU file may run
some layers in float on their int8-stored weights, the search may leave a layer in fp16. A summary
that calls such a file "INT8" hides it. This module walks each weight layer (``MatMul``, ``Gemm``,
``Conv`` and ONNX Runtime's integer forms ``MatMulIntegerToFloat``, ``MatMulInteger``,
``QLinearMatMul``, ``DynamicQuantizeMatMul``, ``MatMulNBits``, ``ConvInteger``, ``QLinearConv``,
``QGemm``) and says, from the tensors that feed it:

* ``weight``: ``int8`` / ``int4`` (an int8 / int4 initializer, through ``DequantizeLinear`` or a
  ``Cast`` + scale, or read directly by an integer kernel), ``fp16``, ``float``, or
  ``float (int8 grid)`` (a float32 initializer whose every output channel is an int8 grid, as in the
  CUDA file where the weights were dequantized at export);
* ``activation``: ``int8`` (the input comes out of ``QuantizeLinear → DequantizeLinear``, or an
  integer kernel reads a quantized tensor), ``fp16`` or ``float``;
* ``status``: the layer in one phrase: ``int8`` (int8 weights and activations: TensorRT and ORT's
  integer kernels compute it in int8), ``w4a8``, ``int8 weights, float activations``, ``float on
  int8 weights``, ``int8-rounded, float32 compute`` (the CUDA file), ``fp16``, ``float``.

Activation × activation MatMuls (attention's Q·Kᵀ, A·V) have no weight; they are listed with
``weight: "none"`` and do not count as layers. Pure and deterministic: the same file, the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

#: Ops whose inputs include a weight (first: activation input index, second: weight input index).
WEIGHT_OPS: dict[str, tuple[int, int]] = {
    "MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1), "ConvTranspose": (0, 1),
    "MatMulInteger": (0, 1), "MatMulIntegerToFloat": (0, 1), "DynamicQuantizeMatMul": (0, 1),
    "MatMulNBits": (0, 1), "ConvInteger": (0, 1), "QLinearMatMul": (0, 3), "QLinearConv": (0, 3),
    "QGemm": (0, 3),
}
#: Integer kernels: their quantized inputs are computed in integers.
INTEGER_OPS = frozenset({"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger",
                         "QLinearMatMul", "QLinearConv", "QGemm"})
#: Ops a tensor passes through unchanged in precision (a scale, a layout change): looked through.
_TRANSPARENT = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Mul", "Div"})
_INT8 = {TensorProto.INT8, TensorProto.UINT8}
_INT4 = {getattr(TensorProto, n) for n in ("INT4", "UINT4") if hasattr(TensorProto, n)}
_FP16 = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


@dataclass(frozen=True)
class LayerPrecision:
    """One weight layer (or activation MatMul) of a file, as its graph computes it."""

    node: str
    op: str
    weight: str
    activation: str
    status: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output}
        for n in g.node:  # Constant nodes are initializers too
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.inits[n.output[0]] = a.t

    def trace(self, name: str, depth: int = 0) -> dict[str, Any]:
        """Follow ``name`` back through transparent ops: ``{"init": TensorProto|None, "dq": bool,
        "q": bool (a QuantizeLinear feeds it), "cast_to": dtype|None, "dtype": dtype of an init}``."""
        out: dict[str, Any] = {"init": None, "dq": False, "q": False, "cast_to": None}
        cur = name
        for _ in range(32):
            if cur in self.inits:
                out["init"] = self.inits[cur]
                return out
            node = self.producer.get(cur)
            if node is None:  # a graph input
                return out
            op = node.op_type
            if op == "DequantizeLinear":
                out["dq"] = True
                src = self.producer.get(node.input[0])
                if src is not None and src.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
                    out["q"] = True
                cur = node.input[0]
                continue
            if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
                out["q"] = True
                return out
            if op == "Cast":
                if out["cast_to"] is None:
                    out["cast_to"] = next((a.i for a in node.attribute if a.name == "to"), None)
                cur = node.input[0]
                continue
            if op in _TRANSPARENT:
                # a scale by a constant: follow the non-constant operand (or the first if both are constants)
                ins = [i for i in node.input if i]
                var = [i for i in ins if i not in self.inits]
                if op in ("Mul", "Div") and len(var) > 1:
                    return out
                cur = var[0] if var else ins[0]
                continue
            return out
        return out


def _int8_grid(w: np.ndarray) -> bool:
    """True when every output channel of a float weight is ``k * s`` with integer ``|k| <= 127`` (one ``s`` per
    channel): the smallest nonzero magnitude is ``k_min * s`` for a small ``k_min``, tried from 1 to 16."""
    if w.ndim < 2 or w.size < 4 or not np.all(np.isfinite(w)):
        return False
    cols = w.reshape(w.shape[0], -1).T if w.ndim == 2 else w.reshape(w.shape[0], -1)
    for col in cols:
        mag = np.abs(col[col != 0])
        if not len(mag):
            continue
        smallest = mag.min()
        for k_min in range(1, 17):
            k = mag / (smallest / k_min)
            if k.max() <= 127.5 and np.all(np.abs(k - np.round(k)) <= 2e-3 * np.maximum(1.0, k / 64)):
                break
        else:
            return False
    return True


def _weight_kind(node: onnx.NodeProto, g: _Graph, t: dict[str, Any]) -> str:
    if node.op_type == "MatMulNBits":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return f"int{bits}"
    init = t["init"]
    if init is None:
        return "none"
    dt = init.data_type
    if dt in _INT4:
        return "int4"
    if dt in _INT8:
        return "int8"
    if dt in _FP16 or t["cast_to"] in _FP16:
        return "fp16"
    if dt == TensorProto.FLOAT and init.doc_string == "edgeq: int8 weight dequantized at export":
        return "float (int8 grid)"  # edgeq.export.ort_cuda.DEQUANTIZED_DOC
    if node.op_type in ("MatMul", "Gemm") and not t["dq"] and dt == TensorProto.FLOAT:
        w = numpy_helper.to_array(init)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) and w.ndim == 2:
            w = w.T
        if _int8_grid(np.asarray(w, np.float64)):
            return "float (int8 grid)"
    return "float"


def _activation_kind(node: onnx.NodeProto, g: _Graph, t: dict[str, Any]) -> str:
    if node.op_type in ("DynamicQuantizeMatMul",):
        return "int8 (dynamic)"
    if node.op_type in INTEGER_OPS:
        return "int8"
    if t["dq"] and t["q"]:
        return "int8"
    if t["cast_to"] in _FP16:
        return "fp16"
    return "float"


def _status(weight: str, act: str) -> str:
    if weight == "none":
        return "int8" if act == "int8" else act
    if weight == "float (int8 grid)":
        return "int8-rounded, float32 compute" if act == "int8" else "float on int8-grid weights"
    if weight in ("int8", "int4") and act.startswith("int8"):
        return "int8" if weight == "int8" else "w4a8"
    if weight in ("int8", "int4") and act == "float":
        return f"float on {weight} weights"  # int8/int4 storage, dequantized, float arithmetic
    if "fp16" in (weight, act):
        return "fp16"
    return "float"


def layer_precisions(model: onnx.ModelProto) -> list[LayerPrecision]:
    """Every weight layer (and activation MatMul) of ``model`` in graph order, as the file computes it."""
    g = _Graph(model)
    rows = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        ai, wi = WEIGHT_OPS[node.op_type]
        if len(node.input) <= wi:
            continue
        ta, tw = g.trace(node.input[ai]), g.trace(node.input[wi])
        if ta["init"] is not None and tw["init"] is None:  # the weight on the left (x @ W written as W^T ...)
            ta, tw = tw, ta
        if ta["init"] is not None:  # both constant: folded arithmetic, no layer
            continue
        weight = _weight_kind(node, g, tw)
        act = _activation_kind(node, g, ta)
        if weight == "none":  # activation x activation: both inputs must be int8 for int8 compute
            other = _activation_kind(node, g, tw)
            act = "int8" if act == "int8" and other == "int8" else ("float" if "float" in (act, other) else act)
        rows.append(LayerPrecision(node=node.name or node.output[0], op=node.op_type, weight=weight, activation=act,
                                   status=_status(weight, act)))
    return rows


def count_statuses(rows: Iterable[LayerPrecision | dict[str, Any]]) -> dict[str, int]:
    """``{status: number of weight layers}`` (activation MatMuls excluded), in first-seen order."""
    out: dict[str, int] = {}
    for r in rows:
        d = r.to_json() if isinstance(r, LayerPrecision) else r
        if d["weight"] == "none":
            continue
        out[d["status"]] = out.get(d["status"], 0) + 1
    return out


def file_record(model: onnx.ModelProto) -> dict[str, Any]:
    """The manifest's record of one file: ``{"layers": [...], "counts": {...}, "all_int8": bool}``.

    ``all_int8`` is True only when every weight layer computes with int8 weights and int8 activations
    (and every activation MatMul has both inputs int8).
    """
    rows = layer_precisions(model)
    counts = count_statuses(rows)
    all_int8 = bool(rows) and all(r.status == "int8" for r in rows)
    return {"layers": [r.to_json() for r in rows], "counts": counts, "all_int8": all_int8}
