"""From calibration statistics to a plan: rewrites, per-layer choice, rounding, bias correction, fp16.

:func:`build_plan` runs, in order, the stages :class:`QuantOptions` turns on:

1. **Per-layer activation quantizer** (:class:`~edgeq.quantizers.auto.LayerChoice`): a calibrator and
   an exact rewrite of the layer's input (static CrossQuant or equalization, applied by
   :mod:`edgeq.quantizers.transforms`), or CrossQuant's dynamic form. Without ``auto`` every layer in
   ``transform_layers`` gets ``transform``/``alpha`` and every tensor the calibrator; with ``auto``
   each layer's choice is searched (:func:`edgeq.quantizers.auto.choose_per_layer`). A rewritten
   tensor is exactly ``X / d`` of the original input ``X``, so its statistics (the "second pass")
   are computed from the original input's values on the stored calibration states divided by
   ``d``; untouched tensors keep the streamed first-pass statistics.
2. **Rounding** (``rounding``): AdaRound, GPTQ or stochastic rounding per layer in graph order (inputs
   as the partially quantized graph feeds the layer), or ``brecq``: every layer's rounding and input
   scale jointly against the float actions (:mod:`edgeq.quantizers.reconstruct`).
3. **Bias correction** per layer in graph order.
4. **fp16 fallback** for the most sensitive layers while the held-out action error is above
   ``max_action_error``.

Every stage after the first is kept only if it lowers the held-out action error of the whole
policy (:class:`~edgeq.quantizers.evaluate.ActionErrorScorer`), and the plan's metrics record the
error after each stage. Stages 1 (auto), 2 and 3 need states; recurrent policies (whose layer
inputs depend on carried state) get the plain static plan.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from edgeq.calibration.calibrators import compute_amax, quantization_kernel_fraction
from edgeq.calibration.collect import CalibrationStats, layer_rows, observe_states, tensor_values
from edgeq.calibration.observers import TensorObserver
from edgeq.deploy.runtime import OrtPolicy
from edgeq.graph.analysis import WeightedLayer, constant_value, find_activation_matmuls, find_weighted_layers
from edgeq.quantizers import crossquant, equalize
from edgeq.quantizers.adaround import adaround
from edgeq.quantizers.affine import learn_input_affine
from edgeq.quantizers.auto import (
    DEFAULT_CALIBRATOR_CANDIDATES,
    DEFAULT_TRANSFORM_CANDIDATES,
    LayerChoice,
    candidate_choices,
    choose_per_layer,
)
from edgeq.quantizers.bias_correction import bias_correction_delta, corrected_bias
from edgeq.quantizers.evaluate import ActionErrorScorer, Lowering
from edgeq.quantizers.noisy import fake_quant_noisy, noisy_bias
from edgeq.quantizers.plan import ActivationQuant, LayerQuant, QuantPlan, make_plan
from edgeq.quantizers.precision import fp16_fallback
from edgeq.quantizers.reconstruct import reconstruct
from edgeq.quantizers.rounding import gptq_round, stochastic_round
from edgeq.quantizers.sensitivity import OBJECTIVES, ValueFn, value_loss, value_sensitivity
from edgeq.quantizers.split import ChannelSplit, apply_splits, choose_splits
from edgeq.quantizers.transforms import InputScaling, apply_input_scalings, can_fold, weight_in_view
from edgeq.quantizers.weights import QuantizedWeight, quantize_weight

__all__ = ["QuantOptions", "build_plan"]

#: Weight rounding methods (``QuantOptions.rounding``): per layer in graph order (``adaround``, ``gptq``,
#: ``stochastic``) or the whole network at once (``brecq``: :mod:`edgeq.quantizers.reconstruct`).
ROUNDINGS = ("nearest", "adaround", "gptq", "stochastic", "brecq", "gptq+brecq", "adaround+brecq", "discquant",
             "adaround+discquant")
TRANSFORM_LAYERS = ("first", "all")
AUTO_STARTS = ("recipe", "first-layer")


@dataclass
class QuantOptions:
    """What :func:`build_plan` does; every field is a config field of the same name.

    The defaults here are the plain baseline (every later stage off) that unit tests start from; the
    defaults ``edgeq quantize`` uses are :class:`edgeq.config.QuantizeConfig`'s, and the pipeline makes
    its options from the config only (:meth:`~edgeq.config.QuantizeConfig.quant_options`).

    Attributes:
        calibrator, calibrator_params: Activation calibrator for every tensor (without ``auto``),
            and the starting point of the search (with it).
        weight_method: Per-output-channel weight quantizer (``absmax`` or ``mse``).
        transform: ``none``, ``crossquant`` or ``equalize``, applied to ``transform_layers``.
        transform_layers: ``first`` (the layer reading the observation) or ``all``.
        alpha: The rewrite's strength (default: 0.15 for CrossQuant, 0.5 for equalization).
        dynamic: CrossQuant's dynamic form on ``transform_layers`` (ONNX Runtime CPU only: the plan
            is marked not TensorRT-compatible).
        auto: Search each layer's calibrator and rewrite by held-out action error.
        auto_calibrators, auto_transforms: The candidates (default:
            :data:`~edgeq.quantizers.auto.DEFAULT_CALIBRATOR_CANDIDATES` / ``..._TRANSFORM_...``).
        auto_sweeps: Coordinate-descent sweeps.
        auto_starts: ``recipe`` (one coordinate descent from the recipe's choices) or ``first-layer``
            (one descent per input rewrite of the layer reading the observation, that layer held to
            the rewrite's calibrator candidates; the best :data:`AUTO_STARTS_REFINED` go through the
            rounding stages and the lowest held-out score after them is kept). Greedy descent from
            one start can settle the first layer on a rewrite that is best only for the recipe's
            later layers (benchmarks/results/int8_methods.md, the hard SAC HalfCheetah fixture).
        auto_weight_methods: After the activation search, each layer's weight quantizer is chosen
            among these the same way (default ``["absmax", "mse"]``; ``[]`` skips it).
        rounding: ``nearest``, ``adaround`` (per layer, :mod:`~edgeq.quantizers.adaround`), ``gptq``
            (per layer, error-compensating, :mod:`~edgeq.quantizers.rounding`), ``stochastic`` (seeded,
            a candidate) or ``brecq`` (every layer's rounding and input scale jointly against the float
            actions, :mod:`~edgeq.quantizers.reconstruct`); each is kept only if it lowers the held-out
            score; ``gptq+brecq`` / ``adaround+brecq``: GPTQ or AdaRound, then the joint reconstruction
            from their integers (each stage kept on its own). adaround_iters: Adam steps of AdaRound's
            soft-rounding stage per layer (0: only the exact flip descent on the same objective).
            ``discquant`` / ``adaround+discquant``: DiscQuant's relaxed rounding of every layer at once against
            the float actions (:data:`edgeq.quantizers.reconstruct.METHODS`; the input scales stay).
            reconstruct_iters, reconstruct_seconds: the ``brecq`` optimization's Adam steps and time
            bound; reconstruct_scales: learn the input scales too.
        objective: ``action`` (the held-out action error) or ``critic``: the errors weighted per state
            and action dimension by the value they cost under the policy's own Q critic
            (:mod:`edgeq.quantizers.sensitivity`; needs ``build_plan(critic=...)``, else plain).
        bias_correction: Empirical bias correction per layer.
        fp16_fallback: At most this many layers go to fp16 when the held-out action error stays
            above ``max_action_error`` (mean ``|a_int8 - a_float|`` in units of the action
            half-range); 0 turns the fallback off.
        tail_weight, tail_fraction: The score every decision minimizes is the held-out mean action
            error plus ``tail_weight`` times the mean of the worst ``tail_fraction`` of the states'
            largest errors (:class:`~edgeq.quantizers.evaluate.ActionErrorScorer`); the fp16 target
            ``max_action_error`` applies to this score. tail_on_calibration_states: take the tail
            over the held-out and the calibration states (whose extremes set the ranges).
        keep_float: Layers (node names) left in float by request.
        split_outliers: Outlier channel splitting (:mod:`edgeq.quantizers.split`) before everything else:
            at most this fraction of each hidden layer's width is added as split units (0: off); the
            splits are kept only if they lower the held-out score of the initial plan.
        noisy_bias: NoisyQuant (:mod:`edgeq.quantizers.noisy`) before the rounding stages: per static int8
            layer a fixed seeded noise on its input, removed through the bias, where it lowers the layer's
            held-out output error; the stage is kept only if it lowers the held-out score. (The ``brecq``
            reconstruction optimizes without the noise; its result is scored with it.)
        affine_input: AffineQuant on the observation input (:mod:`edgeq.quantizers.affine`) after the per-layer
            search: a learned per-channel scale and shift of the first layer's input, folded exactly into a
            Sub/Mul pre-op and the layer's weight and bias; kept only if it lowers the held-out score.
        input_headroom: The observation input's int8 range (the first layer's input, after any pre-op) is
            widened by this factor after every other stage (1: as calibrated). Not scored on held-out
            states, which the calibrated range already covers: it is a margin for states beyond
            calibration (a falling robot), where a clipped observation makes the policy act on a wrong
            state. It trades input resolution for range; benchmarks/results/int8_methods.md measures it.
        seed: Seed of AdaRound's mini-batches.
    """

    calibrator: str = "percentile"
    calibrator_params: dict[str, Any] = field(default_factory=lambda: {"percentile": 99.99})
    weight_method: str = "absmax"
    transform: str = "none"
    transform_layers: str = "first"
    alpha: float | None = None
    dynamic: bool = False
    auto: bool = False
    auto_calibrators: list[tuple[str, dict[str, Any]]] | None = None
    auto_transforms: list[tuple[str, float | None]] | None = None
    auto_sweeps: int = 1
    auto_starts: str = "recipe"
    auto_weight_methods: list[str] | None = None
    rounding: str = "nearest"
    adaround_iters: int = 0
    reconstruct_iters: int = 600
    reconstruct_seconds: float = 90.0
    reconstruct_scales: bool = True
    objective: str = "action"
    bias_correction: bool = False
    fp16_fallback: int = 0
    max_action_error: float = 0.01
    tail_weight: float = 0.0
    tail_fraction: float = 0.01
    tail_on_calibration_states: bool = False
    keep_float: list[str] = field(default_factory=list)
    split_outliers: float = 0.0
    noisy_bias: bool = False
    affine_input: bool = False
    input_headroom: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        import math

        from edgeq.calibration.calibrators import CALIBRATORS
        from edgeq.quantizers.weights import WEIGHT_QUANTIZERS

        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator {self.calibrator!r} is unknown; expected one of {', '.join(CALIBRATORS)}")
        pct = dict(self.calibrator_params).get("percentile")
        pct_ok = isinstance(pct, (int, float)) and math.isfinite(pct) and 0.0 < pct <= 100.0
        if self.calibrator == "percentile" and pct is not None and not pct_ok:
            raise ValueError(f"percentile {pct!r} is out of range; expected a number in (0, 100], e.g. 99.99")
        if self.weight_method not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight method {self.weight_method!r} is unknown; expected one of "
                             f"{', '.join(sorted(WEIGHT_QUANTIZERS))}")
        if self.transform not in ("none", "crossquant", "equalize"):
            raise ValueError(f"transform must be none, crossquant or equalize, got {self.transform!r}")
        if self.transform_layers not in TRANSFORM_LAYERS:
            raise ValueError(f"transform_layers must be one of {TRANSFORM_LAYERS}, got {self.transform_layers!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.auto_starts not in AUTO_STARTS:
            raise ValueError(f"auto_starts must be one of {AUTO_STARTS}, got {self.auto_starts!r}")
        if self.dynamic and self.transform not in ("none", "crossquant"):
            raise ValueError("dynamic is CrossQuant's run-time form; it cannot combine with equalization")
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if int(self.reconstruct_iters) < 0 or float(self.reconstruct_seconds) <= 0:
            raise ValueError("reconstruct_iters must be >= 0 and reconstruct_seconds > 0")
        if int(self.fp16_fallback) < 0:
            raise ValueError(f"fp16_fallback must be >= 0, got {self.fp16_fallback}")
        if not (math.isfinite(float(self.input_headroom)) and 1.0 <= float(self.input_headroom) <= 16.0):
            raise ValueError(f"input_headroom must be a factor in [1, 16] (1: the calibrated range), got "
                             f"{self.input_headroom}")
        if not 0.0 <= float(self.split_outliers) <= 1.0:
            raise ValueError(f"split_outliers must be in [0, 1] (a fraction of each hidden width), got "
                             f"{self.split_outliers}")

    def default_alpha(self) -> float | None:
        if self.alpha is not None:
            return float(self.alpha)
        if self.transform == "crossquant" or self.dynamic:
            return crossquant.DEFAULT_ALPHA
        if self.transform == "equalize":
            return equalize.DEFAULT_ALPHA
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _weight_key(w: np.ndarray, axis: int, method: str) -> tuple[str, int, str]:
    return hashlib.blake2b(np.ascontiguousarray(w).tobytes(), digest_size=16).hexdigest(), axis, method


class _Builder:
    """State shared by the stages: the float model, the states, caches and the scorer."""

    def __init__(self, model: onnx.ModelProto, stats: CalibrationStats, options: QuantOptions,
                 half_range: np.ndarray, lower: Lowering) -> None:
        self.model, self.stats, self.opt, self.lower = model, stats, options, lower
        self.layers: list[WeightedLayer] = find_weighted_layers(model)
        self.by_node = {wl.node: wl for wl in self.layers}
        calib = np.asarray(stats.observations, np.float32)
        held = stats.holdout
        if held is None or len(held) == 0:  # no held-out episodes: hold out a quarter of the sample
            rng = np.random.default_rng(options.seed)
            order = rng.permutation(len(calib))
            n = max(1, len(calib) // 4)
            held, calib = calib[order[:n]], calib[order[n:]]
        self.calib, self.held = calib, np.asarray(held, np.float32)
        inputs = list(dict.fromkeys(wl.input for wl in self.layers))
        self.inputs = tensor_values(model, self.calib, inputs)  # original layer inputs on calibration states
        self.scorer = ActionErrorScorer(model, self.held, half_range, tail_weight=options.tail_weight,
                                        tail_fraction=options.tail_fraction,
                                        tail_states=self.calib if options.tail_on_calibration_states else None,
                                        lower=lower)
        self.state_weights: np.ndarray | None = None  # [calibration states, act] (objective: critic)
        self._obs_cache: dict[tuple[Any, ...], TensorObserver] = {}
        self._factor_cache: dict[tuple[Any, ...], np.ndarray] = {}
        self._weight_cache: dict[tuple[str, int, str], QuantizedWeight] = {}
        self._amax_cache: dict[tuple[Any, ...], float] = {}  # make_plan's thresholds, per observer and calibrator
        self._scaled_cache: dict[tuple[Any, ...], onnx.ModelProto] = {}

    def scaled(self, transforms: Sequence[InputScaling]) -> onnx.ModelProto:
        """``apply_input_scalings(self.model, transforms)`` (the model itself for none), each graph made once.

        A search materializes many plans that share their input scalings; the graph depends only on each
        scaling's layer, factors, placement and shift. The returned model is shared: read it, never edit it.
        """
        if not transforms:
            return self.model
        key = tuple((t.layer, np.asarray(t.factors, np.float64).tobytes(), t.placement,
                     None if t.shift is None else np.asarray(t.shift, np.float64).tobytes()) for t in transforms)
        if key not in self._scaled_cache:
            if len(self._scaled_cache) >= 64:
                self._scaled_cache.pop(next(iter(self._scaled_cache)))
            self._scaled_cache[key] = apply_input_scalings(self.model, transforms)
        return self._scaled_cache[key]

    # -- per-layer choices → plan -------------------------------------------------------------
    def factors(self, node: str, choice: LayerChoice) -> np.ndarray:
        key = (node, choice.transform, choice.alpha)
        if key not in self._factor_cache:
            wl = self.by_node[node]
            c = self.stats.observers[wl.input].channel_absmax
            if choice.transform == "crossquant":
                d = crossquant.crossquant_static_factors(c, float(choice.alpha or 0.0))
            else:
                w = constant_value(self.model, wl.weight)
                assert w is not None
                wcol = np.abs(weight_in_view(np.asarray(w, np.float64), wl)).max(axis=0)
                d = equalize.equalization_factors(c, wcol, float(choice.alpha or 0.0))
            self._factor_cache[key] = d
        return self._factor_cache[key]

    def scaled_observer(self, node: str, choice: LayerChoice, name: str) -> TensorObserver:
        key = (node, choice.transform, choice.alpha)
        if key not in self._obs_cache:
            obs = TensorObserver(name)
            x = self.inputs[self.by_node[node].input]
            obs.update(layer_rows((x / self.factors(node, choice)).astype(np.float32)))
            self._obs_cache[key] = obs
        return self._obs_cache[key]

    def quantize_weight(self, w: np.ndarray, axis: int, method: str) -> QuantizedWeight:
        key = _weight_key(w, axis, method)
        if key not in self._weight_cache:
            self._weight_cache[key] = quantize_weight(w, axis=axis, method=method)
        return self._weight_cache[key]

    def materialize(self, choices: Mapping[str, LayerChoice]) -> QuantPlan:
        """The nearest-rounding plan of ``choices`` (no bias correction, no fp16)."""
        transforms = [InputScaling(node, self.factors(node, ch), ch.transform, float(ch.alpha or 0.0))
                      for node, ch in choices.items() if ch.transform != "none" and not ch.dynamic]
        work = self.scaled(transforms)
        observers: dict[str, TensorObserver] = {}
        per_tensor: dict[str, tuple[str, dict[str, Any]]] = {}
        for wl in find_weighted_layers(work):
            ch = choices[wl.node]
            orig = self.by_node[wl.node].input
            if ch.transform != "none" and not ch.dynamic:
                observers[wl.input] = self.scaled_observer(wl.node, ch, wl.input)
            else:
                observers[wl.input] = self.stats.observers[orig]
            per_tensor.setdefault(wl.input, (ch.calibrator, dict(ch.params)))
        for mm in find_activation_matmuls(work):  # attention products: the streamed statistics of both inputs
            mm_choice = choices.get(mm.node)
            for t in mm.inputs:
                if t not in observers and t in self.stats.observers:
                    observers[t] = self.stats.observers[t]
                if mm_choice is not None:
                    per_tensor.setdefault(t, (mm_choice.calibrator, dict(mm_choice.params)))
        plan = make_plan(self.model, observers, calibrator=self.opt.calibrator,
                         calibrator_params=self.opt.calibrator_params, weight_method=self.opt.weight_method,
                         keep_float=self.opt.keep_float, per_tensor_calibrator=per_tensor, transforms=transforms,
                         per_layer_weight_method={n: c.weight_method for n, c in choices.items() if c.weight_method},
                         amax_cache=self._amax_cache, weight_quantizer=self.quantize_weight, scaled=work)
        layers: list[LayerQuant] = []
        for layer in plan.layers:
            ch = choices[layer.node]
            if layer.precision == "int8" and ch.dynamic:
                d = self.factors(layer.node, replace(ch, transform="crossquant"))
                w = np.asarray(constant_value(work, layer.weight_name), np.float64)
                shape = (1, -1) if layer.weight_axis == 0 else (-1, 1)
                qw = self.quantize_weight((w * d.reshape(shape)).astype(np.float32), layer.weight_axis,
                                          ch.weight_method or self.opt.weight_method)
                layer = replace(layer, scheme="crossquant-dynamic", dynamic_alpha=float(ch.alpha or 0.0),
                                dynamic_factors=d, weight=qw)
            layers.append(replace(layer, choice={"label": ch.label, **ch.to_json()}))
        plan = replace(plan, layers=layers)
        # drop activation entries no static layer uses (dynamic layers quantize at run time)
        used = plan.used_activations()
        return replace(plan, activations={k: v for k, v in plan.activations.items() if k in used})

    # -- stages --------------------------------------------------------------------------------
    def initial_choices(self) -> dict[str, LayerChoice]:
        o = self.opt
        alpha = o.default_alpha()
        out: dict[str, LayerChoice] = {}
        for i, wl in enumerate(self.layers):
            targeted = o.transform_layers == "all" or i == 0
            if targeted and o.dynamic:
                out[wl.node] = LayerChoice(o.calibrator, dict(o.calibrator_params), "crossquant", alpha, dynamic=True)
            elif targeted and o.transform != "none":
                out[wl.node] = LayerChoice(o.calibrator, dict(o.calibrator_params), o.transform, alpha)
            else:
                out[wl.node] = LayerChoice(o.calibrator, dict(o.calibrator_params))
        return out

    def layer_io(self, plan: QuantPlan, node: str, *, raw: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_hat, x_float, w_float, w_quant)`` of one int8 layer, all in the ``[out, in]``/primed view.

        ``x_hat``: the layer's int8 input (dequantized) as the graph quantized up to the layer
        feeds it (``raw``: that input before the layer's own static quantizer); ``x_float``: the float
        input of the rewritten float model; ``w_*`` ``[out, in]``.
        """
        layer = plan.layer(node)
        idx = [la.node for la in plan.layers].index(node)
        prefix = replace(plan, layers=[la if i < idx else replace(la, precision="float")
                                       for i, la in enumerate(plan.layers)])
        work = self.scaled(plan.transforms)
        x_q = layer_rows(tensor_values(self.lower(self.model, prefix, check=False), self.calib,
                                       [layer.input])[layer.input])
        x_f = layer_rows(tensor_values(work, self.calib, [layer.input])[layer.input])
        wl = next(w for w in find_weighted_layers(work) if w.node == node)
        w = weight_in_view(np.asarray(constant_value(work, wl.weight), np.float64), wl)
        if layer.scheme == "crossquant-dynamic":
            assert layer.dynamic_factors is not None and layer.dynamic_alpha is not None
            d = layer.dynamic_factors
            q, r = crossquant.dynamic_quantize_reference(x_q, d, layer.dynamic_alpha)
            x_hat = q.astype(np.float32) * r
            x_f = (x_f / d[None, :]).astype(np.float32)
            w = w * d[None, :]
        elif raw:
            x_hat = x_q.astype(np.float32)
        else:  # NoisyQuant: the GEMM reads Q(x + N) - N (the noise leaves through the bias)
            x_hat = fake_quant_noisy(x_q, plan.activations[layer.input].amax, layer.input_noise)
        assert layer.weight is not None
        wq = layer.weight.dequantize()
        wq = wq if layer.weight_axis == 0 else wq.T
        return x_hat, x_f, w.astype(np.float32), wq

    def refine(self, plan: QuantPlan, stage: str) -> tuple[QuantPlan, dict[str, Any]]:
        """AdaRound, GPTQ, stochastic rounding or bias correction on every int8 layer, in graph order."""
        report: dict[str, Any] = {}
        work = apply_input_scalings(self.model, plan.transforms) if plan.transforms else self.model
        for layer in list(plan.int8_layers()):
            if stage == "noisy":
                if layer.scheme != "static":
                    continue
                x_q, x_f, w, wq = self.layer_io(plan, layer.node, raw=True)
                seed = self.opt.seed + [la.node for la in plan.layers].index(layer.node)
                nr = noisy_bias(w, wq, x_q, x_f, plan.activations[layer.input].amax, seed=seed)
                new = replace(layer, input_noise=nr.noise, notes={**layer.notes, "noisy_bias": nr.to_json()})
                report[layer.node] = nr.to_json()
                plan = replace(plan, layers=[new if la.node == layer.node else la for la in plan.layers])
                continue
            x_hat, x_f, w, wq = self.layer_io(plan, layer.node)
            if stage in ("gptq", "stochastic"):
                assert layer.weight is not None
                near = layer.weight if layer.weight_axis == 0 else QuantizedWeight(
                    np.ascontiguousarray(layer.weight.q.T), layer.weight.scale, 0)
                if stage == "gptq":
                    rr = gptq_round(w, near, x_hat, x_f, seed=self.opt.seed)
                    qv, used, rep = rr.weight, rr.used, rr.to_json()
                else:
                    seed = self.opt.seed + [la.node for la in plan.layers].index(layer.node)
                    qv = stochastic_round(w, near, seed=seed)
                    used, rep = True, {"method": "stochastic", "seed": seed,
                                       "changed_fraction": float(np.mean(qv.q != near.q))}
                qw = qv if layer.weight_axis == 0 else QuantizedWeight(np.ascontiguousarray(qv.q.T), qv.scale, 1)
                new = replace(layer, weight=qw, rounding=stage if used else "nearest",
                              notes={**layer.notes, stage: rep})
                report[layer.node] = rep
            elif stage == "adaround":
                assert layer.weight is not None
                near = layer.weight if layer.weight_axis == 0 else QuantizedWeight(
                    np.ascontiguousarray(layer.weight.q.T), layer.weight.scale, 0)
                res = adaround(w, near, x_hat, x_f, iters=self.opt.adaround_iters, seed=self.opt.seed)
                qw = res.weight if layer.weight_axis == 0 else QuantizedWeight(
                    np.ascontiguousarray(res.weight.q.T), res.weight.scale, 1)
                new = replace(layer, weight=qw, rounding="adaround" if res.used else "nearest",
                              notes={**layer.notes, "adaround": res.to_json()})
                report[layer.node] = res.to_json()
            else:
                delta = bias_correction_delta(x_hat, wq, x_f, w)
                b = constant_value(work, layer.bias_name) if layer.bias_name else None
                new = replace(layer, bias=corrected_bias(b, delta),
                              notes={**layer.notes, "bias_correction_max_abs_shift": float(np.abs(delta).max())})
                report[layer.node] = {"max_abs_shift": float(np.abs(delta).max())}
            plan = replace(plan, layers=[new if la.node == layer.node else la for la in plan.layers])
        return plan, report

    def affine_input(self, plan: QuantPlan) -> tuple[QuantPlan, dict[str, Any]]:
        """AffineQuant on the first layer's input (:mod:`edgeq.quantizers.affine`): learned per-channel ``d`` and
        shift ``δ``, an exact Sub/Mul pre-op and the layer's weight and bias; the layer re-quantized (nearest)."""
        skipped = self.observation_skip(plan)
        if skipped is not None:
            return plan, {"skipped": skipped}
        wl = self.layers[0]
        layer = plan.layer(wl.node)
        old = next((t for t in plan.transforms if t.layer == wl.node), None)
        x = layer_rows(self.inputs[wl.input]).astype(np.float32)
        w0 = constant_value(self.model, wl.weight)
        assert w0 is not None
        w = weight_in_view(np.asarray(w0, np.float64), wl)
        d0 = old.factors if old is not None else np.ones(w.shape[1])
        res = learn_input_affine(x, w, d0, plan.activations[layer.input].amax, seed=self.opt.seed)
        report: dict[str, Any] = res.to_json()
        if not res.loss_end < res.loss_start:
            return plan, {**report, "skipped": "the learned transform does not lower the layer's output error"}
        shift: np.ndarray | None = res.shift
        new_t = InputScaling(wl.node, res.factors, "affinequant", 0.0, "mul", details=res.to_json(), shift=shift)
        transforms = [new_t if t is old else t for t in plan.transforms] if old is not None else \
            [new_t, *plan.transforms]
        try:
            work = apply_input_scalings(self.model, transforms)
        except ValueError as exc:  # no bias to absorb W δ: the scaling alone
            report["shift_dropped"] = str(exc)
            shift = None
            new_t = InputScaling(wl.node, res.factors, "affinequant", 0.0, "mul", details=res.to_json())
            transforms = [new_t if t is old else t for t in plan.transforms] if old is not None else \
                [new_t, *plan.transforms]
            work = apply_input_scalings(self.model, transforms)
        new_wl = next(w_ for w_ in find_weighted_layers(work) if w_.node == wl.node)
        xs = x - shift[None, :] if shift is not None else x
        obs = TensorObserver(new_wl.input)
        obs.update((xs / res.factors[None, :]).astype(np.float32))
        ch = layer.choice or {}
        method = str(ch.get("calibrator", self.opt.calibrator))
        params = dict(ch.get("params", self.opt.calibrator_params))
        amax = compute_amax(obs, method, **params)
        wq = self.quantize_weight(np.asarray(constant_value(work, wl.weight), np.float32), layer.weight_axis,
                                  layer.weight_method)
        new_layer = replace(layer, input=new_wl.input, weight=wq, rounding="nearest",
                            notes={**layer.notes, "affinequant": report})
        layers = [new_layer if la.node == wl.node else la for la in plan.layers]
        acts = dict(plan.activations)
        acts[new_wl.input] = ActivationQuant(new_wl.input, amax, method, params)
        cand = replace(plan, layers=layers, transforms=transforms, activations=acts)
        used = cand.used_activations()
        return replace(cand, activations={k: v for k, v in acts.items() if k in used}), report

    def observation_skip(self, plan: QuantPlan) -> str | None:
        """Why the first layer's input is not a static int8 quantizer of the observation (after any pre-op), or
        None when it is (AffineQuant and the input headroom act there only)."""
        wl = self.layers[0]
        layer = plan.layer(wl.node)
        if layer.precision != "int8" or layer.scheme != "static":
            return "the first layer is not a static int8 layer"
        old = next((t for t in plan.transforms if t.layer == wl.node), None)
        if old is not None and (old.placement == "folded" or can_fold(self.model, wl.node) is not None):
            return "the first layer's input is a hidden activation, not the observation"
        return None

    def input_headroom(self, plan: QuantPlan, factor: float) -> tuple[QuantPlan, dict[str, Any]]:
        """The observation input's int8 range widened by ``factor`` (:attr:`QuantOptions.input_headroom`)."""
        skipped = self.observation_skip(plan)
        if skipped is not None:
            return plan, {"factor": factor, "skipped": skipped}
        name = plan.layer(self.layers[0].node).input
        act = plan.activations[name]
        new = replace(act, amax=float(act.amax * factor), params={**act.params, "headroom": factor})
        report = {"factor": factor, "tensor": name, "amax_calibrated": act.amax, "amax": new.amax}
        return replace(plan, activations={**plan.activations, name: new}), report

    def reconstruct(self, plan: QuantPlan, method: str = "brecq") -> tuple[QuantPlan, dict[str, Any]]:
        """Every static int8 layer's rounding (and, BRECQ-style, input scale) at once against the float actions;
        ``method="discquant"``: DiscQuant's relaxed rounding (:data:`edgeq.quantizers.reconstruct.METHODS`)."""
        work = apply_input_scalings(self.model, plan.transforms) if plan.transforms else self.model
        o = self.opt
        extra: dict[str, Any] = {"lr": 0.05} if method == "discquant" else {}
        res = reconstruct(work, plan, self.calib, self.scorer.half_range, state_weights=self.state_weights,
                          iters=o.reconstruct_iters, method=method,
                          learn_scales=o.reconstruct_scales, seed=o.seed, time_limit_s=o.reconstruct_seconds,
                          **extra)
        return res.plan, res.report

    def kernels(self, plan: QuantPlan) -> QuantPlan:
        """Fill each int8 layer's quantization kernel (and the plain per-tensor one) on calibration states."""
        work = self.scaled(plan.transforms)
        names = list(dict.fromkeys(la.input for la in plan.int8_layers()))
        vals = tensor_values(work, self.calib, names) if names else {}
        layers = []
        for la in plan.layers:
            if la.precision == "int8":
                x = vals[la.input]
                orig = self.by_node[la.node].input
                ch = la.choice or {}
                method = ch.get("calibrator", self.opt.calibrator)
                params = ch.get("params", self.opt.calibrator_params)
                base = quantization_kernel_fraction(self.inputs[orig],
                                                    compute_amax(self.stats.observers[orig], method, **params))
                if la.scheme == "crossquant-dynamic":
                    assert la.dynamic_factors is not None and la.dynamic_alpha is not None
                    q, _ = crossquant.dynamic_quantize_reference(x, la.dynamic_factors, la.dynamic_alpha)
                    k = float(np.mean(q == 0))
                else:
                    xn = x if la.input_noise is None else x + la.input_noise.reshape(1, -1)
                    k = quantization_kernel_fraction(xn, plan.activations[la.input].amax)
                la = replace(la, kernel=k, kernel_per_tensor=base)
            layers.append(la)
        return replace(plan, layers=layers)


@dataclass(frozen=True)
class _Start:
    """One per-layer search result: its start's name, held-out score, choices and per-layer records."""

    name: str
    score: float
    choices: dict[str, LayerChoice]
    records: dict[str, dict[str, Any]]


#: with ``auto_starts: first-layer``, the best this many starts (by the search's score) go through the
#: rounding stages, and the lowest score after them is kept: the rounding can reorder close starts
AUTO_STARTS_REFINED = 2
#: a first-layer rewrite starts a search only if that layer alone scores within this factor of the best one
AUTO_STARTS_WITHIN = 1.25


def _descend(nodes: list[str], initial: dict[str, LayerChoice], cands: list[LayerChoice],
             score: Callable[[Mapping[str, LayerChoice]], float], opt: QuantOptions) -> list[_Start]:
    """The per-layer search (:func:`choose_per_layer`) from one start or, with ``auto_starts:
    first-layer``, from one start per input rewrite of the first layer; best score first."""
    free = {n: cands for n in nodes}
    if opt.auto_starts != "first-layer" or not nodes:
        ch, rec = choose_per_layer(nodes, initial, free, score, sweeps=opt.auto_sweeps)
        return [_Start("recipe", float(score(ch)), ch, rec)]
    first = nodes[0]
    families: dict[tuple[str, float | None, bool], tuple[float, LayerChoice]] = {}
    for c in cands:  # each rewrite's best calibrator for the first layer, the later layers as the recipe has them
        try:
            sc = float(score({**initial, first: c}))
        except ValueError:
            continue
        fam = (c.transform, c.alpha, c.dynamic)
        if fam not in families or sc < families[fam][0]:
            families[fam] = (sc, c)
    if not families:
        ch, rec = choose_per_layer(nodes, initial, free, score, sweeps=opt.auto_sweeps)
        return [_Start("recipe", float(score(ch)), ch, rec)]
    best_first = min(sc for sc, _ in families.values())
    out = []
    for (transform, alpha, dynamic), (sc, c0) in families.items():
        if sc > AUTO_STARTS_WITHIN * best_first:  # hopeless from the first layer alone
            continue
        held = [c for c in cands if (c.transform, c.alpha, c.dynamic) == (transform, alpha, dynamic)]
        ch, rec = choose_per_layer(nodes, {**initial, first: c0}, {**free, first: held}, score,
                                   sweeps=opt.auto_sweeps)
        name = transform + ("" if alpha is None else f"(alpha={alpha:g})") + (" dynamic" if dynamic else "")
        out.append(_Start(name, float(score(ch)), ch, rec))
    return sorted(out, key=lambda st: st.score)


def build_plan(model: onnx.ModelProto, stats: CalibrationStats, options: QuantOptions | None = None, *,
               lower: Lowering, half_range: Sequence[float] | np.ndarray | None = None,
               recurrent: bool = False, critic: ValueFn | None = None) -> QuantPlan:
    """Make the quantization plan of ``model`` from calibration ``stats`` (see the module docstring).

    Args:
        model: The float policy graph (``obs -> actions``).
        stats: Calibration statistics with the stored states (and held-out states, if any).
        options: The stages to run (default: :class:`QuantOptions` defaults).
        lower: Writes a candidate plan into ``model`` to score it (the export stage's
            :func:`edgeq.export.qdq.apply_plan`; passed in so quantizers never import export).
        half_range: Action half-ranges, the units of the action error (default 1 per dimension).
        recurrent: The policy carries state between calls: only the plain static plan is made.
        critic: The policy's Q critic (:mod:`edgeq.ingest.sb3_critic`), if it has one: with
            ``objective: critic`` every decision's score weights the errors by the critic's value
            sensitivity (:mod:`edgeq.quantizers.sensitivity`); in any case the metrics report the
            weighted error and the critic's value loss next to the plain error.
    """
    opt = options or QuantOptions()
    t0 = time.perf_counter()
    if recurrent or len(stats.observations) == 0:
        plan = make_plan(model, stats.observers, calibrator=opt.calibrator,
                         calibrator_params=opt.calibrator_params, weight_method=opt.weight_method,
                         keep_float=opt.keep_float)
        plan.settings["options"] = opt.to_json()
        plan.metrics["note"] = ("recurrent policy: per-layer choice, rewrites, AdaRound, bias correction and "
                                "fp16 fallback need stateless layer inputs and were skipped") if recurrent else \
            "no stored calibration states: plain static plan"
        return plan
    out_dim = None
    for o in model.graph.output:
        dims = o.type.tensor_type.shape.dim
        out_dim = dims[-1].dim_value if dims and dims[-1].dim_value else None
    hr = np.ones(out_dim or 1) if half_range is None else np.asarray(half_range, np.float64)
    b = _Builder(model, stats, opt, hr, lower)
    weights = None
    objective_note = "plain action error"
    if critic is not None:
        low, high = getattr(critic, "action_low", None), getattr(critic, "action_high", None)
        # every scored row when the weights drive the search; else only the held-out rows the metrics report
        rows = len(b.scorer.states) if opt.objective == "critic" else len(b.held)
        weights = value_sensitivity(critic, b.scorer.states[:rows], b.scorer.reference[:rows], hr, low=low, high=high)
        if opt.objective == "critic":
            b.scorer.set_weights(weights)
            b.state_weights = value_sensitivity(critic, b.calib, OrtPolicy(model.SerializeToString()).act(b.calib),
                                                hr, low=low, high=high)
            objective_note = "action error weighted by the critic's value sensitivity"
    elif opt.objective == "critic":
        objective_note = "objective critic asked, but the policy has no Q critic: plain action error"
    candidates = _first_stage(b, opt)
    splits: list[ChannelSplit] = []
    split_report: dict[str, Any] | None = None
    if opt.split_outliers > 0:
        sb, splits, split_report = _split_builder(b, opt, hr, lower)
        if sb is not None:
            if opt.objective == "critic" and weights is not None:
                sb.scorer.set_weights(weights)
                sb.state_weights = b.state_weights
            scandidates = _first_stage(sb, opt)
            last = "auto" if opt.auto else "initial"
            errors, serrors = candidates[0][1], scandidates[0][1]
            kept = serrors[last] < errors[last]
            split_report.update({"kept": kept, "heldout_score": {"unsplit": errors, "split": serrors}})
            if kept:
                b, candidates = sb, scandidates
            else:
                splits = []
    outcomes = [_refined(b, opt, p, e) for p, e in candidates]
    plan, current, stage_reports, errors = min(outcomes, key=lambda o: o[1])
    if "auto_starts" in plan.metrics:
        refined = {str(o[0].metrics["auto_starts"]["start"]): round(o[1], 6) for o in outcomes}
        plan = replace(plan, metrics={**plan.metrics, "auto_starts": {**plan.metrics["auto_starts"],
                                                                      "refined": refined}})
    if opt.input_headroom != 1.0:
        plan, rep = b.input_headroom(plan, float(opt.input_headroom))
        current = rep["heldout_score"] = b.scorer(plan)
        stage_reports["input_headroom"] = rep
        errors["input_headroom"] = current
    if opt.fp16_fallback > 0:
        plan, rep = fp16_fallback(plan, b.scorer, max_layers=opt.fp16_fallback, target=opt.max_action_error)
        stage_reports["fp16_fallback"] = rep
        current = rep["error_after"]
        errors["fp16_fallback"] = current
    plan = b.kernels(plan)
    final = b.scorer.summary(plan)  # scored on the builder's (split) model, before the splits join the plan
    critic_metrics: dict[str, Any] = {}
    if critic is not None and weights is not None:
        n_held = len(b.held)
        err_all = b.scorer.errors(plan)
        final["weighted_mean"] = float((err_all[:n_held] * weights[:n_held]).mean())
        vloss = value_loss(critic, b.held, b.scorer.reference[:n_held], b.scorer.actions(plan)[:n_held])
        q_ref = float(np.mean(np.abs(critic(b.held, b.scorer.reference[:n_held]))))
        critic_metrics = {"critic_value_loss": {"mean": float(vloss.mean()), "relative": float(vloss.mean() / q_ref),
                                                "p99": float(np.percentile(vloss, 99))}}
    plan.settings.update({"options": opt.to_json(), "tensorrt_compatible": plan.tensorrt_compatible})
    plan.metrics.update({
        "heldout_states": int(len(b.held)), "calibration_states": int(len(b.calib)),
        "heldout_score_by_stage": {k: round(float(v), 6) for k, v in errors.items()},
        "heldout_action_error": {k: round(v, 6) for k, v in final.items()},
        "action_error_units": "|a_int8 - a_float| / action half-range; score = mean + tail_weight * cvar "
                              "(mean of the worst tail_fraction of per-state max errors)",
        "objective": objective_note, **critic_metrics,
        "stages": stage_reports, "graph_evaluations": b.scorer.evaluations,
        "seconds": round(time.perf_counter() - t0, 3)})
    if split_report is not None:
        plan.metrics["outlier_split"] = split_report
    return replace(plan, splits=splits) if splits else plan


def _first_stage(b: _Builder, opt: QuantOptions) -> list[tuple[QuantPlan, dict[str, Any]]]:
    """The initial plan and (with ``auto``) the per-layer search: candidate plans, best held-out score
    first, each with the held-out score after each step (one candidate, or with ``auto_starts:
    first-layer`` the best :data:`AUTO_STARTS_REFINED` starts, which all go through the rounding stages)."""
    errors: dict[str, Any] = {}
    choices = b.initial_choices()
    plan = b.materialize(choices)
    errors["initial"] = b.scorer(plan)
    if not opt.auto:
        return [(plan, errors)]
    cands = candidate_choices(opt.auto_calibrators or DEFAULT_CALIBRATOR_CANDIDATES,
                              opt.auto_transforms or DEFAULT_TRANSFORM_CANDIDATES)
    if opt.dynamic:
        cands += [LayerChoice(opt.calibrator, dict(opt.calibrator_params), "crossquant", a, dynamic=True)
                  for a in sorted({opt.default_alpha() or crossquant.DEFAULT_ALPHA, 1.0})]
    int8_nodes = [wl.node for wl in b.layers if wl.node not in opt.keep_float]
    score = lambda ch: b.scorer(b.materialize(ch))  # noqa: E731
    starts = _descend(int8_nodes, choices, cands, score, opt)
    out = []
    for start in starts[:AUTO_STARTS_REFINED]:
        plan = _searched(b, opt, start.choices, start.records, int8_nodes, score)
        if len(starts) > 1:
            plan = replace(plan, metrics={**plan.metrics, "auto_starts": {
                "first_layer": int8_nodes[0], "start": start.name,
                "score_by_start": {st.name: round(st.score, 6) for st in starts}}})
        out.append((plan, {**errors, "auto": b.scorer(plan)}))
    return out


def _searched(b: _Builder, opt: QuantOptions, choices: dict[str, LayerChoice], records: dict[str, Any],
              int8_nodes: list[str], score: Callable[[Mapping[str, LayerChoice]], float]) -> QuantPlan:
    """The plan of one per-layer search result: each layer's weight quantizer and the attention inputs chosen too."""
    records = {n: dict(r) for n, r in records.items()}
    methods = ["absmax", "mse"] if opt.auto_weight_methods is None else list(opt.auto_weight_methods)
    if methods:
        choices = {n: replace(c, weight_method=c.weight_method or opt.weight_method) if n in int8_nodes else c
                   for n, c in choices.items()}
        wcands = {n: [replace(choices[n], weight_method=m) for m in methods] for n in int8_nodes}
        choices, wrec = choose_per_layer(int8_nodes, choices, wcands, score)
        for n in int8_nodes:
            records[n]["weights"] = wrec[n]
            records[n]["chosen"] = wrec[n]["chosen"]
            records[n]["heldout_action_error"] = wrec[n]["heldout_action_error"]
    # attention products (MatMuls of two activations): the calibrator of their two inputs, searched the same way
    mm_nodes = [m.node for m in find_activation_matmuls(b.model) if m.node not in opt.keep_float]
    mm_records: dict[str, dict[str, Any]] = {}
    if mm_nodes:
        mm_cands = candidate_choices(opt.auto_calibrators or DEFAULT_CALIBRATOR_CANDIDATES, [("none", None)])
        choices = {**choices, **{n: LayerChoice(opt.calibrator, dict(opt.calibrator_params)) for n in mm_nodes}}
        choices, mm_records = choose_per_layer(mm_nodes, choices, {n: mm_cands for n in mm_nodes}, score,
                                               sweeps=opt.auto_sweeps)
    plan = b.materialize(choices)
    plan = replace(plan, layers=[replace(la, choice={**la.choice, "search": records[la.node]})
                                 if la.node in records and la.choice is not None else la
                                 for la in plan.layers],
                   matmuls=[replace(m, reason=f"inputs calibrated by {choices[m.node].label} (searched)")
                            if m.node in mm_records and m.precision == "int8" else m for m in plan.matmuls])
    if mm_records:
        plan = replace(plan, metrics={**plan.metrics, "activation_matmul_search": mm_records})
    return plan


def _refined(b: _Builder, opt: QuantOptions, plan: QuantPlan, errors: dict[str, Any]
             ) -> tuple[QuantPlan, float, dict[str, Any], dict[str, Any]]:
    """AffineQuant's input transform, NoisyQuant, the rounding stages and bias correction, each kept only if
    it lowers the held-out score."""
    errors = dict(errors)
    current = errors["auto"] if opt.auto else errors["initial"]
    stage_reports: dict[str, Any] = {}
    roundings = [r for r in opt.rounding.split("+") if r != "nearest"]
    for stage in [*(["affine"] if opt.affine_input else []), *(["noisy"] if opt.noisy_bias else []), *roundings,
                  *(["bias_correction"] if opt.bias_correction else [])]:
        if not plan.int8_layers():
            continue
        if stage == "affine":
            cand, rep = b.affine_input(plan)
        elif stage in ("brecq", "discquant"):
            cand, rep = b.reconstruct(plan, stage)
        else:
            cand, rep = b.refine(plan, stage)
        e = b.scorer(cand)
        kept = e < current
        stage_reports[stage] = {"kept": kept, "heldout_action_error": e, "layers": rep}
        errors[stage] = e
        if kept:
            plan, current = cand, e
    return plan, current, stage_reports, errors


def _split_builder(b: _Builder, opt: QuantOptions, hr: np.ndarray, lower: Lowering
                   ) -> tuple[_Builder | None, list[ChannelSplit], dict[str, Any]]:
    """Outlier channel splitting: the builder of the split model (None if nothing is worth splitting).

    The split tensors' statistics are second-pass statistics on the stored calibration states (as for
    a rewritten tensor); the rest keep the streamed ones. :func:`build_plan` keeps the split model only
    if its plan scores lower after the per-layer search (or the initial plan, without ``auto``).
    """
    splits, rows = choose_splits(b.model, b.calib, float(opt.split_outliers))
    report: dict[str, Any] = {"fraction": float(opt.split_outliers), "layers": rows, "kept": False}
    if not splits:
        report["note"] = "no split lowers the modelled quantization error (or no splittable hidden layer)"
        return None, [], report
    smodel = apply_splits(b.model, splits)
    changed = [wl.input for wl in find_weighted_layers(smodel) if wl.node in {sp.layer for sp in splits}]
    observers = {**b.stats.observers, **observe_states(smodel, b.calib, changed)}
    return _Builder(smodel, replace(b.stats, observers=observers), opt, hr, lower), splits, report
