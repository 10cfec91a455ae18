"""The TensorRT backend: pick the bundle's engine that fits this machine, and run it.

A serialized TensorRT engine runs only in the TensorRT version that built it, on GPUs of the compute
capability it was built for. A bundle may carry several engines (say one for a Jetson Orin and one
for a workstation GPU), each described by a record in ``manifest["engines"]`` (see
``docs/bundle-format.md``). :func:`select_engine` is pure: given those records and this machine's
facts it returns the engine to run or raises one :class:`BundleError` that names every engine and
why it does not fit. The engine runner and the machine facts come from
:mod:`edgeq.deploy.tensorrt_runner`, imported only when the ``trt`` backend is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.runtime import PolicyRuntime
from edgeq.errors import BundleError

#: ``check(expected_record, actual_platform)`` raises BundleError on a mismatch.
CompatCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], None]


def tensorrt_available() -> bool:
    """True if TensorRT's runtime imports here (type stubs alone do not count)."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt, "Runtime")


def _default_check() -> CompatCheck:
    from edgeq.deploy.tensorrt_runner import check_engine_compat

    return check_engine_compat


def engines_for(manifest: Mapping[str, Any], precision: str) -> list[dict[str, Any]]:
    """The manifest's engine records of ``precision``."""
    return [dict(r) for r in manifest.get("engines", []) if r.get("precision") == precision]


def select_engine(records: Sequence[Mapping[str, Any]], platform: Mapping[str, Any], *, precision: str,
                  check: CompatCheck | None = None) -> dict[str, Any]:
    """The first record of ``precision`` whose engine fits ``platform``; else a BundleError naming all.

    ``platform`` holds this machine's ``tensorrt_version``, ``gpu_name`` and ``compute_capability``
    (:func:`edgeq.deploy.tensorrt_runner.current_platform`). ``check`` defaults to
    :func:`edgeq.deploy.tensorrt_runner.check_engine_compat`.
    """
    check = check or _default_check()
    candidates = [r for r in records if r.get("precision") == precision]
    if not candidates:
        have = sorted({str(r.get("precision")) for r in records})
        raise BundleError(f"the bundle has no TensorRT engine of precision {precision!r} "
                          f"(engines: {', '.join(have) or 'none'}); build one on the target GPU or use "
                          "backend 'cuda' or 'cpu' to run the ONNX model")
    problems = []
    for rec in candidates:
        try:
            check(rec, platform)
        except BundleError as exc:
            problems.append(f"{rec.get('file')}: {exc}")
            continue
        return dict(rec)
    here = (f"TensorRT {platform.get('tensorrt_version')}, {platform.get('gpu_name') or 'unknown GPU'} "
            f"(compute capability {platform.get('compute_capability')})")
    raise BundleError(f"no engine in the bundle fits this machine ({here}): " + " | ".join(problems))


class TrtRuntime(PolicyRuntime):
    """A bundle's TensorRT engine behind the :class:`PolicyRuntime` interface.

    Runs through :class:`edgeq.deploy.tensorrt_runner.TrtPolicyRunner`, which checks the engine
    against this machine again (hash, TensorRT version, compute capability) before deserializing it.
    """

    def __init__(self, engine: Path, record: Mapping[str, Any], *, input_name: str, output_name: str,
                 state: Sequence[dict[str, Any]] = ()) -> None:
        from edgeq.deploy.tensorrt_runner import TrtPolicyRunner

        super().__init__(input_name=input_name, output_name=output_name, state=state)
        self.record = dict(record)
        self.runner = TrtPolicyRunner(engine, expected=self.record, input_name=input_name)

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {self.record.get('tensorrt_version')}"]

    def _infer(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        extra = {k: v for k, v in feeds.items() if k != self.input_name}
        result = self.runner.run(feeds[self.input_name], **extra)
        if isinstance(result, dict):
            missing = [n for n in outputs if n not in result]
            if missing:
                raise BundleError(f"engine {self.record.get('file')} has no output {missing[0]!r} "
                                  f"(outputs: {sorted(result)})")
            return [result[n] for n in outputs]
        if len(outputs) != 1:
            raise BundleError(f"engine {self.record.get('file')} has one output but {outputs} were asked for")
        return [result]


def load_trt_runtime(root: Path, manifest: Mapping[str, Any], precision: str) -> TrtRuntime:
    """Choose the engine for this machine (refusing engines built for another GPU/TensorRT) and load it."""
    from edgeq.deploy.tensorrt_runner import check_engine_compat, current_platform

    record = select_engine(manifest.get("engines", []), current_platform(), precision=precision,
                           check=check_engine_compat)
    io = manifest["io"]
    return TrtRuntime(root / record["file"], record, input_name=io["input"], output_name=io["output"],
                      state=io.get("state", []))
