"""Policy sources → :class:`~edgeq.policy.FloatPolicy`. No later stage knows where a policy came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq.errors import PolicyFormatError
from edgeq.policy import FloatPolicy


def load_policy(path: str | Path, **options: Any) -> FloatPolicy:
    """Load a policy file by its kind: an SB3 ``.zip`` (more sources plug in here)."""
    p = Path(path)
    if not p.exists():
        raise PolicyFormatError(f"{p}: no such file (expected a Stable-Baselines3 .zip)")
    suffix = p.suffix.lower()
    if suffix == ".zip":
        from edgeq.ingest.sb3 import load_sb3

        return load_sb3(p, vecnormalize=options.get("vecnormalize"), algorithm=options.get("algorithm"))
    raise PolicyFormatError(f"{p}: unsupported policy file type {suffix or '(none)'}; expected a "
                            "Stable-Baselines3 .zip")
