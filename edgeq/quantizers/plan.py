"""The quantization plan: which layers run in int8 (and how), fp16 or float, with what scales.

A :class:`QuantPlan` is data, not a graph: exact float rewrites to apply first
(:class:`~edgeq.quantizers.transforms.InputScaling`), then per layer the precision, the activation
quantizer of its input, the int8 weight and (optionally) a corrected float bias. It is made from
calibration statistics by :func:`make_plan` (one calibrator for every tensor) or by
:func:`edgeq.quantizers.build.build_plan` (transforms, per-layer choice, AdaRound, bias correction,
fp16 fallback), printed in the summary, saved in the manifest, and applied to the float graph by
:func:`edgeq.export.qdq.apply_plan`.

A plan is frozen data and round-trips: :meth:`QuantPlan.to_dict` holds the choices (settings, per-layer
precision, scheme, calibrator and search records) and the artifact (int8 weights and their scales,
corrected biases, input-scaling factors, activation thresholds) exactly, with no metrics;
:meth:`QuantPlan.from_dict` reads it back. A bundle stores it as ``plan.json`` (its metrics stay in the
manifest's ``quantization`` report), and :meth:`QuantPlan.from_bundle` loads it, so
``apply_plan(policy.fp32.onnx, QuantPlan.from_bundle(bundle))`` rebuilds ``policy.int8.onnx`` byte for
byte, without re-quantizing anything or reading tensor names back from the graph.

Layer schemes:

``static``
    per-tensor static int8 input (Q/DQ), per-output-channel int8 weight: what TensorRT runs.
``crossquant-dynamic``
    CrossQuant's per-row scale computed at run time (:mod:`edgeq.quantizers.crossquant`): ONNX
    Runtime CPU only; a plan holding one is marked ``tensorrt_compatible: false``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeq.calibration.calibrators import compute_amax
from edgeq.calibration.observers import TensorObserver
from edgeq.deploy.bundle_format import MANIFEST, PLAN, read_manifest, verify_files
from edgeq.graph.analysis import constant_value, find_activation_matmuls, find_weighted_layers
from edgeq.quantizers.input_split import InputSplit, apply_input_splits
from edgeq.quantizers.int4 import Int4Weight
from edgeq.quantizers.split import ChannelSplit, apply_splits
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings
from edgeq.quantizers.weights import QuantizedWeight, quantize_weight

INT8_MAX = 127
#: Per-layer precisions a plan may choose (a field of every :class:`LayerQuant`).
PRECISIONS = ("int8", "int4", "fp16", "float")
SCHEMES = ("static", "crossquant-dynamic")
#: Version of :meth:`QuantPlan.to_dict`'s layout (``plan.json`` in a bundle).
PLAN_FORMAT = 1

#: A calibrator for one tensor: a method name, or ``(method, params)``.
CalibratorSpec = str | tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ActivationQuant:
    """Per-tensor symmetric int8 for an activation: ``scale = amax / 127``, zero point 0."""

    tensor: str
    amax: float
    calibrator: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(np.float32(self.amax / INT8_MAX))

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "amax": self.amax, "scale": self.scale, "calibrator": self.calibrator,
                "params": self.params}


def _array_to_dict(a: np.ndarray) -> dict[str, Any]:
    """An exact, JSON-safe form of ``a``: dtype, shape and the little-endian bytes in base64."""
    a = np.ascontiguousarray(a)
    little = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "base64": base64.b64encode(little.tobytes()).decode()}


def _array_from_dict(d: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(d["dtype"]))
    raw = base64.b64decode(str(d["base64"]), validate=True)
    shape = tuple(int(s) for s in d["shape"])
    a = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    if a.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"array of shape {list(shape)} has {a.size} values")
    return a.reshape(shape)


def _optional_array(a: np.ndarray | None) -> dict[str, Any] | None:
    return None if a is None else _array_to_dict(a)


def _weight_to_dict(w: QuantizedWeight | None) -> dict[str, Any] | None:
    return None if w is None else {"q": _array_to_dict(w.q), "scale": _array_to_dict(w.scale), "axis": w.axis}


def _weight_from_dict(d: Mapping[str, Any] | None) -> QuantizedWeight | None:
    return None if d is None else QuantizedWeight(_array_from_dict(d["q"]), _array_from_dict(d["scale"]),
                                                  int(d["axis"]))


def _weight4_to_dict(w: Int4Weight | None) -> dict[str, Any] | None:
    return None if w is None else {"bits": 4, "q": _array_to_dict(w.q), "scale": _array_to_dict(w.scale),
                                   "axis": w.axis, "block_size": w.block_size}


def _weight4_from_dict(d: Mapping[str, Any] | None) -> Int4Weight | None:
    return None if d is None else Int4Weight(_array_from_dict(d["q"]), _array_from_dict(d["scale"]), int(d["axis"]),
                                             int(d.get("block_size", 0)))


@dataclass(frozen=True, eq=False)
class LayerQuant:
    """One weighted layer: int8 (static or CrossQuant-dynamic input, per-channel weight), fp16 or float.

    ``bias`` replaces the layer's float bias in the int8 graph (bias correction); ``kernel`` is the
    fraction of the layer's int8 input elements that quantize to zero on the calibration states
    (CrossQuant's "quantization kernel"), and ``kernel_per_tensor`` the same for a plain per-tensor
    quantizer of the untransformed input, for comparison. ``choice`` records the per-layer
    automatic choice (candidates and their held-out action errors).
    """

    node: str
    op_type: str
    input: str
    weight_name: str
    weight_axis: int
    precision: str  # "int8" | "fp16" | "float"
    weight: QuantizedWeight | None = None
    weight_method: str = "absmax"
    reason: str = ""
    scheme: str = "static"
    dynamic_alpha: float | None = None
    dynamic_factors: np.ndarray | None = None
    rounding: str = "nearest"
    bias: np.ndarray | None = None
    bias_name: str | None = None
    kernel: float | None = None
    kernel_per_tensor: float | None = None
    choice: dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    weight4: Int4Weight | None = None
    #: NoisyQuant's fixed noisy bias ``N`` ``[in]`` (:mod:`edgeq.quantizers.noisy`): the int8 layer quantizes
    #: ``X + N`` and its float bias subtracts ``N · W_int8ᵀ``, so the noise leaves the output exactly
    input_noise: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"layer {self.node}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "int4" and self.weight4 is None:
            raise ValueError(f"layer {self.node}: precision int4 needs its int4 weight (weight4)")
        if self.scheme not in SCHEMES:
            raise ValueError(f"layer {self.node}: scheme must be one of {SCHEMES}, got {self.scheme!r}")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "op_type": self.op_type, "input": self.input,
                             "weight": self.weight_name, "precision": self.precision}
        if self.precision == "int8":
            d["scheme"] = self.scheme
            if self.dynamic_alpha is not None:
                d["dynamic_alpha"] = self.dynamic_alpha
        if self.weight is not None and self.precision == "int8":
            s = self.weight.scale
            d.update({"weight_axis": self.weight_axis, "weight_method": self.weight_method,
                      "rounding": self.rounding,
                      "weight_scale_min": float(s.min()), "weight_scale_max": float(s.max())})
        if self.weight4 is not None and self.precision == "int4":
            s4 = self.weight4.scale
            d.update({"weight_axis": self.weight_axis, "weight_bits": 4, "weight_granularity":
                      "per-output-channel" if self.weight4.block_size == 0 else f"blocks of {self.weight4.block_size}",
                      "block_size": self.weight4.block_size, "weight_range": [-7, 7], "activation": "int8",
                      "weight_scale_min": float(s4.min()), "weight_scale_max": float(s4.max())})
        if self.bias is not None and self.precision in ("int8", "int4"):
            d["bias_corrected"] = True
        if self.input_noise is not None and self.precision == "int8":
            d["input_noise_range"] = float(np.ptp(self.input_noise)) if self.input_noise.size else 0.0
        for key in ("kernel", "kernel_per_tensor"):
            v = getattr(self, key)
            if v is not None:
                d[key] = round(float(v), 6)
        if self.choice is not None:
            d["choice"] = self.choice
        if self.notes:
            d["notes"] = self.notes
        if self.reason:
            d["reason"] = self.reason
        return d

    def to_dict(self) -> dict[str, Any]:
        """Every field, exactly (arrays as :func:`_array_to_dict`): the inverse of :meth:`from_dict`."""
        d: dict[str, Any] = {
                "node": self.node, "op_type": self.op_type, "input": self.input, "weight_name": self.weight_name,
                "weight_axis": self.weight_axis, "precision": self.precision, "weight": _weight_to_dict(self.weight),
                "weight_method": self.weight_method, "reason": self.reason, "scheme": self.scheme,
                "dynamic_alpha": self.dynamic_alpha, "dynamic_factors": _optional_array(self.dynamic_factors),
                "rounding": self.rounding, "bias": _optional_array(self.bias), "bias_name": self.bias_name,
                "kernel": self.kernel, "kernel_per_tensor": self.kernel_per_tensor, "choice": self.choice,
                "notes": self.notes}
        if self.weight4 is not None:  # only int4-capable plans carry the key (older plan.json files unchanged)
            d["weight4"] = _weight4_to_dict(self.weight4)
        if self.input_noise is not None:  # likewise: only NoisyQuant layers carry it
            d["input_noise"] = _array_to_dict(self.input_noise)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerQuant:
        def opt_float(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(str(d["node"]), str(d["op_type"]), str(d["input"]), str(d["weight_name"]), int(d["weight_axis"]),
                   str(d["precision"]), _weight_from_dict(d.get("weight")), str(d.get("weight_method", "absmax")),
                   str(d.get("reason", "")), str(d.get("scheme", "static")), opt_float("dynamic_alpha"),
                   None if d.get("dynamic_factors") is None else _array_from_dict(d["dynamic_factors"]),
                   str(d.get("rounding", "nearest")), None if d.get("bias") is None else _array_from_dict(d["bias"]),
                   None if d.get("bias_name") is None else str(d["bias_name"]), opt_float("kernel"),
                   opt_float("kernel_per_tensor"), d.get("choice"), dict(d.get("notes") or {}),
                   _weight4_from_dict(d.get("weight4")),
                   None if d.get("input_noise") is None else _array_from_dict(d["input_noise"]))


@dataclass(frozen=True)
class MatMulQuant:
    """A MatMul of two activations (attention's Q·Kᵀ and A·V): int8 with **both** inputs per tensor, or float.

    TensorRT runs a MatMul in int8 only when both of its inputs come through Q/DQ; each input gets
    its own per-tensor scale (``QuantPlan.activations``). ``role`` is ``attention-scores``,
    ``attention-values`` or ``matmul`` (:func:`edgeq.graph.analysis.find_activation_matmuls`).
    """

    node: str
    inputs: tuple[str, str]
    precision: str  # "int8" | "float"
    role: str = "matmul"
    block: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "float"):
            raise ValueError(f"matmul {self.node}: precision must be int8 or float, got {self.precision!r}")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "op_type": "MatMul", "inputs": list(self.inputs),
                             "precision": self.precision, "role": self.role, "block": self.block}
        if self.precision == "int8":
            d["granularity"] = "per-tensor (both inputs)"
        if self.reason:
            d["reason"] = self.reason
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MatMulQuant:
        a, b = d["inputs"]
        return cls(str(d["node"]), (str(a), str(b)), str(d["precision"]), str(d.get("role", "matmul")),
                   str(d.get("block", "")), str(d.get("reason", "")))


@dataclass(frozen=True, eq=False)
class QuantPlan:
    """Everything :func:`edgeq.export.qdq.apply_plan` needs, plus what the manifest reports.

    ``layers`` are the weighted layers (a constant weight); ``matmuls`` the products of two
    activations (attention), whose inputs also have entries in ``activations``.

    Frozen: a stage that changes a plan returns a new one (``dataclasses.replace``). ``metrics`` is
    the report of how the plan was made (held-out action errors per stage, timings); it is not part of
    :meth:`to_dict`, which holds only the choices and the artifact.
    """

    activations: dict[str, ActivationQuant]
    layers: list[LayerQuant]
    settings: dict[str, Any] = field(default_factory=dict)
    transforms: list[InputScaling] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    matmuls: list[MatMulQuant] = field(default_factory=list)
    #: outlier channel splits (:mod:`edgeq.quantizers.split`), applied to the float graph before ``transforms``
    splits: list[ChannelSplit] = field(default_factory=list)
    #: duplicated input columns of a layer reading the observation (:mod:`edgeq.quantizers.input_split`),
    #: applied after ``transforms`` (a ``Gather`` in front of the layer's input quantizer)
    input_splits: list[InputSplit] = field(default_factory=list)

    def rewritten(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The exact float rewrite of ``model`` whose layers this plan quantizes: splits, input scalings, then
        input splits."""
        work = apply_splits(model, self.splits) if self.splits else model
        work = apply_input_scalings(work, self.transforms) if self.transforms else work
        return apply_input_splits(work, self.input_splits) if self.input_splits else work

    def int8_layers(self) -> list[LayerQuant]:
        return [layer for layer in self.layers if layer.precision == "int8"]

    def int4_layers(self) -> list[LayerQuant]:
        """Layers with int4 weights and an int8 input (W4A8)."""
        return [layer for layer in self.layers if layer.precision == "int4"]

    def int8_matmuls(self) -> list[MatMulQuant]:
        return [m for m in self.matmuls if m.precision == "int8"]

    def used_activations(self) -> set[str]:
        """Tensors a static int8 layer or an int8 activation MatMul quantizes."""
        return ({la.input for la in self.int8_layers() if la.scheme == "static"}
                | {la.input for la in self.int4_layers()}
                | {t for m in self.int8_matmuls() for t in m.inputs})

    def layer(self, node: str) -> LayerQuant:
        for layer in self.layers:
            if layer.node == node:
                return layer
        raise KeyError(node)

    @property
    def tensorrt_compatible(self) -> bool:
        """False when a layer needs run-time row scales (CrossQuant dynamic), which TensorRT cannot run, or
        has int4 weights with an int8 input (W4A8: TensorRT runs INT4 weights only weight-only, see
        :mod:`edgeq.export.trt_rules`)."""
        return all(layer.scheme == "static" for layer in self.int8_layers()) and not self.int4_layers()

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "tensorrt_compatible": self.tensorrt_compatible,
                **({"splits": [sp.to_json() for sp in self.splits]} if self.splits else {}),
                **({"input_splits": [sp.to_json() for sp in self.input_splits]} if self.input_splits else {}),
                "transforms": [t.to_json() for t in self.transforms],
                "activations": [a.to_json() for a in self.activations.values()],
                "layers": [layer.to_json() for layer in self.layers],
                "activation_matmuls": [m.to_json() for m in self.matmuls],
                "metrics": self.metrics}

    def to_dict(self) -> dict[str, Any]:
        """The plan's choices and artifact, exactly and JSON-safe (no metrics): ``plan.json`` of a bundle."""
        return {"format": PLAN_FORMAT, "settings": self.settings,
                **({"splits": [sp.to_json() for sp in self.splits]} if self.splits else {}),
                **({"input_splits": [sp.to_json() for sp in self.input_splits]} if self.input_splits else {}),
                "transforms": [{"layer": t.layer, "factors": _array_to_dict(t.factors), "method": t.method,
                                "alpha": t.alpha, "placement": t.placement, "details": t.details,
                                **({"shift": _array_to_dict(t.shift)} if t.shift is not None else {})}
                               for t in self.transforms],
                "activations": [{"tensor": a.tensor, "amax": a.amax, "calibrator": a.calibrator, "params": a.params}
                                for a in self.activations.values()],
                "layers": [layer.to_dict() for layer in self.layers],
                "activation_matmuls": [m.to_json() for m in self.matmuls]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> QuantPlan:
        """The plan :meth:`to_dict` wrote (``metrics``, if given, are attached as the plan's report).

        Raises:
            ValueError: another layout version, or a malformed entry.
        """
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {d.get('format')!r} is not {PLAN_FORMAT} (written by another edgeq)")
        try:
            transforms = [InputScaling(str(t["layer"]), _array_from_dict(t["factors"]), str(t["method"]),
                                       float(t["alpha"]), str(t.get("placement", "auto")), dict(t.get("details") or {}),
                                       None if t.get("shift") is None else _array_from_dict(t["shift"]))
                          for t in d.get("transforms", [])]
            acts = {str(a["tensor"]): ActivationQuant(str(a["tensor"]), float(a["amax"]), str(a["calibrator"]),
                                                      dict(a.get("params") or {}))
                    for a in d.get("activations", [])}
            layers = [LayerQuant.from_dict(la) for la in d.get("layers", [])]
            matmuls = [MatMulQuant.from_json(m) for m in d.get("activation_matmuls", [])]
            splits = [ChannelSplit.from_json(sp) for sp in d.get("splits", [])]
            input_splits = [InputSplit.from_json(sp) for sp in d.get("input_splits", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed plan entry: {type(exc).__name__}: {exc}") from None
        return cls(acts, layers, dict(d.get("settings") or {}), transforms, dict(metrics or {}), matmuls, splits,
                   input_splits)

    @classmethod
    def from_bundle(cls, bundle: str | Path) -> QuantPlan:
        """The plan a bundle was made with (its ``plan.json``, hash-checked; metrics from the manifest).

        Raises:
            ValueError: the bundle has no ``plan.json`` (made by edgeq < 0.2.0: see
                :func:`edgeq.validate.layers.plan_from_manifest`), or it is malformed.
            BundleError: the manifest is invalid or ``plan.json`` does not match its hash.
        """
        root = Path(bundle)
        manifest = read_manifest(root, verify=False)
        if PLAN not in manifest.get("files", {}):
            raise ValueError(f"{root / MANIFEST}: the bundle has no {PLAN} (made by edgeq < 0.2.0)")
        verify_files(root, manifest, [PLAN])
        try:
            data = json.loads((root / PLAN).read_text())
            return cls.from_dict(data, (manifest.get("quantization") or {}).get("metrics"))
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{root / PLAN}: {exc}") from None


def _spec(spec: CalibratorSpec, default_params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, dict(default_params)
    method, params = spec
    return method, dict(params)


def make_plan(model: onnx.ModelProto, observers: Mapping[str, TensorObserver], *,
              calibrator: str = "percentile", calibrator_params: dict[str, Any] | None = None,
              weight_method: str = "absmax", keep_float: Sequence[str] = (),
              per_tensor_calibrator: Mapping[str, CalibratorSpec] | None = None,
              transforms: Sequence[InputScaling] = (),
              per_layer_weight_method: Mapping[str, str] | None = None,
              amax_cache: dict[tuple[Any, ...], float] | None = None,
              weight_quantizer: Callable[..., QuantizedWeight] | None = None,
              scaled: onnx.ModelProto | None = None) -> QuantPlan:
    """Choose static int8 scales for every weighted layer of ``model`` (after ``transforms``), and for
    both inputs of every MatMul of two activations (attention's Q·Kᵀ and A·V).

    ``observers`` describe the tensors of the transformed graph (the same as ``model``'s when there
    are no transforms). ``keep_float`` names layers (node names) to leave in float;
    ``per_tensor_calibrator`` overrides the activation calibrator for named tensors (a method, or
    ``(method, params)``; a bare method other than ``calibrator`` gets its default parameters);
    ``per_layer_weight_method`` overrides ``weight_method`` for named layers.

    ``amax_cache`` (a dict the caller keeps) and ``weight_quantizer`` (``quantize_weight``'s
    signature, e.g. a caching wrapper) let a search that makes many plans from the same observers
    and weights compute each threshold and each quantized weight once; the plan is the same. ``scaled``:
    ``model`` after ``transforms``, when the caller already has it (it is not made again).
    """
    quantize_w = weight_quantizer or quantize_weight

    def amax(obs: TensorObserver, method: str, p: dict[str, Any]) -> float:
        if amax_cache is None:
            return float(compute_amax(obs, method, **p))
        key = (id(obs), obs.count, method, repr(sorted(p.items())))
        if key not in amax_cache:
            amax_cache[key] = float(compute_amax(obs, method, **p))
        return amax_cache[key]

    params = dict(calibrator_params or {})
    overrides = dict(per_tensor_calibrator or {})
    work = scaled if scaled is not None else apply_input_scalings(model, transforms) if transforms else model
    activations: dict[str, ActivationQuant] = {}
    layers: list[LayerQuant] = []
    for wl in find_weighted_layers(work):
        if wl.node in keep_float:
            layers.append(LayerQuant(wl.node, wl.op_type, wl.input, wl.weight, wl.weight_axis, "float",
                                     reason="kept in float by request"))
            continue
        obs = observers.get(wl.input)
        if obs is None or obs.count == 0:
            layers.append(LayerQuant(wl.node, wl.op_type, wl.input, wl.weight, wl.weight_axis, "float",
                                     reason="no calibration statistics for its input"))
            continue
        if wl.input not in activations:
            spec = overrides.get(wl.input, calibrator)
            method, p = _spec(spec, params if spec == calibrator else {})
            activations[wl.input] = ActivationQuant(wl.input, amax(obs, method, p), method, p)
        w = constant_value(work, wl.weight)
        assert w is not None
        wm = (per_layer_weight_method or {}).get(wl.node, weight_method)
        qw = quantize_w(np.asarray(w, np.float32), axis=wl.weight_axis, method=wm)
        layers.append(LayerQuant(wl.node, wl.op_type, wl.input, wl.weight, wl.weight_axis, "int8", qw,
                                 wm, bias_name=wl.bias))
    matmuls: list[MatMulQuant] = []
    for am in find_activation_matmuls(work):
        if am.node in keep_float:
            matmuls.append(MatMulQuant(am.node, am.inputs, "float", am.role, am.block, "kept in float by request"))
            continue
        missing = [t for t in am.inputs if observers.get(t) is None or observers[t].count == 0]
        if missing:
            matmuls.append(MatMulQuant(am.node, am.inputs, "float", am.role, am.block,
                                       f"no calibration statistics for {missing}"))
            continue
        for t in am.inputs:
            if t not in activations:
                spec = overrides.get(t, calibrator)
                method, p = _spec(spec, params if spec == calibrator else {})
                activations[t] = ActivationQuant(t, amax(observers[t], method, p), method, p)
        matmuls.append(MatMulQuant(am.node, am.inputs, "int8", am.role, am.block))
    settings = {"activation_calibrator": calibrator, "calibrator_params": params, "weight_method": weight_method,
                "activation_granularity": "per-tensor", "weight_granularity": "per-output-channel",
                "symmetric": True, "zero_point": 0, "weight_range": [-127, 127]}
    return QuantPlan(activations, layers, settings, list(transforms), matmuls=matmuls)
