"""Box spaces as plain, JSON-serializable data (no gym/gymnasium objects, no pickles)."""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError


@dataclass(frozen=True)
class BoxSpec:
    """A continuous box: ``shape`` with elementwise ``low``/``high`` bounds (may be +-inf)."""

    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def bounded(self) -> bool:
        return bool(np.all(np.isfinite(self.low_array)) and np.all(np.isfinite(self.high_array)))

    @property
    def low_array(self) -> np.ndarray:
        return np.asarray(self.low, dtype=np.float64).reshape(self.shape)

    @property
    def high_array(self) -> np.ndarray:
        return np.asarray(self.high, dtype=np.float64).reshape(self.shape)

    def to_json(self) -> dict[str, Any]:
        def enc(v: float) -> float | str:
            return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")

        return {
            "type": "Box",
            "shape": list(self.shape),
            "dtype": self.dtype,
            "low": [enc(v) for v in self.low],
            "high": [enc(v) for v in self.high],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BoxSpec:
        if d.get("type", "Box") != "Box":
            raise PolicyFormatError(f"space type {d.get('type')!r} is not supported (expected Box)")
        return cls(
            shape=tuple(int(s) for s in d["shape"]),
            low=tuple(float(v) for v in d["low"]),
            high=tuple(float(v) for v in d["high"]),
            dtype=str(d.get("dtype", "float32")),
        )

    @classmethod
    def from_gym(cls, space: Any) -> BoxSpec:
        """From a gymnasium ``Box`` (duck-typed, so gymnasium need not be importable here)."""
        if type(space).__name__ != "Box":
            raise PolicyFormatError(f"space {space} is {type(space).__name__}, expected a continuous Box")
        low = np.broadcast_to(np.asarray(space.low, dtype=np.float64), space.shape)
        high = np.broadcast_to(np.asarray(space.high, dtype=np.float64), space.shape)
        return cls(tuple(int(s) for s in space.shape), tuple(low.ravel().tolist()),
                   tuple(high.ravel().tolist()), str(np.dtype(space.dtype)))


def parse_numpy_repr(text: str, shape: tuple[int, ...], field: str) -> tuple[float, ...]:
    """Parse a numpy array repr such as ``'[-1. -1. -inf]'`` or ``'-2.0'`` into ``shape`` values.

    SB3 stores spaces in its ``data`` JSON as the readable ``str()`` of numpy arrays next to the
    cloudpickled object; this reads the readable form. Numpy summarizes long arrays with ``...``,
    which cannot be recovered: that raises :class:`PolicyFormatError` naming ``field``.
    """
    if "..." in text:
        raise PolicyFormatError(f"{field}: the stored bounds are abbreviated ({text[:60]!r}); "
                                "cannot recover them without unpickling")
    body = re.sub(r"(array\(|\)|dtype=\w+|\[|\]|,)", " ", text)
    tokens = body.split()
    try:
        values = [float(t) for t in tokens]
    except ValueError as exc:
        raise PolicyFormatError(f"{field}: cannot parse bounds {text[:80]!r}: {exc}") from None
    n = int(np.prod(shape)) if shape else 1
    if len(values) == 1 and n != 1:
        values = values * n
    if len(values) != n:
        raise PolicyFormatError(f"{field}: expected {n} bound values for shape {shape}, found {len(values)}")
    return tuple(values)


def parse_shape(text: Any, field: str) -> tuple[int, ...]:
    """Parse SB3's stored shape field (``'[3]'``, ``'(3,)'`` or a list)."""
    try:
        value = ast.literal_eval(text) if isinstance(text, str) else text
        return tuple(int(s) for s in value)
    except (ValueError, SyntaxError, TypeError):
        raise PolicyFormatError(f"{field}: cannot parse shape {text!r}") from None
