"""Structured pruning of hidden units (issue 12 part 5): exact on dead/constant units, shapes shrink, the
pruned+quantized bundle runs and is judged against the unpruned float policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import EdgeqError
from edgeq.quantizers.prune import hidden_layers, prune_hidden_units

ZOO_RUN = Path(__file__).parent / "fixtures" / "zoo" / "logs" / "sac" / "Pendulum-v1_1"


def _mlp(matmul: bool, dead: int = 3, constant: int = 2, seed: int = 0) -> onnx.ModelProto:
    """obs[4] → 16 → relu → 12 → tanh → 2; the first ``dead`` units of layer 1 never fire, the next ``constant``
    have zero input weights and a positive bias (a constant output)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w1[:dead], b1[:dead] = 0.0, -1.0
    w1[dead:dead + constant], b1[dead:dead + constant] = 0.0, 0.7
    w2, b2 = rng.normal(size=(12, 16)).astype(np.float32), rng.normal(size=12).astype(np.float32)
    w3, b3 = rng.normal(size=(2, 12)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    nodes, inits = [], []
    x = "obs"
    for i, (w, b, act) in enumerate(((w1, b1, "Relu"), (w2, b2, "Tanh"), (w3, b3, None))):
        if matmul:
            inits += [numpy_helper.from_array(w.T.copy(), f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"L{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"], name=f"L{i}/bias")]
        else:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], name=f"L{i}", transB=1))
        x = f"z{i}"
        if act:
            nodes.append(helper.make_node(act, [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["actions"], name="out"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, obs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"obs": obs})[0])


def _obs(n: int = 512) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)


@pytest.mark.parametrize("matmul", [False, True])
def test_pruning_dead_and_constant_units_is_exact_and_shapes_shrink(matmul: bool) -> None:
    model = _mlp(matmul)
    hidden, skipped = hidden_layers(model)
    assert [h.width for h in hidden] == [16, 12] and not skipped
    obs = _obs()
    pruned, report = prune_hidden_units(model, obs, 5 / 16)  # exactly the 3 dead + 2 constant units of layer 1
    first = report.layers[0]
    assert (first["width"], first["kept"], first["removed"], first["constant_units_removed"]) == (16, 11, 5, 5)
    w1 = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w0"))
    w2 = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w1"))
    assert w1.shape == ((4, 11) if matmul else (11, 4)) and w2.shape == ((11, 8) if matmul else (8, 11))
    # layer 2 lost 4 of its 12 units, none constant: not exact, and it shows
    assert report.layers[1]["removed"] == 4 and report.layers[1]["constant_units_removed"] == 0
    assert np.abs(_run(pruned, obs) - _run(model, obs)).max() > 1e-4


@pytest.mark.parametrize("matmul", [False, True])
def test_pruning_only_constant_units_keeps_the_outputs(matmul: bool) -> None:
    model = _mlp(matmul)
    obs = _obs()
    # the second hidden layer's last 6 units made constant (zero input weights: tanh(bias))
    w = next(t for t in model.graph.initializer if t.name == "w1")
    arr = numpy_helper.to_array(w).copy()
    if matmul:
        arr[:, 6:] = 0.0
    else:
        arr[6:] = 0.0
    w.CopyFrom(numpy_helper.from_array(arr, "w1"))
    pruned, report = prune_hidden_units(model, obs, 5 / 16)  # 5 of 16, 4 of 12: every one constant
    assert [r["constant_units_removed"] for r in report.layers] == [5, 4]
    assert [r["kept"] for r in report.layers] == [11, 8]
    np.testing.assert_allclose(_run(pruned, obs), _run(model, obs), rtol=1e-5, atol=1e-5)


def test_bad_ratio_and_no_hidden_layer_are_one_line_errors() -> None:
    with pytest.raises(EdgeqError, match=r"\[0, 1\)"):
        prune_hidden_units(_mlp(False), _obs(), 1.0)
    one = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["obs", "w", "b"], ["actions"], name="L", transB=1)], "g",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 2])],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "w"),
         numpy_helper.from_array(np.zeros(2, np.float32), "b")]))
    with pytest.raises(EdgeqError, match="no prunable hidden layer"):
        prune_hidden_units(one, _obs(), 0.25)


def test_pruned_bundle_runs_and_is_judged_against_the_unpruned_float(tmp_path: Path) -> None:
    from edgeq.pipeline import quantize
    from edgeq.validate.validator import ValidationOptions

    out = tmp_path / "b"
    light = ValidationOptions.light(targets=("cpu",), floor_draws=0, latency_calls=0)
    res = quantize(str(ZOO_RUN), None, out, episodes=3, report=False, calib_episodes=2, validation=light,
                   recipe_overrides={"auto": False, "rounding": "nearest"}, prune=0.5)
    rec = res.manifest["pruning"]
    assert rec["ratio"] == 0.5 and rec["file"] == "policy.pruned.fp32.onnx"
    assert all(r["kept"] == r["width"] // 2 for r in rec["layers"])
    q = onnx.load(str(out / "policy.int8.onnx"))
    f = onnx.load(str(out / "policy.fp32.onnx"))
    widths = sorted(int(t.dims[0]) for t in q.graph.initializer if t.name.endswith(".weight.int8") and len(t.dims) == 2)
    full = sorted(int(t.dims[0]) for t in f.graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2)
    assert sum(widths) < sum(full)  # the GEMMs shrank
    for name in ("policy.int8.onnx", "policy.int8.cpu.onnx", "policy.pruned.fp32.onnx"):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        obs = np.zeros((1, int(sess.get_inputs()[0].shape[1])), np.float32)
        assert sess.run(None, {sess.get_inputs()[0].name: obs})[0].shape == (1, 1)
    val = json.loads((out / "validation.json").read_text())
    assert val["targets"]["cpu"]["float_model"] == "policy.fp32.onnx"  # the unpruned reference
    assert "layers" in val["per_layer"]  # measured against the pruned float graph
    assert res.manifest["config"]["quantization"]["prune"] == 0.5
    from edgeq.commands._app import console, print_summary

    with console.capture() as cap:
        print_summary(res.validation, res.manifest)
    text = " ".join(cap.get().split())
    assert "pruned before quantization: 50% of each hidden layer's units" in text
    assert "against the unpruned policy.fp32.onnx" in text
