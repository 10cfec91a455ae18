"""An INT8 feed-forward policy as a list of fused layers, read from the bundle's QDQ ONNX file.

:func:`plan_from_graph` walks edgeq's portable INT8 graph (``policy.int8.onnx``: per-layer
``[elementwise] → QuantizeLinear → DequantizeLinear``, ``DequantizeLinear(int8 W, per-channel)``,
``MatMul``, ``Add(bias)``, activation, and a float tail such as ``Tanh → Mul → Add``) and returns an
:class:`MlpPlan`: for every layer the int8 weights ``[K, N]``, the activation scale and zero point
it quantizes its input with, the per-output-channel weight scales, the bias, and the elementwise ops
that follow (activations and constant Add/Sub/Mul/Div/Clip). Anything else raises
:class:`UnsupportedGraph` naming the node, so the caller can fall back to ONNX Runtime.

:func:`reference_forward` computes the plan with numpy in the arithmetic the fused GPU kernel uses,
which is ONNX Runtime's integer path on the CPU (``MatMulIntegerToFloat``): the input quantized as
``clamp(rint(x / s) + zp)`` (float32 division, round half to even), an exact int32 accumulation of
``(q - zp) · w``, then ``float(acc) * (s * w_scale[j]) + bias[j]`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeq.deploy.onnx_graph import Graph, Node
from edgeq.errors import EdgeqError

#: Elementwise ops the fused kernel runs (between layers and in the tail).
ACTIVATIONS = ("Relu", "Elu", "Tanh", "Sigmoid", "LeakyRelu", "Identity")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")


class UnsupportedGraph(EdgeqError):
    """The ONNX graph is not a chain of INT8 layers the fused GPU backend can run (the message says where)."""


@dataclass
class ElementOp:
    """One elementwise op on a feature vector: an activation, a constant binary op, or a clip.

    ``const`` is a float32 vector over the features (or one value); ``const_first`` means
    ``const op x`` (for Sub/Div). ``alpha`` for Elu/LeakyRelu; ``lo``/``hi`` for Clip.
    """

    op: str
    const: np.ndarray | None = None
    const_first: bool = False
    alpha: float = 0.0
    lo: float = -np.inf
    hi: float = np.inf

    def describe(self) -> str:
        if self.op in BINARY:
            return f"{self.op}(const[{self.const.size if self.const is not None else 0}])"
        if self.op == "Clip":
            return f"Clip({self.lo}, {self.hi})"
        if self.op in ("Elu", "LeakyRelu"):
            return f"{self.op}({self.alpha})"
        return self.op


@dataclass
class Layer:
    """``y = act(float(sum_k (q_k - zp) w_kj) * (in_scale * w_scale_j) + bias_j)`` then ``post`` ops."""

    name: str
    weight: np.ndarray  # int8 [K, N]
    w_scale: np.ndarray  # float32 [N]
    bias: np.ndarray  # float32 [N]
    in_scale: float
    in_zero_point: int
    in_uint8: bool
    post: list[ElementOp] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class MlpPlan:
    """``pre`` ops on the observation, then the layers in order (each quantizes its input)."""

    input_name: str
    output_name: str
    pre: list[ElementOp]
    layers: list[Layer]

    @property
    def obs_dim(self) -> int:
        return self.layers[0].k

    @property
    def act_dim(self) -> int:
        return self.layers[-1].n

    def describe(self) -> dict[str, Any]:
        return {"pre": [o.describe() for o in self.pre],
                "layers": [{"name": la.name, "shape": [la.k, la.n],
                            "post": [o.describe() for o in la.post]} for la in self.layers]}


def _scalar(value: np.ndarray, what: str, node: Node) -> Any:
    if value.size != 1:
        raise UnsupportedGraph(f"node {node.name or node.op_type}: {what} has {value.size} values; the fused backend "
                               "needs a per-tensor activation scale")
    return value.reshape(())[()]


def _vector(value: np.ndarray, width: int | None, node: Node) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype.kind != "f":
        raise UnsupportedGraph(f"node {node.name or node.op_type}: constant of dtype {v.dtype}, not float")
    flat = v.astype(np.float32).reshape(-1)
    shape = [d for d in v.shape]
    while shape and shape[0] == 1 and len(shape) > 1:
        shape = shape[1:]
    if flat.size != 1 and (len(shape) != 1 or (width is not None and flat.size != width)):
        raise UnsupportedGraph(f"node {node.name or node.op_type}: constant of shape {list(v.shape)} does not "
                               f"broadcast per feature (width {width})")
    return flat


def plan_from_graph(graph: Graph) -> MlpPlan:
    """The fused-layer plan of an edgeq INT8 QDQ graph; :class:`UnsupportedGraph` if it is not a plain chain."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UnsupportedGraph(f"the graph has inputs {graph.inputs} and outputs {graph.outputs}; the fused backend "
                               "runs one input and one output (recurrent policies: edgeq.deploy.rnn_plan)")
    inits = graph.initializers
    producer: dict[str, Node] = {}
    consumers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for o in n.outputs:
            producer[o] = n
        for i in n.inputs:
            if i:
                consumers.setdefault(i, []).append(n)
    # weight DequantizeLinear nodes: output name → (int8 W, scale, zero point, axis)
    weight_dq: dict[str, Node] = {}
    for n in graph.nodes:
        if n.op_type == "DequantizeLinear" and n.inputs and n.inputs[0] in inits:
            weight_dq[n.outputs[0]] = n
    cur = graph.inputs[0]
    width: int | None = None
    window: tuple[int, int] | None = None  # a history input viewed as [batch, L, D] (Reshape ... Flatten)
    pre: list[ElementOp] = []
    layers: list[Layer] = []
    ops = pre
    pending_q: tuple[float, int, bool] | None = None
    done: set[int] = set()
    while True:
        users = [u for u in consumers.get(cur, []) if id(u) not in done]
        if cur == graph.outputs[0] and not users:
            break
        if len(users) != 1:
            where = producer[cur].name if cur in producer else cur
            raise UnsupportedGraph(f"tensor {cur!r} (after {where}) feeds {len(users)} nodes; the fused backend runs "
                                   "a plain chain of layers")
        node = users[0]
        done.add(id(node))
        name = node.name or node.op_type
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedGraph(f"node {name}: op {node.domain}.{op} is not supported by the fused backend")
        consts = [i for i in node.inputs if i and i in inits]
        if window is not None and op in ("QuantizeLinear", "MatMul"):
            raise UnsupportedGraph(f"node {name}: {op} on a [batch, L, D] view (no Flatten before it)")
        if op == "QuantizeLinear":
            scale = float(_scalar(inits[node.inputs[1]], "QuantizeLinear scale", node))
            zp_arr = inits.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            zp = int(_scalar(zp_arr, "zero point", node)) if zp_arr is not None else 0
            uint8 = zp_arr is None or zp_arr.dtype == np.uint8
            if zp_arr is not None and zp_arr.dtype not in (np.int8, np.uint8):
                raise UnsupportedGraph(f"node {name}: {zp_arr.dtype} activations; the fused backend runs int8/uint8")
            if node.attributes.get("axis") not in (None, 1) and np.asarray(inits[node.inputs[1]]).size != 1:
                raise UnsupportedGraph(f"node {name}: per-axis activation quantization")
            dq_users = consumers.get(node.outputs[0], [])
            if len(dq_users) != 1 or dq_users[0].op_type != "DequantizeLinear":
                raise UnsupportedGraph(f"node {name}: QuantizeLinear not followed by one DequantizeLinear")
            dq = dq_users[0]
            if (dq.inputs[1:] != node.inputs[1:] and
                    not (float(_scalar(inits[dq.inputs[1]], "scale", dq)) == scale)):
                raise UnsupportedGraph(f"node {dq.name}: dequantizes with other parameters than its QuantizeLinear")
            done.add(id(dq))
            pending_q = (scale, zp, uint8)
            cur = dq.outputs[0]
            continue
        if op == "MatMul":
            if pending_q is None:
                raise UnsupportedGraph(f"node {name}: a MatMul on float activations (a layer kept in float); the "
                                       "fused backend runs layers whose input is quantized")
            wname = next((i for i in node.inputs if i != cur), None)
            if node.inputs[0] != cur or wname not in weight_dq:
                raise UnsupportedGraph(f"node {name}: MatMul whose weight is not an int8 DequantizeLinear constant")
            wdq = weight_dq[wname]
            done.add(id(wdq))
            w = inits[wdq.inputs[0]]
            if w.dtype != np.int8 or w.ndim != 2:
                raise UnsupportedGraph(f"node {wdq.name}: weight of dtype {w.dtype} and shape {list(w.shape)}; "
                                       "the fused backend runs 2-D int8 weights")
            ws = np.asarray(inits[wdq.inputs[1]], np.float32).reshape(-1)
            wzp = inits.get(wdq.inputs[2]) if len(wdq.inputs) > 2 and wdq.inputs[2] else None
            if wzp is not None and np.any(wzp != 0):
                raise UnsupportedGraph(f"node {wdq.name}: weight zero points are not 0 (asymmetric weights)")
            axis = int(wdq.attributes.get("axis", 1))
            if ws.size != 1 and (axis % 2 != 1 or ws.size != w.shape[1]):
                raise UnsupportedGraph(f"node {wdq.name}: weight scales along axis {axis}; the fused backend needs "
                                       "per-output-channel (axis 1) or per-tensor scales")
            if width is not None and w.shape[0] != width:
                raise UnsupportedGraph(f"node {name}: weight of {w.shape[0]} rows after a {width}-wide tensor")
            scale, zp, uint8 = pending_q
            n_out = int(w.shape[1])
            layer = Layer(node.name or f"layer{len(layers)}", np.ascontiguousarray(w),
                          np.broadcast_to(ws, (n_out,)).astype(np.float32).copy(), np.zeros(n_out, np.float32),
                          np.float32(scale).item(), zp, uint8)
            # the bias Add right after the MatMul
            nxt = consumers.get(node.outputs[0], [])
            cur = node.outputs[0]
            if len(nxt) == 1 and nxt[0].op_type == "Add":
                add = nxt[0]
                other = next((i for i in add.inputs if i != cur), "")
                if other in inits:
                    layer.bias = _vector(inits[other], n_out, add).astype(np.float32)
                    if layer.bias.size == 1:
                        layer.bias = np.full(n_out, layer.bias[0], np.float32)
                    done.add(id(add))
                    cur = add.outputs[0]
            layers.append(layer)
            ops = layer.post
            pending_q = None
            width = n_out
            continue
        if pending_q is not None:
            raise UnsupportedGraph(f"node {name}: {op} on dequantized activations before a MatMul")
        if op == "Reshape" and window is None and not layers and len(node.inputs) > 1 and node.inputs[1] in inits:
            # a history window [batch, L·D] viewed as [batch, L, D] for per-feature constants, then Flatten:
            # elementwise on the flat row with the constants repeated L times
            dims = [int(d) for d in np.asarray(inits[node.inputs[1]]).reshape(-1)]
            if len(dims) != 3 or dims[0] not in (-1, 0) or min(dims[1:]) < 1 or (
                    width is not None and width != dims[1] * dims[2]):
                raise UnsupportedGraph(f"node {name}: Reshape to {dims}; the fused backend runs a [-1, L, D] view "
                                       "of the input")
            window, width = (dims[1], dims[2]), dims[1] * dims[2]
            cur = node.outputs[0]
            continue
        if op == "Flatten" and window is not None and int(node.attributes.get("axis", 1)) == 1:
            window = None
            cur = node.outputs[0]
            continue
        if window is not None and op not in ACTIVATIONS and op not in BINARY and op != "Clip":
            raise UnsupportedGraph(f"node {name}: {op} on a [batch, L, D] view; the fused backend runs elementwise "
                                   "ops there")
        if op in ACTIVATIONS:
            if op in ("Elu", "LeakyRelu"):
                alpha = float(node.attributes.get("alpha", 1.0 if op == "Elu" else 0.01))
                ops.append(ElementOp(op, alpha=alpha))
            elif op != "Identity":
                ops.append(ElementOp(op))
        elif op in BINARY:
            if len(consts) != 1 or len(node.inputs) != 2:
                raise UnsupportedGraph(f"node {name}: {op} of two computed tensors")
            if window is not None:
                c = _vector(inits[consts[0]], window[1], node)
                c = np.tile(c, window[0]) if c.size == window[1] and c.size != 1 else c
            else:
                c = _vector(inits[consts[0]], width, node)
            ops.append(ElementOp(op, const=c, const_first=node.inputs[0] in inits))
        elif op == "Clip":
            lo, hi = -np.inf, np.inf
            if len(node.inputs) > 1 and node.inputs[1]:
                lo = float(_scalar(inits[node.inputs[1]], "min", node))
            if len(node.inputs) > 2 and node.inputs[2]:
                hi = float(_scalar(inits[node.inputs[2]], "max", node))
            ops.append(ElementOp("Clip", lo=lo, hi=hi))
        else:
            raise UnsupportedGraph(f"node {name}: op {op} is not supported by the fused backend")
        cur = node.outputs[0]
    if window is not None:
        raise UnsupportedGraph("the graph ends on a [batch, L, D] view")
    if not layers:
        raise UnsupportedGraph("the graph has no INT8 MatMul layer")
    if pending_q is not None:
        raise UnsupportedGraph("the graph ends in a quantized tensor")
    if len(done) != len(graph.nodes):
        left = [n.name or n.op_type for n in graph.nodes if id(n) not in done]
        raise UnsupportedGraph(f"nodes outside the layer chain: {left[:5]}")
    return MlpPlan(graph.inputs[0], graph.outputs[0], pre, layers)


def _apply(x: np.ndarray, ops: list[ElementOp]) -> np.ndarray:
    f32 = np.float32
    for o in ops:
        if o.op == "Relu":
            x = np.maximum(x, f32(0))
        elif o.op == "Elu":
            x = np.where(x > 0, x, f32(o.alpha) * np.expm1(x)).astype(f32)
        elif o.op == "LeakyRelu":
            x = np.where(x >= 0, x, f32(o.alpha) * x).astype(f32)
        elif o.op == "Tanh":
            x = np.tanh(x)
        elif o.op == "Sigmoid":
            x = (f32(1) / (f32(1) + np.exp(-x))).astype(f32)
        elif o.op == "Clip":
            x = np.clip(x, f32(o.lo), f32(o.hi))
        else:
            assert o.const is not None
            c = o.const
            a, b = (c, x) if o.const_first else (x, c)
            x = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
                 "Max": np.maximum, "Min": np.minimum}[o.op](a, b).astype(f32)
    return x


def quantize(x: np.ndarray, layer: Layer) -> np.ndarray:
    """The layer's input as int32 ``q - zp`` (``clamp(rint(x / s) + zp)`` in float32, half to even)."""
    lo, hi = (0, 255) if layer.in_uint8 else (-128, 127)
    q = np.rint(x / np.float32(layer.in_scale)) + np.float32(layer.in_zero_point)
    return np.clip(q, lo, hi).astype(np.int32) - np.int32(layer.in_zero_point)


def reference_forward(plan: MlpPlan, obs: np.ndarray) -> np.ndarray:
    """The plan on ``obs`` [batch, obs_dim] with numpy, in the fused kernel's arithmetic (float32 out)."""
    x = _apply(np.asarray(obs, np.float32), plan.pre)
    for layer in plan.layers:
        q = quantize(x, layer)
        acc = q @ layer.weight.astype(np.int32)
        mult = (np.float32(layer.in_scale) * layer.w_scale).astype(np.float32)
        y = (acc.astype(np.float32) * mult).astype(np.float32) + layer.bias
        x = _apply(y.astype(np.float32), layer.post)
    return x.astype(np.float32)


__all__ = ["ElementOp", "Layer", "MlpPlan", "UnsupportedGraph", "plan_from_graph", "quantize", "reference_forward"]
