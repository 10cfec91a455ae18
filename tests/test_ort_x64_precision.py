"""edgeq's ONNX Runtime sessions keep int8 matrix products exact on x86-64 CPUs without VNNI.

Without ``session.x64quantprecision`` ONNX Runtime's CPU provider multiplies int8 activations by int8
weights as u8 x s8 through ``vpmaddubsw`` on SSE4.1 / AVX2 / AVX-512 CPUs without VNNI, which saturates
int16 pair sums: a QDQ layer with full-range weights (+-127, what per-channel absmax gives) then differs
from the model's own semantics by a large part of its output range (docs/ort-int8-x86.md). On a CPU with
VNNI both paths agree, and so does this test: it fails only where the saturation exists and the option is off.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, X64_QUANT_PRECISION, OrtPolicy, session_options


def _qdq_layer(k: int, n: int, seed: int = 0) -> bytes:
    """obs [batch, k] -> Q/DQ (int8, scale 0.02) -> MatMul with per-column int8 weights in [-127, 127]."""
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.02, np.float32), "as"),
             numpy_helper.from_array(np.array(0, np.int8), "az")]
    nodes = [helper.make_node("QuantizeLinear", ["obs", "as", "az"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["actions"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("actions", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _reference(model: bytes, x: np.ndarray) -> np.ndarray:
    """The QDQ semantics: no graph optimization, so DequantizeLinear then a float MatMul."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return np.asarray(ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"obs": x})[0])


def test_session_options_turn_the_x64_precision_option_on() -> None:
    assert session_options().get_session_config_entry(X64_QUANT_PRECISION[0]) == "1"
    assert session_options("none", 1).get_session_config_entry(X64_QUANT_PRECISION[0]) == "1"


@pytest.mark.parametrize("k", [11, 256])
def test_int8_layer_with_full_range_weights_matches_its_qdq_semantics(k: int) -> None:
    model = _qdq_layer(k, 64)
    # activations at the ends of the int8 grid (|x| up to 2.6 > 127 * 0.02): the saturating case
    x = (np.random.default_rng(1).uniform(-1.0, 1.0, (512, k)) * 2.6).astype(np.float32)
    ref = _reference(model, x)
    got = OrtPolicy(model, output_name="actions").act(x)
    # the fused integer kernel ran (not a float fallback) ...
    opts = session_options(intra_op_threads=1)
    opts.optimized_model_filepath = ""
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    assert np.array_equal(np.asarray(sess.run(None, {"obs": x})[0]), got)
    # ... and its int32 accumulation equals the float product of the dequantized tensors
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fused_graph_is_integer() -> None:
    """The option keeps ONNX Runtime's QDQ fusion into MatMulIntegerToFloat (an int8 kernel, not float)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(intra_op_threads=1)
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(_qdq_layer(11, 64), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
        ops = {n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops
