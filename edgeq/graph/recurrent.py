"""LSTM and GRU cells unrolled into plain ONNX ops, with the state as explicit graph inputs/outputs.

ONNX Runtime's quantizer cannot quantize the ONNX ``LSTM``/``GRU`` ops, and TensorRT runs them in
float. edgeq writes one time step of the cell as its gate matrix products instead:

* LSTM (PyTorch gate order i, f, g, o)::

      gates = x @ W_ih^T + b_ih + h @ W_hh^T + b_hh        # two Gemm nodes (transB=1) + Add
      i, f, g, o = split(gates); i, f, o = sigmoid(.); g = tanh(g)
      c' = f * c + i * g;  h' = o * tanh(c')

* GRU (gate order r, z, n)::

      gx = x @ W_ih^T + b_ih;  gh = h @ W_hh^T + b_hh       # two Gemm nodes
      r = sigmoid(gx_r + gh_r); z = sigmoid(gx_z + gh_z); n = tanh(gx_n + r * gh_n)
      h' = (h - n) * z + n

The two gate Gemms of each layer are ordinary weighted layers to
:func:`edgeq.graph.analysis.find_weighted_layers`, so the QDQ exporter quantizes them like any
``Linear`` (per-output-channel int8 weights, so each gate row has its own scale; per-tensor int8
input, calibrated on the layer input and on the previous hidden state). The nonlinearities and the
cell update stay float. Keeping the cell in float is ``keep_float=gate_nodes``.

State: ``h_in`` (and ``c_in`` for LSTM) are ``[batch, num_layers, hidden]`` graph inputs, zeros at
an episode start; ``h_out`` / ``c_out`` are the next state. Per row this is PyTorch's
``[num_layers, batch, hidden]`` state transposed to batch-first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgeq.errors import PolicyFormatError
from edgeq.graph.builder import GraphBuilder
from edgeq.graph.layers import Layer, emit_layers
from edgeq.policy import ACTIONS_OUTPUT, OBS_INPUT, StateSpec

H_IN, C_IN, H_OUT, C_OUT = "h_in", "c_in", "h_out", "c_out"
CELL_KINDS = {"lstm": 4, "gru": 3}


@dataclass(frozen=True)
class RecurrentLayer:
    """One layer's weights in PyTorch's layout: ``weight_ih`` [G*H, in], ``weight_hh`` [G*H, H]."""

    weight_ih: np.ndarray
    weight_hh: np.ndarray
    bias_ih: np.ndarray | None
    bias_hh: np.ndarray | None


@dataclass(frozen=True)
class RecurrentCell:
    """A (stacked, unidirectional) ``nn.LSTM`` or ``nn.GRU``, one time step at a time."""

    kind: str
    name: str
    layers: tuple[RecurrentLayer, ...]

    @property
    def gates(self) -> int:
        return CELL_KINDS[self.kind]

    @property
    def hidden_size(self) -> int:
        return int(self.layers[0].weight_hh.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.layers[0].weight_ih.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def state_specs(self) -> tuple[StateSpec, ...]:
        shape = (self.num_layers, self.hidden_size)
        specs = [StateSpec(H_IN, H_OUT, shape)]
        if self.kind == "lstm":
            specs.append(StateSpec(C_IN, C_OUT, shape))
        return tuple(specs)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "module": self.name, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "input_size": self.input_size}

    @classmethod
    def from_state_dict(cls, kind: str, sd: Mapping[str, np.ndarray], prefix: str, *, source: str,
                        name: str | None = None) -> RecurrentCell:
        """Read ``{prefix}.weight_ih_l{k}`` ... as ``nn.LSTM``/``nn.GRU`` save them.

        Raises :class:`PolicyFormatError` for bidirectional or projected (``proj_size``) cells and
        for weights whose shapes do not fit together.
        """
        kind = kind.lower()
        if kind not in CELL_KINDS:
            raise PolicyFormatError(f"{source}: recurrent cell kind {kind!r}; expected one of {sorted(CELL_KINDS)}")
        unsupported = [k for k in sd if k.startswith(prefix + ".") and ("_reverse" in k or "weight_hr" in k)]
        if unsupported:
            raise PolicyFormatError(f"{source}: {prefix} is bidirectional or uses proj_size ({unsupported[0]}); "
                                    "edgeq supports unidirectional LSTM/GRU without projections")
        g = CELL_KINDS[kind]
        layers: list[RecurrentLayer] = []
        k = 0
        while f"{prefix}.weight_ih_l{k}" in sd:
            def get(key: str, k: int = k) -> np.ndarray | None:
                v = sd.get(f"{prefix}.{key}_l{k}")
                return None if v is None else np.asarray(v, np.float32)

            w_ih, w_hh, b_ih, b_hh = get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")
            if w_hh is None:
                raise PolicyFormatError(f"{source}: {prefix}.weight_hh_l{k} is missing")
            layers.append(RecurrentLayer(w_ih, w_hh, b_ih, b_hh))  # type: ignore[arg-type]
            k += 1
        if not layers:
            raise PolicyFormatError(f"{source}: no {prefix}.weight_ih_l0 (expected the weights of an "
                                    f"nn.{kind.upper()})")
        hidden = layers[0].weight_hh.shape[1]
        for i, layer in enumerate(layers):
            want_in = layers[0].weight_ih.shape[1] if i == 0 else hidden
            shapes_ok = (layer.weight_ih.shape == (g * hidden, want_in)
                         and layer.weight_hh.shape == (g * hidden, hidden)
                         and all(b is None or b.shape == (g * hidden,) for b in (layer.bias_ih, layer.bias_hh)))
            if not shapes_ok:
                raise PolicyFormatError(
                    f"{source}: {prefix} layer {i} has weight_ih {layer.weight_ih.shape}, weight_hh "
                    f"{layer.weight_hh.shape}; expected [{g}*{hidden}, {want_in}] and [{g}*{hidden}, {hidden}] "
                    f"for an {kind.upper()} with hidden size {hidden}")
        return cls(kind, name or prefix, tuple(layers))


@dataclass
class EmittedCell:
    """What :func:`emit_cell` added: the top layer's output and the gate Gemm node names."""

    output: str
    gate_nodes: list[str] = field(default_factory=list)


def _gemm(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray | None, base: str) -> tuple[str, str]:
    out = g.linear(x, w, b, base)
    return out, g.nodes[-1].name


def emit_cell(g: GraphBuilder, x: str, cell: RecurrentCell) -> EmittedCell:
    """Append one time step of ``cell`` reading ``x`` [batch, in] and the graph inputs ``h_in``/``c_in``.

    Adds the graph outputs' producers for ``h_out``/``c_out`` (as Identity nodes) and returns the
    last layer's hidden output [batch, hidden].
    """
    emitted = EmittedCell(x)
    h_outs: list[str] = []
    c_outs: list[str] = []
    for k, layer in enumerate(cell.layers):
        base = f"{cell.name}.l{k}"
        idx = g.const(f"{base}.index", np.array(k, np.int64), np.dtype(np.int64))
        h_prev = g.op("Gather", [H_IN, idx], f"{base}.h_prev", axis=1)
        gx, nx = _gemm(g, x, layer.weight_ih, layer.bias_ih, f"{base}.ih")
        gh, nh = _gemm(g, h_prev, layer.weight_hh, layer.bias_hh, f"{base}.hh")
        emitted.gate_nodes += [nx, nh]
        if cell.kind == "lstm":
            c_prev = g.op("Gather", [C_IN, idx], f"{base}.c_prev", axis=1)
            gates = g.op("Add", [gx, gh], f"{base}.gates")
            i, f, gg, o = g.op_multi("Split", [gates], [f"{base}.i_pre", f"{base}.f_pre", f"{base}.g_pre",
                                                          f"{base}.o_pre"], f"{base}.split", axis=1)
            i = g.op("Sigmoid", [i], f"{base}.i")
            f = g.op("Sigmoid", [f], f"{base}.f")
            gg = g.op("Tanh", [gg], f"{base}.g")
            o = g.op("Sigmoid", [o], f"{base}.o")
            c_new = g.op("Add", [g.op("Mul", [f, c_prev], f"{base}.fc"), g.op("Mul", [i, gg], f"{base}.ig")],
                         f"{base}.c")
            h_new = g.op("Mul", [o, g.op("Tanh", [c_new], f"{base}.tanh_c")], f"{base}.h")
            c_outs.append(c_new)
        else:
            xr, xz, xn = g.op_multi("Split", [gx], [f"{base}.xr", f"{base}.xz", f"{base}.xn"], f"{base}.split_x",
                                    axis=1)
            hr, hz, hn = g.op_multi("Split", [gh], [f"{base}.hr", f"{base}.hz", f"{base}.hn"], f"{base}.split_h",
                                    axis=1)
            r = g.op("Sigmoid", [g.op("Add", [xr, hr], f"{base}.r_pre")], f"{base}.r")
            z = g.op("Sigmoid", [g.op("Add", [xz, hz], f"{base}.z_pre")], f"{base}.z")
            n = g.op("Tanh", [g.op("Add", [xn, g.op("Mul", [r, hn], f"{base}.rhn")], f"{base}.n_pre")], f"{base}.n")
            diff = g.op("Sub", [h_prev, n], f"{base}.h_minus_n")
            h_new = g.op("Add", [g.op("Mul", [diff, z], f"{base}.zd"), n], f"{base}.h")
        h_outs.append(h_new)
        x = h_new
    axes = g.const(f"{cell.name}.state_axis", np.array([1], np.int64), np.dtype(np.int64))

    def stack(values: list[str], out_name: str) -> None:
        parts = [g.op("Unsqueeze", [v, axes], f"{v}.stacked") for v in values]
        y = parts[0] if len(parts) == 1 else g.op("Concat", parts, f"{cell.name}.{out_name}", axis=1)
        g.output(y, out_name)

    stack(h_outs, H_OUT)
    if cell.kind == "lstm":
        stack(c_outs, C_OUT)
    emitted.output = x
    return emitted


@dataclass
class RecurrentGraph:
    """A recurrent policy graph with its state tensors and the node names of its gate Gemms."""

    model: onnx.ModelProto
    state: tuple[StateSpec, ...]
    gate_nodes: list[str]


def recurrent_policy_to_onnx(pre: list[Layer], cell: RecurrentCell, post: list[Layer], obs_dim: int, act_dim: int,
                             graph_name: str, metadata: dict[str, str] | None = None) -> RecurrentGraph:
    """``obs`` → ``pre`` layers → ``cell`` → ``post`` layers → ``actions``, with explicit state I/O.

    ``pre``/``post`` are :mod:`edgeq.graph.layers` layers (normalization before the cell; the MLP
    head and action squashing/clipping after it).
    """
    g = GraphBuilder(graph_name)
    x = emit_layers(g, OBS_INPUT, pre, act_prefix="pre_act")
    emitted = emit_cell(g, x, cell)
    y = emit_layers(g, emitted.output, post)
    g.output(y, ACTIONS_OUTPUT)
    shape: list[int | str] = ["batch", cell.num_layers, cell.hidden_size]
    state = cell.state_specs()
    inputs: list[tuple[str, list[int | str]]] = [(OBS_INPUT, ["batch", obs_dim])]
    outputs: list[tuple[str, list[int | str]]] = [(ACTIONS_OUTPUT, ["batch", act_dim])]
    for s in state:
        inputs.append((s.input_name, shape))
        outputs.append((s.output_name, shape))
    meta = dict(metadata or {})
    meta["edgeq.recurrent"] = f"{cell.kind}:{cell.num_layers}x{cell.hidden_size}"
    model = g.make_model(inputs, outputs, metadata=meta)
    return RecurrentGraph(model, state, emitted.gate_nodes)
