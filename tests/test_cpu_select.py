"""policy.int8.cpu.onnx: each layer INT8 or float (on int8 weights) by measured batch-1 latency, recorded and
replayable; a float-running layer is never called INT8."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import onnx
import pytest

from edgeq.export.cpu_select import replay_record, select_cpu_float_layers
from edgeq.export.ort_cpu import cpu_float_layers, int8_layer_names

ZOO_RUN = Path(__file__).parent / "fixtures" / "zoo" / "logs" / "sac" / "Pendulum-v1_1"


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64x64 SAC policy of the RL Zoo fixture, quantized (measured CPU layer choice)."""
    from edgeq.pipeline import quantize

    out = tmp_path_factory.mktemp("cpu") / "b"
    quantize(str(ZOO_RUN), None, out, episodes=2, report=False, calib_episodes=2,
             recipe_overrides={"auto": False, "rounding": "nearest", "fp16_fallback": 0})
    return out


def _fake_timer(int8_us: dict[str, float], float_us: dict[str, float], base: float = 2.0):
    """A deterministic stand-in for the ORT timer: per-layer costs read back from each model's metadata."""
    def time_all(blobs: Sequence[bytes]) -> list[float]:
        out = []
        for blob in blobs:
            m = onnx.load_from_string(blob)
            if not any(n.op_type in ("MatMulIntegerToFloat", "Gemm", "MatMul") for n in m.graph.node):
                out.append(base)
                continue
            floats = set(cpu_float_layers(m))
            names = [n for n in int8_us]
            if all(n.op_type != "MatMulIntegerToFloat" for n in m.graph.node) and not floats:
                out.append(base + sum(float_us.values()))  # the fp32 model
                continue
            out.append(base + sum(float_us[n] if n in floats else int8_us[n] for n in names))
        return out

    return time_all


def test_choice_follows_the_measured_latency(small_bundle: Path) -> None:
    qdq = onnx.load(str(small_bundle / "policy.int8.onnx"))
    fp32 = onnx.load(str(small_bundle / "policy.fp32.onnx"))
    a, b, c = int8_layer_names(qdq)
    # the middle layer is clearly faster in int8, the outer ones in float
    chosen, record = select_cpu_float_layers(
        qdq, fp32, width_rule=32, timer=_fake_timer({a: 3.0, b: 1.0, c: 3.0}, {a: 1.0, b: 4.0, c: 1.0}))
    assert chosen == [a, c] and record["int8_layers"] == [b]
    assert record["method"] == "measured" and record["chosen_us"] == pytest.approx(2.0 + 1 + 1 + 1)
    # a near tie (within the margin) keeps the width rule's choice: noise never flips a layer
    chosen, _ = select_cpu_float_layers(
        qdq, fp32, width_rule=32, timer=_fake_timer({a: 3.0, b: 1.0, c: 3.0}, {a: 1.0, b: 1.02, c: 1.0}))
    assert chosen == [a, c]
    # every layer slower in INT8 (a 64x64 policy): all float, as fast as the float policy
    chosen, record = select_cpu_float_layers(
        qdq, fp32, width_rule=32, timer=_fake_timer({a: 3.0, b: 2.0, c: 3.0}, {a: 1.0, b: 1.0, c: 1.0}))
    assert chosen == [a, b, c] and record["chosen_us"] == record["fp32_us"]


def test_small_policy_cpu_file_is_recorded_and_never_called_int8(small_bundle: Path) -> None:
    m = json.loads((small_bundle / "manifest.json").read_text())
    sel = m["cpu_layer_selection"]
    assert sel["method"] == "measured"
    assert set(sel["float_layers"]) | set(sel["int8_layers"]) == {la["node"] for la in m["quantization"]["layers"]}
    assert m["cpu_float_layers"] == sel["float_layers"]  # the file's own metadata agrees with the record
    assert cpu_float_layers(onnx.load(str(small_bundle / "policy.int8.cpu.onnx"))) == sel["float_layers"]
    # the timings behind the choice are measurements: in measurements.json, out of the hashed manifest
    assert not {"batch1_median_us", "chosen_us", "fp32_us"} & set(sel)
    timing = json.loads((small_bundle / "measurements.json").read_text())["cpu_layer_timing"]
    assert {"all float", "all int8", "fp32_us", "chosen_us"} <= set(timing["batch1_median_us"]) | set(timing)
    # the chosen file is the fastest measured candidate
    assert timing["chosen_us"] == min(timing["batch1_median_us"].values())
    # the CPU file keeps every weight matrix as int8, also for the layers it runs in float
    cpu = onnx.load(str(small_bundle / "policy.int8.cpu.onnx"))
    int8_mats = [t for t in cpu.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.INT8]
    assert len(int8_mats) == 3
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) > 1
                   for t in cpu.graph.initializer)


def test_recorded_choice_replays_byte_for_byte(small_bundle: Path, tmp_path: Path) -> None:
    from edgeq.pipeline import quantize

    chosen = json.loads((small_bundle / "manifest.json").read_text())["cpu_layer_selection"]["float_layers"]
    again = tmp_path / "again"
    res = quantize(str(ZOO_RUN), None, again, episodes=2, report=False, calib_episodes=2,
                   recipe_overrides={"auto": False, "rounding": "nearest", "fp16_fallback": 0},
                   cpu_float_layers=chosen)
    assert res.manifest["cpu_layer_selection"]["method"] == "replayed"
    for name in ("policy.int8.onnx", "policy.int8.cpu.onnx"):
        assert (again / name).read_bytes() == (small_bundle / name).read_bytes()
    with pytest.raises(Exception, match="not INT8 layers"):
        replay_record(["nope"], onnx.load(str(small_bundle / "policy.int8.onnx")))
