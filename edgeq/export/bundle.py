"""Writing bundles atomically: everything goes to a temporary sibling directory, then one rename.

A failure at any stage leaves no partial bundle at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from edgeq.deploy.bundle_format import FORMAT_VERSION, MANIFEST, sha256_of
from edgeq.errors import BundleError


class BundleWriter:
    """Context manager: ``with BundleWriter(out) as w: w.save_model(...); w.write_json(...)``.

    On clean exit the manifest (with the SHA-256 of every file) is written and the directory is
    renamed into place; on an exception the temporary directory is removed.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} already exists; pass --overwrite to replace it")
        if self.out.exists() and not (self.out / MANIFEST).is_file() and any(self.out.iterdir()):
            raise BundleError(f"{self.out} exists and is not an edgeq bundle; refusing to replace it")
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> BundleWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    @property
    def path(self) -> Path:
        assert self.tmp is not None, "use BundleWriter as a context manager"
        return self.tmp

    def save_model(self, model: onnx.ModelProto, name: str) -> Path:
        """Save ``model`` self-contained (weights inside the file, no external data)."""
        p = self.path / name
        p.write_bytes(model.SerializeToString(deterministic=True))
        return p

    def write_json(self, name: str, data: Any) -> Path:
        p = self.path / name
        p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return p

    def _finish(self) -> None:
        files = {p.relative_to(self.path).as_posix(): sha256_of(p) for p in sorted(self.path.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        manifest = {"format_version": FORMAT_VERSION, **self.manifest, "files": files}
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(self.path, 0o755)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
