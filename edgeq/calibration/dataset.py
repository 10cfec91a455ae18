"""Logged observations for offline calibration, when the robot's environment cannot be run.

Two sources:

* a NumPy ``.npz`` with an array under ``obs`` or ``observations`` (shape [N, obs_dim], or
  [N, *obs_shape], flattened per row); read with ``allow_pickle=False``, never unpickled;
* a Minari dataset, when the optional ``minari`` package is installed: ``minari:DATASET_ID`` for
  a dataset in the local Minari store (never downloaded here), or the path of a dataset's
  directory. The observations of every episode are used, without each episode's final one (the
  policy never acts on it).

The observations are split into a calibration part and a held-out part (the last
``holdout_fraction`` of the rows, in file order: for logs kept in time order this holds out whole
later episodes rather than neighbours of calibration states). Without an environment edgeq can only
report the action error of the INT8 policy on the held-out part, not its return.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError

OBS_KEYS = ("obs", "observations")
MINARI_PREFIX = "minari:"


class CalibrationDataError(EdgeqError):
    """Logged calibration data is missing, malformed or does not fit the policy."""


@dataclass(frozen=True)
class ObservationLog:
    """Logged observations [N, obs_dim] (float32) and where they came from."""

    observations: np.ndarray
    source: str
    kind: str  # "npz" | "minari"
    key: str | None = None
    sha256: str | None = None
    episodes: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "key": self.key, "sha256": self.sha256,
                "samples": int(len(self.observations)), "episodes": self.episodes}


def _as_rows(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise CalibrationDataError(f"{where} has dtype {array.dtype}; expected numeric observations")
    if array.ndim < 1 or array.shape[0] == 0:
        raise CalibrationDataError(f"{where} has shape {array.shape}; expected [N, obs_dim] with N > 0")
    rows = np.ascontiguousarray(array.reshape(array.shape[0], -1), dtype=np.float32)
    bad = ~np.isfinite(rows)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise CalibrationDataError(f"{where} has {int(bad.sum())} non-finite values (first at row {r}, column {c}); "
                                   "expected finite observations")
    return rows


def load_npz(path: str | Path, key: str | None = None) -> ObservationLog:
    """Observations from a ``.npz`` (key ``key``, else ``obs`` or ``observations``)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"{p}: no such file (expected a .npz of observations)")
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = list(npz.files)
            wanted = (key,) if key else OBS_KEYS
            found = next((k for k in wanted if k in keys), None)
            if found is None:
                raise CalibrationDataError(f"{p}: no array named {' or '.join(repr(k) for k in wanted)} (found keys "
                                           f"{keys}); store the observations as [N, obs_dim] under 'obs'")
            array = npz[found]
    except CalibrationDataError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise CalibrationDataError(f"{p}: cannot read without unpickling ({exc}); save plain numeric arrays") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{p}: not a readable .npz file ({exc})") from None
    rows = _as_rows(array, f"{p}[{found!r}]")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return ObservationLog(rows, str(p), "npz", found, digest)


def load_minari(spec: str) -> ObservationLog:
    """Observations of a Minari dataset (``minari:ID`` from the local store, or a dataset directory)."""
    try:
        import minari
    except ImportError:
        raise CalibrationDataError(f"{spec}: reading Minari datasets needs the optional 'minari' package "
                                   "(pip install minari)") from None
    try:
        if spec.startswith(MINARI_PREFIX):
            dataset = minari.load_dataset(spec[len(MINARI_PREFIX):], download=False)
        else:
            root = Path(spec)
            dataset = minari.MinariDataset(root / "data" if (root / "data").is_dir() else root)
    except FileNotFoundError as exc:
        raise CalibrationDataError(f"{spec}: Minari dataset not found locally ({exc}); edgeq does not download "
                                   "datasets: run 'minari download ID' first") from None
    except Exception as exc:  # noqa: BLE001 - minari raises ValueError/KeyError/OSError for bad directories
        raise CalibrationDataError(f"{spec}: cannot open as a Minari dataset: {type(exc).__name__}: {exc}") from None
    parts: list[np.ndarray] = []
    episodes = 0
    for episode in dataset.iterate_episodes():
        obs = episode.observations
        if isinstance(obs, dict):
            raise CalibrationDataError(f"{spec}: episodes have dict observations {sorted(obs)}; expected a Box")
        obs = np.asarray(obs)
        parts.append(obs[:-1] if len(obs) > 1 else obs)
        episodes += 1
    if not parts:
        raise CalibrationDataError(f"{spec}: the Minari dataset has no episodes")
    rows = _as_rows(np.concatenate(parts), f"{spec} observations")
    return ObservationLog(rows, spec, "minari", None, None, episodes)


def load_observations(spec: str | Path, key: str | None = None) -> ObservationLog:
    """Logged observations from ``spec``: a ``.npz`` path, ``minari:ID`` or a Minari dataset directory."""
    text = str(spec)
    if text.startswith(MINARI_PREFIX):
        return load_minari(text)
    p = Path(text)
    if p.is_dir():
        return load_minari(text)
    if p.suffix.lower() == ".npz":
        return load_npz(p, key)
    raise CalibrationDataError(f"{p}: unsupported calibration data; expected a .npz of observations, "
                               "minari:DATASET_ID or a Minari dataset directory")


def split_holdout(observations: np.ndarray, holdout_fraction: float,
                  min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out): the held-out part is the last ``holdout_fraction`` of the rows."""
    if not 0.0 < holdout_fraction < 1.0:
        raise CalibrationDataError(f"holdout fraction {holdout_fraction}; expected a value in (0, 1)")
    n = len(observations)
    n_hold = int(round(n * holdout_fraction))
    if n_hold < min_rows or n - n_hold < min_rows:
        raise CalibrationDataError(f"{n} logged observations are too few to hold out {holdout_fraction:.0%} "
                                   f"(need at least {min_rows} rows on each side)")
    return observations[: n - n_hold], observations[n - n_hold:]
