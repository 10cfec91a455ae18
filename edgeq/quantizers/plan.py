"""The quantization plan: which tensors and weights are INT8, with what scales (data, no graphs).

A :class:`QuantPlan` is made from calibration statistics by :func:`make_plan`, printed in the
summary, saved in the manifest, and applied to the float graph by :mod:`edgeq.export.qdq`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgeq.calibration.calibrators import compute_amax
from edgeq.calibration.observers import TensorObserver
from edgeq.graph.analysis import constant_value, find_weighted_layers
from edgeq.quantizers.weights import QuantizedWeight, quantize_weight

INT8_MAX = 127


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


@dataclass
class LayerQuant:
    """One weighted layer: INT8 (input + per-output-channel weight) or left in float."""

    node: str
    op_type: str
    input: str
    weight_name: str
    weight_axis: int
    precision: str  # "int8" | "float"
    weight: QuantizedWeight | None = None
    weight_method: str = "absmax"
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "op_type": self.op_type, "input": self.input,
                             "weight": self.weight_name, "precision": self.precision}
        if self.weight is not None:
            s = self.weight.scale
            d.update({"weight_axis": self.weight_axis, "weight_method": self.weight_method,
                      "weight_scale_min": float(s.min()), "weight_scale_max": float(s.max())})
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class QuantPlan:
    activations: dict[str, ActivationQuant]
    layers: list[LayerQuant]
    settings: dict[str, Any] = field(default_factory=dict)

    def int8_layers(self) -> list[LayerQuant]:
        return [layer for layer in self.layers if layer.precision == "int8"]

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings,
                "activations": [a.to_json() for a in self.activations.values()],
                "layers": [layer.to_json() for layer in self.layers]}


def make_plan(model: onnx.ModelProto, observers: Mapping[str, TensorObserver], *,
              calibrator: str = "percentile", calibrator_params: dict[str, Any] | None = None,
              weight_method: str = "absmax", keep_float: Sequence[str] = (),
              per_tensor_calibrator: Mapping[str, str] | None = None) -> QuantPlan:
    """Choose scales for every weighted layer of ``model``.

    ``keep_float`` names layers (node names) to leave in float; ``per_tensor_calibrator`` overrides
    the activation calibrator for named tensors.
    """
    params = dict(calibrator_params or {})
    overrides = dict(per_tensor_calibrator or {})
    activations: dict[str, ActivationQuant] = {}
    layers: list[LayerQuant] = []
    for wl in find_weighted_layers(model):
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
            method = overrides.get(wl.input, calibrator)
            p = params if method == calibrator else {}
            activations[wl.input] = ActivationQuant(wl.input, float(compute_amax(obs, method, **p)), method, p)
        w = constant_value(model, wl.weight)
        assert w is not None
        qw = quantize_weight(np.asarray(w, np.float32), axis=wl.weight_axis, method=weight_method)
        layers.append(LayerQuant(wl.node, wl.op_type, wl.input, wl.weight, wl.weight_axis, "int8", qw,
                                 weight_method))
    settings = {"activation_calibrator": calibrator, "calibrator_params": params, "weight_method": weight_method,
                "activation_granularity": "per-tensor", "weight_granularity": "per-output-channel",
                "symmetric": True, "zero_point": 0, "weight_range": [-127, 127]}
    return QuantPlan(activations, layers, settings)
