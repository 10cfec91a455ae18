"""The bundle format: file names, the manifest and its integrity check (numpy-free, stdlib only).

A bundle is a directory::

    manifest.json       format_version, edgeq version, source, env, spaces, io names, state,
                        quantization settings, and the SHA-256 of every other file
    policy.fp32.onnx    the float policy (self-contained, no external data)
    policy.int8.onnx    the INT8 QDQ policy (int8 weight initializers): TensorRT, CUDA, any runtime
    policy.int8.cpu.onnx  the same arithmetic specialized for ONNX Runtime's CPU provider
    policy.int8.cuda.onnx the same arithmetic specialized for ONNX Runtime's CUDA provider
    validation.json     paired float/int8 rollouts (written by the validator)

Readers must accept any ``format_version`` up to :data:`FORMAT_VERSION` (bundles made by an older
edgeq keep loading) and refuse newer ones with a clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeq.errors import BundleError
from edgeq.hashing import sha256_of

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FLOAT_MODEL = "policy.fp32.onnx"
INT8_MODEL = "policy.int8.onnx"
INT8_CPU_MODEL = "policy.int8.cpu.onnx"
INT8_CUDA_MODEL = "policy.int8.cuda.onnx"
VALIDATION = "validation.json"


def read_manifest(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load ``manifest.json``; with ``verify`` check every listed file's SHA-256."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (expected an edgeq bundle directory)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version is {version!r}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {version} is newer than this edgeq reads "
                          f"({FORMAT_VERSION}); upgrade edgeq")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Raise :class:`BundleError` if a listed file is missing or its SHA-256 differs."""
    files: dict[str, str] = manifest.get("files", {})
    for name in names or sorted(files):
        if name not in files:
            raise BundleError(f"{root}: {name} is not listed in {MANIFEST}")
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
