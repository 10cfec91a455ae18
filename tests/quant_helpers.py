"""Helpers shared by the quantization tests: small float graphs and their calibration statistics."""

from __future__ import annotations

import numpy as np
import onnx

from edgeq.calibration.collect import CalibrationStats, calibrate_observations
from edgeq.graph.builder import GraphBuilder
from edgeq.policy import FloatPolicy, PolicySource
from edgeq.spaces import BoxSpec


def mlp(weights: list[tuple[np.ndarray, np.ndarray]], activation: str = "relu") -> onnx.ModelProto:
    """``obs -> Gemm -> act -> ... -> Gemm -> actions`` from ``[(W [out, in], b), ...]``."""
    g = GraphBuilder("mlp")
    x = "obs"
    for i, (w, b) in enumerate(weights):
        x = g.linear(x, w.astype(np.float32), b.astype(np.float32), f"fc{i}")
        if i < len(weights) - 1:
            x = g.activation(x, activation, f"act{i}")
    g.output(x, "actions")
    return g.make_model([("obs", ["batch", weights[0][0].shape[1]])], [("actions", ["batch", weights[-1][0].shape[0]])])


def float_policy(model: onnx.ModelProto) -> FloatPolicy:
    """Wrap a graph ``obs [batch, n] -> actions [batch, m]`` (actions in [-1, 1] units)."""
    n_in = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    n_out = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    inf = float("inf")
    return FloatPolicy(model, BoxSpec((n_in,), (-inf,) * n_in, (inf,) * n_in),
                       BoxSpec((n_out,), (-1.0,) * n_out, (1.0,) * n_out), PolicySource("test", "", "test"))


def stats_for(model: onnx.ModelProto, calib: np.ndarray, holdout: np.ndarray | None = None) -> CalibrationStats:
    """Calibration statistics of ``model`` on logged states, with optional held-out states."""
    stats = calibrate_observations(float_policy(model), calib)
    stats.holdout = None if holdout is None else np.asarray(holdout, np.float32)
    return stats
