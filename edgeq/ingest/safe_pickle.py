"""Read the data inside pickles without running any code they name.

SB3 archives cloudpickle some fields (``policy_kwargs`` with an ``activation_fn`` class, spaces,
schedules) and RL-Zoo ``vecnormalize.pkl`` files are pickles of a whole ``VecNormalize`` object.
Unpickling such a file can execute arbitrary code, so edgeq never does. Instead:

* every global a pickle refers to becomes an inert :class:`GlobalRef` placeholder (nothing is
  imported or called); calling or instantiating it only records the arguments and state;
* only a short allow-list of numpy reconstruction functions is real, so that arrays come back as
  arrays.

The result is a tree of dicts, lists, numbers, strings, numpy arrays and placeholders, from which the
caller reads the plain fields it needs.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

# numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; pickles name either.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # type: ignore[attr-defined]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _NUMPY_CORE.multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _NUMPY_CORE.multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _NUMPY_CORE.numeric._frombuffer


class GlobalRef:
    """Placeholder for a class or function named in a pickle; it never runs the real one."""

    module: str = ""
    qualname: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> GlobalRef:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses (OrderedDict) pickle items
        if not isinstance(self.__dict__.get("items"), dict):
            self.__dict__["items"] = {}
        self.__dict__["items"][key] = value

    @classmethod
    def full_name(cls) -> str:
        return f"{cls.module}.{cls.qualname}"

    def field(self, name: str, default: Any = None) -> Any:
        """A field of the pickled object's state (``__dict__`` or the state's dict part)."""
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            return state.get(name, default)
        return default

    def __repr__(self) -> str:
        return f"<GlobalRef {self.full_name()}>"


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return type(name, (GlobalRef,), {"module": module, "qualname": name})

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


def inert_loads(data: bytes) -> Any:
    """Decode a pickle into plain data plus :class:`GlobalRef` placeholders, running no code."""
    return _InertUnpickler(io.BytesIO(data)).load()


def global_name(obj: Any) -> str | None:
    """``'module.QualName'`` if ``obj`` is a placeholder class/instance for a global, else None."""
    if isinstance(obj, type) and issubclass(obj, GlobalRef):
        return obj.full_name()
    if isinstance(obj, GlobalRef):
        return type(obj).full_name()
    return None
