"""Read a Stable-Baselines3 ``.zip`` without unpickling it.

An SB3 archive holds ``data`` (JSON; objects that are not JSON-serializable appear as
``{":type:", ":serialized:" (cloudpickle, base64), plus readable attributes}``), ``policy.pth``
(a torch state dict) and optimizer files. edgeq reads only the JSON fields, decodes the few
cloudpickled ones it needs with :func:`edgeq.ingest.safe_pickle.inert_loads` (which runs no code),
and loads ``policy.pth`` with ``torch.load(weights_only=True)``. This also opens archives whose
spaces were pickled with the long-gone ``gym`` package and archives written by SB3 1.x.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.hashing import sha256_of
from edgeq.ingest.safe_pickle import GlobalRef, global_name, inert_loads
from edgeq.spaces import BoxSpec, parse_numpy_repr, parse_shape


@dataclass
class SB3Archive:
    path: Path
    sha256: str
    data: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    sb3_version: str | None

    def field(self, name: str, default: Any = None) -> Any:
        """A top-level ``data`` field as plain data (decoding a cloudpickled value inertly)."""
        value = self.data.get(name, default)
        if isinstance(value, dict) and ":serialized:" in value:
            try:
                return inert_loads(base64.b64decode(value[":serialized:"]))
            except Exception as exc:  # noqa: BLE001 - any decoding problem is a format error
                raise PolicyFormatError(f"{self.path}: cannot decode field {name!r}: {exc}") from None
        return value

    def space(self, name: str) -> BoxSpec:
        """Rebuild ``observation_space`` / ``action_space`` from its readable JSON fields."""
        raw = self.data.get(name)
        if not isinstance(raw, dict):
            raise PolicyFormatError(f"{self.path}: data field {name!r} is missing")
        type_str = str(raw.get(":type:", ""))
        kind = type_str.rsplit(".", 1)[-1].strip("'>")
        if kind != "Box":
            raise PolicyFormatError(
                f"{self.path}: {name} is a {kind or type_str} space; edgeq supports continuous Box spaces "
                "(expected gymnasium.spaces.Box)")
        shape = parse_shape(raw.get("_shape", raw.get("shape")), f"{self.path}: {name}.shape")
        low = parse_numpy_repr(str(raw.get("low")), shape, f"{self.path}: {name}.low")
        high = parse_numpy_repr(str(raw.get("high")), shape, f"{self.path}: {name}.high")
        return BoxSpec(shape, low, high, str(raw.get("dtype", "float32")))

    def policy_kwargs(self) -> dict[str, Any]:
        kw = self.field("policy_kwargs", {}) or {}
        if isinstance(kw, GlobalRef):  # an OrderedDict or similar pickled mapping
            kw = dict(kw.__dict__.get("items") or {})
        if not isinstance(kw, dict):
            raise PolicyFormatError(f"{self.path}: policy_kwargs is {type(kw).__name__}, expected a mapping")
        return kw

    def policy_class(self) -> str:
        """``'module.ClassName'`` of the saved policy class, read from the readable fields."""
        raw = self.data.get("policy_class")
        if isinstance(raw, dict):
            module = str(raw.get("__module__", ""))
            try:
                obj = inert_loads(base64.b64decode(raw[":serialized:"]))
                name = global_name(obj)
                if name:
                    return name
            except Exception:  # noqa: BLE001 - fall back to the readable fields
                pass
            for value in raw.values():
                text = str(value)
                if text.startswith("<function ") and "." in text:
                    return f"{module}.{text.split()[1].split('.')[0]}"
            return module
        return str(raw or "")


def read_archive(path: str | Path) -> SB3Archive:
    """Open an SB3 archive; raise :class:`PolicyFormatError` naming the file and what is wrong."""
    import torch  # the workstation side only

    p = Path(path)
    if not p.exists():
        raise PolicyFormatError(f"{p}: no such file (expected a Stable-Baselines3 .zip archive)")
    if not zipfile.is_zipfile(p):
        raise PolicyFormatError(f"{p}: not a zip archive (expected a Stable-Baselines3 .zip with 'data' and "
                                "'policy.pth')")
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            for needed in ("data", "policy.pth"):
                if needed not in names:
                    raise PolicyFormatError(f"{p}: archive has no {needed!r} entry (found {sorted(names)}); "
                                            "expected a Stable-Baselines3 model archive")
            data = json.loads(zf.read("data").decode("utf-8"))
            raw_policy = zf.read("policy.pth")
            version = zf.read("_stable_baselines3_version").decode().strip() \
                if "_stable_baselines3_version" in names else None
    except PolicyFormatError:
        raise
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise PolicyFormatError(f"{p}: corrupt archive: {exc}") from None
    try:
        state = torch.load(io.BytesIO(raw_policy), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise PolicyFormatError(f"{p}: policy.pth cannot be read as a weights-only torch state dict: "
                                f"{str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise PolicyFormatError(f"{p}: policy.pth holds {type(state).__name__}, expected a state dict")
    arrays = {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
    return SB3Archive(p, sha256_of(p), data, arrays, version)
