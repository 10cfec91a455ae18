"""``edgeq check``: each ONNX file against the rules of the runtime it is for.

* ``policy.int8.onnx`` (and any QDQ file for TensorRT): TensorRT's explicit-quantization rules
  (:mod:`edgeq.export.trt_rules`);
* ``policy.int8.cpu.onnx`` / ``policy.int8.cuda.onnx`` / ``policy.fp32.onnx``: what ONNX Runtime
  needs: a valid ONNX graph (``onnx.checker``), a session that builds on the execution provider, and
  one batch-1 call that returns finite actions of the right shape. edgeq's ORT files use ORT's integer
  kernels (``DynamicQuantizeLinear``, ``MatMulIntegerToFloat``) on purpose: TensorRT rules do not apply.

A bundle directory is checked file by file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.deploy.bundle_format import FLOAT_MODEL, INT8_CPU_MODEL, INT8_CUDA_MODEL, INT8_MODEL, MANIFEST
from edgeq.errors import EdgeqError
from edgeq.export import trt_rules
from edgeq.export.trt_rules import ERROR, Violation

#: Which runtime each bundle file is for (check order).
BUNDLE_RUNTIMES = {INT8_MODEL: "tensorrt", INT8_CPU_MODEL: "onnxruntime-cpu", INT8_CUDA_MODEL: "onnxruntime-cuda",
                   FLOAT_MODEL: "onnxruntime-cpu"}
RUNTIMES = ("tensorrt", "onnxruntime-cpu", "onnxruntime-cuda")


@dataclass
class FileCheck:
    """The findings for one file under one runtime's rules."""

    path: Path
    runtime: str
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(1 for v in self.violations if v.severity == ERROR)


def runtime_for(path: Path) -> str:
    """The runtime a file is for, from its bundle name (TensorRT for any other QDQ file)."""
    return BUNDLE_RUNTIMES.get(path.name, "tensorrt")


def check_ort_model(path: Path, runtime: str = "onnxruntime-cpu") -> FileCheck:
    """Check ``path`` loads and runs on ONNX Runtime (CPU provider; CUDA's where it is installed)."""
    import onnx
    import onnxruntime as ort

    result = FileCheck(path, runtime)

    def bad(rule: str, message: str, fix: str) -> FileCheck:
        result.violations.append(Violation(rule=rule, node=path.name, message=message, fix=fix, severity=ERROR))
        return result

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return bad("onnx-checker", f"not a valid ONNX model: {exc}".splitlines()[0],
                   "re-export the bundle with 'edgeq quantize' (the file is damaged or was edited)")
    providers = ["CPUExecutionProvider"]
    if runtime == "onnxruntime-cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            result.notes.append("CUDA execution provider not installed here: checked on ONNX Runtime's CPU "
                                "provider only (pip install 'edgeq[gpu]' on a GPU machine to check on CUDA)")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001
        return bad("ort-session", f"ONNX Runtime {ort.__version__} cannot build a session: "
                   + str(exc).splitlines()[0][:300],
                   f"upgrade onnxruntime (this one is {ort.__version__}) or re-export with this edgeq version")
    feeds: dict[str, Any] = {}
    for inp in sess.get_inputs():
        shape = [1 if not isinstance(d, int) or d <= 0 else d for d in inp.shape]
        feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    try:
        outputs = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return bad("ort-run", f"a batch-1 call fails on ONNX Runtime: {str(exc).splitlines()[0][:300]}",
                   "re-export the bundle with 'edgeq quantize'")
    if not all(np.all(np.isfinite(o)) for o in outputs if isinstance(o, np.ndarray)):
        return bad("ort-nonfinite", "a batch-1 call on zeros returns NaN or inf",
                   "re-export the bundle; if it persists, report it with the bundle's manifest.json")
    used = ", ".join(sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"}))
    ran_on = ", ".join(p.removesuffix("ExecutionProvider") for p in sess.get_providers())
    result.notes.append(f"ONNX Runtime {ort.__version__} ({ran_on}): "
                        "session builds, batch-1 call returns finite values"
                        + (f"; ORT contrib ops {used}" if used else ""))
    return result


def check_file(path: Path, runtime: str | None = None) -> FileCheck:
    """One file under ``runtime``'s rules (default: the runtime its bundle name says)."""
    runtime = runtime or runtime_for(path)
    if runtime not in RUNTIMES:
        raise EdgeqError(f"--runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise EdgeqError(f"{path}: no such file (expected an ONNX model or an edgeq bundle directory)")
    if runtime == "tensorrt":
        import dataclasses

        import onnx

        violations = trt_rules.check_qdq_model(path)
        model = onnx.load(str(path), load_external_data=False)
        if model.producer_name == "edgeq" and path.name in (INT8_CPU_MODEL, INT8_CUDA_MODEL):
            # edgeq's own ONNX Runtime file: the fix is the bundle's TensorRT file, never a re-quantization
            fix = (f"{path.name} is edgeq's ONNX Runtime file; for TensorRT use the same bundle's {INT8_MODEL} "
                   "(same arithmetic, QDQ form)")
            violations = [dataclasses.replace(v, fix=fix) for v in violations]
        return FileCheck(path, runtime, violations)
    return check_ort_model(path, runtime)


def check_bundle(bundle: Path) -> list[FileCheck]:
    """Every ONNX file of a bundle under the rules of the runtime it is for."""
    manifest = bundle / MANIFEST
    if not manifest.is_file():
        raise EdgeqError(f"{bundle}: a directory without {MANIFEST}; expected an edgeq bundle directory "
                         "or an ONNX file")
    try:
        listed = json.loads(manifest.read_text()).get("files", {})
    except (json.JSONDecodeError, AttributeError):
        listed = {}
    names = [n for n in BUNDLE_RUNTIMES if (bundle / n).is_file()]
    names += sorted(n for n in listed if n.endswith(".onnx") and n not in names and (bundle / n).is_file())
    if not names:
        raise EdgeqError(f"{bundle}: no ONNX file in this bundle")
    return [check_file(bundle / n) for n in names]
