"""A CUDA-specialized copy of the INT8 QDQ graph for ONNX Runtime's CUDA execution provider.

ONNX Runtime's CUDA EP has no integer GEMM for QDQ graphs (its QDQ fusions into integer kernels are
registered for the CPU EP only): it runs every ``QuantizeLinear`` / ``DequantizeLinear`` node as its
own kernel and the ``MatMul`` in float32 on the dequantized values. So edgeq's portable layer
``Q(s8) → DQ, DQ(int8 W) → MatMul → Add(bias)`` costs, on every call, a kernel that dequantizes the
whole weight matrix again, and ``policy.int8.onnx`` needs ~2x the kernels of the float graph.

Which nodes left the GPU, and why (measured with ONNX Runtime 1.31.1 on an H100; see
``benchmarks/results/gpu.md``): none of edgeq's own Q/DQ nodes lack a CUDA kernel (the CUDA EP
registers QuantizeLinear/DequantizeLinear for int8/uint8 at opsets 10-21, per-tensor and per-axis).
The CPU nodes come from ONNX Runtime's QDQ-aware ``MatMulAddFusion``, which rewrites
``DQ → MatMul → Add(bias)`` into a ``Gemm`` whose bias is an int32 initializer behind a new
``DequantizeLinear`` (``<layer>/Gemm/MatMulAddFusion_bias_dq``): the CUDA EP has no int32
DequantizeLinear, so ONNX Runtime runs it on the CPU, inserts ``MemcpyFromHost`` and refuses CUDA
graphs, exactly as for the int32 bias DequantizeLinear that ``quantize_static`` writes. On this file the
same rewrite would also re-quantize the folded float weights. :class:`edgeq.deploy.ort_cuda.OrtCudaPolicy`
therefore disables ``MatMulAddFusion`` (as edgeq's CPU runtime already does); with it off, both this
file and ``policy.int8.onnx`` run entirely on the GPU and are captured as CUDA graphs.

This module writes the form the CUDA EP should run: each weight ``DequantizeLinear`` of a constant
int8 initializer is folded into a float32 initializer, computed exactly as the CUDA kernel computes it
(``float(q - zero_point) * scale``, one float32 multiply per element: the same bits), the activation
``QuantizeLinear → DequantizeLinear`` pairs stay (int8 rounding and saturation of the activations are
the int8 arithmetic), and the ``Identity`` before the graph output is dropped: 3 kernels fewer for a
3-layer policy (HalfCheetah: 15 instead of 18; batch-1 latency with a CUDA graph 62.7 µs instead of 68.0).

The result computes what ``policy.int8.onnx`` computes in ONNX Runtime (bit for bit up to the GEMM's
float32 summation order). ``policy.int8.onnx`` stays the artifact for TensorRT, which does run int8
kernels and must see the int8 weight initializers; this file is for ``CUDAExecutionProvider`` only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from edgeq.export.passes import bypass_output_identities
from edgeq.graph.ir import array_of, check, drop_unused_initializers, rewire, to_ir, to_onnx

#: ``doc_string`` of a weight initializer folded from an int8 ``DequantizeLinear`` (read by edgeq.export.file_precision)
DEQUANTIZED_DOC = "edgeq: int8 weight dequantized at export"
DOC = "edgeq INT8 policy specialized for ONNX Runtime's CUDA EP (weights dequantized at export; same arithmetic)"


def dequantize_initializer(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``DequantizeLinear`` of a constant, in float32 as ONNX Runtime's kernels compute it.

    ``(int32(q) - int32(zero_point))`` converted to float32, times ``scale`` in float32; per-tensor when
    ``scale`` has one element, else per-axis along ``axis``.
    """
    q32 = q.astype(np.int32)
    zp = np.zeros((), np.int32) if zero_point is None else zero_point.astype(np.int32)
    sc = scale.astype(np.float32)
    if sc.size > 1:
        ax = axis % q.ndim
        shape = [1] * q.ndim
        shape[ax] = -1
        sc = sc.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(())
    else:
        sc, zp = sc.reshape(()), zp.reshape(())
    return ((q32 - zp).astype(np.float32) * sc).astype(np.float32)


def specialize_for_ort_cuda(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every constant-weight ``DequantizeLinear`` of ``qdq`` into float32; keep activation Q/DQ.

    Returns a new model; ``qdq`` is left untouched. A graph without weight ``DequantizeLinear`` nodes
    comes back with only its output ``Identity`` bypassed.
    """
    model = to_ir(qdq)
    g = model.graph
    folded: list[ir.Value] = []
    for node in [n for n in g if n.op_type == "DequantizeLinear"]:
        arrays = [array_of(v) for v in node.inputs if v is not None]
        if any(a is None for a in arrays) or node.attributes.get_int("block_size"):
            continue  # a computed input, or blocked quantization: leave to the runtime
        q, scale, *zp = arrays
        assert q is not None and scale is not None
        if scale.dtype != np.float32:
            continue  # fp16/bf16 scales: the runtime's arithmetic differs; not edgeq's form
        axis = node.attributes.get_int("axis")
        value = ir.Value(const_value=ir.Tensor(dequantize_initializer(q, scale, zp[0] if zp else None,
                                                                      1 if axis is None else axis),
                                               doc_string=DEQUANTIZED_DOC))
        rewire(node.outputs[0], value)
        g.remove(node, safe=True)
        folded.append(value)
    for value in folded:  # after the existing initializers, in node order
        assert value.const_value is not None
        value.const_value.name = value.name
        g.register_initializer(value)
    bypass_output_identities(g)
    drop_unused_initializers(g, list(g.initializers.values()))
    model.doc_string = DOC
    return check(to_onnx(model, qdq, value_info=False))


def kernel_count(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op type (each is at least one CUDA kernel launch on the CUDA EP)."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["DOC", "dequantize_initializer", "kernel_count", "specialize_for_ort_cuda"]
