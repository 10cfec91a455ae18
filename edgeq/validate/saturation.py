"""Range coverage of a quantized policy: how often each INT8 tensor falls outside its calibrated range.

Every per-tensor int8 activation has a calibrated threshold ``amax`` (scale ``amax / 127``); a value
with ``|x| > amax`` is clipped by the QuantizeLinear in front of the layer. The *saturation rate*
of a tensor is the fraction of its values (elements, over all steps of the counted episodes) beyond
``amax``. Measured on validation rollouts it shows whether calibration saw the states the policy
meets: a percentile calibrator clips ~1e-4 of the calibration data by design, while a policy pushed
off its nominal gait can leave the calibrated range on a large fraction of steps (and then its
actions are wrong exactly when it must recover).

:class:`SaturationMonitor` wraps an :class:`~edgeq.deploy.runtime.OrtPolicy` of a model instrumented
to also output those tensors; :meth:`SaturationMonitor.observe_rows` is called by the paired
validator with the rows that belong to counted episodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

#: Default warning threshold on a tensor's saturation rate (0.1% of its values).
DEFAULT_SATURATION_WARN = 1e-3


@dataclass
class SaturationCounter:
    """Streaming count of ``|x| > amax`` for one tensor."""

    tensor: str
    amax: float
    total: int = 0
    outside: int = 0
    absmax: float = 0.0

    def add(self, values: np.ndarray) -> None:
        a = np.abs(np.asarray(values, np.float64))
        if a.size == 0:
            return
        self.total += int(a.size)
        self.outside += int(np.count_nonzero(a > self.amax))
        self.absmax = max(self.absmax, float(a.max()))

    @property
    def rate(self) -> float:
        return self.outside / self.total if self.total else 0.0

    @property
    def harmless(self) -> bool:
        """Clipping costs at most one quantization step (``amax / 127``): e.g. a tanh output at ±1 with
        ``amax`` just under 1. Such saturation is rounding, not lost range, and is not warned about."""
        return self.absmax - self.amax <= self.amax / 127

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "outside": self.outside, "values": self.total, "amax": self.amax,
                "absmax_seen": self.absmax, "max_clip_error": max(0.0, self.absmax - self.amax),
                "within_one_step": self.harmless}


def quantized_ranges(quantization: Mapping[str, Any]) -> dict[str, float]:
    """``{tensor: amax}`` of the INT8 activations, from a plan's ``to_json()`` (the manifest's)."""
    return {str(a["tensor"]): float(a["amax"]) for a in quantization.get("activations", [])}


def restrict_to_quantized(ranges: Mapping[str, float], model: onnx.ModelProto) -> dict[str, float]:
    """The entries of ``ranges`` whose tensor ``model`` quantizes (feeds to a ``QuantizeLinear``).

    A target-specialized file may run some layers in float (the CPU file's tiny layers); their
    activations cannot saturate there.
    """
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {t: a for t, a in ranges.items() if t in quantized}


def instrument_model(model: str | Path | onnx.ModelProto, tensors: Sequence[str]) -> bytes:
    """The model (a path or proto) with ``tensors`` added as graph outputs, serialized."""
    from edgeq.calibration.collect import instrumented

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return instrumented(proto, list(tensors)).SerializeToString()


class SaturationMonitor:
    """A batch policy that also counts, per quantized tensor, the values outside ``amax``.

    ``runtime`` must return ``tensors`` from :meth:`run` (build it on :func:`instrument_model`).
    Values are counted only for rows passed to :meth:`observe_rows` (the counted episodes).
    """

    def __init__(self, runtime: Any, ranges: Mapping[str, float]) -> None:
        self.runtime = runtime
        self.counters = {t: SaturationCounter(t, float(a)) for t, a in ranges.items()}
        self._last: dict[str, np.ndarray] = {}

    def reset(self, mask: np.ndarray | None = None) -> None:
        self.runtime.reset(mask)

    def act(self, obs: np.ndarray) -> np.ndarray:
        out = self.runtime.output_name
        self._last = self.runtime.run(np.ascontiguousarray(obs, dtype=np.float32), [out, *self.counters])
        return self._last[out]

    def observe_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, bool)
        if not rows.any() or not self._last:
            return
        for name, counter in self.counters.items():
            counter.add(self._last[name][rows])

    def report(self, threshold: float = DEFAULT_SATURATION_WARN) -> dict[str, Any]:
        return saturation_report(self.counters.values(), threshold)


def saturation_report(counters: Sequence[SaturationCounter] | Any, threshold: float) -> dict[str, Any]:
    """Per-tensor rates, the worst tensor, and a warning line for each tensor above ``threshold``.

    A tensor whose clipped values lie within one quantization step of its range (a bounded output such
    as tanh at ±1) is reported but not warned about: its clipping error is no larger than rounding.
    """
    items = list(counters)
    tensors = {c.tensor: c.to_json() for c in items}
    worst = max(items, key=lambda c: c.rate, default=None)
    warnings = [f"tensor {c.tensor!r}: {100 * c.rate:.3g}% of values outside the calibrated range "
                f"±{c.amax:.4g} (largest seen {c.absmax:.4g}, more than one quantization step beyond); threshold "
                f"{100 * threshold:.3g}%"
                for c in items if c.rate > threshold and not c.harmless]
    return {"threshold": threshold, "max_rate": worst.rate if worst else 0.0,
            "max_tensor": worst.tensor if worst else None, "tensors": tensors, "warnings": warnings}
