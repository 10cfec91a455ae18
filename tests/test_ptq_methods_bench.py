"""benchmarks/ptq_methods.py without rollouts: fixture discovery, the methods table and the markdown it renders
from its cache (rows in a fixed order, the interval as a ratio, notes for methods that did not apply)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ptq_methods", ROOT / "benchmarks" / "ptq_methods.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ptq_methods"] = module
    spec.loader.exec_module(module)
    return module


def test_every_zip_fixture_and_method_is_known(bench: ModuleType) -> None:
    fx = bench.fixtures()
    assert fx["sac-halfcheetah"] == "HalfCheetah-v5" and fx["sac-pendulum"] == "Pendulum-v1"
    assert {"default", "gptq", "brecq", "w4a8", "mixed", "prune25", "prune25+mixed", "ort-static"} <= set(
        bench.METHODS)
    assert all(bench.QUANTIZE_METHODS[m]["quantization.prune"] == r for m, r in
               (("prune10", 0.1), ("prune25", 0.25), ("prune50", 0.5)))


def test_render_orders_rows_and_states_ratios(bench: ModuleType, tmp_path: Path) -> None:
    base = {"fixture": "sac-pendulum", "env": "Pendulum-v1", "episodes": 20, "float_mean": -130.0,
            "failures": [0, 1], "file_bytes": 1000, "batch1_us": 9.5}
    cache = {"rows": {
        "a": {**base, "method": "ort-static", "file": "policy.ort-static.onnx", "int8_mean": -131.3, "kept": 0.99,
              "kept_ci": [0.985, 0.995], "verdict": "FAIL", "layers": {"int8": 3}},
        "b": {**base, "method": "default", "file": "policy.int8.onnx", "int8_mean": -130.0, "kept": 1.0,
              "kept_ci": [0.999, None], "verdict": "PASS", "layers": {"int8": 3}},
        "c": {"fixture": "sac-pendulum", "env": "Pendulum-v1", "method": "mixed", "verdict": "none",
              "note": "no candidate PASSed under the budget"},
        "d": {**base, "method": "prune25", "file": "policy.int8.onnx", "int8_mean": -131.0, "kept": 0.992,
              "kept_ci": [0.98, 1.001], "verdict": "INCONCLUSIVE", "layers": {"int8": 3},
              "pruned_widths": ["256->192"]}}}
    out = tmp_path / "r.md"
    bench.render(cache, out, "python benchmarks/ptq_methods.py --render")
    text = out.read_text()
    body = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert [line.split("|")[1].strip() for line in body] == ["default", "mixed", "prune25", "ort-static"]
    assert "| default | policy.int8.onnx | int8 3 | 20 | -130.0 | -130.0 | 100.00% | [99.90%, -] | PASS | 0/1 |" \
        in text
    assert "widths 256->192" in text and "INCONCLUSIVE" in text and "no candidate PASSed" in text
