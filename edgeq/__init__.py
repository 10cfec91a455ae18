"""edgeq: post-training INT8 quantization for robot-control policies that keeps their return.

The workstation side (ingest, calibration, export, validation) needs the ``full`` extra; the robot
side, :mod:`edgeq.deploy`, needs only numpy and one inference backend.
"""

from __future__ import annotations

from typing import Any

from edgeq._version import __version__

__all__ = ["__version__", "load_policy", "quantize"]


def __getattr__(name: str) -> Any:
    # Lazy so that ``import edgeq.deploy`` on a robot never pulls torch or gymnasium.
    if name == "quantize":
        from edgeq.pipeline import quantize

        return quantize
    if name == "load_policy":
        from edgeq.ingest import load_policy

        return load_policy
    raise AttributeError(f"module 'edgeq' has no attribute {name!r}")
