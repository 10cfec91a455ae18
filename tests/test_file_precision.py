"""Report the truth (issue 12 part 1): what each shipped file really computes in, read from its graph;
fp16 fallback off by default; the all-INT8 file validated on the CPU as its own row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.describe import file_headline, layer_precisions, precision_counts
from edgeq.export.file_precision import file_record
from edgeq.export.file_precision import layer_precisions as graph_layers

ZOO_RUN = Path(__file__).parent / "fixtures" / "zoo" / "logs" / "sac" / "Pendulum-v1_1"


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], out: str = "y") -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_act(src: str, dst: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    return ([helper.make_node("QuantizeLinear", [src, "s", "zp"], [src + ".q"]),
             helper.make_node("DequantizeLinear", [src + ".q", "s", "zp"], [dst])],
            [_init("s", np.array(0.1, np.float32)), _init("zp", np.array(0, np.int8))])


def _dq_weight(name: str, dtype: int = TensorProto.INT8) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    q = helper.make_tensor(name + ".q", dtype, [4, 3], [1, -2, 3, 4, 5, -6, 7, 1, 2, 3, 4, 5])
    return ([helper.make_node("DequantizeLinear", [name + ".q", name + ".s"], [name], axis=1)],
            [q, _init(name + ".s", np.full(3, 0.01, np.float32))])


def test_qdq_layer_is_int8_weight_only_dq_is_int8_storage() -> None:
    an, ai = _qdq_act("x", "x.dq")
    wn, wi = _dq_weight("w")
    both = _model([*an, *wn, helper.make_node("MatMul", ["x.dq", "w"], ["y"], name="L")], ai + wi)
    [row] = graph_layers(both)
    assert (row.weight, row.activation, row.status) == ("int8", "int8", "int8")
    weight_only = _model([*wn, helper.make_node("MatMul", ["x", "w"], ["y"], name="L")], wi)
    [row] = graph_layers(weight_only)
    assert (row.weight, row.activation, row.status) == ("int8", "float", "float on int8 weights")
    rec = file_record(weight_only)
    assert rec["all_int8"] is False and rec["counts"] == {"float on int8 weights": 1}
    assert file_record(both)["all_int8"] is True


def test_int4_fp16_float_and_integer_kernels() -> None:
    an, ai = _qdq_act("x", "x.dq")
    wn, wi = _dq_weight("w", TensorProto.INT4)
    [row] = graph_layers(_model([*an, *wn, helper.make_node("MatMul", ["x.dq", "w"], ["y"], name="L")], ai + wi))
    assert (row.weight, row.status) == ("int4", "w4a8")
    w16 = _init("w16", np.ones((4, 3), np.float16))
    fp16 = _model([helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                   helper.make_node("MatMul", ["x16", "w16"], ["y16"], name="L"),
                   helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)], [w16])
    [row] = graph_layers(fp16)
    assert (row.weight, row.activation, row.status) == ("fp16", "fp16", "fp16")
    rng = np.random.default_rng(0)
    wf = _init("wf", rng.normal(size=(4, 3)).astype(np.float32))
    [row] = graph_layers(_model([helper.make_node("MatMul", ["x", "wf"], ["y"], name="L")], [wf]))
    assert row.status == "float"
    # a float initializer on an int8 grid behind QDQ activations (the CUDA file): int8 rounding, float compute
    grid = (rng.integers(-127, 128, size=(4, 3)) * np.array([0.01, 0.02, 0.03])).astype(np.float32)
    grid[0], grid[1] = [1.27, -2.54, 3.81], [0.03, -0.04, 0.09]
    [row] = graph_layers(_model([*an, helper.make_node("MatMul", ["x.dq", "wg"], ["y"], name="L")],
                                ai + [_init("wg", grid)]))
    assert (row.weight, row.status) == ("float (int8 grid)", "int8-rounded, float32 compute")
    integer = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                      helper.make_node("MatMulIntegerToFloat", ["xq", "wi8", "xs", "ws", "xz"], ["y"],
                                       name="L", domain="com.microsoft")],
                     [_init("wi8", np.ones((4, 3), np.int8)), _init("ws", np.ones(3, np.float32))])
    [row] = graph_layers(integer)
    assert (row.weight, row.activation, row.status) == ("int8", "int8", "int8")


def _manifest(cpu_rows: list[tuple[str, str]], method: str = "measured") -> dict:
    def rec(rows: list[tuple[str, str]]) -> dict:
        return {"layers": [{"node": n, "op": "MatMul", "weight": "int8", "activation": "x", "status": s}
                           for n, s in rows]}
    names = [n for n, _ in cpu_rows]
    return {"file_precision": {"policy.int8.onnx": rec([(n, "int8") for n in names]),
                               "policy.int8.cpu.onnx": rec(cpu_rows)},
            "cpu_layer_selection": {"method": method},
            "quantization": {"layers": [{"node": n, "precision": "int8"} for n in names]}}


def test_headline_counts_from_the_file_and_says_why() -> None:
    m = _manifest([("a", "int8"), ("b", "int8"), ("c", "float on int8 weights")])
    assert file_headline(m, "policy.int8.cpu.onnx") == (
        "policy.int8.cpu.onnx: 2 of 3 layers int8 (weights+activations), 1 float on int8 weights (chosen by "
        "measured latency: c)")
    assert file_headline(m, "policy.int8.onnx") == "policy.int8.onnx: all 3 layers int8 (weights+activations)"
    assert "INT8" not in precision_counts(m).replace("int8", "")
    assert [r["cpu"] for r in layer_precisions(m)] == ["int8", "int8", "float (int8 weights)"]
    m["quantization"]["layers"][0].update(precision="fp16", reason="fp16 fallback: held-out error 0.2 > 0.1")
    m["file_precision"]["policy.int8.onnx"]["layers"][0]["status"] = "fp16"
    assert file_headline(m, "policy.int8.onnx") == (
        "policy.int8.onnx: 2 of 3 layers int8 (weights+activations), 1 fp16 (fp16 fallback: a)")


def test_fp16_fallback_is_off_by_default() -> None:
    from edgeq.config import QuantizeConfig
    from edgeq.quantizers.build import QuantOptions

    assert QuantizeConfig().quantization.fp16_fallback == 0 and QuantOptions().fp16_fallback == 0
    for name in ("default", "HalfCheetah-v5", "Pendulum-v1", "BipedalWalker-v3"):
        assert QuantizeConfig.from_recipe(name).quant_options().fp16_fallback == 0, name


def test_bundle_reports_each_file_and_validates_the_all_int8_file_on_cpu(tmp_path: Path) -> None:
    """A CPU file with a float layer (a replayed choice, so the test does not depend on timing): the manifest
    counts it from the file, validation.json has the all-INT8 file's own row and verdict, the summary says so."""
    from edgeq.commands._app import console, print_summary
    from edgeq.pipeline import quantize
    from edgeq.validate.validator import ValidationOptions

    out = tmp_path / "b"
    light = ValidationOptions.light(targets=("cpu",), floor_draws=0, latency_calls=0, per_layer=False)
    res = quantize(str(ZOO_RUN), None, out, episodes=3, report=True, calib_episodes=2, validation=light,
                   recipe_overrides={"auto": False, "rounding": "nearest"}, cpu_float_layers=["actor.mu/Gemm"])
    fp = res.manifest["file_precision"]
    assert fp["policy.int8.onnx"]["all_int8"] is True
    cpu = {r["node"]: r["status"] for r in fp["policy.int8.cpu.onnx"]["layers"]}
    assert cpu["actor.mu/Gemm"] == "float on int8 weights" and fp["policy.int8.cpu.onnx"]["all_int8"] is False
    assert sum(s == "int8" for s in cpu.values()) == len(cpu) - 1
    val = json.loads((out / "validation.json").read_text())
    assert val["targets"]["cpu"]["int8_model"] == "policy.int8.cpu.onnx"
    row = val["all_int8_cpu"]
    assert row["int8_model"] == "policy.int8.onnx" and row["runtime"] == "onnxruntime-cpu"
    assert row["verdict"]["status"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert row["float"]["seeds"] == val["targets"]["cpu"]["float"]["seeds"]
    assert row["float"]["returns"] == val["targets"]["cpu"]["float"]["returns"]  # same seeds, same float policy
    assert res.manifest["decision"]["all_int8_cpu"]["int8_model"] == "policy.int8.onnx"
    with console.capture() as cap:
        print_summary(res.validation, res.manifest)
    text = cap.get()
    assert "cpu, policy.int8.onnx (all-INT8)" in text
    assert "policy.int8.cpu.onnx: 2 of 3 layers int8 (weights+activations), 1 float on int8 weights " \
           "(a replayed measured-latency choice: actor.mu/Gemm)" in " ".join(text.split())
    report = (out / "report.md").read_text()
    assert "cpu, policy.int8.onnx (all-INT8)" in report and "2 of 3 layers int8" in report


def test_info_lists_the_all_int8_row_with_its_own_status() -> None:
    from edgeq.describe import info_lines

    def row(model: str, status: str) -> dict:
        return {"float": {"mean": 100.0}, "int8": {"mean": 99.0}, "int8_model": model,
                "paired_difference": {"mean": -1.0, "ci95": [-2.0, 0.5]}, "verdict": {"status": status}}

    val = {"seeds": list(range(20)), "targets": {"cpu": row("policy.int8.cpu.onnx", "INCONCLUSIVE")},
           "all_int8_cpu": row("policy.int8.onnx", "PASS"), "verdict": {"status": "INCONCLUSIVE"}}
    lines = info_lines(_manifest([("a", "int8"), ("b", "float on int8 weights")]), val)
    assert any(line.startswith("validation cpu:") and line.endswith("verdict INCONCLUSIVE") for line in lines)
    assert any(line.startswith("validation cpu, policy.int8.onnx (all-INT8):") and line.endswith("verdict PASS")
               for line in lines)
