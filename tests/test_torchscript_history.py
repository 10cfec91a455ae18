"""TorchScript history policies (frame stack, causal Transformer, encoder + body .pt files): ingested through
torch.onnx into the same graph as their ONNX twins, history found from the module, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeq.deploy.history import episode_windows
from edgeq.errors import PolicyFormatError
from edgeq.ingest import load_policy
from edgeq.policy import FloatPolicy

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
TS = {"framestack": [FIXTURES / "torchscript-framestack-mlp-pendulum.pt"],
      "transformer": [FIXTURES / "torchscript-transformer-pendulum.pt"],
      "encoder-body": [FIXTURES / "torchscript-encoder-pendulum.pt", FIXTURES / "torchscript-body-pendulum.pt"]}
ONNX = {"framestack": [FIXTURES / "framestack-mlp-pendulum.onnx"],
        "transformer": [FIXTURES / "transformer-pendulum.onnx"],
        "encoder-body": [FIXTURES / "encoder-pendulum.onnx", FIXTURES / "body-pendulum.onnx"]}


def _load(files: list[Path], **kw: object) -> FloatPolicy:
    return load_policy(files[0] if len(files) == 1 else files, **kw)


def _act(fp: FloatPolicy, windows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(fp.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run([fp.output_name], {fp.input_name: windows})[0])


@pytest.mark.parametrize("name", sorted(TS))
def test_torchscript_history_policy_matches_its_onnx_twin(name: str) -> None:
    fp = _load(TS[name], obs_dim=3)
    assert fp.source.kind == "torchscript" and fp.history is not None
    assert (fp.history.length, fp.history.obs_dim, fp.history.reset) == (8, 3, "zeros")
    assert fp.obs_space.shape == (3,) and fp.input_size == 24
    assert fp.source.details["verification"]["max_abs_action_diff"] < 1e-4
    assert [Path(m["path"]).name for m in fp.source.details["modules"]] == [p.name for p in TS[name]]
    rng = np.random.default_rng(0)
    th = rng.uniform(-np.pi, np.pi, (6, 20))
    obs = np.concatenate([episode_windows(np.stack([np.cos(t), np.sin(t), rng.uniform(-8, 8, 20)], -1), 8)
                          for t in th]).astype(np.float32)
    ours, twin = _act(fp, obs), _act(_load(ONNX[name]), obs)
    np.testing.assert_allclose(ours, twin, atol=1e-5)  # the same trained weights, the same policy
    assert np.abs(ours).max() > 0.1  # not a constant


def test_torchscript_transformer_keeps_its_attention_products() -> None:
    from edgeq.graph.analysis import find_activation_matmuls

    fp = _load(TS["transformer"], obs_dim=3)
    assert _load(TS["transformer"], obs_dim=3).model == fp.model  # the export is deterministic
    roles = sorted(a.role for a in find_activation_matmuls(fp.model))
    assert roles == ["attention-scores"] * 2 + ["attention-values"] * 2
    record = json.loads((FIXTURES / "torchscript-transformer-pendulum.json").read_text())
    assert record["weights_from"][0]["path"].endswith("transformer-pendulum.onnx")


def test_torchscript_history_input_errors_name_the_fix() -> None:
    with pytest.raises(PolicyFormatError, match="--env"):
        _load(TS["transformer"])  # no observation size: the module's input shape is unknown
    with pytest.raises(PolicyFormatError, match="none of the inputs"):
        _load(TS["framestack"], obs_dim=3, history=5)  # the module holds 8
    with pytest.raises(PolicyFormatError, match="none of the inputs"):
        _load(TS["framestack"], obs_dim=4)  # the env's observation does not fit
