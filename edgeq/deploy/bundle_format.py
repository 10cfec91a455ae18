"""The bundle format: file names, the manifest and its integrity check (stdlib only).

A bundle is a directory::

    manifest.json       format_version, edgeq version, source, env, spaces, io names, state,
                        quantization settings, optional TensorRT engine records, and the
                        SHA-256 of every other file
    policy.fp32.onnx    the float policy (self-contained, no external data)
    policy.int8.onnx    the INT8 QDQ policy (int8 weight initializers): TensorRT, CUDA, any runtime
    policy.int8.cpu.onnx  specialized for ONNX Runtime's CPU provider (integer kernels; layers narrower
                          than the profile's ``cpu_float_below`` run in float on their int8 weights,
                          listed in the manifest's ``cpu_float_layers``)
    policy.int8.cuda.onnx the same arithmetic specialized for ONNX Runtime's CUDA provider
    validation.json     paired float/int8 rollouts (written by the validator)
    (manifest "decision")  format 2: the verdict (PASS / FAIL / INCONCLUSIVE), the procedure that
                        reached it and its parameters, episodes used, failure counts per target
    plan.json           the quantization plan (choices and int8 weights, scales, biases, input
                        scalings; no metrics): ``edgeq.quantizers.plan.QuantPlan.from_bundle``
    *.engine            optional TensorRT engines, each described in ``manifest["engines"]``

Readers must accept any ``format_version`` up to :data:`FORMAT_VERSION` (bundles made by an older
edgeq keep loading) and refuse newer ones with a clear message. ``docs/bundle-format.md`` is the
full specification; :func:`check_manifest` enforces the part a reader relies on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeq.errors import BundleError
from edgeq.hashing import sha256_of

#: 2: the manifest records the validation ``decision`` (three-way verdict, procedure, episodes,
#: failure counts); 1: no decision (bundles made before edgeq's equivalence verdict; still load).
FORMAT_VERSION = 2
#: the verdict states a ``decision`` may hold
DECISION_STATUSES = ("PASS", "FAIL", "INCONCLUSIVE")
MANIFEST = "manifest.json"
FLOAT_MODEL = "policy.fp32.onnx"
INT8_MODEL = "policy.int8.onnx"
INT8_CPU_MODEL = "policy.int8.cpu.onnx"
INT8_CUDA_MODEL = "policy.int8.cuda.onnx"
VALIDATION = "validation.json"
#: Timings and latency of the run that made the bundle (differ from run to run), and the report that shows
#: them: not hashed, not signed, never read by a robot. Everything else is byte-identical for the same
#: inputs and seeds.
MEASUREMENTS = "measurements.json"
MEASURED_FILES = (MEASUREMENTS, "report.html", "report.md")
MEASURED_DIRS = ("report/",)
PLAN = "plan.json"
#: Precisions a bundle may hold an ONNX model for (``manifest["models"]`` keys).
PRECISIONS = ("int8", "fp32")


def is_measured(name: str) -> bool:
    """Whether the bundle file ``name`` (a relative POSIX path) holds measurements (unhashed, see above)."""
    return name in MEASURED_FILES or name.startswith(MEASURED_DIRS)


def read_manifest(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load ``manifest.json``, check its version and fields; with ``verify`` check every file's SHA-256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (expected an edgeq bundle directory with {MANIFEST})")
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (expected an edgeq bundle directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version is {version!r}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version} is newer than this edgeq reads "
                          f"({FORMAT_VERSION}); upgrade edgeq on this machine to load it")
    check_manifest(manifest, path)
    if verify:
        verify_files(root, manifest)
    return manifest


def _field(manifest: dict[str, Any], dotted: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BundleError(f"{path}: missing field {dotted!r}")
        value = value[part]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{path}: field {dotted!r} is {type(value).__name__}, expected {names}")
    return value


def _check_name(name: Any, where: str, path: Path) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise BundleError(f"{path}: {where} is {name!r}, expected a plain file name inside the bundle")


def _check_relpath(name: Any, where: str, path: Path) -> None:
    """A file inside the bundle: a relative POSIX path (``report/plot.png``) that cannot leave it."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{path}: {where} is {name!r}, expected a relative path inside the bundle")


def check_manifest(manifest: dict[str, Any], path: Path = Path(MANIFEST)) -> None:
    """Raise :class:`BundleError` naming the first field a reader needs that is missing or malformed."""
    files = _field(manifest, "files", dict, path)
    for name, digest in files.items():
        _check_relpath(name, f"files key {name!r}", path)
        if not isinstance(digest, str) or len(digest) != 64:
            raise BundleError(f"{path}: files[{name!r}] is {digest!r}, expected a 64-digit SHA-256 hex string")
    for space in ("observation_space", "action_space"):
        shape = _field(manifest, f"{space}.shape", list, path)
        if not all(isinstance(s, int) and s > 0 for s in shape):
            raise BundleError(f"{path}: {space}.shape is {shape!r}, expected a list of positive integers")
    _field(manifest, "io.input", str, path)
    _field(manifest, "io.output", str, path)
    state = manifest["io"].get("state", [])
    if not isinstance(state, list) or not all(
            isinstance(s, dict) and isinstance(s.get("input"), str) and isinstance(s.get("output"), str)
            and isinstance(s.get("shape"), list) for s in state):
        raise BundleError(f"{path}: io.state is {state!r}, expected a list of {{input, output, shape}} objects")
    models = _field(manifest, "models", dict, path)
    if not models:
        raise BundleError(f"{path}: models is empty, expected at least one of {PRECISIONS}")
    for precision, name in models.items():
        _check_name(name, f"models.{precision}", path)
    decision = manifest.get("decision")
    if decision is not None and (not isinstance(decision, dict) or decision.get("status") not in DECISION_STATUSES):
        got = decision.get("status") if isinstance(decision, dict) else decision
        raise BundleError(f"{path}: decision.status is {got!r}, expected one of {', '.join(DECISION_STATUSES)}")
    engines = manifest.get("engines", [])
    if not isinstance(engines, list):
        raise BundleError(f"{path}: engines is {type(engines).__name__}, expected a list of engine records")
    for i, rec in enumerate(engines):
        if not isinstance(rec, dict):
            raise BundleError(f"{path}: engines[{i}] is {type(rec).__name__}, expected an object")
        _check_name(rec.get("file"), f"engines[{i}].file", path)
        for key in ("precision", "tensorrt_version", "compute_capability"):
            if not rec.get(key):
                raise BundleError(f"{path}: engines[{i}] has no {key!r} (every engine record names the "
                                  "precision, TensorRT version and compute capability it was built for)")


def verify_files(root: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Raise :class:`BundleError` if a listed file is missing or its SHA-256 differs from the manifest."""
    files: dict[str, str] = manifest.get("files", {})
    for name in names or sorted(files):
        if name not in files:
            raise BundleError(f"{root}: {name} is not listed in {MANIFEST}, so it cannot be verified")
        p = root / name
        if not p.is_file():
            raise BundleError(f"{root}: {name} is listed in {MANIFEST} but missing")
        digest = sha256_of(p)
        if digest != files[name]:
            raise BundleError(f"{p}: SHA-256 {digest[:12]}… does not match the manifest ({files[name][:12]}…); "
                              "the file was modified after export")


def model_for(manifest: dict[str, Any], precision: str, backend: str) -> str:
    """The bundle file that runs ``precision`` on ``backend`` (a backend-specialized copy if any)."""
    models: dict[str, str] = manifest.get("models", {"fp32": FLOAT_MODEL, "int8": INT8_MODEL})
    if precision not in models:
        raise BundleError(f"no {precision!r} model in this bundle (has {sorted(models)})")
    return models.get(f"{precision}-{backend}", models[precision])
