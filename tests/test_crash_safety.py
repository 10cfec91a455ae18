"""Crash safety: temporary bundles of killed runs are removed by the next run; two runs on the same
inputs and seeds write byte-identical bundles except the measured part (measurements.json and the
report that shows it); bundle files follow the umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUICK_MEASURE, QUICK_PLAN

from edgeq.deploy.bundle_format import MEASUREMENTS, read_manifest
from edgeq.export.bundle import BundleWriter

SAC_PENDULUM = Path(__file__).parent / "fixtures" / "policies" / "sac-pendulum.zip"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    dead = _dead_pid()
    stale = [tmp_path / f".bundle.tmp-{dead}-abc", tmp_path / f".bundle.old-{dead}",
             tmp_path / f".bundle.probe-{dead}-x"]
    legacy = tmp_path / ".bundle.tmp-k2j3h4"  # written by an edgeq without the pid in the name, 2 h ago
    live = tmp_path / f".bundle.tmp-{os.getppid()}-zzz"  # a run still going on
    other = tmp_path / ".other.tmp-1-abc"  # another bundle's
    for d in [*stale, legacy, live, other]:
        d.mkdir()
        (d / "policy.int8.onnx").write_bytes(b"x")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    BundleWriter(out)
    assert not any(d.exists() for d in [*stale, legacy])
    assert live.exists() and other.exists()


def test_a_killed_run_leaves_a_temporary_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    code = ("import sys, time; from pathlib import Path; from edgeq.export.bundle import BundleWriter\n"
            f"w = BundleWriter(Path({str(out)!r})).__enter__(); (w.path / 'policy.fp32.onnx').write_bytes(b'x')\n"
            "print(w.path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())  # type: ignore[union-attr]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and tmp.name.startswith(".bundle.tmp-")  # what SIGKILL leaves behind
    with BundleWriter(out) as w:
        (w.path / "x.txt").write_text("y")
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _quantize(out: Path, *settings: str) -> None:
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(SAC_PENDULUM), "--env", "Pendulum-v1",
                          "--out", str(out), "--json", *settings], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_two_runs_are_byte_identical_except_the_measurements(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        # the CPU file's float layers are chosen by timing (recorded, replayable); fixed here
        _quantize(a, "--episodes", "3", "--calib-episodes", "3", "--cpu-float-layers", "none", *QUICK_PLAN,
                  *QUICK_MEASURE)
        _quantize(b, "--config", str(a))  # the config stored in a's manifest makes the same bundle
    finally:
        os.umask(old)
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    differ = [n for n in files_a if (a / n).read_bytes() != (b / n).read_bytes()]
    m = read_manifest(a)
    unhashed = set(m["unhashed"])
    assert MEASUREMENTS in unhashed and not unhashed & set(m["files"])
    assert set(differ) <= unhashed, differ  # manifest.json (with its config), validation.json, models, plan
    assert m["config"]["validation"]["episodes"] == 3 and m["config"]["calibration"]["episodes"] == 3
    # a freshly written bundle fits the typed records (edgeq.deploy.contracts)
    from test_contracts import check_manifest_contract, check_validation_contract

    check_manifest_contract(m)
    check_validation_contract({**json.loads((a / "validation.json").read_text())})
    assert {"manifest.json", "validation.json", "policy.int8.onnx"} <= set(files_a) - set(differ)
    assert set(m["files"]) == set(files_a) - unhashed - {"manifest.json"}
    # the measured values live in measurements.json only
    val = json.loads((a / "validation.json").read_text())
    meas = json.loads((a / MEASUREMENTS).read_text())
    text = json.dumps(val)
    assert '"latency"' not in text and '"timings"' not in text and '"seconds"' not in text
    assert meas["targets"]["cpu"]["latency"]["models"]["int8"]["batch1"] and meas["timings"]["ingest_s"] >= 0
    assert '"seconds"' not in json.dumps(m)  # no measured time (the config's reconstruct_seconds is a setting)
    # files follow the umask (0644 under umask 022; validation.json was 0600), the directory 0755
    for name in files_a:
        assert stat.S_IMODE((a / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(a.stat().st_mode) == 0o755



def test_an_unreadable_bundle_file_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle copied with a 0600 file (what ``cp -rp`` kept of the old validation.json) loaded by a service
    user: a BundleError naming the file and the fix, not a raw PermissionError."""
    import errno

    import edgeq.deploy
    import edgeq.deploy.bundle_format as bf
    from edgeq.errors import BundleError

    real = bf.sha256_of

    def denied(path: object) -> str:
        if str(path).endswith("validation.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(bf, "sha256_of", denied)
    v1 = Path(__file__).parent / "fixtures" / "bundles" / "v1" / "sac-pendulum"
    with pytest.raises(BundleError, match=r"validation.json: cannot read it \(Permission denied\).*chmod"):
        edgeq.deploy.load(v1, backend="cpu", allow_unsigned=True)
