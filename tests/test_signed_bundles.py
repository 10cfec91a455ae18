"""Signed bundles: an attacker who swaps a model *and* its hash, repoints the manifest, adds external data
or symbolic links does not get the robot to act with their model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgeq.deploy
from edgeq.deploy.bundle_format import MANIFEST, sha256_of
from edgeq.deploy.cli import main as deploy_main
from edgeq.deploy.signing import SIGNATURE, generate_keypair, sign_bundle
from edgeq.errors import BundleError

V1 = Path(__file__).parent / "fixtures" / "bundles" / "v1" / "sac-pendulum"
OBS = np.array([0.3, -0.2, 0.5], np.float32)


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "keys").mkdir()
    return generate_keypair(tmp_path / "keys" / "edgeq")


@pytest.fixture()
def signed(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(V1, root)
    sign_bundle(root, keys[0])
    return root


def _edit(root: Path, fn: object) -> None:
    m = json.loads((root / MANIFEST).read_text())
    fn(m)  # type: ignore[operator]
    (root / MANIFEST).write_text(json.dumps(m, indent=2))


def _load(root: Path, key: Path | None = None, **kw: object) -> edgeq.deploy.DeployedPolicy:
    return edgeq.deploy.load(root, backend="cpu", trusted_keys=key, **kw)  # type: ignore[arg-type]


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in pub.read_bytes() and b"PRIVATE KEY" in priv.read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        generate_keypair(priv)


def test_a_signed_bundle_loads_with_its_key_and_no_warning(signed: Path, keys: tuple[Path, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = _load(signed, keys[1])
    unsigned = _load(V1, allow_unsigned=True)
    np.testing.assert_array_equal(p.act(OBS), unsigned.act(OBS))
    assert json.loads((signed / SIGNATURE).read_text())["algorithm"] == "ed25519"


def test_swapping_a_model_and_its_hash_is_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    """The attack that loaded before: another model in policy.int8.onnx and its SHA-256 in the manifest."""
    m = onnx.load(str(signed / "policy.fp32.onnx"))
    for init in m.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.dims:
            arr = onnx.numpy_helper.to_array(init) * -1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
    (signed / "policy.int8.onnx").write_bytes(m.SerializeToString())
    _edit(signed, lambda mf: mf["files"].update({"policy.int8.onnx": sha256_of(signed / "policy.int8.onnx")}))
    with pytest.raises(BundleError, match="signature .* does not verify with any trusted key"):
        _load(signed, keys[1])
    with pytest.raises(BundleError, match="signed, but no trusted keys were given"):
        _load(signed)  # no keys and not explicitly allowed: refused too
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert deploy_main(["verify", str(signed), "--trusted-key", str(keys[1])]) == 2
        assert deploy_main(["selftest", str(signed), "--trusted-key", str(keys[1]), "--latency-calls", "0"]) == 1
    assert "does not verify" in err.getvalue()


def test_repointing_a_model_entry_is_refused(signed: Path, keys: tuple[Path, Path]) -> None:
    _edit(signed, lambda mf: mf["models"].update({"int8": "policy.fp32.onnx"}))
    with pytest.raises(BundleError, match="does not verify"):
        _load(signed, keys[1])


def test_another_key_is_refused(signed: Path, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        _load(signed, other)


def test_unsigned_bundles_load_only_when_allowed_with_a_warning(keys: tuple[Path, Path]) -> None:
    with pytest.raises(BundleError, match="unsigned bundle.*allow_unsigned=True"):
        edgeq.deploy.load(V1, backend="cpu")
    with pytest.warns(UserWarning, match="unsigned bundle"):
        edgeq.deploy.load(V1, backend="cpu", allow_unsigned=True)
    with pytest.raises(BundleError, match="unsigned bundle .*but trusted keys were given"):
        _load(V1, keys[1])
    with pytest.raises(BundleError, match="missing.pub: cannot read the trusted key"):
        _load(V1, Path("missing.pub"))


def test_symlinks_are_refused(signed: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(signed / "policy.int8.onnx", outside)
    (signed / "policy.int8.onnx").unlink()
    (signed / "policy.int8.onnx").symlink_to(outside)  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match="symbolic link"):
        _load(signed, keys[1])


def test_external_data_in_an_unlisted_file_is_never_run(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    root = tmp_path / "ext"
    shutil.copytree(V1, root)
    m = onnx.load(str(root / "policy.fp32.onnx"))
    onnx.save(m, str(root / "policy.fp32.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    _edit(root, lambda mf: mf["files"].update({"policy.fp32.onnx": sha256_of(root / "policy.fp32.onnx")}))
    sign_bundle(root, keys[0])  # even signed by a trusted key: the unlisted weights.bin is not covered
    with pytest.raises(BundleError, match="cannot start"):
        _load(root, keys[1], precision="fp32")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["profile"].update(max_batch=-5), "profile.max_batch is -5"),
    (lambda m: m["observation_space"].update(shape=[5]), "observation_space.low is not a list of 5"),
    (lambda m: m["observation_space"].update(shape=[2_000_000_000]), "observation_space.shape"),
    (lambda m: m["models"].update(int8="validation.json"), "expected an .onnx file"),
    (lambda m: m["models"].update(bogus="policy.int8.onnx"), "models key 'bogus' is unknown"),
    (lambda m: m["io"].update(state=[{"input": "h", "output": "h2", "shape": [-1]}]), "io.state"),
])
def test_manifest_fields_are_validated(tmp_path: Path, edit: object, match: str) -> None:
    root = tmp_path / "b"
    shutil.copytree(V1, root)
    _edit(root, edit)
    with pytest.raises(BundleError, match=match):
        _load(root, allow_unsigned=True)


def test_an_edited_observation_shape_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(V1, root)

    def edit(m: dict) -> None:
        m["observation_space"].update(shape=[4], low=[-1.0] * 4, high=[1.0] * 4)

    _edit(root, edit)
    with pytest.raises(BundleError, match=r"takes \[batch, 3\] but the manifest's observation_space.shape is \[4\]"):
        _load(root, allow_unsigned=True)


def test_edgeq_keygen_and_sign_commands(tmp_path: Path) -> None:
    from edgeq.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["keygen", "--out", str(tmp_path / "k")])
    assert done.value.code == 0 and (tmp_path / "k.pub").is_file()
    root = tmp_path / "b"
    shutil.copytree(V1, root)
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["sign", str(root), "--key", str(tmp_path / "k")])
    assert done.value.code == 0
    assert _load(root, tmp_path / "k.pub").act(OBS).shape == (1,)


def test_bundle_writer_signs_at_export(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from edgeq.export.bundle import BundleWriter

    with pytest.raises(BundleError, match="not an unencrypted PEM private key"):
        BundleWriter(tmp_path / "x", sign_key=keys[1])  # the public key by mistake: refused before any work
    with BundleWriter(tmp_path / "out", sign_key=keys[0]) as w:
        for name in ("policy.fp32.onnx", "policy.int8.onnx"):
            shutil.copy(V1 / name, w.path / name)
        w.manifest = {k: v for k, v in json.loads((V1 / MANIFEST).read_text()).items()
                      if k not in ("files", "format_version")}
        w.manifest["models"] = {"fp32": "policy.fp32.onnx", "int8": "policy.int8.onnx"}
    assert _load(tmp_path / "out", keys[1]).act(OBS).shape == (1,)


def test_revalidation_removes_the_signature_it_would_break(signed: Path, keys: tuple[Path, Path]) -> None:
    from edgeq.validate.validator import save_validation

    with pytest.warns(UserWarning, match="signature was removed; sign the bundle again"):
        save_validation(signed, {"env_id": "Pendulum-v1", "targets": {}}, report=False, update_manifest=True)
    assert not (signed / SIGNATURE).exists()
    with pytest.raises(BundleError, match="unsigned bundle .*but trusted keys were given"):
        _load(signed, keys[1])
    sign_bundle(signed, keys[0])
    assert _load(signed, keys[1]).act(OBS).shape == (1,)
