"""Per-layer error of a quantized policy at the boundaries that deployment fuses.

A *fused boundary* is the output of a weighted layer after its bias and activation
(``Gemm``/``MatMul`` [+ ``Add`` bias] [+ activation]): the tensor a TensorRT or ONNX Runtime
kernel writes, not every small op inside it. On states the float policy visited, this module
measures

* the SQNR and relative error of the quantized model against the float one at every boundary
  (errors accumulated through all quantized layers before it), and
* each layer's share of the final action error, by quantizing **one layer at a time** (every
  other layer float) and measuring the action error that layer alone causes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.calibration.collect import instrumented
from edgeq.deploy.history import ObservationHistory, episode_windows, with_history
from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.graph.analysis import constant_value, find_activation_matmuls, find_weighted_layers, node_scope
from edgeq.quantizers.plan import ActivationQuant, LayerQuant, MatMulQuant, QuantPlan
from edgeq.quantizers.split import merge_split_values
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings
from edgeq.quantizers.weights import QuantizedWeight, quantize_weight

#: Elementwise activations that deployment runtimes fuse into the preceding GEMM's epilogue.
FUSED_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Elu", "LeakyRelu", "Softplus", "Selu", "HardSigmoid",
                     "HardSwish", "Gelu", "Mish", "Clip")


@dataclass(frozen=True)
class LayerBoundary:
    """Weighted layer ``node`` and the tensor after its bias and activation (``ops`` were fused)."""

    node: str
    tensor: str
    ops: tuple[str, ...]


def fused_boundaries(model: onnx.ModelProto) -> list[LayerBoundary]:
    """The fused output tensor of every weighted layer of a float graph, in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {n.name: n for n in model.graph.node}
    out = []
    for wl in find_weighted_layers(model):
        node = by_name[wl.node]
        tensor, ops = node.output[0], [node.op_type]
        cons = consumers.get(tensor, [])
        if (len(cons) == 1 and cons[0].op_type == "Add"
                and any(constant_value(model, i) is not None for i in cons[0].input if i != tensor)):
            tensor, ops = cons[0].output[0], [*ops, "Add"]
            cons = consumers.get(tensor, [])
        if len(cons) == 1 and cons[0].op_type in FUSED_ACTIVATIONS:
            tensor, ops = cons[0].output[0], [*ops, cons[0].op_type]
        elif len(cons) == 2 and {c.op_type for c in cons} == {"Sigmoid", "Mul"}:  # SiLU: x * sigmoid(x)
            sig = next(c for c in cons if c.op_type == "Sigmoid")
            mul = next(c for c in cons if c.op_type == "Mul")
            if sig.output[0] in mul.input:
                tensor, ops = mul.output[0], [*ops, "SiLU"]
        out.append(LayerBoundary(wl.node, tensor, tuple(ops)))
    return out


def plan_from_manifest(float_model: onnx.ModelProto, quantization: dict[str, Any],
                       int8_model: onnx.ModelProto | None = None) -> QuantPlan:
    """Rebuild the :class:`QuantPlan` of a bundle made before ``plan.json`` existed (edgeq < 0.2.0).

    Newer bundles store the plan itself: :meth:`QuantPlan.from_bundle` reads it exactly. This legacy
    path recovers it from the manifest's report and the INT8 model's tensor names.
    Input scalings (CrossQuant static, equalization) come back from their stored factors. Weights
    are re-quantized from the (scaled) float model with the recorded per-channel method, which is
    deterministic; with ``int8_model`` (the bundle's ``policy.int8.onnx``) every int8 layer takes
    the stored int8 weights, scales and corrected biases instead, so data-dependent rounding
    (AdaRound) and bias correction are reproduced exactly. Plans that cannot be rebuilt raise
    ``ValueError`` (CrossQuant's dynamic form; AdaRound or bias correction without ``int8_model``;
    manifests written before the factors were stored): the caller then reports per-layer SQNR
    without the one-layer-at-a-time ranking.
    """
    try:
        transforms = [InputScaling.from_json(t) for t in quantization.get("transforms", [])]
    except KeyError:
        raise ValueError("the manifest's input scalings lack their factors (written by an older edgeq)") from None
    stored = {t.name: t for t in int8_model.graph.initializer} if int8_model is not None else {}
    for entry in quantization.get("layers", []):
        if entry.get("precision") not in ("int8", "float", "fp16"):
            raise ValueError(f"layer {entry.get('node')!r}: unknown precision {entry.get('precision')!r}")
        if entry.get("precision") == "int8" and entry.get("scheme", "static") != "static":
            raise ValueError(f"layer {entry.get('node')!r} uses {entry.get('scheme')}; not rebuilt from the manifest")
        exact = entry.get("rounding", "nearest") != "nearest" or entry.get("bias_corrected")
        if entry.get("precision") == "int8" and exact and int8_model is None:
            raise ValueError(f"layer {entry.get('node')!r} uses {entry.get('rounding')} rounding / bias correction: "
                             "rebuilding it needs the bundle's INT8 model")
    work = apply_input_scalings(float_model, transforms) if transforms else float_model
    nodes = {n.name: n for n in work.graph.node}
    acts = {a["tensor"]: ActivationQuant(a["tensor"], float(a["amax"]), a.get("calibrator", "?"),
                                         dict(a.get("params", {})))
            for a in quantization.get("activations", [])}
    layers = []
    for entry in quantization.get("layers", []):
        lq = LayerQuant(entry["node"], entry["op_type"], entry["input"], entry["weight"],
                        int(entry.get("weight_axis", 0)), entry["precision"], reason=entry.get("reason", ""),
                        rounding=entry.get("rounding", "nearest"))
        if lq.precision == "int8":
            w = constant_value(work, lq.weight_name)
            if w is None:
                raise ValueError(f"weight {lq.weight_name!r} of layer {lq.node!r} is not in the float model")
            method = entry.get("weight_method", "absmax")
            qw = quantize_weight(np.asarray(w, np.float32), axis=lq.weight_axis, method=method)
            if int8_model is not None:
                qw = _stored_weight(int8_model, stored, lq.weight_name, qw)
            bias = None
            node = nodes.get(lq.node)
            if entry.get("bias_corrected") and node is not None and len(node.input) > 2:
                t = stored.get(f"{node.input[2]}.corrected")
                if t is None:
                    raise ValueError(f"layer {lq.node!r}: corrected bias {node.input[2]}.corrected is not in the "
                                     "INT8 model")
                bias = numpy_helper.to_array(t).astype(np.float32).reshape(-1)
            lq = dataclasses.replace(lq, weight=qw, weight_method=method, bias=bias)
        layers.append(lq)
    matmuls = [MatMulQuant.from_json(m) for m in quantization.get("activation_matmuls", [])]
    return QuantPlan(acts, layers, dict(quantization.get("settings", {})), transforms=transforms, matmuls=matmuls)


def _stored_weight(int8_model: onnx.ModelProto, stored: dict[str, onnx.TensorProto], name: str,
                   like: QuantizedWeight) -> QuantizedWeight:
    """The int8 weight ``name`` as the bundle stores it (``name.int8``/``name.scale``), in ``like``'s layout.

    The exporter stores a Gemm weight ``[N, K]`` (channel axis 0) as MatMul's ``[K, N]`` (axis 1); the
    DequantizeLinear's ``axis`` says which layout the file holds.
    """
    if f"{name}.int8" not in stored or f"{name}.scale" not in stored:
        raise ValueError(f"weight {name!r} has no {name}.int8 / {name}.scale in the INT8 model")
    q = numpy_helper.to_array(stored[f"{name}.int8"])
    scale = numpy_helper.to_array(stored[f"{name}.scale"]).astype(np.float32)
    dq = next((n for n in int8_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.int8"),
              None)
    axis = next((int(helper.get_attribute_value(a)) for a in dq.attribute if a.name == "axis"), 1) if dq else like.axis
    if q.ndim == 2 and axis != like.axis:
        q = q.T
    if q.shape != like.q.shape or scale.shape != like.scale.shape:
        raise ValueError(f"weight {name!r}: stored int8 {q.shape} / scale {scale.shape} do not match "
                         f"the model's {like.q.shape} / {like.scale.shape}")
    return QuantizedWeight(np.ascontiguousarray(q, np.int8), scale, like.axis)


def only_layer(plan: QuantPlan, node: str) -> QuantPlan:
    """``plan`` with every INT8 layer and INT8 activation MatMul but ``node`` turned back to float."""
    layers = [layer if layer.node == node or layer.precision != "int8"
              else dataclasses.replace(layer, precision="float", reason="per-layer analysis")
              for layer in plan.layers]
    matmuls = [m if m.node == node or m.precision != "int8"
               else dataclasses.replace(m, precision="float", reason="per-layer analysis") for m in plan.matmuls]
    return dataclasses.replace(plan, layers=layers, matmuls=matmuls)  # keeps transforms and metrics


def _session(model: onnx.ModelProto | bytes | str, io: dict[str, Any], outputs: Sequence[str]) -> Any:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(
        model) if isinstance(model, bytes) else onnx.load(model)
    graph_tensors = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    names = [t for t in outputs if t in graph_tensors]
    return with_history(OrtPolicy(instrumented(m, names).SerializeToString(), input_name=io.get("input", "obs"),
                                  output_name=io.get("output", "actions"), state=io.get("state", [])), io)


def _evaluate(rt: Any, episodes: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Run ``rt`` over the states of ``episodes``; recurrent policies step each episode with its state."""
    available = set(rt.output_names)
    want = [n for n in names if n in available]
    if isinstance(rt, ObservationHistory) and not rt.runtime.state_specs:  # windows of each episode, one batch
        obs = np.concatenate([episode_windows(ep, rt.history.length, rt.history.reset_mode) for ep in episodes])
        values = rt.runtime.run(obs, want)
        return {k: v.reshape(len(obs), -1).astype(np.float64) for k, v in values.items()}
    if not rt.state_specs:
        obs = np.ascontiguousarray(np.concatenate(episodes), np.float32)
        values = rt.run(obs, want)
        return {k: v.reshape(len(obs), -1).astype(np.float64) for k, v in values.items()}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in want}
    for ep in episodes:
        rt.reset(None)
        for o in np.asarray(ep, np.float32):
            values = rt.run(o[None], want)
            for k, v in values.items():
                rows[k].append(v.reshape(1, -1).astype(np.float64))
    rt.reset(None)
    return {k: np.concatenate(v) for k, v in rows.items()}


def _errors(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    diff = cand - ref
    sig, noise = float(np.sum(ref * ref)), float(np.sum(diff * diff))
    sqnr = float("inf") if noise == 0 else (10 * np.log10(sig / noise) if sig > 0 else float("-inf"))
    return {"sqnr_db": float(sqnr), "relative_error": float(np.sqrt(noise / sig)) if sig > 0 else float("nan"),
            "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0}


def _block_of(node: str, attention_blocks: Sequence[str]) -> str:
    """The block a unit belongs to, for the ranking by block: the attention block whose scope holds it
    (its Q/K/V/O projections and both products), else its module's scope, one level up for a member
    of a ``Sequential`` (``/net/net.2/Gemm`` → ``/net``)."""
    for block in attention_blocks:
        if node.startswith(block + "/"):
            return block
    scope = node_scope(node)
    last = scope.rsplit("/", 1)[-1]
    if "." in last and last.rsplit(".", 1)[-1].isdigit():
        return scope.rsplit("/", 1)[0]
    return scope


def per_layer_error(float_model: onnx.ModelProto, int8_model: onnx.ModelProto | bytes | str, io: dict[str, Any],
                    episodes: Sequence[np.ndarray], *, plan: QuantPlan | None = None) -> dict[str, Any]:
    """SQNR/relative error at each fused boundary, and (with ``plan``) each layer's share of the action error.

    ``episodes`` are observation sequences the float policy visited (one array per episode; for
    stateless policies they are simply concatenated). Without ``plan`` (a QDQ model from another
    tool) only the boundaries whose tensor names exist in both graphs are measured and no ranking
    is made.
    """
    bounds = fused_boundaries(float_model)
    action = io.get("output", "actions")
    outputs_of = {n.name: n.output[0] for n in float_model.graph.node}
    mm_bounds = [(mm, outputs_of[mm.node]) for mm in find_activation_matmuls(float_model) if mm.node in outputs_of]
    mm_precision = {m.node: m.precision for m in plan.matmuls} if plan is not None else {}
    att_blocks = sorted({mm.block for mm, _ in mm_bounds if mm.block}, key=len, reverse=True)
    names = [b.tensor for b in bounds] + [out for _, out in mm_bounds]
    ref = _evaluate(_session(float_model, io, names), episodes, [*names, action])
    full = _evaluate(_session(int8_model, io, names), episodes, [*names, action])
    # An input scaling folded into the previous layer's weight rows (CrossQuant/equalization) leaves
    # that boundary tensor divided by the factors d in the INT8 graph: compare it with d undone.
    # Outlier channel splits widened hidden tensors (their factors d are in the split widths): merge the
    # copies back to the float widths after the scalings are undone.
    splits = plan.splits if plan is not None else []

    def merged(name: str, v: np.ndarray) -> np.ndarray:
        return merge_split_values(float_model, splits, {name: v})[name] if splits else v

    if plan is not None and plan.transforms:
        inputs = {wl.node: wl.input for wl in find_weighted_layers(float_model)}
        for t in plan.transforms:
            tensor = inputs.get(t.layer)
            if tensor in full and tensor in ref and full[tensor].shape[1] == len(t.factors):
                undone = full[tensor] * np.asarray(t.factors, np.float64)[None, :]
                if t.shift is not None:  # AffineQuant's translation: the layer read (X - δ) / d
                    undone = undone + np.asarray(t.shift, np.float64)[None, :]
                if np.abs(merged(tensor, undone) - ref[tensor]).mean() < \
                        np.abs(merged(tensor, full[tensor]) - ref[tensor]).mean():
                    full[tensor] = undone
    if splits:
        full = merge_split_values(float_model, splits, full)
    layers: list[dict[str, Any]] = []
    precision = {layer.node: layer.precision for layer in plan.layers} if plan is not None else {}
    for b in bounds:
        row: dict[str, Any] = {"node": b.node, "tensor": b.tensor, "fused": "+".join(b.ops),
                               "precision": precision.get(b.node, "int8" if plan is None else "float"),
                               "role": "layer", "block": _block_of(b.node, att_blocks)}
        if b.tensor in full and b.tensor in ref:
            row.update(_errors(ref[b.tensor], full[b.tensor]))
        layers.append(row)
    for mm, out in mm_bounds:
        row = {"node": mm.node, "tensor": out, "fused": "MatMul", "role": mm.role, "block": mm.block,
               "precision": mm_precision.get(mm.node, "int8" if plan is None else "float")}
        if out in full and out in ref:
            row.update(_errors(ref[out], full[out]))
        layers.append(row)
    full_err = full[action] - ref[action]
    result: dict[str, Any] = {"states": int(len(ref[action])), "layers": layers,
                              "action_rms_error": float(np.sqrt(np.mean(full_err ** 2))),
                              "action": _errors(ref[action], full[action]), "ranking": None}
    if plan is None or not plan.int8_layers():
        return result
    # check that the plan reproduces the model under test before trusting the one-layer variants
    rebuilt = _evaluate(_session(apply_plan(float_model, plan), io, []), episodes, [action])[action]
    mismatch = float(np.abs(rebuilt - full[action]).max())
    ranking: list[dict[str, Any]] = []
    mm_out = {mm.node: out for mm, out in mm_bounds}
    roles = {mm.node: mm.role for mm, _ in mm_bounds}
    units = [(la.node, next((b.tensor for b in bounds if b.node == la.node), None)) for la in plan.int8_layers()]
    units += [(m.node, mm_out.get(m.node)) for m in plan.int8_matmuls()]
    for unit, tensor in units:
        variant = apply_plan(float_model, only_layer(plan, unit))
        vals = _evaluate(_session(variant, io, [tensor] if tensor else []), episodes,
                         [action, *([tensor] if tensor else [])])
        if plan.splits:
            vals = merge_split_values(float_model, plan.splits, vals)
        err = vals[action] - ref[action]
        entry: dict[str, Any] = {"node": unit, "role": roles.get(unit, "layer"), "block": _block_of(unit, att_blocks),
                                 "action_mse": float(np.mean(err ** 2)),
                 "action_rms_error": float(np.sqrt(np.mean(err ** 2))),
                 "action_max_abs_error": float(np.abs(err).max())}
        if tensor is not None and tensor in vals:
            entry["own_output_sqnr_db"] = _errors(ref[tensor], vals[tensor])["sqnr_db"]
        ranking.append(entry)
    total = sum(r["action_mse"] for r in ranking)
    for r in ranking:
        r["share"] = r["action_mse"] / total if total > 0 else 0.0
    ranking.sort(key=lambda r: -r["action_mse"])
    result["ranking"] = ranking
    if mm_bounds:  # attention blocks: the shares of their projections and products together
        blocks: dict[str, dict[str, Any]] = {}
        for r in ranking:
            key = r["block"] or "(top level)"
            blk = blocks.setdefault(key, {"block": key, "share": 0.0, "action_mse": 0.0, "units": []})
            blk["share"] += r["share"]
            blk["action_mse"] += r["action_mse"]
            blk["units"].append(f"{r['node']} ({r['role']})")
        result["ranking_by_block"] = sorted(blocks.values(), key=lambda v: -v["share"])
    result["ranking_method"] = ("one layer quantized at a time (others float); share = its action MSE / "
                                "sum over layers")
    result["sum_single_layer_mse_over_full_mse"] = (total / float(np.mean(full_err ** 2))
                                                    if np.any(full_err) else None)
    result["plan_reproduces_model_max_abs"] = mismatch
    return result
