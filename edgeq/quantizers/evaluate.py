"""The policy's action error of a plan on fixed states, measured with the real ONNX Runtime graph.

Every per-layer decision (automatic choice, AdaRound/bias-correction acceptance, fp16 fallback) is
scored by the error of the **actions** the quantized graph produces on held-out calibration
states, not by any tensor's own error: what matters to the return is the action.

The quantizers do not write graphs: the scorer is given the export stage's lowering function
(:class:`Lowering`, in practice :func:`edgeq.export.qdq.apply_plan`) by its caller, so the data
flows one way (quantizers never import the export stage).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx

from edgeq.deploy.runtime import OrtPolicy
from edgeq.quantizers.plan import QuantPlan

__all__ = ["ActionErrorScorer", "Lowering", "action_half_range"]


class Lowering(Protocol):
    """Writes a plan into a float graph: ``lower(model, plan, check=False)`` returns the quantized model.

    :func:`edgeq.export.qdq.apply_plan` is the implementation; ``check=False`` skips ONNX's full
    model check (the many candidate graphs of a search).
    """

    def __call__(self, model: onnx.ModelProto, plan: QuantPlan, *, check: bool = ...) -> onnx.ModelProto: ...


def action_half_range(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Half the width of each action bound (1 where unbounded): errors are reported in these units."""
    lo, hi = np.asarray(low, np.float64).ravel(), np.asarray(high, np.float64).ravel()
    half = (hi - lo) / 2.0
    return np.where(np.isfinite(half) & (half > 0), half, 1.0)


@dataclass
class ActionErrorScorer:
    """The score of a plan: its action error on ``states`` (lower is better).

    ``score = mean(e) + tail_weight * CVaR(tail_fraction)``, where ``e`` is
    ``|a_quant - a_float| / half_range`` per state and action dimension, and the CVaR is the mean,
    over the worst ``tail_fraction`` of the states, of each state's largest error. The tail term
    keeps a choice from buying a lower average with rare large errors (a clipping calibrator on
    a tensor whose extremes matter), which is how a policy falls over. ``model`` is the original
    float graph; the float actions are computed once. ``lower`` writes a plan into ``model``
    (:class:`Lowering`: :func:`edgeq.export.qdq.apply_plan`).
    """

    model: onnx.ModelProto
    states: np.ndarray
    half_range: np.ndarray
    tail_weight: float = 0.0
    tail_fraction: float = 0.01
    tail_states: np.ndarray | None = None
    evaluations: int = 0
    lower: Lowering = field(kw_only=True)
    #: ``[rows of states, act]`` weights of the errors (the critic's value sensitivity,
    #: :mod:`edgeq.quantizers.sensitivity`); None: every state and dimension alike. Set with :meth:`set_weights`.
    weights: np.ndarray | None = field(default=None, kw_only=True)
    #: score by the lowered graph's digest: a search meets the same graph again (a candidate whose
    #: threshold equals the current one's, the chosen plan re-scored), and ONNX Runtime gives it the same
    #: actions; the score is the same, only not recomputed (cleared when the weights change).
    _scores: dict[bytes, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.states = np.ascontiguousarray(self.states, np.float32)
        if self.tail_states is not None and self.tail_weight > 0:
            self.states = np.ascontiguousarray(np.concatenate([self.states, self.tail_states]), np.float32)
            self._n_mean = len(self.states) - len(self.tail_states)
        else:
            self._n_mean = len(self.states)
        self.reference = OrtPolicy(self.model.SerializeToString()).act(self.states)

    def _lowered(self, plan: QuantPlan) -> bytes:
        self.evaluations += 1
        return self.lower(self.model, plan, check=False).SerializeToString()

    def _errors_of(self, model: bytes) -> np.ndarray:
        return np.abs(OrtPolicy(model).act(self.states).astype(np.float64) - self.reference) / self.half_range

    def actions(self, plan: QuantPlan) -> np.ndarray:
        return OrtPolicy(self._lowered(plan)).act(self.states)

    def errors(self, plan: QuantPlan) -> np.ndarray:
        """Per-state, per-dimension normalized absolute errors."""
        return self._errors_of(self._lowered(plan))

    def _cvar(self, e: np.ndarray) -> float:
        worst = np.sort(e.max(axis=1))[::-1]
        k = max(1, int(np.ceil(self.tail_fraction * len(worst))))
        return float(worst[:k].mean())

    def set_weights(self, weights: np.ndarray | None) -> None:
        """Weight the errors of ``states`` (``[len(states), act]``, as :attr:`states` is ordered) from now on."""
        if weights is not None:
            weights = np.asarray(weights, np.float64)
            if weights.shape != self.reference.shape:
                raise ValueError(f"weights of shape {weights.shape}; expected {self.reference.shape}")
        self.weights = weights
        self._scores.clear()

    def score_errors(self, e: np.ndarray) -> float:
        """The score of per-state, per-dimension errors ``e`` (rows as in ``states``), weighted if weights are set."""
        if self.weights is not None:
            e = e * self.weights
        mean = float(e[: self._n_mean].mean())
        return mean if self.tail_weight <= 0 else mean + self.tail_weight * self._cvar(e)

    def __call__(self, plan: QuantPlan) -> float:
        model = self._lowered(plan)
        key = hashlib.blake2b(model, digest_size=32).digest()
        if key not in self._scores:
            self._scores[key] = self.score_errors(self._errors_of(model))
        return self._scores[key]

    def summary(self, plan: QuantPlan) -> dict[str, float]:
        e = self.errors(plan)
        h = e[: self._n_mean]
        out = {"mean": float(h.mean()), "p99": float(np.percentile(h.max(axis=1), 99)), "max": float(h.max()),
               "cvar": self._cvar(e), "score": self.score_errors(e)}
        if self.weights is not None:
            out["weighted_mean"] = float((h * self.weights[: self._n_mean]).mean())
        return out
