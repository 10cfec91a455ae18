"""An INT8 recurrent (LSTM/GRU) policy as data, read from the bundle's QDQ ONNX file, and its numpy reference.

edgeq writes a recurrent policy as one time step (:mod:`edgeq.graph.recurrent`): the state is
explicit (``h_in``/``c_in`` ``[batch, layers, hidden]`` in, ``h_out``/``c_out`` out), each cell
layer ``k`` reads its previous state with ``Gather(h_in, k, axis=1)``, and its two gate products
``x @ W_ih + b_ih`` and ``h @ W_hh + b_hh`` are ordinary INT8 layers (per-tensor int8 input,
per-output-channel int8 weights), followed by the cell update in float::

    LSTM: gates = ih + hh; i, f, g, o = split(gates, 4); c' = sigmoid(f) c + sigmoid(i) tanh(g);
          h' = sigmoid(o) tanh(c')
    GRU:  r = sigmoid(ih_r + hh_r); z = sigmoid(ih_z + hh_z); n = tanh(ih_n + r hh_n);
          h' = (h - n) z + n

:func:`recurrent_plan_from_graph` reads that structure back into a :class:`RecurrentPlan`: per cell
layer the chain into its ``ih`` product (observation pre-ops and any INT8 layers before the cell, as
an :class:`edgeq.deploy.mlp_plan.MlpPlan` whose last layer is the ``ih`` product), its ``hh``
product (one :class:`~edgeq.deploy.mlp_plan.Layer`), and the MLP head from the top layer's ``h'``
to the actions (an ``MlpPlan``). The cell update is *checked*, node by node, against the LSTM or
GRU expression above (commutative ``Add``/``Mul`` in either order); anything else raises
:class:`~edgeq.deploy.mlp_plan.UnsupportedGraph` naming what differs, so the caller keeps the model
on ONNX Runtime.

:func:`reference_step` computes one step with numpy in the arithmetic of ONNX Runtime's CPU
provider, which the fused GPU kernel (:mod:`edgeq.deploy.fused_rnn`) reproduces:

* each INT8 product as ``MatMulIntegerToFloat``: ``clamp(rint(x / s) + zp)``, an exact int32
  accumulation, ``float(acc) * (s * w_scale_j) + bias_j`` (see :mod:`edgeq.deploy.mlp_plan`);
* ``Sigmoid`` and ``Tanh`` as ONNX Runtime's CPU kernels compute them on x86-64 (MLAS's
  ``MlasComputeLogistic``/``MlasComputeTanh``, FMA3 kernels): a clamp, two polynomials in ``x²``
  evaluated with fused multiply-adds, one division (and ``+ 0.5`` for the logistic). These are not
  the correctly rounded functions (they differ from them by up to ~2e-7), and a recurrent policy
  quantizes ``h`` every step, so a GPU that used its own ``expf``/``tanhf`` would put some ``h``
  values on the neighbouring int8 step and carry that difference in the state. With the same
  polynomials and FMAs the GPU gets the same bits (``tests/test_fused_rnn.py`` checks the numpy
  version against ONNX Runtime on millions of values here, and the GPU against ONNX Runtime there);
* every other float op once, rounded to float32 (``Add``, ``Mul``, ``Sub``: no contraction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.deploy.mlp_plan import ElementOp, Layer, MlpPlan, UnsupportedGraph, _apply, plan_from_graph, quantize
from edgeq.deploy.onnx_graph import Graph, Node

#: Gates per cell kind (PyTorch's order: LSTM i, f, g, o; GRU r, z, n).
CELL_GATES = {"lstm": 4, "gru": 3}

# MLAS's logistic and tanh constants (onnxruntime/core/mlas/lib/logistic.cpp, tanh.cpp: Eigen's polynomials)
LOGISTIC_RANGE = 18.0
LOGISTIC_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
              2.48287947061529e-01)
LOGISTIC_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
              1.16817656904453e-01, 9.93151921023180e-01)
TANH_RANGE = 9.0
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
          1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)

_F32 = np.float32


# -- float32 arithmetic as the CPU does it -------------------------------------------------------------------


def fma32(a: Any, b: Any, c: Any) -> np.ndarray:
    """``a * b + c`` with one rounding to float32, as an FMA instruction computes it.

    The product of two float32 values is exact in float64; the sum is rounded to float64 and then
    to float32, which can differ from one rounding only when the float64 sum lands exactly halfway
    between two float32 values. Those cases are found (the float64 sum's own error, from TwoSum, says
    which way the exact value lies) and rounded in that direction."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c64 = np.asarray(c, np.float32).astype(np.float64)
    s = p + c64
    # TwoSum: the exact error of s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    mid = (r64 + other.astype(np.float64)) / 2
    tie = (s != r64) & (s == mid) & (err != 0)
    if np.any(tie):
        toward = np.where(err > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
        up = np.nextafter(r, toward)
        # the exact value is beyond the midpoint on err's side: the float32 nearer to it
        exact_side = np.where((up.astype(np.float64) - mid) * err > 0, up, r)
        r = np.where(tie, exact_side, r)
    return np.asarray(r, np.float32)


def _poly(x2: np.ndarray, coefficients: Sequence[float]) -> np.ndarray:
    acc = fma32(x2, _F32(coefficients[0]), _F32(coefficients[1]))
    for c in coefficients[2:]:
        acc = fma32(acc, x2, _F32(c))
    return acc


def mlas_logistic(x: np.ndarray) -> np.ndarray:
    """``Sigmoid`` as ONNX Runtime's x86-64 CPU kernel computes it (MLAS, FMA3), bit for bit."""
    v = np.clip(np.asarray(x, _F32), _F32(-LOGISTIC_RANGE), _F32(LOGISTIC_RANGE))
    x2 = (v * v).astype(_F32)
    p = (_poly(x2, LOGISTIC_P) * v).astype(_F32)
    q = _poly(x2, LOGISTIC_Q)
    # the FMA3 kernel keeps the result >= 0 (and, unlike MLAS's portable C, does not clamp it to 1)
    return np.maximum(((p / q).astype(_F32) + _F32(0.5)).astype(_F32), _F32(0))


def mlas_tanh(x: np.ndarray) -> np.ndarray:
    """``Tanh`` as ONNX Runtime's x86-64 CPU kernel computes it (MLAS, FMA3), bit for bit."""
    v = np.clip(np.asarray(x, _F32), _F32(-TANH_RANGE), _F32(TANH_RANGE))
    x2 = (v * v).astype(_F32)
    p = (_poly(x2, TANH_P) * v).astype(_F32)
    q = _poly(x2, TANH_Q)
    return (p / q).astype(_F32)


def apply_ops(x: np.ndarray, ops: Sequence[ElementOp]) -> np.ndarray:
    """Elementwise ``ops`` on ``x`` with ``Sigmoid``/``Tanh`` as ONNX Runtime's CPU computes them."""
    for o in ops:
        if o.op == "Tanh":
            x = mlas_tanh(x)
        elif o.op == "Sigmoid":
            x = mlas_logistic(x)
        else:
            x = _apply(x, [o])
    return np.asarray(x, _F32)


def layer_forward(layer: Layer, x: np.ndarray) -> np.ndarray:
    """One INT8 product with its bias (no ``post`` ops): ``float(acc) * (s * w_scale) + bias`` in float32."""
    acc = quantize(x, layer) @ layer.weight.astype(np.int32)
    mult = (_F32(layer.in_scale) * layer.w_scale).astype(_F32)
    return ((acc.astype(_F32) * mult).astype(_F32) + layer.bias).astype(_F32)


def chain_forward(plan: MlpPlan, x: np.ndarray) -> np.ndarray:
    """An :class:`MlpPlan` on ``x`` (pre-ops, layers, each layer's post-ops) in ONNX Runtime's CPU arithmetic."""
    x = apply_ops(np.asarray(x, _F32), plan.pre)
    for layer in plan.layers:
        x = apply_ops(layer_forward(layer, x), layer.post)
    return x


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass
class CellLayer:
    """One cell layer: the chain into its ``ih`` product (last layer of ``into``) and its ``hh`` product."""

    into: MlpPlan
    hh: Layer

    @property
    def ih(self) -> Layer:
        return self.into.layers[-1]


@dataclass
class RecurrentPlan:
    """An INT8 LSTM/GRU policy: ``obs`` → cell layers → ``head`` → ``actions``, state ``[batch, layers, hidden]``."""

    kind: str
    hidden: int
    input_name: str
    output_name: str
    #: state tensors as in the manifest's ``io.state``: ``{"input", "output", "shape"}`` (h first, then c)
    state: list[dict[str, Any]]
    cells: list[CellLayer]
    head: MlpPlan

    @property
    def num_layers(self) -> int:
        return len(self.cells)

    @property
    def gates(self) -> int:
        return CELL_GATES[self.kind]

    @property
    def obs_dim(self) -> int:
        return self.cells[0].into.obs_dim

    @property
    def act_dim(self) -> int:
        return self.head.act_dim

    def int8_layers(self) -> list[Layer]:
        """Every INT8 product, in the order a step computes them."""
        out: list[Layer] = []
        for cell in self.cells:
            out += [*cell.into.layers, cell.hh]
        return out + list(self.head.layers)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": self.num_layers, "hidden": self.hidden,
                "cells": [{"into": c.into.describe(), "hh": {"name": c.hh.name, "shape": [c.hh.k, c.hh.n]}}
                          for c in self.cells],
                "head": self.head.describe()}

    def zero_state(self, batch: int) -> dict[str, np.ndarray]:
        """Zero state for ``batch`` rows, by state input name."""
        return {s["input"]: np.zeros((batch, self.num_layers, self.hidden), _F32) for s in self.state}


def reference_step(plan: RecurrentPlan, obs: np.ndarray,
                   state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One step with numpy in ONNX Runtime's CPU arithmetic: ``(actions, next state by state input name)``."""
    h_name = plan.state[0]["input"]
    h_in = np.asarray(state[h_name], _F32)
    c_in = np.asarray(state[plan.state[1]["input"]], _F32) if plan.kind == "lstm" else None
    n = plan.hidden
    x = np.asarray(obs, _F32)
    hs, cs = [], []
    for k, cell in enumerate(plan.cells):
        h_prev = h_in[:, k, :]
        gx = chain_forward(cell.into, x)
        gh = layer_forward(cell.hh, h_prev)
        if plan.kind == "lstm":
            assert c_in is not None
            g = (gx + gh).astype(_F32)
            i, f = mlas_logistic(g[:, :n]), mlas_logistic(g[:, n:2 * n])
            gg, o = mlas_tanh(g[:, 2 * n:3 * n]), mlas_logistic(g[:, 3 * n:])
            c = ((f * c_in[:, k, :]).astype(_F32) + (i * gg).astype(_F32)).astype(_F32)
            h = (o * mlas_tanh(c)).astype(_F32)
            cs.append(c)
        else:
            r = mlas_logistic((gx[:, :n] + gh[:, :n]).astype(_F32))
            z = mlas_logistic((gx[:, n:2 * n] + gh[:, n:2 * n]).astype(_F32))
            nn = mlas_tanh((gx[:, 2 * n:] + (r * gh[:, 2 * n:]).astype(_F32)).astype(_F32))
            h = (((h_prev - nn).astype(_F32) * z).astype(_F32) + nn).astype(_F32)
        hs.append(h)
        x = h
    actions = chain_forward(plan.head, x)
    new = {h_name: np.stack(hs, axis=1)}
    if plan.kind == "lstm":
        new[plan.state[1]["input"]] = np.stack(cs, axis=1)
    return actions, new


# -- reading the graph --------------------------------------------------------------------------------------


class _Index:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.inits = graph.initializers
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {}
        for n in graph.nodes:
            for o in n.outputs:
                self.producer[o] = n
            for i in n.inputs:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def const_int(self, name: str) -> list[int] | None:
        v = self.inits.get(name)
        return None if v is None else [int(t) for t in np.asarray(v).reshape(-1)]

    def is_gate_leaf(self, tensor: str) -> bool:
        """A tensor an INT8 product ends in: a MatMul output, or ``Add(MatMul output, constant)``."""
        n = self.producer.get(tensor)
        if n is None:
            return False
        if n.op_type == "MatMul":
            users = self.consumers.get(tensor, [])
            return not (len(users) == 1 and users[0].op_type == "Add" and any(i in self.inits for i in users[0].inputs))
        if n.op_type == "Add" and len(n.inputs) == 2:
            other = [i for i in n.inputs if i not in self.inits]
            return len(other) == 1 and other[0] in self.producer and self.producer[other[0]].op_type == "MatMul"
        return False

    def subgraph(self, src: str, dst: str) -> tuple[Graph, set[int]]:
        """The nodes between tensor ``src`` and tensor ``dst`` (and the constant-only nodes they read) as a graph."""
        anc: set[int] = set()
        stack = [dst]
        while stack:
            t = stack.pop()
            n = self.producer.get(t)
            if n is None or id(n) in anc or t == src:
                continue
            anc.add(id(n))
            stack.extend(i for i in n.inputs if i)
        desc: set[int] = set()
        stack = [src]
        while stack:
            t = stack.pop()
            for n in self.consumers.get(t, []):
                if id(n) not in desc:
                    desc.add(id(n))
                    stack.extend(n.outputs)
        core = {id(n) for n in self.graph.nodes if id(n) in anc and id(n) in desc}
        reads = {i for n in self.graph.nodes if id(n) in core for i in n.inputs}
        consts = {id(n) for n in self.graph.nodes if id(n) in anc and id(n) not in desc
                  and all((not i) or i in self.inits for i in n.inputs) and any(o in reads for o in n.outputs)}
        keep = core | consts
        nodes = [n for n in self.graph.nodes if id(n) in keep]
        return Graph(nodes, self.inits, [src], [dst], self.graph.opset), keep


def _expr(idx: _Index, tensor: str, leaves: dict[str, str], used: set[int], depth: int = 0) -> str:
    """``tensor`` as a canonical expression over ``leaves`` (tensor → symbol); commutative ops sorted."""
    if tensor in leaves:
        return leaves[tensor]
    n = idx.producer.get(tensor)
    if n is None or depth > 40:
        return f"?{tensor}"
    used.add(id(n))
    op = n.op_type
    if op == "Split":
        axis = int(n.attributes.get("axis", 0))
        parts = len(n.outputs)
        sizes = n.attributes.get("split")
        if sizes is None and len(n.inputs) > 1 and n.inputs[1]:
            sizes = idx.const_int(n.inputs[1])
            if sizes is None:
                return f"?split-sizes:{n.name}"
        if axis not in (1, -1) or (sizes is not None and len(set(sizes)) != 1):
            return f"?split:{n.name}"
        return f"Split{n.outputs.index(tensor)}/{parts}({_expr(idx, n.inputs[0], leaves, used, depth + 1)})"
    if op in ("Sigmoid", "Tanh", "Identity"):
        inner = _expr(idx, n.inputs[0], leaves, used, depth + 1)
        return inner if op == "Identity" else f"{op}({inner})"
    if op in ("Add", "Mul", "Sub") and len(n.inputs) == 2:
        args = [_expr(idx, i, leaves, used, depth + 1) for i in n.inputs]
        if op != "Sub":
            args.sort()
        return f"{op}({args[0]},{args[1]})"
    return f"?{op}:{n.name}"


def _canon(op: str, a: str, b: str) -> str:
    return f"{op}({','.join(sorted((a, b)))})" if op != "Sub" else f"Sub({a},{b})"


def _lstm_expected() -> tuple[str, str]:
    def sp(i: int) -> str:
        return f"Split{i}/4({_canon('Add', 'IH', 'HH')})"

    c = _canon("Add", _canon("Mul", f"Sigmoid({sp(1)})", "C"), _canon("Mul", f"Sigmoid({sp(0)})", f"Tanh({sp(2)})"))
    h = _canon("Mul", f"Sigmoid({sp(3)})", f"Tanh({c})")
    return h, c


def _gru_expected() -> str:
    def x(i: int) -> str:
        return f"Split{i}/3(IH)"

    def hh(i: int) -> str:
        return f"Split{i}/3(HH)"

    r = f"Sigmoid({_canon('Add', x(0), hh(0))})"
    z = f"Sigmoid({_canon('Add', x(1), hh(1))})"
    n = f"Tanh({_canon('Add', x(2), _canon('Mul', r, hh(2)))})"
    return _canon("Add", _canon("Mul", f"Sub(H,{n})", z), n)


def _gather_index(idx: _Index, node: Node, where: str) -> int:
    if int(node.attributes.get("axis", 0)) != 1 or len(node.inputs) != 2:
        raise UnsupportedGraph(f"node {node.name}: Gather on {where} along axis {node.attributes.get('axis', 0)}; "
                               "expected one layer's state with axis 1")
    k = idx.const_int(node.inputs[1])
    if k is None or len(k) != 1 or np.asarray(idx.inits[node.inputs[1]]).ndim != 0:
        raise UnsupportedGraph(f"node {node.name}: Gather on {where} with a non-constant or non-scalar index")
    return k[0]


def _stacked(idx: _Index, output: str, used: set[int]) -> list[str]:
    """The per-layer tensors a state output stacks (``Unsqueeze(axis 1)``, ``Concat(axis 1)``, ``Identity``)."""
    n = idx.producer.get(output)
    while n is not None and n.op_type == "Identity":
        used.add(id(n))
        n = idx.producer.get(n.inputs[0])
    if n is None:
        raise UnsupportedGraph(f"state output {output!r} is not computed by the graph")
    parts = [n]
    if n.op_type == "Concat":
        if int(n.attributes.get("axis", 0)) not in (1, -2):
            raise UnsupportedGraph(f"node {n.name}: state output {output!r} concatenated along axis "
                                   f"{n.attributes.get('axis')}; expected 1")
        used.add(id(n))
        parts = [idx.producer.get(i) for i in n.inputs]  # type: ignore[misc]
    out = []
    for p in parts:
        if p is None or p.op_type != "Unsqueeze":
            raise UnsupportedGraph(f"state output {output!r}: expected Unsqueeze(axis 1) of each layer's state, got "
                                   f"{p.op_type if p is not None else 'a graph input'}")
        axes = p.attributes.get("axes")
        if axes is None and len(p.inputs) > 1:
            axes = idx.const_int(p.inputs[1])
        if list(axes or []) not in ([1], [-2]):
            raise UnsupportedGraph(f"node {p.name}: Unsqueeze of state along axes {axes}; expected [1]")
        used.add(id(p))
        out.append(p.inputs[0])
    return out


def _chain_to_leaf(idx: _Index, start: str, where: str) -> str:
    """From ``start`` (a layer's previous state) along its quantizer to the gate product it feeds."""
    users = [u for u in idx.consumers.get(start, []) if u.op_type == "QuantizeLinear"]
    if len(users) != 1:
        raise UnsupportedGraph(f"{where}: the hidden-to-hidden product runs in float (the previous state feeds "
                               f"{len(users)} QuantizeLinear nodes, as with --cell-precision fp32); the fused backend "
                               "runs INT8 gate products")
    cur = users[0].outputs[0]
    for _ in range(8):
        if idx.is_gate_leaf(cur):
            return cur
        nxt = idx.consumers.get(cur, [])
        if len(nxt) != 1:
            break
        cur = nxt[0].outputs[0]
    raise UnsupportedGraph(f"{where}: no INT8 hidden-to-hidden product after the state's quantizer")


def recurrent_plan_from_graph(graph: Graph, state: Sequence[Mapping[str, Any]], *, input_name: str = "obs",
                              output_name: str = "actions") -> RecurrentPlan:
    """The :class:`RecurrentPlan` of an edgeq INT8 recurrent graph; :class:`UnsupportedGraph` if it is anything else.

    ``state`` is the manifest's ``io.state``: ``[h]`` for a GRU, ``[h, c]`` for an LSTM, each
    ``{"input", "output", "shape": [layers, hidden]}``.
    """
    specs = [dict(s) for s in state]
    if len(specs) not in (1, 2):
        raise UnsupportedGraph(f"{len(specs)} state tensors; the fused recurrent backend runs an LSTM (h, c) or a "
                               "GRU (h)")
    kind = "lstm" if len(specs) == 2 else "gru"
    shapes = {tuple(int(d) for d in s["shape"]) for s in specs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise UnsupportedGraph(f"state shapes {[s['shape'] for s in specs]}; expected [layers, hidden] for each")
    num_layers, hidden = next(iter(shapes))
    wanted_in = {input_name, *(s["input"] for s in specs)}
    wanted_out = {output_name, *(s["output"] for s in specs)}
    if set(graph.inputs) != wanted_in or set(graph.outputs) != wanted_out:
        raise UnsupportedGraph(f"the graph has inputs {graph.inputs} and outputs {graph.outputs}; the manifest's io "
                               f"names {sorted(wanted_in)} and {sorted(wanted_out)}")
    idx = _Index(graph)
    used: set[int] = set()
    h_in = specs[0]["input"]
    c_in = specs[1]["input"] if kind == "lstm" else None
    prev: dict[tuple[str, int], str] = {}
    for name in [h_in] + ([c_in] if c_in else []):
        assert name is not None
        for n in idx.consumers.get(name, []):
            if n.op_type != "Gather":
                raise UnsupportedGraph(f"node {n.name}: state input {name!r} read by {n.op_type}; expected Gather "
                                       "of one layer")
            k = _gather_index(idx, n, name)
            if not 0 <= k < num_layers or (name, k) in prev:
                raise UnsupportedGraph(f"node {n.name}: layer index {k} of {name!r} (the state has {num_layers})")
            prev[(name, k)] = n.outputs[0]
            used.add(id(n))
    for k in range(num_layers):
        for name in [h_in] + ([c_in] if c_in else []):
            if (name, k) not in prev:
                raise UnsupportedGraph(f"layer {k} of state input {name!r} is never read")
    h_tensors = _stacked(idx, specs[0]["output"], used)
    c_tensors = _stacked(idx, specs[1]["output"], used) if kind == "lstm" else []
    if len(h_tensors) != num_layers or (kind == "lstm" and len(c_tensors) != num_layers):
        raise UnsupportedGraph(f"the state outputs stack {len(h_tensors)} layer(s); the state has {num_layers}")
    g = CELL_GATES[kind]
    cells: list[CellLayer] = []
    x_src = input_name
    for k in range(num_layers):
        h_prev = prev[(h_in, k)]
        hh_leaf = _chain_to_leaf(idx, h_prev, f"cell layer {k}")
        # the ih leaf: the other gate product in the cell expression
        cell_nodes: set[int] = set()
        probe: dict[str, str] = {hh_leaf: "HH", h_prev: "H"}
        if c_in:
            probe[prev[(c_in, k)]] = "C"
        # find the ih product: walk the h expression and take the first gate leaf that is not hh
        ih_leaf = _find_other_leaf(idx, h_tensors[k], probe)
        if ih_leaf is None:
            raise UnsupportedGraph(f"cell layer {k}: no input-to-hidden INT8 product in the cell update")
        probe[ih_leaf] = "IH"
        h_expr = _expr(idx, h_tensors[k], probe, cell_nodes)
        if kind == "lstm":
            want_h, want_c = _lstm_expected()
            c_expr = _expr(idx, c_tensors[k], probe, cell_nodes)
            # h' reads c' (the node that c_out stacks): name it so
            h_expr = _expr(idx, h_tensors[k], {**probe, c_tensors[k]: "CNEW"}, cell_nodes)
            want_h = want_h.replace(f"Tanh({want_c})", "Tanh(CNEW)")
            if c_expr != want_c or h_expr != want_h:
                raise UnsupportedGraph(f"cell layer {k}: the cell update is not an LSTM's (c' = {c_expr[:160]}, "
                                       f"h' = {h_expr[:160]})")
        elif h_expr != _gru_expected():
            raise UnsupportedGraph(f"cell layer {k}: the cell update is not a GRU's (h' = {h_expr[:200]})")
        used |= cell_nodes
        into_graph, into_nodes = idx.subgraph(x_src, ih_leaf)
        hh_graph, hh_nodes = idx.subgraph(h_prev, hh_leaf)
        into = plan_from_graph(into_graph)
        hh_plan = plan_from_graph(hh_graph)
        if hh_plan.pre or len(hh_plan.layers) != 1 or hh_plan.layers[0].post:
            raise UnsupportedGraph(f"cell layer {k}: the hidden-to-hidden product is not one INT8 layer "
                                   f"({hh_plan.describe()})")
        hh = hh_plan.layers[0]
        if into.layers[-1].post:
            raise UnsupportedGraph(f"cell layer {k}: ops after the input-to-hidden product before the gates")
        if hh.k != hidden or hh.n != g * hidden or into.layers[-1].n != g * hidden:
            raise UnsupportedGraph(f"cell layer {k}: gate products of shapes {[into.layers[-1].k, into.layers[-1].n]} "
                                   f"and {[hh.k, hh.n]}; expected [*, {g * hidden}] and [{hidden}, {g * hidden}]")
        used |= into_nodes | hh_nodes
        cells.append(CellLayer(into, hh))
        x_src = h_tensors[k]
    head_graph, head_nodes = idx.subgraph(x_src, output_name)
    head = plan_from_graph(head_graph)
    used |= head_nodes
    left = [n.name or n.op_type for n in graph.nodes if id(n) not in used]
    if left:
        raise UnsupportedGraph(f"nodes outside the recurrent policy's structure: {left[:5]}")
    return RecurrentPlan(kind, hidden, input_name, output_name, specs, cells, head)


def _find_other_leaf(idx: _Index, tensor: str, known: Mapping[str, str]) -> str | None:
    """The first gate-product tensor below ``tensor`` that is not in ``known`` (depth-first)."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if t in seen or t in known:
            continue
        seen.add(t)
        if idx.is_gate_leaf(t):
            return t
        n = idx.producer.get(t)
        if n is not None and n.op_type in ("Add", "Mul", "Sub", "Sigmoid", "Tanh", "Split", "Identity"):
            stack.extend(i for i in n.inputs if i and i not in idx.inits)
    return None


__all__ = ["CELL_GATES", "CellLayer", "RecurrentPlan", "apply_ops", "chain_forward", "fma32", "layer_forward",
           "mlas_logistic", "mlas_tanh", "recurrent_plan_from_graph", "reference_step"]
