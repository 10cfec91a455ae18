"""A float32 graph cast to fp16 inside, fp32 at its inputs and outputs (a pass on ``onnx_ir``).

For strongly typed TensorRT engines (TensorRT 11 has no FP16 builder flag; see
:mod:`edgeq.export.tensorrt_engine`). Needs only onnx, onnx_ir and numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.graph.ir import to_ir, to_onnx

__all__ = ["FP16_MAX", "fp16_onnx_with_casts"]

FP16_MAX = 65504.0
# Inputs that ONNX requires to be float32 whatever the data type (they are not data).
_KEEP_FP32_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}
_NOT_FLOAT_GRAPH = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger"}
)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_FLOAT, _FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _half(array: np.ndarray, name: str, tensor_name: str | None) -> ir.Tensor:
    finite = array[np.isfinite(array)]
    if finite.size and float(np.abs(finite).max()) > FP16_MAX:
        raise ValueError(f"{name!r} holds values up to {float(np.abs(finite).max()):.3g}, beyond fp16's range "
                         f"({FP16_MAX:g}): rescale the model or build fp32")
    return ir.Tensor(array.astype(np.float16), name=tensor_name or None)


def _cast(value: ir.Value, out: str, name: str, to: ir.DataType) -> ir.Node:
    return ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(to))], outputs=[ir.Value(name=out)], name=name)


def fp16_onnx_with_casts(float_model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast a float32 ONNX graph to fp16 inside, keeping fp32 inputs and outputs.

    Every float32 initializer and Constant becomes fp16, every ``Cast(to=FLOAT)`` becomes
    ``Cast(to=FLOAT16)``, a ``Cast(to=FLOAT16)`` follows each float32 graph input and a
    ``Cast(to=FLOAT)`` precedes each float32 graph output, so callers still feed and read float32.

    Args:
        float_model: a float32 model (not quantized, no control-flow subgraphs). It is not modified.

    Returns:
        A new model that passes ONNX's full check (types and strict shape inference).

    Raises:
        ValueError: the model holds Q/DQ or control flow, or a weight is beyond fp16's range (65504).
    """
    model = to_ir(float_model)
    g = model.graph
    for node in g:
        if node.op_type in _NOT_FLOAT_GRAPH:
            raise ValueError(f"fp16_onnx_with_casts expects a float model; node {node.name!r} is {node.op_type}")
        if node.op_type in _CONTROL_FLOW:
            raise ValueError(f"fp16_onnx_with_casts does not convert control flow ({node.op_type} {node.name!r})")
    keep_fp32 = {node.inputs[i] for node in g for i in _KEEP_FP32_INPUTS.get(node.op_type, ())
                 if i < len(node.inputs) and node.inputs[i] is not None}

    for value in g.initializers.values():
        t = value.const_value
        if t is not None and t.dtype == _FLOAT and value not in keep_fp32:
            value.const_value = _half(t.numpy(), value.name or "", value.name)
    for node in g:
        out = node.outputs[0] if node.outputs else None
        if node.op_type == "Constant" and out is not None and out not in keep_fp32:
            for attr in list(node.attributes.values()):
                if attr.name == "value" and attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == _FLOAT:
                    t = attr.as_tensor()
                    node.attributes["value"] = ir.AttrTensor("value", _half(t.numpy(), out.name or "", t.name))
                elif attr.name in ("value_float", "value_floats"):
                    values = np.asarray(attr.as_float() if attr.name == "value_float" else list(attr.as_floats()),
                                        np.float32)
                    del node.attributes[attr.name]
                    node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(values.astype(np.float16)))
        elif node.op_type == "ConstantOfShape":
            fill = node.attributes.get("value")
            if fill is not None and fill.type == ir.AttributeType.TENSOR and fill.as_tensor().dtype == _FLOAT:
                t = fill.as_tensor()
                node.attributes["value"] = ir.AttrTensor("value", _half(t.numpy(), node.name or "", t.name))
        elif node.op_type == "Cast" and node.attributes.get_int("to") == int(_FLOAT):
            node.attributes["to"] = ir.AttrInt64("to", int(_FLOAT16))

    taken = {v.name for node in g for v in (*node.inputs, *node.outputs) if v is not None}
    taken |= set(g.initializers) | {v.name for v in g.inputs}

    def fresh(base: str) -> str:
        name, k = f"{base}_fp16", 1
        while name in taken:
            name, k = f"{base}_fp16_{k}", k + 1
        taken.add(name)
        return name

    head: list[ir.Node] = []
    for inp in g.inputs:
        if inp.is_initializer() or inp.dtype != _FLOAT:
            continue
        uses = list(inp.uses())
        cast = _cast(inp, fresh(inp.name or ""), f"{inp.name}_to_fp16", _FLOAT16)
        for use in uses:
            use.node.replace_input_with(use.idx, cast.outputs[0])
        head.append(cast)
    tail: list[ir.Node] = []
    for i, out in enumerate(list(g.outputs)):
        if out.dtype != _FLOAT or out.producer() is None:
            continue
        name = out.name or ""
        out.name = fresh(name)
        cast = _cast(out, name, f"{name}_to_fp32", _FLOAT)
        cast.outputs[0].type, cast.outputs[0].shape = out.type, out.shape
        g.outputs[i] = cast.outputs[0]
        tail.append(cast)
    nodes = list(g)
    if head:
        g.insert_before(nodes[0], head)
    g.extend(tail)
    result = to_onnx(model, float_model, value_info=False)  # stale float32 annotations dropped
    try:
        onnx.checker.check_model(result, full_check=True)
    except Exception as exc:
        raise ValueError(f"the fp16 graph does not type-check: {exc}") from exc
    return result
