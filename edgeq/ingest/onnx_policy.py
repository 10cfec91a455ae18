"""Float ONNX policy files (Isaac Lab / rsl_rl ``policy.onnx``, any exporter) → :class:`FloatPolicy`.

An exported policy file is normalized to edgeq's conventions, so that every later stage treats it
like a policy built from an SB3 archive:

* **self-contained**: external-data tensors are loaded and embedded, local functions inlined,
  ``Constant`` nodes and constant sub-expressions (``Transpose``/``Identity``/``Cast`` of a
  weight...) folded into initializers, so each ``Gemm``/``MatMul`` reads its weight straight from
  an initializer (what :func:`edgeq.graph.analysis.find_weighted_layers` needs);
* **opset >= 13** (QuantizeLinear with a per-channel axis): older files are upgraded with
  ``onnx.version_converter`` to :data:`TARGET_OPSET`;
* **one input ``obs`` [batch, obs_dim], one output ``actions`` [batch, act_dim]**, float32: the
  single float input and the single output (or the one named ``actions``) are renamed; other
  outputs (a value head) are pruned;
* **dynamic batch**: exporters such as Isaac Lab's write a fixed batch of 1 (``dynamic_axes={}``);
  the batch dimension of the input and output becomes ``batch``, and ``Reshape`` nodes whose
  constant target shape hard-codes that batch are rewritten (``[1, 256]`` → ``[-1, 256]``). Nodes
  that cannot follow a batch (``Flatten(axis=0)``, a ``Reshape`` that drops the batch axis) raise
  :class:`~edgeq.errors.PolicyFormatError` naming the node. The result is then checked by running it
  in ONNX Runtime at batch 1 and batch 3: each row must equal its own batch-1 result.

An ONNX file has no spaces. The observation and action *dimensions* come from the graph; their
*bounds* are unknown (±inf) unless given (``action_low``/``action_high``) or taken from the
environment at calibration time (:func:`bind_env_spaces`). The graph itself is not changed by the
bounds: whatever the file computes (tanh, scaling, clipping) is what the policy does.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import PolicyFormatError
from edgeq.graph.analysis import find_weighted_layers
from edgeq.ingest.limits import MAX_WIDTH, check_elements, check_file_size
from edgeq.policy import ACTIONS_OUTPUT, OBS_INPUT, FloatPolicy, PolicySource
from edgeq.spaces import BoxSpec

#: Opset that files older than opset 13 are converted to (edgeq's own graphs use the same).
TARGET_OPSET = 17
MIN_OPSET = 13
BATCH = "batch"
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Ops whose outputs are folded when all their inputs are constants. Shape-producing ops are left
#: alone: folding them would freeze a batch size.
#: Most nodes of a policy graph edgeq ingests.
MAX_NODES = 20_000
_FOLDABLE = {"Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Mul", "Add", "Sub", "Div",
             "Neg", "Sqrt", "Reciprocal", "Concat", "MatMul", "Gemm", "Gather", "Slice", "Flatten"}
_MAX_FOLD_ELEMENTS = 1 << 24


@dataclass
class NormalizationReport:
    """What :func:`normalize_onnx` changed, for the manifest (``source.details``)."""

    original_input: str = ""
    original_output: str = ""
    original_opset: int = 0
    opset: int = 0
    original_batch: int | str | None = None
    dropped_outputs: list[str] = field(default_factory=list)
    reshapes_rewritten: list[str] = field(default_factory=list)
    folded_constants: int = 0
    inlined_functions: int = 0
    lowered_convs: list[str] = field(default_factory=list)
    attention_scales_moved: list[str] = field(default_factory=list)
    weighted_layers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"original_input": self.original_input, "original_output": self.original_output,
                "original_opset": self.original_opset, "opset": self.opset,
                "original_batch": self.original_batch, "dropped_outputs": self.dropped_outputs,
                "reshapes_rewritten": self.reshapes_rewritten, "folded_constants": self.folded_constants,
                "inlined_functions": self.inlined_functions, "lowered_convs": self.lowered_convs,
                "attention_scales_moved": self.attention_scales_moved,
                "weighted_layers": self.weighted_layers}


# -- small graph helpers ------------------------------------------------------------------------
def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return int(op.version)
    return 0


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in t.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _set_batch_dim(vi: onnx.ValueInfoProto) -> None:
    dim = vi.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = BATCH


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in collection:
            if item.name == old:
                item.name = new


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return names


def _unique(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        name = f"{base}_{i}"
        i += 1
    names.add(name)
    return name


def _check_supported_nodes(model: onnx.ModelProto, origin: str) -> None:
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            raise PolicyFormatError(f"{origin}: node {node.name or node.op_type!r} uses the custom operator "
                                    f"domain {node.domain!r} ({node.op_type}); expected standard ONNX operators")
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise PolicyFormatError(f"{origin}: node {node.name or node.op_type!r} ({node.op_type}) has a "
                                        "subgraph; control flow is not supported (re-export a straight-line "
                                        "feed-forward policy)")


# -- constants ----------------------------------------------------------------------------------
def _fold_constants(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes and nodes of :data:`_FOLDABLE` with only constant inputs into initializers.

    Values are computed by ``onnx.reference`` (the ONNX reference implementation), node by node,
    in graph order. Returns how many nodes were folded.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    graph_inputs = {v.name for v in graph.input}
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer
                                     if t.name not in graph_inputs}
    kept: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    folded = 0
    for node in graph.node:
        is_const = node.op_type == "Constant"
        foldable = node.op_type in _FOLDABLE and all(i == "" or i in consts for i in node.input) and node.input
        if not (is_const or foldable) or len(node.output) != 1:
            kept.append(node)
            continue
        sub_inputs = [i for i in node.input if i]
        sub = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape)
             for i in dict.fromkeys(sub_inputs)],
            [helper.make_empty_tensor_value_info(node.output[0])])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
        try:
            (value,) = ReferenceEvaluator(sub_model).run(None, {i: consts[i] for i in dict.fromkeys(sub_inputs)})
        except Exception:  # noqa: BLE001 - a node the reference cannot fold stays in the graph
            kept.append(node)
            continue
        value = np.asarray(value)
        if value.size > _MAX_FOLD_ELEMENTS:
            kept.append(node)
            continue
        consts[node.output[0]] = value
        new_inits.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_inits)
        _drop_unused_initializers(graph)
    return folded


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# -- inputs / outputs ---------------------------------------------------------------------------
def _named(values: list[onnx.ValueInfoProto], name: str, kind: str, origin: str) -> onnx.ValueInfoProto:
    """The graph input/output (``kind``) called ``name``, or an error listing the ones there are."""
    for v in values:
        if v.name == name:
            return v
    raise PolicyFormatError(f"{origin}: no graph {kind} named {name!r} ({kind}s: {[v.name for v in values]})")


def _choose_io(graph: onnx.GraphProto, origin: str, input_name: str | None,
               output_name: str | None) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    inits = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in inits]
    outputs = list(graph.output)
    if input_name is not None:
        x = _named(inputs, input_name, "input", origin)
    elif len(inputs) == 1:
        x = inputs[0]
    else:
        raise PolicyFormatError(f"{origin}: the graph has {len(inputs)} inputs {[v.name for v in inputs]}; edgeq "
                                "quantizes feed-forward policies with one observation input (recurrent policies "
                                "with state inputs are not supported); name the observation input explicitly "
                                "(--onnx-input) if the others are unused")
    if output_name is not None:
        y = _named(outputs, output_name, "output", origin)
    elif len(outputs) == 1:
        y = outputs[0]
    elif any(v.name == ACTIONS_OUTPUT for v in outputs):
        y = next(v for v in outputs if v.name == ACTIONS_OUTPUT)
    else:
        raise PolicyFormatError(f"{origin}: the graph has {len(outputs)} outputs {[v.name for v in outputs]} and "
                                f"none is named {ACTIONS_OUTPUT!r}; name the action output (--onnx-output)")
    for v, role in ((x, "input"), (y, "output")):
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) \
                if v.type.tensor_type.elem_type else "unknown"
            raise PolicyFormatError(f"{origin}: {role} {v.name!r} has element type {dtype}; expected float32")
        if len(_dims(v)) != 2:
            raise PolicyFormatError(f"{origin}: {role} {v.name!r} has shape {_dims(v) or 'unknown'}; expected "
                                    "[batch, features] (re-export with a leading batch axis)")
    if x.name == y.name:
        raise PolicyFormatError(f"{origin}: input {x.name!r} is also the output; the graph computes nothing")
    return x, y


def _prune_to(model: onnx.ModelProto, origin: str, x: str, y: str) -> tuple[onnx.ModelProto, list[str]]:
    """Keep only what computes ``y`` from ``x`` (drops other outputs, such as a value head)."""
    from onnx.utils import Extractor

    dropped = [o.name for o in model.graph.output if o.name != y]
    graph_name = model.graph.name
    pruned = Extractor(model).extract_model([x], [y])
    pruned.graph.name = graph_name
    pruned.ir_version = model.ir_version
    pruned.producer_name, pruned.producer_version = model.producer_name, model.producer_version
    pruned.doc_string = model.doc_string
    pruned.metadata_props.extend(model.metadata_props)
    known = {t.name for t in pruned.graph.initializer} | {x}
    produced = {o for node in pruned.graph.node for o in node.output}
    for node in pruned.graph.node:
        for name in node.input:
            if name and name not in known and name not in produced:
                raise PolicyFormatError(f"{origin}: node {node.name or node.op_type!r} reads {name!r}, which is "
                                        f"neither computed from the observation input {x!r} nor a constant "
                                        "(a second input such as a recurrent state is not supported)")
    return pruned, dropped


# -- batch --------------------------------------------------------------------------------------
def _make_batch_dynamic(model: onnx.ModelProto, origin: str, batch0: int | None) -> list[str]:
    """Rewrite batch-dependent constants; returns the names of rewritten Reshape nodes.

    ``batch0`` is the fixed batch the file was exported with (None: already symbolic).
    """
    graph = model.graph
    if batch0 is None:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {t.name: t for t in graph.initializer}
    names = _tensor_names(graph)
    rewritten: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        label = node.name or f"{node.op_type} → {node.output[0]}"
        in_shape = shapes.get(node.input[0], []) if node.input else []
        carries_batch = bool(in_shape) and in_shape[0] == batch0
        if node.op_type == "Flatten" and carries_batch:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if axis == 0:
                raise PolicyFormatError(f"{origin}: node {label!r} is Flatten(axis=0), which folds the batch axis "
                                        "into the features; re-export flattening from axis 1")
        if node.op_type == "Reshape" and carries_batch:
            shape_init = inits.get(node.input[1])
            if shape_init is None:
                continue  # a computed shape follows the batch already
            target = numpy_helper.to_array(shape_init).astype(np.int64)
            allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
            if target.size == 0 or int(target[0]) != batch0:
                raise PolicyFormatError(f"{origin}: node {label!r} reshapes [{batch0}, ...] to {target.tolist()}, "
                                        "dropping the batch axis; edgeq needs every tensor to keep its batch axis "
                                        "first (re-export with x.reshape(x.shape[0], ...))")
            new = target.copy()
            if -1 not in target[1:].tolist():
                new[0] = -1
            elif not allowzero:
                new[0] = 0  # copy the input's batch dimension
            else:
                raise PolicyFormatError(f"{origin}: node {label!r} (Reshape, allowzero=1) has target shape "
                                        f"{target.tolist()} with a fixed batch and a -1; cannot make it dynamic")
            init_name = _unique(names, f"{node.input[1]}.dynamic_batch")
            new_inits.append(numpy_helper.from_array(new, init_name))
            node.input[1] = init_name
            rewritten.append(label)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return rewritten


def _check_batch_consistency(model: onnx.ModelProto, origin: str, obs_dim: int) -> int:
    """Run at batch 1 and 3 in ONNX Runtime; each row of the batch must match its own batch-1 run.

    Returns the action dimension.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated exception types
        raise PolicyFormatError(f"{origin}: ONNX Runtime cannot load the normalized graph: {exc}") from None
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((3, obs_dim)).astype(np.float32)
    try:
        rows = [sess.run([ACTIONS_OUTPUT], {OBS_INPUT: obs[i:i + 1]})[0] for i in range(3)]
        batched = sess.run([ACTIONS_OUTPUT], {OBS_INPUT: obs})[0]
    except Exception as exc:  # noqa: BLE001
        raise PolicyFormatError(f"{origin}: the graph does not run with a batch of 3 after making its batch axis "
                                f"dynamic (a node hard-codes the exported batch): {exc}") from None
    single = np.concatenate(rows, axis=0)
    if batched.shape != single.shape or not np.allclose(batched, single, rtol=1e-5, atol=1e-5, equal_nan=True):
        raise PolicyFormatError(f"{origin}: with a dynamic batch, rows of a batch of 3 differ from the same "
                                f"observations run one by one (shapes {batched.shape} vs {single.shape}); a node "
                                "mixes rows or hard-codes the exported batch")
    if batched.ndim != 2:
        raise PolicyFormatError(f"{origin}: actions have shape {list(batched.shape)}; expected [batch, act_dim]")
    return int(batched.shape[1])


# -- main entry points --------------------------------------------------------------------------
def normalize_onnx(model: onnx.ModelProto, *, origin: str = "<onnx model>", input_name: str | None = None,
                   output_name: str | None = None,
                   obs_dim: int | None = None) -> tuple[onnx.ModelProto, NormalizationReport]:
    """Return a copy of ``model`` in edgeq's conventions (see the module docstring) and what changed.

    ``model`` must already hold its tensor data (``onnx.load`` with external data). ``origin``
    names the model in error messages. ``obs_dim`` is needed only when the graph's feature
    dimension is symbolic.
    """
    from onnx import inliner, version_converter
    from onnx.external_data_helper import uses_external_data

    report = NormalizationReport()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if uses_external_data(t):
            raise PolicyFormatError(f"{origin}: initializer {t.name!r} refers to external data that was not "
                                    "loaded; load the model with its data files beside it")
    if len(m.functions):
        report.inlined_functions = len(m.functions)
        m = inliner.inline_local_functions(m)
    _check_supported_nodes(m, origin)

    report.original_opset = _default_opset(m)
    if report.original_opset == 0:
        raise PolicyFormatError(f"{origin}: the model imports no default-domain opset; not an ONNX operator graph")
    if report.original_opset < MIN_OPSET:
        try:
            m = version_converter.convert_version(m, TARGET_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValueError/C++ errors
            raise PolicyFormatError(f"{origin}: cannot convert opset {report.original_opset} to "
                                    f"{TARGET_OPSET}: {exc}") from None
    report.opset = _default_opset(m)
    m.ir_version = max(int(m.ir_version), helper.find_min_ir_version_for(list(m.opset_import), ignore_unknown=True))

    # initializers listed as inputs (keep_initializers_as_inputs=True) are constants, not inputs
    inits = {t.name for t in m.graph.initializer}
    real_inputs = [v for v in m.graph.input if v.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(real_inputs)

    report.folded_constants = _fold_constants(m)
    from edgeq.graph.attention import move_attention_scale
    from edgeq.ingest.history import lower_conv1d

    report.lowered_convs = lower_conv1d(m, origin=origin)
    report.attention_scales_moved = move_attention_scale(m)
    x, y = _choose_io(m.graph, origin, input_name, output_name)
    report.original_input, report.original_output = x.name, y.name
    m, report.dropped_outputs = _prune_to(m, origin, x.name, y.name)

    # names: obs / actions (moving aside any unrelated tensor that already has one of these names)
    names = _tensor_names(m.graph)
    tmp_x, tmp_y = _unique(names, "edgeq.tmp.obs"), _unique(names, "edgeq.tmp.actions")
    _rename_tensor(m.graph, x.name, tmp_x)
    _rename_tensor(m.graph, y.name, tmp_y)
    for tmp, new in ((tmp_x, OBS_INPUT), (tmp_y, ACTIONS_OUTPUT)):
        if new in names:
            _rename_tensor(m.graph, new, _unique(names, f"{new}.renamed"))
        _rename_tensor(m.graph, tmp, new)

    x_vi, y_vi = m.graph.input[0], m.graph.output[0]
    in_dims = _dims(x_vi)
    feat = in_dims[1]
    if isinstance(feat, int) and feat > 0:
        if obs_dim is not None and obs_dim != feat:
            raise PolicyFormatError(f"{origin}: input {x.name!r} has {feat} features but obs_dim={obs_dim} was given")
        obs_dim = feat
    elif obs_dim is None:
        raise PolicyFormatError(f"{origin}: input {x.name!r} has a symbolic feature dimension {feat!r}; give the "
                                "observation dimension (load_policy(..., obs_dim=N))")
    batch0 = in_dims[0] if isinstance(in_dims[0], int) and in_dims[0] > 0 else None
    report.original_batch = in_dims[0]
    report.reshapes_rewritten = _make_batch_dynamic(m, origin, batch0)

    # declare the batch symbolic, drop stale intermediate shapes, infer them again
    _set_batch_dim(x_vi)
    x_vi.type.tensor_type.shape.dim[1].Clear()
    x_vi.type.tensor_type.shape.dim[1].dim_value = int(obs_dim)
    _set_batch_dim(y_vi)
    del m.graph.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - InferenceError and C++ errors
        raise PolicyFormatError(f"{origin}: shape inference fails once the batch is dynamic: {exc}") from None

    act_dim = _check_batch_consistency(m, origin, int(obs_dim))
    out_dims = _dims(m.graph.output[0])
    if not isinstance(out_dims[1], int) or out_dims[1] != act_dim:
        dim = m.graph.output[0].type.tensor_type.shape.dim[1]
        dim.Clear()
        dim.dim_value = act_dim
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError and InferenceError
        raise PolicyFormatError(f"{origin}: the normalized graph fails onnx.checker: {exc}") from None

    layers = find_weighted_layers(m)
    if not layers:
        raise PolicyFormatError(f"{origin}: found no Gemm/MatMul with a constant 2-D weight; edgeq quantizes "
                                "the weights of such layers and has nothing to quantize here")
    report.weighted_layers = [layer.node for layer in layers]
    return m, report


def _bounds(value: float | Sequence[float] | np.ndarray | None, n: int, default: float, what: str,
            origin: str) -> tuple[float, ...]:
    if value is None:
        return (default,) * n
    arr = np.asarray(value, np.float64).ravel()
    if arr.size == 1:
        arr = np.full(n, float(arr[0]))
    if arr.size != n:
        raise PolicyFormatError(f"{origin}: {what} has {arr.size} values; the policy has {n} action dimensions")
    return tuple(float(v) for v in arr)


def policy_from_normalized(model: onnx.ModelProto, report: NormalizationReport, source: PolicySource, *,
                           action_low: float | Sequence[float] | None = None,
                           action_high: float | Sequence[float] | None = None,
                           obs_space: BoxSpec | None = None, action_space: BoxSpec | None = None) -> FloatPolicy:
    """Wrap a graph from :func:`normalize_onnx` as a :class:`FloatPolicy` (spaces from the graph)."""
    obs_dim = int(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)
    act_dim = int(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    origin = source.path
    if obs_space is None:
        obs_space = BoxSpec((obs_dim,), (-math.inf,) * obs_dim, (math.inf,) * obs_dim)
    elif obs_space.size != obs_dim:
        raise PolicyFormatError(f"{origin}: observation space has {obs_space.size} values; the graph takes {obs_dim}")
    if action_space is None:
        low = _bounds(action_low, act_dim, -math.inf, "action_low", origin)
        high = _bounds(action_high, act_dim, math.inf, "action_high", origin)
        if any(lo > hi for lo, hi in zip(low, high, strict=True)):
            raise PolicyFormatError(f"{origin}: action_low {low} exceeds action_high {high}")
        action_space = BoxSpec((act_dim,), low, high)
    elif action_space.size != act_dim:
        raise PolicyFormatError(f"{origin}: action space has {action_space.size} values; the graph produces "
                                f"{act_dim}")
    source.details.setdefault("normalization", report.to_json())
    return FloatPolicy(model=model, obs_space=obs_space, action_space=action_space, source=source)


def check_onnx_limits(model: onnx.ModelProto, origin: str) -> None:
    """Refuse graphs whose declared sizes no policy has (before anything is allocated for them): a graph
    input, output or intermediate dimension above :data:`~edgeq.ingest.limits.MAX_WIDTH` (batch axes
    included), an initializer above :data:`~edgeq.ingest.limits.MAX_TENSOR_ELEMENTS` elements, more than
    :data:`MAX_NODES` nodes."""
    if len(model.graph.node) > MAX_NODES:
        raise PolicyFormatError(f"{origin}: {len(model.graph.node)} nodes, above edgeq's limit of {MAX_NODES}")
    for kind, values in (("input", model.graph.input), ("output", model.graph.output),
                         ("value_info", model.graph.value_info)):
        for vi in values:
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
            for d in dims:
                if d > MAX_WIDTH:
                    raise PolicyFormatError(f"{origin}: {kind} {vi.name!r} has dimension {d} (shape {dims}), above "
                                            f"edgeq's limit of {MAX_WIDTH} (a corrupt or hostile file)")
            check_elements(dims, f"{origin}: {kind} {vi.name!r}")
    for t in model.graph.initializer:
        check_elements(list(t.dims), f"{origin}: initializer {t.name!r}")


def load_onnx_policy(path: str | Path | Sequence[str | Path], *, input_name: str | None = None,
                     output_name: str | None = None, obs_dim: int | None = None,
                     action_low: float | Sequence[float] | None = None,
                     action_high: float | Sequence[float] | None = None, history: int | None = None) -> FloatPolicy:
    """Load a float ONNX policy file and normalize it (see the module docstring).

    ``path`` may be two files, an encoder and a body (joined into one graph), and a graph that
    reads an observation history (``[batch, K, obs_dim]``, or a flat ``K * obs_dim`` input with
    ``history=K``) becomes a history policy whose runtime keeps the window
    (:mod:`edgeq.ingest.history`).

    External data files are read from beside ``path`` and embedded. ``input_name``/``output_name``
    pick the observation input and action output when the graph has several. Action bounds are
    ±inf unless ``action_low``/``action_high`` (a number or one per dimension) are given;
    ``edgeq.quantize`` with an env fills unknown bounds from the env's spaces.
    """
    from edgeq.ingest.history import compose_modules

    if not isinstance(path, str | Path):
        paths = [Path(q) for q in path]
        if len(paths) == 1:
            path = paths[0]
        elif len(paths) != 2:
            raise PolicyFormatError(f"{', '.join(map(str, paths))}: give one ONNX policy file, or two (encoder, body)")
        else:
            enc, body = (load_onnx_policy_model(q) for q in paths)
            origin = " + ".join(str(q) for q in paths)
            joined = compose_modules(enc[0], body[0], origin=origin)
            modules = [{"path": str(q), "sha256": hashlib.sha256(m[1]).hexdigest()}
                       for q, m in zip(paths, (enc, body), strict=True)]
            return _finish(joined, origin, enc[1] + body[1], enc[2] + body[2], input_name=input_name,
                           output_name=output_name, obs_dim=obs_dim, action_low=action_low, action_high=action_high,
                           history=history, modules=modules)
    model, data, external = load_onnx_policy_model(Path(path))
    return _finish(model, str(path), data, external, input_name=input_name, output_name=output_name, obs_dim=obs_dim,
                   action_low=action_low, action_high=action_high, history=history)


def _finish(model: onnx.ModelProto, origin: str, data: bytes, external: list[str], *, input_name: str | None,
            output_name: str | None, obs_dim: int | None, action_low: float | Sequence[float] | None,
            action_high: float | Sequence[float] | None, history: int | None,
            modules: list[dict[str, str]] | None = None) -> FloatPolicy:
    """Normalize ``model`` and wrap it; with ``modules`` (encoder, body) the source's ``sha256`` is that of the
    two files' bytes one after the other, and ``details.modules`` holds each file's own path and hash."""
    from edgeq.ingest.history import history_input

    model, hist = history_input(model, origin=origin, history=history)
    normalized, report = normalize_onnx(model, origin=origin, input_name=input_name, output_name=output_name,
                                        obs_dim=obs_dim)
    details: dict[str, Any] = {"producer": f"{model.producer_name} {model.producer_version}".strip()}
    if external:
        details["external_data"] = external
    if modules:
        details["modules"] = modules
    source = PolicySource(path=origin, sha256=hashlib.sha256(data).hexdigest(), kind="onnx", algorithm=None,
                          details=details)
    fp = policy_from_normalized(normalized, report, source, action_low=action_low, action_high=action_high)
    if hist is None:
        return fp
    d = hist.obs_dim
    return replace(fp, obs_space=BoxSpec((d,), (-math.inf,) * d, (math.inf,) * d), history=hist)


def load_onnx_policy_model(p: Path) -> tuple[onnx.ModelProto, bytes, list[str]]:
    """One ONNX file with its external data loaded: ``(model, file bytes, external data files)``."""
    if not p.is_file():
        raise PolicyFormatError(f"{p}: no such file (expected an ONNX policy file)")
    check_file_size(p, "ONNX policy")
    data = p.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise PolicyFormatError(f"{p}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    check_onnx_limits(model, str(p))
    external = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    try:
        from onnx.external_data_helper import load_external_data_for_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, onnx's ValidationError (missing/escaping files)
        raise PolicyFormatError(f"{p}: cannot read its external data {external} (expected the data files beside "
                                f"it): {exc}") from None
    return model, data, external


def bind_env_spaces(policy: FloatPolicy, observation_space: Any, action_space: Any) -> FloatPolicy:
    """Fill a policy's unknown (entirely unbounded) spaces with an env's spaces of the same shape.

    ONNX files and torch modules carry no spaces; with an env at hand its bounds go to the
    manifest and to calibration's exploration noise. Spaces that have any finite bound (an SB3
    archive's, or ones given explicitly) are kept.
    """
    def pick(current: BoxSpec, env_space: Any) -> BoxSpec:
        if type(env_space).__name__ != "Box" or tuple(env_space.shape) != current.shape:
            return current
        if np.any(np.isfinite(current.low_array)) or np.any(np.isfinite(current.high_array)):
            return current
        return BoxSpec.from_gym(env_space)

    obs, act = pick(policy.obs_space, observation_space), pick(policy.action_space, action_space)
    if obs is policy.obs_space and act is policy.action_space:
        return policy
    return replace(policy, obs_space=obs, action_space=act)
