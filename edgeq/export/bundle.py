"""Writing bundles atomically: everything goes to a temporary sibling directory, then one rename.

A failure at any stage leaves no partial bundle at the destination. The destination is checked
writable (a probe file of :data:`PROBE_BYTES` in its parent, and :data:`MIN_FREE_BYTES` free) when the
writer is made, before any work; temporary directories left by a killed run (``.NAME.tmp-PID-*``
whose process is gone) are removed by the next run that writes ``NAME``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from edgeq.deploy.bundle_format import FORMAT_VERSION, MANIFEST, is_measured, sha256_of
from edgeq.errors import BundleError

#: Bytes written (and removed) in the destination's parent to prove it writable before any work.
PROBE_BYTES = 1 << 20
#: Free space the destination's file system must have before any work (a bundle is a few MiB).
MIN_FREE_BYTES = 32 << 20

_log = logging.getLogger("edgeq")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``out`` left by runs that were killed.

    A directory named with a process id is removed when that process no longer exists; one without
    (written by an older edgeq) when it is older than an hour. Returns the paths removed.
    """
    import time

    removed: list[Path] = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    pat = re.compile(re.escape(f".{out.name}.") + r"(tmp|old|probe)-(\d+)?")
    for p in parent.iterdir():
        m = pat.match(p.name)
        if not m or p.is_symlink():
            continue
        pid = int(m.group(2)) if m.group(2) and m.group(2).isdigit() else None
        if pid is not None and pid == os.getpid():
            continue
        try:
            stale = not _pid_alive(pid) if pid is not None else time.time() - p.stat().st_mtime > 3600
        except OSError:
            continue
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
            _log.warning("removed %s, left by an interrupted edgeq run", p)
    return removed


def _unwritable(out: Path, exc: OSError) -> BundleError:
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    hint = {errno.ENOSPC: "free disk space or choose another --out",
            errno.EFBIG: "the file size limit (ulimit -f) is too low; raise it or choose another --out",
            errno.EROFS: "the file system is read-only; choose a writable --out",
            errno.ENOTDIR: "a part of the path is a file, not a directory; choose another --out",
            errno.EEXIST: "a part of the path is a file, not a directory; choose another --out"}.get(
                exc.errno or 0, "choose a location you can write")
    where = exc.filename or out.parent
    return BundleError(f"--out {out}: cannot write there ({where}: {reason}{f', {code}' if code else ''}); {hint}")


def check_writable(out: Path) -> None:
    """Raise :class:`BundleError` unless a bundle can be written at ``out`` (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is an existing file, not a bundle directory; choose another --out")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-{os.getpid()}-", dir=parent))
        try:
            with open(probe / "probe", "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        st = os.statvfs(parent)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        raise BundleError(f"--out {out}: only {free / (1 << 20):.1f} MiB free on its file system (a bundle needs "
                          f"up to {MIN_FREE_BYTES >> 20} MiB); free disk space or choose another --out")


def check_output_dir(path: str | Path, option: str) -> None:
    """Raise :class:`BundleError` unless files can be written into directory ``path`` (created if missing):
    for commands that write results into an existing directory (``edgeq validate``, ``edgeq compare``),
    checked before their rollouts."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise BundleError(f"{option} {d} is an existing file, not a directory; choose another {option}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe-{os.getpid()}-", dir=d)
        try:
            os.write(fd, b"\0" * (64 << 10))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise BundleError(
            f"{option} {d}: cannot write there ({exc.filename or d}: {exc.strerror}); choose a writable "
            f"{option}" + (" (or --out DIR for a read-only bundle)" if option == "BUNDLE" else "")) from None


class BundleWriter:
    """Context manager: ``with BundleWriter(out) as w: w.save_model(...); w.write_json(...)``.

    On clean exit the manifest (with the SHA-256 of every file) is written and the directory is
    renamed into place; on an exception the temporary directory is removed.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, sign_key: str | Path | None = None) -> None:
        from edgeq.deploy.signing import load_private_key

        self.out = Path(out)
        self.sign_key = load_private_key(sign_key) if sign_key is not None else None  # fails before any work
        if self.out.exists() and not self.out.is_dir():
            raise BundleError(f"--out {self.out} is an existing file, not a bundle directory; choose another --out")
        if self.out.exists() and not overwrite:
            raise BundleError(f"{self.out} already exists; pass --overwrite to replace it")
        if self.out.exists() and not (self.out / MANIFEST).is_file() and any(self.out.iterdir()):
            raise BundleError(f"{self.out} exists and is not an edgeq bundle; refusing to replace it")
        remove_stale_temporaries(self.out)
        check_writable(self.out)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> BundleWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as exc:
            raise _unwritable(self.out, exc) from None
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
        names = [p.relative_to(self.path).as_posix() for p in sorted(self.path.rglob("*")) if p.is_file()]
        files = {n: sha256_of(self.path / n) for n in names if n != MANIFEST and not is_measured(n)}
        manifest = {"format_version": FORMAT_VERSION, **self.manifest, "files": files}
        unhashed = sorted(n for n in names if is_measured(n))
        if unhashed:
            manifest["unhashed"] = unhashed
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        (self.path / MANIFEST).write_bytes(data)
        if self.sign_key is not None:
            from edgeq.deploy.signing import SIGNATURE, sign_manifest_bytes

            (self.path / SIGNATURE).write_bytes(sign_manifest_bytes(data, self.sign_key))
        os.chmod(self.path, 0o777 & ~current_umask())  # mkdtemp made it 0700
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.path, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
