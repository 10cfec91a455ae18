"""One error path: every failure of the ``edgeq`` CLI is one line naming the file, field or env and the
fix, with exit status 2 (1 stays "verdict FAIL" / "rule violations"), found before any work where it
can be; hostile files are refused before they cost memory; policies broken in float are refused.

The CLI runs in this process (``edgeq.cli.main``) so that each case costs milliseconds, not a Python start.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import hostile_inputs as h
import numpy as np
import pytest

from edgeq.cli import main

PENDULUM = str(h.SAC_PENDULUM)


def cli(*argv: str) -> tuple[int, str, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue(), out.getvalue()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    # progress lines ("[edgeq] stage: n/N ...", printed off a terminal) may precede the error
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[edgeq] ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture()
def no_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the pipeline gets as far as reading the policy (the check must come first)."""
    import edgeq.pipeline

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the policy was read before the error was found")

    monkeypatch.setattr(edgeq.pipeline, "load_policy", boom)


# -- bad files -------------------------------------------------------------------------------------
def _archive(tmp_path: Path, kind: str) -> tuple[Path, str, list[str]]:
    """(policy, env, needles) for one kind of broken SB3 archive."""
    import torch

    p = tmp_path / f"{kind}.zip"
    if kind == "data-list":
        return h.with_data(h.SAC_PENDULUM, p, b"[1, 2]"), "Pendulum-v1", [p.name, "'data'", "JSON list"]
    if kind == "data-null":
        return h.with_data(h.SAC_PENDULUM, p, b"null"), "Pendulum-v1", [p.name, "'data'", "NoneType"]
    if kind == "data-nested":
        return h.with_data(h.SAC_PENDULUM, p, h.nested(200_000)), "Pendulum-v1", [p.name, "nested too deeply"]
    if kind == "wrong-shape":
        def edit(sd: dict) -> None:
            sd["actor.latent_pi.2.weight"] = torch.zeros(5, 7)
        return h.with_state(h.SAC_PENDULUM, p, edit), "Pendulum-v1", [p.name, "actor.latent_pi.2.weight", "(5, 7)"]
    if kind == "nan-weight":
        def edit(sd: dict) -> None:
            sd["actor.mu.weight"][0, 0] = float("nan")
        return h.with_state(h.SAC_PENDULUM, p, edit), "Pendulum-v1", [p.name, "actor.mu.weight", "NaN/inf"]
    if kind == "inf-bias":
        def edit(sd: dict) -> None:
            sd["actor.latent_pi.0.bias"][3] = float("inf")
        return h.with_state(h.SAC_PENDULUM, p, edit), "Pendulum-v1", [p.name, "actor.latent_pi.0", "NaN/inf"]
    if kind == "weights-x1e36":
        return (h.with_state(h.SAC_PENDULUM, p, h.scaled_weights(1e36)), "Pendulum-v1",
                [p.name, "broken in float"])
    vn = {"eps-object": ({"epsilon": object}, "epsilon is type, expected a number"),
          "eps-negative": ({"epsilon": -1.0}, "epsilon is -1.0"),
          "mean-strings": ({"mean": np.array(["a"] * 17)}, "obs_rms.mean is <U1 array"),
          "var-negative": ({"var": -np.ones(17)}, "obs_rms.var has negative values"),
          "var-nan": ({"var": np.full(17, np.nan)}, "obs_rms.var holds NaN/inf"),
          "mean-shape": ({"mean": np.zeros((2, 3))}, "obs_rms.mean has shape (2, 3)")}
    edit_kw, needle = vn[kind]
    args = {"mean": np.zeros(17), "var": np.ones(17), **edit_kw}
    h.write_zip(p, h.read_entries(h.PPO_VECNORM))
    (tmp_path / kind).mkdir()
    (tmp_path / kind / "vecnormalize.pkl").write_bytes(h.vecnorm_pickle(**args))
    return p, "HalfCheetah-v5", ["vecnormalize.pkl", needle]


ARCHIVES = ["data-list", "data-null", "data-nested", "wrong-shape", "nan-weight", "inf-bias", "weights-x1e36",
            "eps-object", "eps-negative", "mean-strings", "var-negative", "var-nan", "mean-shape"]


@pytest.mark.parametrize("kind", ARCHIVES)
def test_broken_archives_are_one_line(tmp_path: Path, kind: str) -> None:
    policy, env, needles = _archive(tmp_path, kind)
    out = tmp_path / "out"
    code, err, _ = cli("quantize", policy, "--env", env, "--out", out)
    assert_one_line(code, err, *needles)
    assert_nothing_written(out)


@pytest.mark.parametrize(("env", "needles"), [
    ("hostile_inputs:raises", ["hostile_inputs:raises", "RuntimeError", "license server"]),
    ("hostile_inputs:returns_42", ["returned int", "expected a gymnasium.Env"]),
    ("hostile_inputs:nan_observation", ["non-finite observation (nan)", "seed"]),
    ("hostile_inputs:inf_observation", ["non-finite observation (inf)", "seed"]),
    ("hostile_inputs:nan_reward", ["non-finite reward (nan)", "seed"]),
])
def test_misbehaving_envs_are_one_line(tmp_path: Path, env: str, needles: list[str]) -> None:
    out = tmp_path / "out"
    code, err, _ = cli("quantize", PENDULUM, "--env", env, "--out", out, "--calib-episodes", "2", "--episodes", "2")
    assert_one_line(code, err, *needles)
    assert_nothing_written(out)


def test_unknown_env_kwargs(tmp_path: Path) -> None:
    code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--env-kwargs", '{"gravty": 9}', "--out",
                       tmp_path / "o")
    assert_one_line(code, err, "--env-kwargs", "gravty")


@pytest.mark.parametrize(("args", "needles"), [
    (["--calibrator", "bogus"], ["calibrator 'bogus' is unknown", "percentile"]),
    (["--calibrator", "percentile", "--percentile", "200"], ["percentile 200.0 is out of range", "(0, 100]"]),
    (["--weight-method", "nope"], ["weight method 'nope'", "absmax"]),
    (["--percentile", "nan", "--calibrator", "percentile"], ["percentile nan"]),
])
def test_bad_options_are_found_before_any_work(tmp_path: Path, args: list[str], needles: list[str],
                                               no_ingest: None) -> None:
    out = tmp_path / "out"
    code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", out, *args)
    assert_one_line(code, err, *needles)
    assert_nothing_written(out)


def test_usage_errors_are_one_line() -> None:
    for argv, needle in ((["quantize"], "Missing"), (["quantize", PENDULUM, "--out"], "--out"),
                         (["frobnicate"], "No such command"),
                         (["quantize", PENDULUM, "--out", "o", "--num-envs", "x"], "--num-envs")):
        code, err, _ = cli(*argv)
        assert_one_line(code, err, needle, "--help")


# -- the output location, checked before any work ------------------------------------------------------
def test_out_unwritable_locations(tmp_path: Path, no_ingest: None) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(Path("/proc/edgeq-test/out"), ["/proc/edgeq-test/out", "cannot write"]),
             (a_file / "out", ["file.txt", "not a directory"]),
             (a_file, ["file.txt", "existing file"])]
    for out, needles in cases:
        code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", out, "--overwrite")
        assert_one_line(code, err, *needles)
    assert a_file.read_text() == "x"


def test_out_disk_nearly_full_is_found_first(tmp_path: Path, no_ingest: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Full:
        def __init__(self, path: str) -> None:
            st = real(path)
            self.f_frsize, self.f_bavail = st.f_frsize, (1 << 20) // st.f_frsize

    monkeypatch.setattr(os, "statvfs", Full)
    out = tmp_path / "out"
    code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", out)
    assert_one_line(code, err, "MiB free", "free disk space or choose another --out")
    assert_nothing_written(out)


def test_disk_full_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from edgeq.export import bundle

    def full(self: bundle.BundleWriter, model: object, name: str) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / name))

    monkeypatch.setattr(bundle.BundleWriter, "save_model", full)
    out = tmp_path / "out"
    code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", out, "--calib-episodes", "1",
                       "--episodes", "1", "--no-auto")
    assert_one_line(code, err, "policy.fp32.onnx", "ENOSPC", "free disk space")
    assert_nothing_written(out)


def test_out_file_size_limit_is_found_first(tmp_path: Path) -> None:
    """EFBIG: a file-size limit (ulimit -f) below what a bundle needs; found by the probe in well under the
    time a run takes to get to writing."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", PENDULUM, "--env", "Pendulum-v1",
                          "--out", str(out)], capture_output=True, text=True, preexec_fn=limit, timeout=300,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert_one_line(res.returncode, res.stderr, "EFBIG", "ulimit -f")
    assert time.perf_counter() - t0 < 60
    assert_nothing_written(out)


# -- check: 1 for violations, 2 for anything else ---------------------------------------------------
def test_check_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    code, err, _ = cli("check", empty)
    assert_one_line(code, err, "empty.onnx", "0 bytes")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(h.ISAAC_ONNX.read_bytes()[:3000])
    code, err, _ = cli("check", trunc)
    assert_one_line(code, err, "trunc.onnx", "not an ONNX model")
    code, err, _ = cli("check", tmp_path / "missing.onnx")
    assert_one_line(code, err, "missing.onnx", "no such file")

    import edgeq.export.trt_rules as rules

    def crash(model: object) -> list:
        raise KeyError("a bug")

    monkeypatch.setattr(rules, "check_qdq_model", crash)
    code, err, _ = cli("check", h.ISAAC_ONNX)
    assert_one_line(code, err, "KeyError", "--debug")


def test_a_crash_after_the_work_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Printing the summary is outside the guarded work; a crash there (it crashed on a NaN reward) is still
    one line and exit 2."""
    import edgeq.commands.quantize as q

    def crash(*a: object) -> None:
        raise ValueError("cannot format nan")

    monkeypatch.setattr(q, "print_summary", crash)
    code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", tmp_path / "o", "--calib-episodes", "1",
                       "--episodes", "2", "--no-auto")
    assert_one_line(code, err, "ValueError", "cannot format nan")


# -- resource limits, checked before allocation ------------------------------------------------------
def test_huge_layer_index_is_refused_at_once(tmp_path: Path) -> None:
    import torch

    def edit(sd: dict) -> None:
        sd["actor.latent_pi.50000000.weight"] = torch.zeros(4, 4)

    p = h.with_state(h.SAC_PENDULUM, tmp_path / "idx.zip", edit)
    t0 = time.perf_counter()
    code, err, _ = cli("quantize", p, "--env", "Pendulum-v1", "--out", tmp_path / "o")
    assert_one_line(code, err, "idx.zip", "actor.latent_pi.50000000", "limit of 256 layers")
    assert time.perf_counter() - t0 < 10  # was 68-88 s and 5.4 GB


def test_oversized_zip_entry_is_refused_before_reading(tmp_path: Path) -> None:
    p = h.with_data(h.SAC_PENDULUM, tmp_path / "big.zip", b" " * (65 << 20))
    assert p.stat().st_size < 8 << 20
    code, err, _ = cli("quantize", p, "--env", "Pendulum-v1", "--out", tmp_path / "o")
    assert_one_line(code, err, "big.zip", "entry 'data' declares", "limit of 67108864")


def test_strided_tensor_cannot_ask_for_gigabytes(tmp_path: Path) -> None:
    import torch

    def edit(sd: dict) -> None:  # 4 bytes of storage that claim 10^10 elements
        sd["actor.mu.weight"] = torch.zeros(1).expand(100_000, 100_000)

    p = h.with_state(h.SAC_PENDULUM, tmp_path / "stride.zip", edit)
    code, err, _ = cli("quantize", p, "--env", "Pendulum-v1", "--out", tmp_path / "o")
    assert_one_line(code, err, "stride.zip", "actor.mu.weight", "elements per tensor")


def test_onnx_huge_dimension_is_refused(tmp_path: Path) -> None:
    import onnx

    m = onnx.load(str(h.ISAAC_ONNX))
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2_000_000_000
    p = tmp_path / "wide.onnx"
    onnx.save(m, str(p))
    code, err, _ = cli("quantize", p, "--env", "Pendulum-v1", "--out", tmp_path / "o")
    assert_one_line(code, err, "wide.onnx", "2000000000", "limit of 65536")


# -- policies wrong in float: refused, never PASS --------------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, float("nan")])
def test_onnx_policy_broken_in_float_is_refused(tmp_path: Path, scale: float) -> None:
    """An ONNX source (no weight checks at ingest): calibration sees its activations and refuses it."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(h.ISAAC_ONNX))
    big = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(big).copy()
    arr.flat[:: max(1, arr.size // 7)] = scale
    big.CopyFrom(numpy_helper.from_array(arr, big.name))
    p = tmp_path / "broken.onnx"
    onnx.save(m, str(p))
    out = tmp_path / "o"
    code, err, _ = cli("quantize", p, "--env", "Pendulum-v1", "--out", out, "--calib-episodes", "1",
                       "--episodes", "1")
    assert_one_line(code, err, "broken in float")
    assert_nothing_written(out)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="mounting a file system needs root")
def test_out_on_a_read_only_or_full_file_system(tmp_path: Path, no_ingest: None) -> None:
    """The real conditions behind the monkeypatched tests above: a read-only mount (EROFS) and a tmpfs with
    less free space than a bundle needs, both found before any work."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    mounted = []
    try:
        for path, opts in ((ro, "ro,size=8m"), (small, "size=4m")):
            path.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)]).returncode != 0:
                pytest.skip("mount is not permitted here")
            mounted.append(path)
        code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", ro / "bundle")
        assert_one_line(code, err, "EROFS", "read-only")
        code, err, _ = cli("quantize", PENDULUM, "--env", "Pendulum-v1", "--out", small / "bundle")
        assert_one_line(code, err, "MiB free", "free disk space or choose another --out")
        assert list(small.iterdir()) == []
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)])


def test_validate_and_compare_check_their_output_before_rollouts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import edgeq.validate.validator as validator

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("rollouts started before the output was checked")

    monkeypatch.setattr(validator, "validate_bundle", boom)
    bundle = tmp_path / "bundle"
    shutil.copytree(h.FIXTURES / "bundles" / "v1" / "sac-pendulum", bundle)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err, _ = cli("validate", bundle, "--episodes", "3", "--out", a_file / "sub")
    assert_one_line(code, err, "--out", "file.txt")
    code, err, _ = cli("validate", bundle, "--episodes", "3", "--out", a_file)
    assert_one_line(code, err, "--out", "existing file")
    code, err, _ = cli("compare", bundle, "--env", "Pendulum-v1", "--episodes", "2", "--out", a_file)
    assert_one_line(code, err, "--out", "existing file")
