"""Quantization algorithms: plans, rewrites (CrossQuant, equalization), per-layer choice, rounding, precision.

``edgeq.quantize`` is also the one-call pipeline :func:`edgeq.pipeline.quantize`: importing any
submodule (``edgeq.quantize.build``...) makes Python bind this package to the attribute
``edgeq.quantize``, which would hide the function. The package is therefore callable and forwards
the call, so ``edgeq.quantize(policy, env, out, ...)`` works whatever was imported before.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from edgeq.pipeline import quantize

        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
