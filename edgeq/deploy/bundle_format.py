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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from edgeq.deploy.contracts import Manifest
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
#: with pruning (manifest ``pruning``): the pruned float policy the INT8 files quantize (not run by robots)
PRUNED_FLOAT_MODEL = "policy.pruned.fp32.onnx"
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
#: ``manifest["models"]`` keys: a precision, or a precision's backend-specialized copy.
MODEL_KEYS = ("int8", "fp32", "int8-cpu", "int8-cuda", "fp32-cpu", "fp32-cuda")
#: Largest dimension (and element count) of a space or state tensor a reader accepts.
MAX_DIM = 1 << 16
#: Largest batch a profile may declare.
MAX_BATCH = 1 << 20


def is_measured(name: str) -> bool:
    """Whether the bundle file ``name`` (a relative POSIX path) holds measurements (unhashed, see above)."""
    return name in MEASURED_FILES or name.startswith(MEASURED_DIRS)


#: Largest manifest.json a reader accepts (a real one is tens of KiB).
MAX_MANIFEST_BYTES = 16 << 20


def read_manifest(bundle: str | Path, *, verify: bool = True, trusted_keys: Any = None,
                  allow_unsigned: bool | None = None) -> Manifest:
    """Load ``manifest.json``, check its signature, version and fields; with ``verify`` check every file's
    SHA-256.

    Signature policy (``manifest.sig``, see :mod:`edgeq.deploy.signing`): with ``trusted_keys`` (public
    keys: paths, PEM bytes or key objects) the signature must verify with one of them. Without, the
    bundle is accepted only if ``allow_unsigned`` is true (with a ``UserWarning``: nothing proves who
    made it); ``allow_unsigned=None`` (the workstation's tools: ``edgeq info``, ``validate``) neither
    checks nor warns. The manifest is read once: the bytes checked are the bytes parsed.
    """
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (expected an edgeq bundle directory with {MANIFEST})")
    if path.is_symlink():
        raise BundleError(f"{path}: a symbolic link; a bundle's files must be regular files inside it")
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (expected an edgeq bundle directory)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, above the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    _check_signature(root, data, trusted_keys, allow_unsigned)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not valid JSON: {str(exc)[:200]}") from None
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
    return cast(Manifest, manifest)  # checked above: the fields a reader relies on


def _check_signature(root: Path, data: bytes, trusted_keys: Any, allow_unsigned: bool | None) -> None:
    import warnings

    if trusted_keys is not None:
        from edgeq.deploy.signing import load_public_keys, verify_manifest_signature

        keys = load_public_keys(trusted_keys)
        if keys:
            verify_manifest_signature(root, data, keys)
            return
    if allow_unsigned is None:
        return
    from edgeq.deploy.signing import read_signature

    signed = read_signature(root) is not None
    if not allow_unsigned:
        raise BundleError(f"{root}: " + ("signed, but no trusted keys were given to check it" if signed else
                                         "unsigned bundle (no manifest.sig)")
                          + "; pass trusted_keys=[public key] (edgeq-deploy --trusted-key KEY.pub), or accept it "
                            "unchecked with allow_unsigned=True (edgeq-deploy --allow-unsigned)")
    warnings.warn(f"edgeq.deploy: {root}: " + ("signature not checked (no trusted keys)" if signed else
                                               "unsigned bundle") + "; loaded because allow_unsigned=True: "
                  "nothing proves who made these files", UserWarning, stacklevel=3)


def _field(manifest: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...], path: Path) -> Any:
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


def check_manifest(manifest: Mapping[str, Any], path: Path = Path(MANIFEST)) -> None:
    """Raise :class:`BundleError` naming the first field a reader needs that is missing or malformed."""
    files = _field(manifest, "files", dict, path)
    for name, digest in files.items():
        _check_relpath(name, f"files key {name!r}", path)
        if not isinstance(digest, str) or len(digest) != 64:
            raise BundleError(f"{path}: files[{name!r}] is {digest!r}, expected a 64-digit SHA-256 hex string")
    for space in ("observation_space", "action_space"):
        shape = _field(manifest, f"{space}.shape", list, path)
        if not shape or len(shape) > 4 or not all(_is_int(s) and 0 < s <= MAX_DIM for s in shape):
            raise BundleError(f"{path}: {space}.shape is {shape!r}, expected a list of 1 to 4 positive integers "
                              f"(each at most {MAX_DIM})")
        size = 1
        for s_ in shape:
            size *= s_
        if size > MAX_DIM:
            raise BundleError(f"{path}: {space}.shape {shape} has {size} elements, above {MAX_DIM}")
        for bound in ("low", "high"):
            values = manifest[space].get(bound)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != size or not all(
                    (isinstance(v, (int, float)) and not isinstance(v, bool)) or v in ("inf", "-inf")
                    for v in values):
                raise BundleError(f"{path}: {space}.{bound} is not a list of {size} numbers (or \"inf\"/\"-inf\") "
                                  f"matching {space}.shape {shape}")
    _field(manifest, "io.input", str, path)
    _field(manifest, "io.output", str, path)
    state = manifest["io"].get("state", [])
    if not isinstance(state, list) or len(state) > 16 or not all(
            isinstance(s, dict) and isinstance(s.get("input"), str) and isinstance(s.get("output"), str)
            and isinstance(s.get("shape"), list) and 0 < len(s["shape"]) <= 4
            and all(_is_int(d) and 0 < d <= MAX_DIM for d in s["shape"]) for s in state):
        raise BundleError(f"{path}: io.state is {str(state)[:200]}, expected a list of {{input, output, shape}} "
                          f"objects with shapes of positive integers (each at most {MAX_DIM})")
    models = _field(manifest, "models", dict, path)
    if not models:
        raise BundleError(f"{path}: models is empty, expected at least one of {PRECISIONS}")
    for precision, name in models.items():
        if precision not in MODEL_KEYS:
            raise BundleError(f"{path}: models key {precision!r} is unknown; expected some of {', '.join(MODEL_KEYS)}")
        _check_name(name, f"models.{precision}", path)
        if not name.endswith(".onnx"):
            raise BundleError(f"{path}: models.{precision} is {name!r}, expected an .onnx file")
        if name not in files:
            raise BundleError(f"{path}: models.{precision} is {name!r}, which is not listed in files (so it cannot "
                              "be verified)")
    profile = manifest.get("profile", {})
    if not isinstance(profile, dict):
        raise BundleError(f"{path}: profile is {type(profile).__name__}, expected an object")
    for key in ("min_batch", "opt_batch", "max_batch"):
        if key in profile and not (_is_int(profile[key]) and 1 <= profile[key] <= MAX_BATCH):
            raise BundleError(f"{path}: profile.{key} is {profile[key]!r}, expected an integer in [1, {MAX_BATCH}]")
    unhashed = manifest.get("unhashed", [])
    if not isinstance(unhashed, list) or not all(isinstance(n, str) and is_measured(n) for n in unhashed):
        raise BundleError(f"{path}: unhashed is {str(unhashed)[:200]}, expected names of measured files "
                          f"({', '.join(MEASURED_FILES)}, report/...)")
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


def _unreadable(p: Path, exc: OSError) -> BundleError:
    return BundleError(f"{p}: cannot read it ({exc.strerror}); every file of a bundle must be readable by the user "
                       "that loads it (copy the bundle with files readable by others, e.g. chmod -R a+rX)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def inside_path(root: Path, name: str) -> Path:
    """``root / name`` after checking that no part of it is a symbolic link (nothing may point out of the
    bundle, nor be swapped for a link to another file)."""
    p = root
    for part in name.split("/"):
        p = p / part
        if p.is_symlink():
            raise BundleError(f"{p}: a symbolic link; a bundle's files must be regular files inside it "
                              "(copy the bundle with its files, e.g. cp -rL)")
    return p


def read_verified(root: Path, manifest: Mapping[str, Any], name: str) -> bytes:
    """The bytes of the listed file ``name``, checked against the manifest's SHA-256 (read once: the bytes
    checked are the bytes returned, so the file cannot change between the check and the use)."""
    import hashlib

    files: dict[str, str] = manifest.get("files", {})
    if name not in files:
        raise BundleError(f"{root}: {name} is not listed in {MANIFEST}, so it cannot be verified")
    p = inside_path(root, name)
    if not p.is_file():
        raise BundleError(f"{root}: {name} is listed in {MANIFEST} but missing")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise _unreadable(p, exc) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != files[name]:
        raise BundleError(f"{p}: SHA-256 {digest[:12]}… does not match the manifest ({files[name][:12]}…); "
                          "the file was modified after export")
    return data


def verify_files(root: Path, manifest: Mapping[str, Any], names: list[str] | None = None) -> None:
    """Raise :class:`BundleError` if a listed file is missing, is (or lies under) a symbolic link, or its
    SHA-256 differs from the manifest."""
    files: dict[str, str] = manifest.get("files", {})
    for name in names or sorted(files):
        if name not in files:
            raise BundleError(f"{root}: {name} is not listed in {MANIFEST}, so it cannot be verified")
        p = inside_path(root, name)
        if not p.is_file():
            raise BundleError(f"{root}: {name} is listed in {MANIFEST} but missing")
        try:
            digest = sha256_of(p)
        except OSError as exc:
            raise _unreadable(p, exc) from None
        if digest != files[name]:
            raise BundleError(f"{p}: SHA-256 {digest[:12]}… does not match the manifest ({files[name][:12]}…); "
                              "the file was modified after export")


def model_for(manifest: Mapping[str, Any], precision: str, backend: str) -> str:
    """The bundle file that runs ``precision`` on ``backend`` (a backend-specialized copy if any)."""
    models: dict[str, str] = manifest.get("models", {"fp32": FLOAT_MODEL, "int8": INT8_MODEL})
    if precision not in models:
        raise BundleError(f"no {precision!r} model in this bundle (has {sorted(models)})")
    return models.get(f"{precision}-{backend}", models[precision])
