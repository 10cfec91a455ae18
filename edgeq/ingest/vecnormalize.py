"""Read an SB3 ``vecnormalize.pkl`` with a restricted unpickler (numpy arrays and plain fields only).

The file is a pickle of a whole ``VecNormalize`` object. edgeq decodes it with
:func:`edgeq.ingest.safe_pickle.inert_loads`: numpy arrays are rebuilt, every other class it names
(VecNormalize, RunningMeanStd, gym spaces, random generators) becomes an inert placeholder, and only
the running-mean-std fields are read from it. No code from the file runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.ingest.safe_pickle import GlobalRef, inert_loads


@dataclass(frozen=True)
class ObsNormalization:
    """``clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`` as SB3 computes it."""

    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    clip_obs: float
    source: str

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var.astype(np.float64) + self.epsilon)

    def apply(self, obs: np.ndarray) -> np.ndarray:
        return np.clip((obs - self.mean) / self.std, -self.clip_obs, self.clip_obs)


def default_vecnormalize_path(archive: Path) -> Path:
    """Where the RL Zoo puts it: ``NAME.zip`` beside ``NAME/vecnormalize.pkl``."""
    return archive.with_suffix("") / "vecnormalize.pkl"


def read_vecnormalize(path: str | Path) -> ObsNormalization | None:
    """Return the observation normalization in ``path``, or None if it does not normalize obs."""
    p = Path(path)
    if not p.exists():
        raise PolicyFormatError(f"{p}: no such file (expected an SB3 vecnormalize.pkl)")
    try:
        obj = inert_loads(p.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a format problem
        raise PolicyFormatError(f"{p}: not a readable VecNormalize pickle: {exc}") from None
    if not isinstance(obj, GlobalRef) or not isinstance(obj.field("obs_rms"), (GlobalRef, dict)):
        raise PolicyFormatError(f"{p}: expected a pickled VecNormalize with an 'obs_rms' field")
    if not obj.field("norm_obs", True):
        return None
    rms = obj.field("obs_rms")
    if isinstance(rms, dict):
        raise PolicyFormatError(f"{p}: obs_rms is a dict (Dict observation spaces are not supported; "
                                "expected one RunningMeanStd)")
    mean, var = rms.field("mean"), rms.field("var")
    if not isinstance(mean, np.ndarray) or not isinstance(var, np.ndarray):
        raise PolicyFormatError(f"{p}: obs_rms.mean / obs_rms.var are not numpy arrays")
    return ObsNormalization(mean=mean.astype(np.float64), var=var.astype(np.float64),
                            epsilon=float(obj.field("epsilon", 1e-8)),
                            clip_obs=float(obj.field("clip_obs", 10.0)), source=str(p))
