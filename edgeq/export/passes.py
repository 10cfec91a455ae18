"""Cleanup passes on the IR shared by the ONNX Runtime specializations (:mod:`edgeq.export.ort_cpu`,
:mod:`edgeq.export.ort_cuda`): each edits an :class:`onnx_ir.Graph` in place through its own index."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgeq.graph.ir import array_of, rewire

__all__ = ["bypass_output_identities", "drop_zero_adds"]


def bypass_output_identities(graph: ir.Graph) -> None:
    """Let the node feeding an ``Identity → graph output`` write the output itself (one kernel less)."""
    for ident in [n for n in graph if n.op_type == "Identity" and n.outputs[0].is_graph_output()]:
        src = ident.inputs[0]
        if src is None or src.producer() is None or len(src.uses()) != 1 or src.is_graph_output():
            continue
        rewire(ident.outputs[0], src)
        graph.remove(ident, safe=True)


def drop_zero_adds(graph: ir.Graph) -> None:
    """Drop ``Add(x, 0)`` with a 1-D all-zero constant (the action rescale of a symmetric box, [-a, a]).

    ONNX Runtime removes such a no-op itself, except when it writes a graph output, which it does in
    the CPU file once output Identities are bypassed; at batch 1 the kernel is ~0.2 µs. The producer of
    ``x`` then writes the Add's output (``x`` has no other reader), so names and results are unchanged.
    """
    for add in [n for n in graph if n.op_type == "Add" and len(n.inputs) == 2]:
        consts = [v for v in add.inputs if v is not None and v.is_initializer()]
        zero = array_of(consts[0]) if len(consts) == 1 else None
        if zero is None or zero.ndim > 1 or np.any(zero != 0):
            continue
        x = add.inputs[1] if add.inputs[0] is consts[0] else add.inputs[0]
        if x is None or x.producer() is None or [u.node for u in x.uses()] != [add] or x.is_graph_output():
            continue
        rewire(add.outputs[0], x)
        graph.remove(add, safe=True)
