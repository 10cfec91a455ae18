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
from edgeq.ingest.limits import MAX_WIDTH, check_file_size
from edgeq.ingest.safe_pickle import GlobalRef, inert_loads

#: Largest vecnormalize.pkl edgeq reads (a real one is a few KiB).
MAX_PICKLE_BYTES = 16 << 20


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
    if not p.is_file():
        raise PolicyFormatError(f"{p}: no such file (expected an SB3 vecnormalize.pkl)")
    check_file_size(p, "vecnormalize.pkl", MAX_PICKLE_BYTES)
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
    if not isinstance(rms, GlobalRef):
        raise PolicyFormatError(f"{p}: obs_rms is {type(rms).__name__}, expected a pickled RunningMeanStd")
    mean, var = rms.field("mean"), rms.field("var")
    arrays = {}
    for name, value in (("mean", mean), ("var", var)):
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
            raise PolicyFormatError(f"{p}: obs_rms.{name} is {kind}, expected a numpy array of floats")
        if value.ndim != 1 or value.size > MAX_WIDTH:
            raise PolicyFormatError(f"{p}: obs_rms.{name} has shape {value.shape}, expected a vector (one value per "
                                    "observation feature)")
        arrays[name] = value.astype(np.float64)
        if not np.all(np.isfinite(arrays[name])):
            raise PolicyFormatError(f"{p}: obs_rms.{name} holds NaN/inf values; the normalization is broken "
                                    "(use the vecnormalize.pkl saved with a healthy model)")
    if arrays["mean"].shape != arrays["var"].shape:
        raise PolicyFormatError(f"{p}: obs_rms.mean has shape {arrays['mean'].shape} but obs_rms.var "
                                f"{arrays['var'].shape}; expected the same")
    if np.any(arrays["var"] < 0):
        raise PolicyFormatError(f"{p}: obs_rms.var has negative values ({arrays['var'].min():.3g}); a variance is "
                                ">= 0: the file is corrupt")
    scalars = {}
    for name, default, low in (("epsilon", 1e-8, 0.0), ("clip_obs", 10.0, 0.0)):
        value = obj.field(name, default)
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise PolicyFormatError(f"{p}: {name} is {type(value).__name__}, expected a number")
        value = float(value)
        if not np.isfinite(value) or value <= low:
            raise PolicyFormatError(f"{p}: {name} is {value}, expected a finite number > {low}")
        scalars[name] = value
    if not np.all(arrays["var"] + scalars["epsilon"] > 0):
        raise PolicyFormatError(f"{p}: obs_rms.var + epsilon is 0 for some feature; expected positive")
    return ObsNormalization(mean=arrays["mean"], var=arrays["var"], epsilon=scalars["epsilon"],
                            clip_obs=scalars["clip_obs"], source=str(p))
