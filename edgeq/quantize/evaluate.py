"""The policy's action error of a plan on fixed states, measured with the real ONNX Runtime graph.

Every per-layer decision (automatic choice, AdaRound/bias-correction acceptance, fp16 fallback) is
scored by the error of the **actions** the quantized graph produces on held-out calibration
states, not by any tensor's own error: what matters to the return is the action.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeq.deploy.runtime import OrtPolicy
from edgeq.export.qdq import apply_plan
from edgeq.quantize.plan import QuantPlan

__all__ = ["ActionErrorScorer", "action_half_range"]


def action_half_range(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Half the width of each action bound (1 where unbounded): errors are reported in these units."""
    lo, hi = np.asarray(low, np.float64).ravel(), np.asarray(high, np.float64).ravel()
    half = (hi - lo) / 2.0
    return np.where(np.isfinite(half) & (half > 0), half, 1.0)


@dataclass
class ActionErrorScorer:
    """Mean ``|a_quant - a_float| / half_range`` over ``states`` (and the max, on request).

    ``model`` is the original float graph; the float actions are computed once.
    """

    model: onnx.ModelProto
    states: np.ndarray
    half_range: np.ndarray
    evaluations: int = 0

    def __post_init__(self) -> None:
        self.states = np.ascontiguousarray(self.states, np.float32)
        self.reference = OrtPolicy(self.model.SerializeToString()).act(self.states)

    def actions(self, plan: QuantPlan) -> np.ndarray:
        q = apply_plan(self.model, plan, check=False)
        self.evaluations += 1
        return OrtPolicy(q.SerializeToString()).act(self.states)

    def errors(self, plan: QuantPlan) -> np.ndarray:
        """Per-state, per-dimension normalized absolute errors."""
        return np.abs(self.actions(plan).astype(np.float64) - self.reference) / self.half_range

    def __call__(self, plan: QuantPlan) -> float:
        return float(self.errors(plan).mean())

    def summary(self, plan: QuantPlan) -> dict[str, float]:
        e = self.errors(plan)
        return {"mean": float(e.mean()), "p99": float(np.percentile(e.max(axis=1), 99)), "max": float(e.max())}
