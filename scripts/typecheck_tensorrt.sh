#!/usr/bin/env bash
# Type-check edgeq's TensorRT module against `tensorrt-stubs`, without the TensorRT runtime.
#
# TensorRT itself cannot be installed on machines without NVIDIA's libraries, but its Python API can
# still be checked (see shared/notes/tensorrt-typecheck.md):
#   1. `pip install --no-deps tensorrt-stubs` (its `tensorrt` dependency needs NVIDIA's index);
#   2. add `py.typed` to the installed `tensorrt/` and `tensorrt_bindings/` folders so mypy reads them;
#   3. fix the two things that keep `tensorrt_bindings/tensorrt.pyi` from parsing: parameters named
#      `in` (a keyword) become `in_`, and `add_scale_nd`'s `channel_axis` gets a default `...`;
#   4. run mypy --strict on edgeq/export/tensorrt_engine.py and edgeq/deploy/tensorrt_runner.py with a
#      config of its own (the project's config sets ignore_missing_imports, which would silently turn
#      a missing tensorrt into Any);
#   5. prove the stubs are really in use: a probe with a wrong call (`trt.Builder(3)`) must fail.
#
# Idempotent: run it as often as you like. The stub files are patched in site-packages, never
# committed. Python: $PYTHON, else the active virtualenv, else ./.venv, else python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    py="$VIRTUAL_ENV/bin/python"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
stubs_version="${TENSORRT_STUBS_VERSION:-10.13.0.35.1}"

if ! "$py" -m pip show tensorrt-stubs >/dev/null 2>&1; then
    echo "typecheck_tensorrt: installing tensorrt-stubs==$stubs_version (--no-deps)"
    "$py" -m pip install --quiet --no-deps "tensorrt-stubs==$stubs_version"
fi

# Steps 2 and 3, applied to the installed copy. Re-running changes nothing.
"$py" - <<'PY'
import importlib.metadata as md
import re
from pathlib import Path

dist = md.distribution("tensorrt-stubs")
root = Path(str(dist.locate_file("")))
changed = []
for pkg in ("tensorrt", "tensorrt_bindings"):
    folder = root / pkg
    if not folder.is_dir():
        raise SystemExit(f"typecheck_tensorrt: {folder} missing: is tensorrt-stubs installed?")
    marker = folder / "py.typed"
    if not marker.exists():
        marker.write_text("")
        changed.append(str(marker))

stub = root / "tensorrt_bindings" / "tensorrt.pyi"
text = stub.read_text()
fixed_lines = []
for line in text.splitlines(keepends=True):
    if line.lstrip().startswith("def "):
        # `in` is a keyword: rename the parameter (only in signatures, never in docstrings).
        line = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", line)
        if "def add_scale_nd(" in line:
            # A non-default parameter after defaults does not parse: give it a default.
            line = re.sub(r"channel_axis: int\)", "channel_axis: int = ...)", line)
    fixed_lines.append(line)
fixed = "".join(fixed_lines)
if fixed != text:
    stub.write_text(fixed)
    changed.append(str(stub))
print("typecheck_tensorrt: stubs fixed up" + (f" ({len(changed)} file(s) changed)" if changed else " (already)"))
PY

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
cat >"$workdir/mypy.ini" <<'INI'
[mypy]
strict = True
ignore_missing_imports = False
show_error_codes = True
# torch.cuda.Stream's constructor carries no annotations (torch's own gap, not a wrong call).
untyped_calls_exclude = torch.cuda.streams

# The rest of edgeq is checked by the project's own mypy run: here its modules are followed for their
# types, but only the files named on the command line report errors.
[mypy-edgeq.*]
follow_imports = silent

# Optional GPU-info fallback, imported dynamically; listed so a future static import stays quiet.
[mypy-cuda.*]
ignore_missing_imports = True
INI

targets=(edgeq/export/tensorrt_engine.py edgeq/deploy/tensorrt_runner.py edgeq/export/trt_rules.py)
echo "typecheck_tensorrt: mypy --strict ${targets[*]}"
"$py" -m mypy --config-file "$workdir/mypy.ini" --cache-dir "$workdir/cache" "${targets[@]}"

# Step 5: a wrong call must be caught, or the stubs are not really being read.
cat >"$workdir/probe_wrong_call.py" <<'PROBE'
import tensorrt as trt

builder = trt.Builder(3)
PROBE
if "$py" -m mypy --config-file "$workdir/mypy.ini" --cache-dir "$workdir/cache" \
    "$workdir/probe_wrong_call.py" >"$workdir/probe.out" 2>&1; then
    echo "typecheck_tensorrt: FAIL: mypy accepted trt.Builder(3): the TensorRT stubs are not in use" >&2
    exit 1
fi
if ! grep -q 'ILogger' "$workdir/probe.out"; then
    echo "typecheck_tensorrt: FAIL: the probe failed for another reason:" >&2
    cat "$workdir/probe.out" >&2
    exit 1
fi
echo "typecheck_tensorrt: OK (stubs active: the probe's wrong call trt.Builder(3) was rejected)"
