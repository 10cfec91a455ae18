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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.hashing import sha256_of
from edgeq.ingest.limits import (
    MAX_DATA_ENTRY_BYTES,
    MAX_WEIGHTS_ENTRY_BYTES,
    check_dim,
    check_elements,
    check_file_size,
)
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
        check_elements(shape, f"{self.path}: data field {name}")
        check_dim(int(np.prod(shape)) if shape else 1, f"{self.path}: {name} size")
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
    check_file_size(p, "policy archive")
    try:
        with zipfile.ZipFile(p) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            names = set(infos)
            for needed in ("data", "policy.pth"):
                if needed not in names:
                    raise PolicyFormatError(f"{p}: archive has no {needed!r} entry (found {sorted(names)[:10]}); "
                                            "expected a Stable-Baselines3 model archive")
            for name, cap in (("data", MAX_DATA_ENTRY_BYTES), ("policy.pth", MAX_WEIGHTS_ENTRY_BYTES),
                              ("_stable_baselines3_version", 1 << 10)):
                if name in infos and infos[name].file_size > cap:
                    raise PolicyFormatError(f"{p}: entry {name!r} declares {infos[name].file_size} bytes "
                                            f"uncompressed, above edgeq's limit of {cap} (a corrupt or hostile "
                                            "archive; a real one is far smaller)")
            data = json.loads(zf.read("data").decode("utf-8"))
            raw_policy = zf.read("policy.pth")
            version = zf.read("_stable_baselines3_version").decode().strip() \
                if "_stable_baselines3_version" in names else None
    except PolicyFormatError:
        raise
    except RecursionError:
        raise PolicyFormatError(f"{p}: entry 'data' is JSON nested too deeply to read; the archive is corrupt "
                                "(save the model again with model.save)") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError,
            NotImplementedError, EOFError, ValueError, RuntimeError, zlib.error) as exc:
        raise PolicyFormatError(f"{p}: corrupt archive: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise PolicyFormatError(f"{p}: entry 'data' holds a JSON {type(data).__name__}, expected an object of "
                                "model fields (is this a Stable-Baselines3 archive?)")
    try:
        state = torch.load(io.BytesIO(raw_policy), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise PolicyFormatError(f"{p}: policy.pth cannot be read as a weights-only torch state dict: "
                                f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(state, dict):
        raise PolicyFormatError(f"{p}: policy.pth holds {type(state).__name__}, expected a state dict")
    arrays: dict[str, np.ndarray] = {}
    for k, v in state.items():
        if not hasattr(v, "detach"):
            continue
        if not isinstance(k, str):
            raise PolicyFormatError(f"{p}: policy.pth has a key of type {type(k).__name__}, expected strings")
        check_elements(tuple(int(d) for d in v.shape), f"{p}: policy.pth tensor {k!r}")
        if not (v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.bool)):
            raise PolicyFormatError(f"{p}: policy.pth tensor {k!r} has dtype {v.dtype}; expected float weights")
        arrays[k] = v.detach().cpu().contiguous().numpy()
    return SB3Archive(p, sha256_of(p), data, arrays, version)
