"""ONNX policies that read an observation history, and two-module (encoder + body) policies.

edgeq's form of a history policy is one graph input ``obs`` [batch, K * obs_dim]: the last ``K``
observations flattened oldest first (the current one last; zeros before the episode start), which
the runtime keeps (:mod:`edgeq.deploy.history`), so ``act(obs)`` still takes one observation.
Exported files come in other shapes; each is rewritten **exactly** into that form before the usual
normalization (:func:`edgeq.ingest.onnx_policy.normalize_onnx`):

* one input ``[batch, K, obs_dim]`` (a Transformer over past observations, a frame-stack MLP that
  flattens inside, a Conv1d history encoder): a ``Reshape`` from the flat window feeds it;
* two inputs, ``obs`` [batch, obs_dim] and ``obs_history`` [batch, K, obs_dim]: the history input is
  the same window (current observation last), and ``obs`` is its last row (a ``Gather``);
* two files, ``encoder`` (``obs_history`` → latent) and ``body`` (the latent, and the current
  observation or the history → actions): :func:`compose_modules` joins them into one graph
  (``onnx.compose.merge_models``), the body's input named like the encoder's output (or, failing
  that, of the same shape) fed by it, then as above.

``Conv`` over time (1-D: weight [C_out, C_in / groups, k], any stride, dilation, zero padding and
groups) is lowered to an im2col ``MatMul`` (:func:`lower_conv1d`): the ``k`` taps of the (padded)
input, each a strided slice starting at ``j * dilation``, are concatenated on the channel axis and
multiplied by the weight as a [k * C_in, C_out] matrix (block-diagonal for groups). That is the
same sum of products in another order, so the policy is unchanged (checked to 1e-5 by the ingest
tests), and every later stage (per-channel int8 weights, the per-layer search, the ONNX Runtime
CPU integer kernel) treats the convolution as the weighted layer it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import PolicyFormatError
from edgeq.policy import OBS_INPUT, HistorySpec

WINDOW = "edgeq.obs_window"


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def compose_modules(encoder: onnx.ModelProto, body: onnx.ModelProto, *, origin: str) -> onnx.ModelProto:
    """One graph ``encoder → body``; the body's remaining inputs stay graph inputs."""
    from onnx import compose

    if len(encoder.graph.output) != 1:
        raise PolicyFormatError(f"{origin}: the encoder has {len(encoder.graph.output)} outputs "
                                f"{[o.name for o in encoder.graph.output]}; expected one (the latent)")
    latent = encoder.graph.output[0]
    body_inputs = _real_inputs(body)
    target = next((v for v in body_inputs if v.name == latent.name), None)
    if target is None:
        same = [v for v in body_inputs if _dims(v)[1:] == _dims(latent)[1:]]
        if len(same) != 1:
            raise PolicyFormatError(f"{origin}: cannot tell which body input takes the encoder's output "
                                    f"{latent.name!r} {_dims(latent)} (body inputs: "
                                    f"{[(v.name, _dims(v)) for v in body_inputs]}); name it like the output")
        target = same[0]
    enc, bod = onnx.ModelProto(), onnx.ModelProto()
    enc.CopyFrom(encoder)
    bod.CopyFrom(body)
    version = max(_opset(enc), _opset(bod))
    for m in (enc, bod):
        if _opset(m) < version:
            from onnx import version_converter

            m.CopyFrom(version_converter.convert_version(m, version))
        m.ir_version = max(enc.ir_version, bod.ir_version)
    enc = compose.add_prefix(enc, "encoder/")
    bod = compose.add_prefix(bod, "body/")
    # inputs keep their names (they are the policy's observation inputs)
    for m, pre in ((enc, "encoder/"), (bod, "body/")):
        for v in _real_inputs(m):
            if v.name != f"body/{target.name}":
                _rename(m.graph, v.name, v.name[len(pre):])
    try:
        merged = compose.merge_models(enc, bod, io_map=[(f"encoder/{latent.name}", f"body/{target.name}")])
    except Exception as exc:  # noqa: BLE001 - onnx.compose raises ValueError and checker errors
        raise PolicyFormatError(f"{origin}: cannot join encoder and body: {exc}") from None
    seen: set[str] = set()
    kept = []
    for v in merged.graph.input:  # an input both modules read (the history) appears twice
        if v.name not in seen:
            seen.add(v.name)
            kept.append(v)
    del merged.graph.input[:]
    merged.graph.input.extend(kept)
    return merged


def _opset(model: onnx.ModelProto) -> int:
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
    for v in (*graph.input, *graph.output):
        if v.name == old:
            v.name = new


def history_input(model: onnx.ModelProto, *, origin: str,
                  history: int | None = None) -> tuple[onnx.ModelProto, HistorySpec | None]:
    """Rewrite a graph reading ``[batch, K, obs_dim]`` (and maybe ``[batch, obs_dim]``) to read the flat window.

    Returns the model unchanged and None when it has one 2-D input and ``history`` is None. With
    ``history=K`` a single 2-D input of ``K * obs_dim`` features is taken as an already flattened
    window (a frame-stacked MLP exported with its stack flattened), oldest first.
    """
    inputs = _real_inputs(model)
    shapes = {v.name: _dims(v) for v in inputs}
    hist = [v for v in inputs if len(shapes[v.name]) == 3]
    flat = [v for v in inputs if len(shapes[v.name]) == 2]
    if not hist:
        if history is None or len(inputs) != 1:
            return model, None
        width = shapes[inputs[0].name][1]
        if not isinstance(width, int) or width % history:
            raise PolicyFormatError(f"{origin}: input {inputs[0].name!r} has {width} features, not a multiple of "
                                    f"the history length {history}")
        spec = HistorySpec(int(history), width // int(history))
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m, spec
    if len(hist) != 1 or len(flat) + len(hist) != len(inputs) or len(flat) > 1:
        raise PolicyFormatError(f"{origin}: inputs {[(v.name, shapes[v.name]) for v in inputs]}; a history policy "
                                "takes one [batch, K, obs_dim] history and at most one [batch, obs_dim] observation")
    _, k, d = shapes[hist[0].name]
    if not isinstance(k, int) or not isinstance(d, int) or k < 1 or d < 1:
        raise PolicyFormatError(f"{origin}: history input {hist[0].name!r} has shape {shapes[hist[0].name]}; "
                                "the history length and observation size must be fixed numbers")
    if history is not None and history != k:
        raise PolicyFormatError(f"{origin}: history length {history} was given but input {hist[0].name!r} holds {k}")
    if flat and shapes[flat[0].name][1] not in (d, None):
        raise PolicyFormatError(f"{origin}: observation input {flat[0].name!r} has {shapes[flat[0].name][1]} "
                                f"features but the history {hist[0].name!r} holds {d} per step")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = [helper.make_node("Reshape", [WINDOW, f"{WINDOW}.shape"], [hist[0].name], name="edgeq/history_reshape")]
    inits = [numpy_helper.from_array(np.array([-1, k, d], np.int64), f"{WINDOW}.shape")]
    if flat:
        nodes.append(helper.make_node("Gather", [hist[0].name, f"{WINDOW}.last"], [flat[0].name],
                                      name="edgeq/history_current", axis=1))
        inits.append(numpy_helper.from_array(np.array(k - 1, np.int64), f"{WINDOW}.last"))
    new_nodes = nodes + list(g.node)
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(inits)
    kept = [v for v in g.input if v.name not in {hist[0].name, *(f.name for f in flat)}]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info(WINDOW, TensorProto.FLOAT, ["batch", k * d]), *kept])
    del g.value_info[:]
    return m, HistorySpec(int(k), int(d), OBS_INPUT)


def _conv_pads(attrs: dict[str, object], length: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """(left, right) zero padding of a 1-D Conv, from ``pads`` or ``auto_pad``."""
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = max((-(-length // stride) - 1) * stride + dilation * (k - 1) + 1 - length, 0)
        small = total // 2
        return (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    if auto == "VALID":
        return 0, 0
    pads = [int(v) for v in attrs.get("pads", [0, 0])]  # type: ignore[attr-defined]
    return pads[0], pads[1]


def conv1d_as_matrix(w: np.ndarray, group: int) -> np.ndarray:
    """A Conv1d weight ``[C_out, C_in / group, k]`` as the im2col matrix ``[k * C_in, C_out]``.

    Row ``j * C_in + c`` multiplies input channel ``c`` at tap ``j``; with groups the matrix is
    block-diagonal (an output channel reads only its group's input channels; the other entries
    are exact zeros, which stay zero in INT8).
    """
    c_out, c_in_g, k = w.shape
    c_in, out_g = c_in_g * group, c_out // group
    m = np.zeros((k, c_in, c_out), np.float32)
    for g in range(group):
        block = w[g * out_g:(g + 1) * out_g]  # [out_g, c_in_g, k]
        m[:, g * c_in_g:(g + 1) * c_in_g, g * out_g:(g + 1) * out_g] = block.transpose(2, 1, 0)
    return np.ascontiguousarray(m.reshape(k * c_in, c_out))


def lower_conv1d(model: onnx.ModelProto, *, origin: str) -> list[str]:
    """Rewrite every 1-D ``Conv`` with a constant weight into an im2col ``MatMul`` (in place).

    Stride, dilation, zero padding (``pads`` or ``auto_pad``) and groups are kept: the padded input
    (a ``Pad``) is cut into ``k`` taps ``Slice(start=j * dilation, step=stride)``, concatenated on the
    channel axis and multiplied by :func:`conv1d_as_matrix`. Returns the names of the rewritten
    nodes; a 1-D Conv over a length that is not a fixed number raises (it would stay float otherwise,
    silently).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    if not any(n.op_type == "Conv" for n in g.node):
        return []
    shapes = {v.name: _dims(v) for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *g.input)}
    opset = _opset(model)
    out: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    lowered: list[str] = []
    for node in g.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            out.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if w.ndim != 3:
            out.append(node)  # 2-D convolutions are not history encoders; left as they are (float)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or node.output[0]
        length = (shapes.get(node.input[0]) or [None, None, None])[-1]
        stride = int(attrs.get("strides", [1])[0])
        dilation = int(attrs.get("dilations", [1])[0])
        group = int(attrs.get("group", 1))
        c_out, c_in_g, k = w.shape
        if not isinstance(length, int) or group < 1 or c_out % group or opset < 11:
            raise PolicyFormatError(f"{origin}: Conv {label!r} (attributes {attrs}, input length {length}, opset "
                                    f"{opset}) is not a 1-D convolution over a fixed number of steps edgeq can "
                                    "lower; export it with a fixed history length (and opset >= 11)")
        left, right = _conv_pads(attrs, length, k, stride, dilation)
        l_out = (length + left + right - dilation * (k - 1) - 1) // stride + 1
        if l_out < 1:
            raise PolicyFormatError(f"{origin}: Conv {label!r} has no output step (input length {length}, kernel "
                                    f"{k}, dilation {dilation}, padding {left}+{right})")
        base = label.replace("/", "_")
        xt = f"{base}.im2col_in"
        out.append(helper.make_node("Transpose", [node.input[0]], [xt], name=f"{label}/to_time_major", perm=[0, 2, 1]))
        if left or right:
            padded = f"{base}.padded"
            new_inits.append(numpy_helper.from_array(np.array([0, left, 0, 0, right, 0], np.int64), f"{base}.pads"))
            out.append(helper.make_node("Pad", [xt, f"{base}.pads"], [padded], name=f"{label}/pad", mode="constant"))
            xt = padded
        taps = []
        for j in range(k):
            names = [f"{base}.tap{j}.{q}" for q in ("start", "end", "axes", "steps")]
            start = j * dilation
            for name, value in zip(names, (start, start + (l_out - 1) * stride + 1, 1, stride), strict=True):
                new_inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
            taps.append(f"{base}.tap{j}")
            out.append(helper.make_node("Slice", [xt, *names], [taps[-1]], name=f"{label}/tap{j}"))
        cols = f"{base}.im2col"
        out.append(helper.make_node("Concat", taps, [cols], name=f"{label}/im2col", axis=2))
        wname = f"{base}.im2col_weight"
        new_inits.append(numpy_helper.from_array(conv1d_as_matrix(w, group), wname))
        mm = f"{base}.matmul"
        out.append(helper.make_node("MatMul", [cols, wname], [mm], name=label))
        y = mm
        if len(node.input) > 2 and node.input[2]:
            y = f"{base}.biased"
            out.append(helper.make_node("Add", [mm, node.input[2]], [y], name=f"{label}/bias"))
        out.append(helper.make_node("Transpose", [y], [node.output[0]], name=f"{label}/to_channels", perm=[0, 2, 1]))
        lowered.append(label)
    del g.node[:]
    g.node.extend(out)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    return lowered
