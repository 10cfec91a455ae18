"""Per-layer mixed precision over {int4, int8, fp16}: plans as data, and the candidates of the search.

This module only makes plans (no graphs, no rollouts): :func:`with_int4` moves one layer's weight to
int4 (the layer's input stays int8: W4A8), :func:`layer_sizes` and :func:`plan_weight_bytes` say what a
plan stores, :func:`rank_layers` orders layers by a pluggable sensitivity score, and
:func:`candidate_plans` proposes the candidates of the search from the smallest up. The closed-loop
acceptance (each candidate judged by the sequential verdict) is :mod:`edgeq.search`.

A sensitivity score is any ``score(plan) -> float`` (lower is better): the held-out action error of
:class:`~edgeq.quantizers.evaluate.ActionErrorScorer` by default; a closed-loop-aware score plugs in the
same way. The sensitivity of a layer at a precision is the score of the base plan with only that layer
moved there (the one-at-a-time proxy of FLIQS/CSQ-style searches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeq.quantizers.adaround import output_error, split_rows
from edgeq.quantizers.bias_correction import bias_correction_delta, corrected_bias
from edgeq.quantizers.int4 import INT4_QMAX, Int4Weight, quantize_weight_int4
from edgeq.quantizers.plan import LayerQuant, QuantPlan
from edgeq.quantizers.precision import with_precision
from edgeq.quantizers.rounding import gptq_quantize, gptq_target

__all__ = ["BITS", "INT4_ROUNDINGS", "LAYER_INT4_ROUNDINGS", "MixedCandidate", "candidate_plans", "gptq_int4",
           "layer_sizes", "plan_weight_bytes", "rank_layers", "with_int4", "with_precisions"]

#: Per-layer rounding of int4 weights (:func:`with_int4`): nearest, or GPTQ error compensation (kept only where
#: it helps).
LAYER_INT4_ROUNDINGS = ("nearest", "gptq")
#: Every int4 rounding a search may propose: the per-layer ones, and ``brecq`` / ``gptq+brecq`` (nearest or
#: GPTQ integers, then the whole plan reconstructed jointly against the float actions, every layer on its
#: own grid: :mod:`edgeq.quantizers.reconstruct`, applied by :mod:`edgeq.search` to each candidate).
INT4_ROUNDINGS = (*LAYER_INT4_ROUNDINGS, "brecq", "gptq+brecq")

#: Bits a weight element takes at each precision ("float" layers keep fp32).
BITS = {"int4": 4, "int8": 8, "fp16": 16, "float": 32}

#: ``score(plan)`` of a candidate plan (lower is better): a held-out action error, or any closed-loop-aware proxy.
Score = Callable[[QuantPlan], float]
#: ``(x_hat, x_float)`` rows of a layer's input as the quantized/float graphs feed it, for bias correction.
LayerInputs = Callable[[QuantPlan, str], tuple[np.ndarray, np.ndarray]]


def gptq_int4(w_oi: np.ndarray, nearest: Int4Weight, x_hat: np.ndarray, x_f: np.ndarray, *, damp: float = 0.01,
              holdout_fraction: float = 0.25, seed: int = 0) -> tuple[Int4Weight, dict[str, Any]]:
    """GPTQ rounding of an int4 weight (the int8 path's solver, :func:`edgeq.quantizers.rounding.gptq_quantize`,
    with the int4 range and per-element block scales): kept only if its held-out layer output error is
    below nearest rounding's. ``w_oi``: the float weight ``[out, in]``; scales stay ``nearest``'s."""
    xq, xf = np.asarray(x_hat, np.float64), np.asarray(x_f, np.float64)
    w = np.asarray(w_oi, np.float64)
    hold, fit = split_rows(len(xq), holdout_fraction, seed)
    h, w_t = gptq_target(w, xq[fit], xf[fit], damp)
    q_near, _ = nearest.out_in()
    s_full = nearest.scale_full() if nearest.axis == 0 else nearest.scale_full().T
    live = ~np.all(q_near == 0, axis=1)
    q = gptq_quantize(w_t, s_full, h, live=live, damp=damp, qmax=INT4_QMAX).astype(np.int8)
    near_deq = q_near.astype(np.float32) * s_full
    cand_deq = q.astype(np.float32) * s_full
    e_near = output_error(xq[hold], near_deq, xf[hold], w)
    e_new = output_error(xq[hold], cand_deq, xf[hold], w)
    rep = {"method": "gptq", "used": bool(e_new < e_near), "heldout_output_mse_nearest": float(e_near),
           "heldout_output_mse_gptq": float(e_new), "changed_fraction": float(np.mean(q != q_near))}
    if not e_new < e_near:
        return nearest, rep
    q_out = q if nearest.axis == 0 else np.ascontiguousarray(q.T)
    return Int4Weight(q_out, nearest.scale.copy(), nearest.axis, nearest.block_size), rep


def with_int4(plan: QuantPlan, node: str, weight: np.ndarray, *, block_size: int = 0, method: str = "mse",
              inputs: LayerInputs | None = None, original_bias: np.ndarray | None = None,
              rounding: str = "nearest", reason: str = "") -> QuantPlan:
    """A copy of ``plan`` with layer ``node``'s weight in int4 (its int8 input quantizer kept).

    ``weight`` is the layer's float weight in the plan's working graph (after its input scalings), in
    the stored orientation. With ``inputs`` (the layer's quantized and float input rows), the int4
    layer gets ``rounding="gptq"`` (:func:`gptq_int4`, kept only where it lowers the held-out layer
    output error) and then empirical bias correction (:mod:`edgeq.quantizers.bias_correction`, the int8
    path's machinery) on top of ``original_bias``.
    """
    if rounding not in LAYER_INT4_ROUNDINGS:
        raise ValueError(f"int4 rounding must be one of {LAYER_INT4_ROUNDINGS}, got {rounding!r}")
    layer = plan.layer(node)
    if layer.scheme != "static" or node not in {la.node for la in plan.layers}:
        raise ValueError(f"layer {node}: int4 needs a static int8 input (scheme {layer.scheme!r})")
    if layer.input not in plan.activations:
        raise ValueError(f"layer {node}: no int8 activation quantizer for its input {layer.input!r}")
    w = np.asarray(weight, np.float32)
    w4 = quantize_weight_int4(w, layer.weight_axis, block_size=block_size, method=method)
    bias = None
    notes = dict(layer.notes)
    notes.pop("adaround", None)
    used_rounding = "nearest"
    if inputs is not None:
        x_hat, x_f = inputs(plan, node)
        w_oi = w if layer.weight_axis == 0 else w.T
        if rounding == "gptq" and len(x_hat) >= 8:
            w4, rep = gptq_int4(w_oi, w4, x_hat, x_f)
            notes["int4_rounding"] = rep
            used_rounding = "gptq" if rep["used"] else "nearest"
        wq_oi = w4.dequantize() if layer.weight_axis == 0 else w4.dequantize().T
        delta = bias_correction_delta(x_hat, wq_oi, x_f, w_oi)
        bias = corrected_bias(original_bias, delta)
        notes["int4_bias_correction_max_abs_shift"] = float(np.abs(delta).max())
    new = replace(layer, precision="int4", weight4=w4, bias=bias, reason=reason or f"{w4.describe()} weights, "
                  "int8 input (W4A8)", rounding=used_rounding, weight_method=method, notes=notes)
    return replace(plan, layers=[new if la.node == node else la for la in plan.layers], metrics=dict(plan.metrics))


def with_precisions(base: QuantPlan, int4: Mapping[str, QuantPlan], choice: Mapping[str, str]) -> QuantPlan:
    """``base`` with each layer at ``choice[node]``: ``int4`` layers taken from ``int4[node]`` (a plan with that
    layer in int4, made by :func:`with_int4`; with its input rewrite where that plan has its own), ``fp16``/``float``
    by :func:`with_precision`, others as in base."""
    plan = base
    for node, prec in choice.items():
        if prec == "int4":
            src = int4[node]
            layer4 = src.layer(node)
            plan = replace(plan, layers=[layer4 if la.node == node else la for la in plan.layers],
                           metrics=dict(plan.metrics))
            if src.transforms != base.transforms or src.input_splits != base.input_splits:
                # an int4 layer made under its own input rewrite (the first layer's int4 input scaling or input
                # split) brings that rewrite and its input's int8 range: its weight is only right with them
                plan = replace(plan, transforms=list(src.transforms), input_splits=list(src.input_splits),
                               activations={**plan.activations, layer4.input: src.activations[layer4.input]})
        elif prec in ("fp16", "float"):
            plan = with_precision(plan, node, prec, reason=f"mixed-precision search: {prec}")
        elif prec != plan.layer(node).precision:
            raise ValueError(f"layer {node}: cannot move to {prec!r} from a plan at {plan.layer(node).precision!r}")
    return plan


def layer_sizes(plan: QuantPlan, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Weight elements of each layer (``shapes``: the float weight's shape by layer node)."""
    return {la.node: int(np.prod(shapes[la.node])) for la in plan.layers if la.node in shapes}


def _layer_bytes(layer: LayerQuant, elements: int) -> float:
    bits = BITS.get(layer.precision, 32)
    scales = 0
    if layer.precision == "int4" and layer.weight4 is not None:
        scales = int(layer.weight4.scale.size)
    elif layer.precision == "int8" and layer.weight is not None:
        scales = int(layer.weight.scale.size)
    return elements * bits / 8 + 4 * scales


def plan_weight_bytes(plan: QuantPlan, sizes: Mapping[str, int]) -> float:
    """Bytes of the layers' weights and their scales at each layer's precision (biases excluded)."""
    return float(sum(_layer_bytes(la, sizes.get(la.node, 0)) for la in plan.layers))


def rank_layers(base: QuantPlan, moved: Mapping[str, QuantPlan], score: Score,
                saved: Mapping[str, float] | None = None) -> list[tuple[str, float]]:
    """``(node, score)`` of each one-layer-moved plan, best move first.

    Without ``saved``: least sensitive first (lowest score). With ``saved`` (bytes each move saves):
    by the score's increase over the base plan per byte saved (a greedy knapsack, as FLIQS/CSQ-style
    searches trade sensitivity against size), so a large, tolerant layer goes before a tiny one.
    """
    rows = [(node, float(score(p))) for node, p in moved.items()]
    if saved is None:
        return sorted(rows, key=lambda r: (r[1], r[0]))
    s0 = float(score(base))
    return sorted(rows, key=lambda r: ((max(r[1] - s0, 0.0) + 1e-9) / max(float(saved.get(r[0], 0.0)), 1e-9), r[0]))


@dataclass(frozen=True)
class MixedCandidate:
    """One candidate of the search: a per-layer precision choice, its plan and its predicted size."""

    name: str
    choice: dict[str, str]
    plan: QuantPlan
    weight_bytes: float
    proxy: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        counts: dict[str, int] = {}
        for p in self.choice.values():
            counts[p] = counts.get(p, 0) + 1
        return ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))


def candidate_plans(base: QuantPlan, int4: Mapping[str, QuantPlan], ranking: Sequence[tuple[str, float]],
                    sizes: Mapping[str, int], *, fp16_layers: Sequence[str] = (),
                    score: Score | None = None) -> list[MixedCandidate]:
    """Candidates from the smallest up: the ``k`` least sensitive layers in int4 (``k = n .. 1``), the rest
    int8; then the all-int8 base; then with the most sensitive ``fp16_layers`` in fp16 (larger, safer).

    ``ranking`` is :func:`rank_layers`' output for int4 moves; ``int4`` the one-layer int4 plans; the
    candidates are sorted by stored weight bytes (duplicates dropped). ``score`` fills each candidate's
    ``proxy`` (its held-out action error) for the report.
    """
    order = [node for node, _ in ranking]
    out: list[MixedCandidate] = []
    base_choice = {la.node: la.precision for la in base.layers}
    for k in range(len(order), 0, -1):
        choice = {**base_choice, **{n: "int4" for n in order[:k]}}
        plan = with_precisions(base, int4, {n: "int4" for n in order[:k]})
        name = "W4A8" if k == len(order) else f"mixed-int4x{k}"
        out.append(MixedCandidate(name, choice, plan, plan_weight_bytes(plan, sizes)))
    out.append(MixedCandidate("W8A8", dict(base_choice), base, plan_weight_bytes(base, sizes)))
    for j in range(1, len(fp16_layers) + 1):
        moved = {n: "fp16" for n in fp16_layers[:j]}
        plan = with_precisions(base, int4, moved)
        out.append(MixedCandidate(f"int8+fp16x{j}", {**base_choice, **moved}, plan, plan_weight_bytes(plan, sizes)))
    seen: set[tuple[tuple[str, str], ...]] = set()
    uniq = []
    for c in sorted(out, key=lambda c: (c.weight_bytes, c.name)):
        key = tuple(sorted(c.choice.items()))
        if key in seen:
            continue
        seen.add(key)
        uniq.append(replace(c, proxy=None if score is None else float(score(c.plan))))
    return uniq
