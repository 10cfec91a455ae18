"""edgeq's ONNX Runtime sessions keep int8 matrix products exact on x86-64 CPUs without VNNI.

Without ``session.x64quantprecision`` ONNX Runtime's CPU provider multiplies int8 activations by int8
weights as u8 x s8 through ``vpmaddubsw`` on SSE4.1 / AVX2 / AVX-512 CPUs without VNNI, which saturates
int16 pair sums: a QDQ layer with full-range weights (+-127, what per-channel absmax gives) then differs
from the model's own semantics by a large part of its output range (docs/ort-int8-x86.md). On a CPU with
VNNI both paths agree, and so does this test: it fails only where the saturation exists and the option is off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fused_helpers import ort_cpu, qdq_mlp

from edgeq.deploy.runtime import DISABLED_ORT_OPTIMIZERS, X64_QUANT_PRECISION, OrtPolicy, session_options


def _one_layer(path: Path, k: int) -> Path:
    """One int8 QDQ layer (int8 weights in [-127, 127], per channel) with a Tanh head, edgeq's layout."""
    return qdq_mlp(path, obs_dim=k, hidden=(), act_dim=64, activation="Relu")


def test_session_options_turn_the_x64_precision_option_on() -> None:
    assert session_options().get_session_config_entry(X64_QUANT_PRECISION[0]) == "1"
    assert session_options("none", 1).get_session_config_entry(X64_QUANT_PRECISION[0]) == "1"


@pytest.mark.parametrize("k", [11, 256])
def test_int8_layer_with_full_range_weights_matches_its_qdq_semantics(k: int, tmp_path: Path) -> None:
    model = _one_layer(tmp_path / "layer.onnx", k)
    # activations over the whole int8 grid and beyond: the saturating case (off by up to 2.4 of a 2.5 range)
    x = (np.random.default_rng(1).uniform(-1.0, 1.0, (512, k)) * 4.0).astype(np.float32)
    ref = OrtPolicy(model, optimization="none").act(x)  # the QDQ semantics: DequantizeLinear, float MatMul
    got = OrtPolicy(model).act(x)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fused_graph_is_integer(tmp_path: Path) -> None:
    """With the option ONNX Runtime still fuses the QDQ layer into MatMulIntegerToFloat (an int8 kernel, not a
    float MatMul), and that session is the one OrtPolicy runs."""
    model = _one_layer(tmp_path / "layer.onnx", 11)
    opts = session_options("all", 1)
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(DISABLED_ORT_OPTIMIZERS))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops
    x = np.random.default_rng(2).uniform(-4.0, 4.0, (64, 11)).astype(np.float32)
    assert np.array_equal(ort_cpu(model, x), OrtPolicy(model).act(x))
