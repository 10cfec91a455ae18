"""Per-layer automatic choice of the activation quantizer, scored by the policy's action error.

Each weighted layer's int8 input gets one :class:`LayerChoice`: a calibrator (with its parameters)
and an optional exact rewrite (static CrossQuant or equalization, with its ``alpha``). The search
is coordinate descent: layers in graph order, each trying every candidate with the other layers at
their current choice, keeping the one whose **action error on held-out calibration states** is the
smallest (ties keep the earlier candidate). A tensor's own quantization MSE is not the objective:
a threshold that clips a rarely used channel can be MSE-optimal and still move the action.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "DEFAULT_CALIBRATOR_CANDIDATES",
    "DEFAULT_TRANSFORM_CANDIDATES",
    "LayerChoice",
    "candidate_choices",
    "choose_per_layer",
]

#: Calibrators tried per tensor: ``(method, params)``.
DEFAULT_CALIBRATOR_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("max", {}),
    ("percentile", {"percentile": 99.9}),
    ("percentile", {"percentile": 99.99}),
    ("mse", {}),
    ("entropy", {}),
)
#: Rewrites tried per layer: ``(transform, alpha)``.
DEFAULT_TRANSFORM_CANDIDATES: tuple[tuple[str, float | None], ...] = (
    ("none", None),
    ("crossquant", 0.0),
    ("crossquant", 0.15),
    ("crossquant", 0.5),
    ("equalize", 0.5),
)
TRANSFORMS = ("none", "crossquant", "equalize")


@dataclass(frozen=True)
class LayerChoice:
    """How one layer's input is quantized.

    ``transform``: ``none``, ``crossquant`` (static column factor ``c^(1-alpha)``) or ``equalize``
    (SmoothQuant factor ``c^alpha / w^(1-alpha)``); ``dynamic``: CrossQuant's run-time row scale
    (ONNX Runtime only), in which case ``transform`` is ``crossquant`` and no calibrator is used.
    """

    calibrator: str = "percentile"
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    transform: str = "none"
    alpha: float | None = None
    dynamic: bool = False
    weight_method: str | None = None  # None: the plan's default weight quantizer

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.transform != "none" and self.alpha is None:
            raise ValueError(f"transform {self.transform!r} needs an alpha")
        if self.dynamic and self.transform != "crossquant":
            raise ValueError("the dynamic form exists for CrossQuant only")

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.calibrator, tuple(sorted(self.params.items())), self.transform, self.alpha, self.dynamic,
                self.weight_method)

    @property
    def label(self) -> str:
        wm = f" w:{self.weight_method}" if self.weight_method else ""
        if self.dynamic:
            return f"crossquant-dynamic(alpha={self.alpha:g}){wm}"
        p = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for _, v in sorted(self.params.items()))
        cal = f"{self.calibrator}({p})" if p else self.calibrator
        return (cal if self.transform == "none" else f"{cal}+{self.transform}(alpha={self.alpha:g})") + wm

    def to_json(self) -> dict[str, Any]:
        return {"calibrator": self.calibrator, "params": dict(self.params), "transform": self.transform,
                "alpha": self.alpha, "dynamic": self.dynamic, "weight_method": self.weight_method,
                "label": self.label}


def candidate_choices(calibrators: Sequence[tuple[str, Mapping[str, Any]]] = DEFAULT_CALIBRATOR_CANDIDATES,
                      transforms: Sequence[tuple[str, float | None]] = DEFAULT_TRANSFORM_CANDIDATES
                      ) -> list[LayerChoice]:
    """Every calibrator crossed with every rewrite (deduplicated, in the given order)."""
    out: list[LayerChoice] = []
    seen: set[tuple[Any, ...]] = set()
    for t, a in transforms:
        for method, params in calibrators:
            c = LayerChoice(method, dict(params), t, a if t != "none" else None)
            if c.key not in seen:
                seen.add(c.key)
                out.append(c)
    return out


def choose_per_layer(layers: Sequence[str], initial: Mapping[str, LayerChoice],
                     candidates: Mapping[str, Sequence[LayerChoice]],
                     score: Callable[[Mapping[str, LayerChoice]], float], *, sweeps: int = 1
                     ) -> tuple[dict[str, LayerChoice], dict[str, dict[str, Any]]]:
    """Coordinate descent over ``layers``; returns the choices and, per layer, what was tried.

    ``score(choices)`` is the held-out action error of the whole policy with ``choices``. A
    candidate that raises ``ValueError`` (e.g. a rewrite impossible for that layer) is skipped
    and recorded as such.
    """
    current = dict(initial)
    best_score = float(score(current))
    records: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, int(sweeps))):
        for node in layers:
            tried: dict[str, float | str] = {}
            best = current[node]
            start_score = best_score  # the score of ``current`` as it is when this layer's turn starts
            for cand in candidates.get(node, ()):
                trial = {**current, node: cand}
                if cand.key == current[node].key:
                    tried[cand.label] = start_score
                    continue
                try:
                    s = float(score(trial))
                except ValueError as exc:
                    tried[cand.label] = f"skipped: {exc}"
                    continue
                tried[cand.label] = s
                if s < best_score:
                    best_score, best = s, cand
            current[node] = best
            records[node] = {"chosen": best.label, "heldout_action_error": best_score,
                             "candidates": {k: (round(v, 6) if isinstance(v, float) else v)
                                            for k, v in tried.items()}}
    return current, records


def with_choice(choices: Mapping[str, LayerChoice], node: str, **changes: Any) -> dict[str, LayerChoice]:
    """A copy of ``choices`` with ``node``'s choice changed."""
    out = dict(choices)
    out[node] = replace(out[node], **changes)
    return out
