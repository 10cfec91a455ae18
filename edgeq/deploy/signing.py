"""Ed25519 signatures over a bundle's manifest (through the ``cryptography`` package).

The manifest lists the SHA-256 of every file the robot runs, so a signature over its exact bytes
covers the whole bundle: replacing a model *and* its hash in the manifest no longer loads. The
signature lives beside the manifest in ``manifest.sig``::

    {"algorithm": "ed25519", "key_id": "<first 16 hex digits of SHA-256 of the raw public key>",
     "signature": "<base64 of the 64-byte signature of manifest.json's bytes>"}

Keys are PEM files: the private key PKCS#8 (written 0600), the public key SubjectPublicKeyInfo
(``edgeq keygen --out KEY`` writes ``KEY`` and ``KEY.pub``). Readers pass the public keys they trust.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgeq.errors import BundleError

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"
#: What ``trusted_keys`` may hold: PEM files (paths), PEM bytes, or ``Ed25519PublicKey`` objects.
TrustedKey = Any


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a base dependency
        raise BundleError("signed bundles need the 'cryptography' package (pip install cryptography)") from None
    return ed25519


def key_id(public_key: Any) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key (names a key in messages)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``private_path`` (mode 0600) and its public key to
    ``private_path.pub``; refuses to overwrite either. Returns both paths."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    priv_path = Path(private_path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise BundleError(f"{p} already exists; choose another --out (a key is never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM file, with a clear error."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"{p}: cannot read the signing key ({exc.strerror}); pass the file `edgeq keygen` "
                          "wrote") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{p}: not an unencrypted PEM private key ({exc}); pass the file `edgeq keygen` "
                          "wrote") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{p}: a {type(key).__name__}, expected an Ed25519 private key (edgeq keygen)")
    return key


def load_public_keys(trusted: TrustedKey | Iterable[TrustedKey]) -> list[Any]:
    """Ed25519 public keys from paths, PEM bytes or key objects (one or several)."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    items = [trusted] if isinstance(trusted, (str, bytes, Path)) or not isinstance(trusted, Iterable) \
        else list(trusted)
    keys = []
    for item in items:
        if isinstance(item, ed25519.Ed25519PublicKey):
            keys.append(item)
            continue
        where = "trusted key (PEM bytes)" if isinstance(item, bytes) else str(item)
        try:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            key = serialization.load_pem_public_key(data)
        except OSError as exc:
            raise BundleError(f"{where}: cannot read the trusted key ({exc.strerror}); pass the .pub file "
                              "`edgeq keygen` wrote") from None
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{where}: not a PEM public key ({exc}); pass the .pub file `edgeq keygen` "
                              "wrote") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleError(f"{where}: a {type(key).__name__}, expected an Ed25519 public key")
        keys.append(key)
    return keys


def sign_manifest_bytes(manifest: bytes, private_key: Any) -> bytes:
    """The ``manifest.sig`` content for ``manifest`` (its exact bytes) signed with ``private_key``."""
    sig = private_key.sign(manifest)
    record = {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
              "signature": base64.b64encode(sig).decode()}
    return (json.dumps(record, indent=2) + "\n").encode()


def sign_bundle(bundle: str | Path, private_key_path: str | Path) -> str:
    """Sign ``bundle``'s manifest.json with the key in ``private_key_path``; returns the key id."""
    from edgeq.deploy.bundle_format import MANIFEST

    root = Path(bundle)
    key = load_private_key(private_key_path)
    data = (root / MANIFEST).read_bytes()
    tmp = root / f".{SIGNATURE}.tmp-{os.getpid()}"
    tmp.write_bytes(sign_manifest_bytes(data, key))
    os.replace(tmp, root / SIGNATURE)
    return key_id(key.public_key())


def read_signature(root: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.sig`` of ``root``, or None if the bundle is unsigned."""
    p = root / SIGNATURE
    if p.is_symlink():
        raise BundleError(f"{p}: a symbolic link; a bundle's files must be regular files inside it")
    if not p.exists():
        return None
    try:
        record = json.loads(p.read_bytes()[:4096])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{p}: not valid JSON ({exc}); re-sign the bundle") from None
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM \
            or not isinstance(record.get("signature"), str):
        raise BundleError(f"{p}: expected {{\"algorithm\": \"ed25519\", \"key_id\", \"signature\"}}; re-sign the "
                          "bundle")
    return record


def verify_manifest_signature(root: Path, manifest: bytes, trusted: Iterable[Any]) -> str:
    """Check ``manifest.sig`` against ``manifest`` with any of the ``trusted`` public keys; returns the
    key id that verified, or raises :class:`BundleError`."""
    from cryptography.exceptions import InvalidSignature

    record = read_signature(root)
    keys = list(trusted)
    if record is None:
        raise BundleError(f"{root}: unsigned bundle (no {SIGNATURE}) but trusted keys were given; sign it "
                          "(edgeq quantize --sign-key, edgeq sign) or load it with allow_unsigned=True")
    try:
        sig = base64.b64decode(record["signature"], validate=True)
    except ValueError:
        raise BundleError(f"{root / SIGNATURE}: the signature is not base64; re-sign the bundle") from None
    for key in keys:
        try:
            key.verify(sig, manifest)
            return key_id(key)
        except InvalidSignature:
            continue
    ids = ", ".join(key_id(k) for k in keys) or "none"
    raise BundleError(f"{root}: the manifest's signature (key {record.get('key_id')!r}) does not verify with any "
                      f"trusted key ({ids}): the bundle was modified after signing or signed by another key")
