"""Validation without an environment: float vs INT8 action error on held-out logged observations.

This is open-loop: both policies see the same logged states, so the error does not compound
along a trajectory the way it does when the INT8 policy drives the robot. It bounds how differently
the two policies act; it does not measure the return.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.runtime import OrtPolicy, provider_names
from edgeq.validate.stats import ActionErrorAccumulator
from edgeq.validate.targets import target_providers

OPEN_LOOP_REASON = ("no environment: calibrated from logged observations, so returns cannot be measured; "
                    "the action error is open-loop, on held-out logged observations")


def validate_offline(target: str, float_model: Path, int8_model: Path, io: dict[str, Any], observations: np.ndarray,
                     *, act_dim: int, batch_size: int = 1024,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Action error of the INT8 model against the float model on ``observations`` (stateless policies)."""
    providers = target_providers(target)

    def runtime(path: Path) -> OrtPolicy:
        return OrtPolicy(path, input_name=io.get("input", "obs"), output_name=io.get("output", "actions"),
                         providers=providers)

    ref, cand = runtime(float_model), runtime(int8_model)
    errors = ActionErrorAccumulator(act_dim)
    obs = np.ascontiguousarray(observations, dtype=np.float32)
    for i in range(0, len(obs), batch_size):
        chunk = obs[i:i + batch_size]
        errors.add(ref.act(chunk), cand.act(chunk))
        if progress is not None:
            progress(len(chunk))
    return {"providers": provider_names(providers), "closed_loop": False,
            "action_error": {"on_held_out_observations": errors.summary()}}
