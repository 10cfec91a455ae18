"""Per-layer precision: find the layers int8 hurts most, and keep one or two in fp16 when nothing else works.

Sensitivity of a layer = the held-out action error of the plan with **only that layer** moved
from int8 to fp16 (lower = that layer's int8 error mattered more). The fallback moves layers to
fp16 one at a time, the most helpful first, while the plan's held-out action error is above the
target, at most ``max_layers`` of them and only when the move lowers the error. Every move is
recorded on the layer (``precision: fp16`` with the reason) and in the plan's metrics, so it is
shown in the summary and the manifest: never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edgeq.quantizers.plan import QuantPlan

__all__ = ["fp16_fallback", "layer_sensitivity", "with_precision"]


def with_precision(plan: QuantPlan, node: str, precision: str, reason: str = "") -> QuantPlan:
    """A copy of ``plan`` with layer ``node`` at ``precision`` (other layers shared, unchanged)."""
    def changed(layer: Any) -> Any:
        # an fp16 layer runs its float weight and bias: drop int8-only corrections
        extra = {"bias": None} if precision != "int8" else {}
        return replace(layer, precision=precision, reason=reason, **extra)

    layers = [changed(layer) if layer.node == node else layer for layer in plan.layers]
    if not any(layer.node == node for layer in plan.layers):
        raise KeyError(f"plan has no layer {node!r}")
    return replace(plan, layers=layers, metrics=dict(plan.metrics))


def layer_sensitivity(plan: QuantPlan, score: Callable[[QuantPlan], float]) -> dict[str, float]:
    """Held-out action error with each int8 layer alone in fp16 (the others as planned)."""
    return {layer.node: float(score(with_precision(plan, layer.node, "fp16")))
            for layer in plan.int8_layers()}


def fp16_fallback(plan: QuantPlan, score: Callable[[QuantPlan], float], *, max_layers: int, target: float
                  ) -> tuple[QuantPlan, dict[str, Any]]:
    """Move up to ``max_layers`` int8 layers to fp16 while the held-out action error exceeds ``target``.

    Returns the new plan and a report: the error before/after, the sensitivities measured at each
    step, and the layers moved.
    """
    current = float(score(plan))
    report: dict[str, Any] = {"target": target, "max_layers": max_layers, "error_before": current,
                              "moved": [], "sensitivity": {}}
    for _ in range(max(0, int(max_layers))):
        if current <= target or not plan.int8_layers():
            break
        sens = layer_sensitivity(plan, score)
        if not report["sensitivity"]:
            report["sensitivity"] = {k: round(v, 6) for k, v in sens.items()}
        node, err = min(sens.items(), key=lambda kv: kv[1])
        if err >= current:
            report["stopped"] = "no single layer in fp16 lowers the held-out action error"
            break
        reason = (f"fp16 fallback: held-out action error {current:.4g} > target {target:.4g} in int8; "
                  f"this layer in fp16 gives {err:.4g}, the largest reduction of any layer")
        plan = with_precision(plan, node, "fp16", reason)
        report["moved"].append({"layer": node, "error": err})
        current = err
    report["error_after"] = current
    return plan, report
