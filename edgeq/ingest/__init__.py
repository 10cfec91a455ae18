"""Policy sources → :class:`~edgeq.policy.FloatPolicy`. No later stage knows where a policy came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeq.errors import PolicyFormatError
from edgeq.policy import FloatPolicy

_EXPECTED = "a Stable-Baselines3 / sb3-contrib .zip or a TorchScript policy.pt"


def load_policy(path: str | Path, **options: Any) -> FloatPolicy:
    """Load a policy file by its kind.

    * ``.zip``: a Stable-Baselines3 / sb3-contrib archive (``RecurrentPPO`` archives go to
      :func:`edgeq.ingest.sb3_recurrent.load_sb3_recurrent`), never unpickled;
    * ``.pt`` / ``.jit`` / ``.pth`` / ``.ts``: a TorchScript module (:mod:`edgeq.ingest.torchscript`).
      TorchScript is code: pass only files you trust.
    """
    p = Path(path)
    if not p.exists():
        raise PolicyFormatError(f"{p}: no such file (expected {_EXPECTED})")
    suffix = p.suffix.lower()
    if suffix == ".zip":
        from edgeq.ingest.sb3_recurrent import is_recurrent_archive

        if is_recurrent_archive(p):
            from edgeq.ingest.sb3_recurrent import load_sb3_recurrent

            return load_sb3_recurrent(p, vecnormalize=options.get("vecnormalize"))
        from edgeq.ingest.sb3 import load_sb3

        return load_sb3(p, vecnormalize=options.get("vecnormalize"), algorithm=options.get("algorithm"))
    from edgeq.ingest.torchscript import TORCHSCRIPT_SUFFIXES, load_torchscript

    if suffix in TORCHSCRIPT_SUFFIXES:
        return load_torchscript(p)
    raise PolicyFormatError(f"{p}: unsupported policy file type {suffix or '(none)'}; expected {_EXPECTED}")
